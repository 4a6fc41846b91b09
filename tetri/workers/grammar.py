"""Grammar-constrained decoding with xgrammar, inside the workers.

A request's `SamplingParams.structured_outputs` (a `StructuredOutputsParams`) travels with it
to every worker that holds it: the prefill worker (which samples the first token), the decode
worker of its handoff, the mixed worker of colocated mode, and whichever worker a migration or
a restart gives it to. Each worker compiles the spec with its own `GrammarCompiler` (cached by
`spec.key`, so one schema compiles once per worker) and gives each sequence its own
`GrammarMatcher` on the first step that samples it, advanced through the tokens the grammar has
already seen: `prefix_token_ids` (a migrated continuation's output, now in its prompt) and
`Seq.output_ids` (after a handoff: the prefill worker's first token). That is the whole state a
matcher has, so nothing but the spec and the tokens crosses a process boundary.

Each step (`GrammarRuntime.mask`, called by `Executor.run` before the sampler): the rows of
constrained sequences get their next-token bitmask (a matcher that has accepted a stop token
allows only stop tokens), and `xgr.apply_token_bitmask_inplace` sets every disallowed logit to
-inf on the logits' own device (xgrammar's CPU kernel, or its Triton kernel on CUDA). After
sampling, `accept` advances each matcher by its sampled token; a token the grammar refuses
(possible only when something after the mask forced a disallowed one) ends that sequence with
an error rather than letting the output leave its grammar.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any

from tetri.types import StructuredOutputsParams

log = logging.getLogger("tetri.grammar")
CACHE_ENTRIES = 256
"""Compiled grammars kept per process (least recently used dropped first)."""
JSON_OBJECT_SCHEMA = '{"type": "object"}'
COMPILE_THREADS = 2


class GrammarError(ValueError):
    """The spec does not compile (invalid schema, regex or grammar): the message says why."""


def load_hf_tokenizer(model_dir: str):
    """The checkpoint's tokenizer as transformers loads it (the fast one where there is a
    tokenizer.json, like the front's)."""
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenizer_info(model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...] | list[int]):
    """xgrammar's view of the vocabulary: every token's bytes, padded to the model's logits width
    (`vocab_size`), with the model's EOS ids as the stop tokens a finished grammar allows."""
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(load_hf_tokenizer(model_dir), vocab_size=vocab_size,
                                              stop_token_ids=list(eos_token_ids))


def choice_grammar(choices: tuple[str, ...] | list[str]) -> str:
    """EBNF accepting exactly one of `choices` (xgrammar's string literals take JSON escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def compile_spec(compiler, spec: StructuredOutputsParams):
    """Compile `spec` with an xgrammar `GrammarCompiler`; GrammarError when it does not compile."""
    try:
        kind = spec.kind
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    try:
        if kind == "json":
            return compiler.compile_json_schema(spec.json, any_whitespace=spec.any_whitespace, strict_mode=spec.strict)
        if kind == "json_object":
            return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=spec.any_whitespace,
                                                strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(spec.regex)
        if kind == "choice":
            if not spec.choice or any(not c for c in spec.choice):
                raise GrammarError("choice needs at least one non-empty string")
            return compiler.compile_grammar(choice_grammar(spec.choice))
        if kind == "grammar":
            return compiler.compile_grammar(spec.grammar)
        return compiler.compile_structural_tag(spec.structural_tag)
    except GrammarError:
        raise
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types
        raise GrammarError(_clean(str(exc))) from None


def _clean(message: str) -> str:
    """xgrammar's C++ messages start with a timestamp and a source location: keep the reason."""
    first = message.strip().splitlines()[0] if message.strip() else "does not compile"
    if first.startswith("[") and "] " in first:
        first = first.split("] ", 1)[1]
    if ".cc:" in first and ": " in first:
        first = first.split(": ", 1)[1]
    return first


class GrammarCache:
    """Compiled grammars by spec key (one `GrammarCompiler` per process, built on first use)."""

    def __init__(self, info_factory, max_entries: int = CACHE_ENTRIES) -> None:
        self._info_factory = info_factory
        self._compiler = None
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self.compile_s = 0.0

    @property
    def compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            self._compiler = xgr.GrammarCompiler(self._info_factory(), max_threads=COMPILE_THREADS)
        return self._compiler

    def get(self, spec: StructuredOutputsParams):
        key = spec.key
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        start = time.perf_counter()
        compiled = compile_spec(self.compiler, spec)
        self.compile_s += time.perf_counter() - start
        self._entries[key] = compiled
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return compiled


class _Broken:
    """A sequence whose grammar could not be built: sampled unmasked, then ended with an error."""

    def __init__(self, why: str) -> None:
        self.why = why


class GrammarRuntime:
    """The executor's grammar hook: `mask` before sampling, `accept` after (see the module doc)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(t for t in eos_token_ids if 0 <= t < vocab_size)
        self.cache = GrammarCache(lambda: tokenizer_info(model_dir, vocab_size, self.eos_token_ids))
        self._bitmask = None
        self._stop_row = None

    @staticmethod
    def constrained(seqs) -> list[int]:
        return [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]

    def check(self, spec: StructuredOutputsParams) -> None:
        """Compile now (the offline LLM's validation): GrammarError when it does not compile."""
        self.cache.get(spec)

    def matcher(self, seq):
        """The sequence's matcher, built on first use and advanced through the tokens it has seen."""
        if seq.grammar is not None:
            return seq.grammar
        import xgrammar as xgr

        spec = seq.params.structured_outputs
        try:
            m = xgr.GrammarMatcher(self.cache.get(spec))
        except GrammarError as exc:
            log.error("%s: structured_outputs does not compile here: %s", seq.req_id, exc)
            seq.grammar = _Broken(str(exc))
            return seq.grammar
        for i, tok in enumerate((*spec.prefix_token_ids, *seq.output_ids)):
            if not m.accept_token(tok):
                seq.grammar = _Broken(f"token {tok} at output position {i} is outside the grammar")
                log.error("%s: %s", seq.req_id, seq.grammar.why)
                return seq.grammar
        seq.grammar = m
        return m

    def mask(self, logits, seqs) -> list[int]:
        """Set the logits the grammars forbid to -inf in place; the constrained rows."""
        rows = self.constrained(seqs)
        if not rows:
            return rows
        import torch
        import xgrammar as xgr

        bitmask = self._bitmask_for(len(seqs))
        masked = []
        for i in rows:
            m = self.matcher(seqs[i])
            if isinstance(m, _Broken):
                continue
            if m.is_terminated():  # accepted a stop token already (ignore_eos): only stop tokens follow
                bitmask[i].copy_(self._stop_mask())
            else:
                m.fill_next_token_bitmask(bitmask, i)
            masked.append(i)
        if masked:
            mask = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device, non_blocking=True)
            with torch.inference_mode():
                xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=masked)
        return rows

    def accept(self, seqs, tokens: list[int]) -> set[int]:
        """Advance each constrained row's matcher by its token; the rows whose token was refused."""
        refused = set()
        for i in self.constrained(seqs):
            m = seqs[i].grammar
            if isinstance(m, _Broken):
                refused.add(i)
            elif m is not None and not m.is_terminated() and not m.accept_token(tokens[i]):
                log.error("%s: sampled token %d is outside its grammar", seqs[i].req_id, tokens[i])
                refused.add(i)
        return refused

    def _bitmask_for(self, rows: int):
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = xgr.allocate_token_bitmask(max(rows, 8), self.vocab_size)
        return self._bitmask

    def _stop_mask(self):
        if self._stop_row is None:
            import torch

            words = -(-self.vocab_size // 32)
            row = [0] * words
            for t in self.eos_token_ids:
                row[t // 32] |= 1 << (t % 32)
            self._stop_row = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in row], dtype=torch.int32)
        return self._stop_row


def serve_checks(conn, model_dir: str, vocab_size: int, eos_token_ids: list[int]) -> None:
    """The front's grammar-check process (`tetri/server/grammar_check.py`): compile each spec it
    is sent and answer (ok, error message, compile seconds). The front imports no torch, and
    xgrammar does; so the front's checks run here. Ends when the front's end of the pipe closes."""
    import msgspec

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cache = GrammarCache(lambda: tokenizer_info(model_dir, vocab_size, eos_token_ids))
    cache.compiler  # noqa: B018 - build the tokenizer info before saying ready
    conn.send(("ready", True, "", 0.0))
    decoder = msgspec.msgpack.Decoder(StructuredOutputsParams)
    while True:
        try:
            job_id, raw = conn.recv()
        except (EOFError, OSError):
            return
        start = time.perf_counter()
        try:
            cache.get(decoder.decode(raw))
            ok, why = True, ""
        except GrammarError as exc:
            ok, why = False, str(exc)
        conn.send((job_id, ok, why, time.perf_counter() - start))
