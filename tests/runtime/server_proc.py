"""Run `tetri-serve` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, *args: str, ready_timeout_s: float = 180.0) -> None:
        self.port = free_port()
        self.args = ["--port", str(self.port), "--log-level", "warning", *args]
        self.ready_timeout_s = ready_timeout_s
        self.log = tempfile.NamedTemporaryFile(prefix="tetri-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProc:
        self.proc = subprocess.Popen([sys.executable, "-m", "tetri.cli", *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tetri-serve exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tetri-serve not healthy in {self.ready_timeout_s}s:\n{self.log_tail()}")

    def get(self, path: str) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=10) as r:
                body = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def workers(self) -> list[dict]:
        return self.get("/workers")[1]["workers"]

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """True once no request runs and every worker's KV pool is empty (board rows refresh
        every 0.1 s, so this polls)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = self.get("/workers")[1]
            live = [r for r in body["workers"] if r["state"] != "dead"]
            if body["num_running"] == 0 and all(r["kv_blocks_used"] == 0 for r in live):
                return True
            time.sleep(0.1)
        return False

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise

    def log_tail(self, n: int = 60) -> str:
        with open(self.log.name) as f:
            return "".join(f.readlines()[-n:])
