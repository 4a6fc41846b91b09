"""The front's check that a request's grammar compiles, within the server's bounds, before the
request is admitted: an invalid schema, regex or grammar is a 400 naming the field, and so is
one past `--max-grammar-bytes` or one whose compile takes longer than
`--grammar-compile-timeout-s`.

xgrammar imports torch, which the front process never loads; so the compiles run in one
spawned child process (`tetri.workers.grammar.serve_checks`, started on the first structured
request, ended when the front ends), one at a time, from a worker thread, so the event loop keeps
streaming. A compile past the bound is ended by killing the child (a fresh one starts for the
next check): nothing keeps compiling after its 400. Results are cached by `spec.key` (hits and
misses, and each compile's time, go to /metrics), and two requests with the same new grammar
share one compile. The workers compile the same spec again from their own cache
(`tetri/workers/grammar.py`); only the check runs here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import multiprocessing as mp
import threading
from collections import OrderedDict

import msgspec

from tetri.server.errors import ApiError, bad_request
from tetri.server.structured import spec_bytes
from tetri.types import StructuredOutputsParams

log = logging.getLogger("tetri.server")
CACHE_ENTRIES = 4096
START_TIMEOUT_S = 300.0
"""How long the check process may take to import xgrammar and read the vocabulary (loaded CI
machines are slow); separate from the compile bound."""


def _child_main(conn, model_dir: str, vocab_size: int, eos_token_ids: list[int]) -> None:
    from tetri.workers.grammar import serve_checks

    serve_checks(conn, model_dir, vocab_size, eos_token_ids)


class _Timeout(Exception):
    pass


class _Started(Exception):
    """The check process could not be started (not the request's fault)."""


class GrammarChecker:
    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: list[int], *, max_bytes: int,
                 timeout_s: float) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._thread = cf.ThreadPoolExecutor(1, thread_name_prefix="tetri-grammar-check")
        self._lock = threading.Lock()  # guards _results and _inflight (callers may run on several loops)
        self._results: OrderedDict[str, tuple[bool, str]] = OrderedDict()
        self._inflight: dict[str, cf.Future] = {}
        self._jobs = itertools.count()
        self._encode = msgspec.msgpack.Encoder().encode

    async def check(self, spec: StructuredOutputsParams, param: str, metrics=None) -> None:
        """Return when `spec` compiles; else raise the 400 naming `param`."""
        size = spec_bytes(spec)
        if size > self.max_bytes:
            raise bad_request(f"{param} is {size} bytes; this server compiles grammars of at most {self.max_bytes} bytes "
                              "(--max-grammar-bytes)", param)
        key = spec.key
        with self._lock:
            cached = self._results.get(key)
            if cached is not None:
                self._results.move_to_end(key)
            fut = self._inflight.get(key) if cached is None else None
            new = cached is None and fut is None
            if new:
                fut = self._inflight[key] = self._thread.submit(self._compile, key, spec)
        if metrics is not None:
            metrics.observe_grammar_cache(hit=not new)
        if cached is None:
            ok, why, seconds = await asyncio.wrap_future(fut)
            if new and metrics is not None and seconds is not None:
                metrics.observe_grammar_compile(seconds)
            cached = (ok, why)
        ok, why = cached
        if not ok:
            raise bad_request(f"{param} is not a valid grammar: {why}" if why != "timeout" else
                              f"{param} took longer than {self.timeout_s:g} s to compile (this server's bound, "
                              "--grammar-compile-timeout-s); simplify it", param)

    # ---- the worker thread -----------------------------------------------------------------
    def _compile(self, key: str, spec: StructuredOutputsParams) -> tuple[bool, str, float | None]:
        try:
            try:
                ok, why, seconds = self._roundtrip(spec)
            except _Timeout:
                log.warning("a grammar compile passed %.3g s: ended it", self.timeout_s)
                ok, why, seconds = False, "timeout", None
            except (EOFError, OSError):  # the process died on this grammar: the grammar's fault, not a 500
                log.error("the grammar check process died compiling a request's grammar")
                self._stop_child()
                ok, why, seconds = False, "compiling it crashed xgrammar", None
            with self._lock:
                self._results[key] = (ok, why)
                if len(self._results) > CACHE_ENTRIES:
                    self._results.popitem(last=False)
            return ok, why, seconds
        except Exception as exc:  # noqa: BLE001 - the check process failed: an error, not a verdict (not cached)
            log.exception("grammar check failed")
            raise ApiError(500, f"The grammar check failed: {exc}") from None
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _roundtrip(self, spec: StructuredOutputsParams) -> tuple[bool, str, float]:
        self._ensure_child()
        job = next(self._jobs)
        self._conn.send((job, self._encode(spec)))
        if not self._conn.poll(self.timeout_s):
            self._stop_child()
            raise _Timeout()
        job_back, ok, why, seconds = self._conn.recv()
        if job_back != job:
            raise RuntimeError(f"grammar check answered job {job_back}, expected {job}")
        return ok, why, seconds

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop_child()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, args=(child, self.model_dir, self.vocab_size, self.eos_token_ids),
                                 name="tetri-grammar-check", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise RuntimeError(f"the grammar check process did not start within {START_TIMEOUT_S:.0f} s")
            parent.recv()  # ("ready", ...)
        except (EOFError, OSError, RuntimeError) as exc:
            self._stop_child()
            raise _Started(f"the grammar check process failed to start: {exc or type(exc).__name__}") from None

    def _stop_child(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.join(10)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._stop_child()
