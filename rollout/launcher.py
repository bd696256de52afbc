"""Start an SGLang server as a child process and wait until it answers /health.

The command is configurable so SGLang can live in its own interpreter or container
(`python=["/opt/sglang/bin/python"]`, or `command=["docker", "exec", "sgl", "python", "-m",
"sglang.launch_server"]`); SGLang's own flags are passed through untouched, e.g.
`extra_args=["--tp-size", "2", "--mem-fraction-static", "0.7", "--enable-memory-saver"]`.
Tests launch `python -m opd rollout-server` through the same code, which takes the same
--model-path/--host/--port flags.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from rollout.sglang_client import http_json

SGLANG_COMMAND = ("-m", "sglang.launch_server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LaunchedServer:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: str | None):
        self.proc, self.url, self.log_path = proc, url, log_path

    def terminate(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()


def launch_server(model_path: str, *, host: str = "127.0.0.1", port: int | None = None,
                  python: str = sys.executable, command: Sequence[str] | None = None,
                  extra_args: Sequence[str] = (), env: dict | None = None, log_path: str | None = None,
                  timeout_s: float = 900.0) -> LaunchedServer:
    """Run `[python, -m, sglang.launch_server]` (or `command`) with --model-path/--host/--port plus
    `extra_args`; block until GET /health is 200. Raises RuntimeError with the log tail on failure."""
    port = port or free_port(host)
    argv = list(command) if command is not None else [python, *SGLANG_COMMAND]
    argv += ["--model-path", model_path, "--host", host, "--port", str(port), *extra_args]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = open(log_path, errors="replace").read()[-3000:] if log_path else "(no log_path)"
            raise RuntimeError(f"server exited with code {proc.returncode} while starting: {argv}\n{tail}")
        try:
            status, _ = http_json(url + "/health", method="GET", timeout_s=5)
            if status == 200:
                return LaunchedServer(proc, url, log_path)
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server at {url} not healthy after {timeout_s} s: {argv}")
