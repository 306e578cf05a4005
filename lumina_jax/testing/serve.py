"""`python -m lumina_jax.serve` in a child process on a free loopback port, and a small HTTP client for it
(the tests and benchmarks/serve_load.py use both)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, str, bytes]:
    """GET (or POST `body` as JSON) -> (status, content type, body bytes); 4xx/5xx answers are returned too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


class ServerProcess:
    """Starts the server with `args`, waits until GET /api/info answers; `stop()` (or the with-block) ends it."""

    def __init__(self, args: list[str] = (), log_path: str | os.PathLike | None = None, timeout: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else None
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "lumina_jax.serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if log is not subprocess.DEVNULL:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}: {self.log_tail()}")
            try:
                if request(self.url + "/api/info", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not answer within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path and self.log_path.exists() else ""

    def info(self) -> dict:
        return json.loads(request(self.url + "/api/info")[2])

    def t2i(self, **body) -> tuple[int, str, bytes]:
        return request(self.url + "/api/t2i", body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
