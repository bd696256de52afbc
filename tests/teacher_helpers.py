"""Shared helpers for teacher-server tests: an in-process server on 127.0.0.1:0, `opd teacher` as
a user starts it (a subprocess), and a float64 reference computed straight from the definition
with a plain forward of the same model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import torch

from teacher_server.app import TeacherConfig, build_server
from teacher_server.service import ServerConfig


@contextlib.contextmanager
def running_server(model_dir, **kw):
    server_kw = {k: kw.pop(k) for k in list(kw) if k in ServerConfig.__dataclass_fields__}
    server_kw.setdefault("port", 0)
    cfg = TeacherConfig(model=model_dir, dtype=kw.pop("dtype", "fp32"), server=ServerConfig(**server_kw), **kw)
    srv = build_server(cfg)
    srv.start()
    srv.warm_up_and_serve()
    try:
        yield srv, f"127.0.0.1:{srv.port}"
    finally:
        srv.stop(1)


class TeacherProcess:
    """`opd teacher ARGS` as a user starts it, in a subprocess. A thread reads its output into
    `log` (a full pipe would block it). Ready at its first 'opd teacher: serving' line: `grpc` is
    then "127.0.0.1:PORT", and `http` "http://127.0.0.1:PORT" when --http-port was given (its line
    comes first). Raises RuntimeError, with the output's end, when it does not start in
    `timeout` seconds (or, with `need_http`, has no HTTP front). As a context manager it stops
    the server at the end and checks that it exited with status 0."""

    def __init__(self, *args, env: dict | None = None, timeout: float = 180.0, need_http: bool = False):
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "opd", "teacher", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        self.grpc: str | None = None
        self.http: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.grpc or (need_http and not self.http):
            self.stop()
            raise RuntimeError(f"opd teacher {' '.join(map(str, args))} did not start:\n" + "".join(self.log[-30:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("opd teacher: HTTP"):
                self.http = f"http://127.0.0.1:{int(line.rsplit(':', 1)[1])}"
            if line.startswith("opd teacher: serving") and self.grpc is None:
                self.grpc = f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
                self._ready.set()
        self._ready.set()

    def __enter__(self) -> "TeacherProcess":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """`stop()`; leaving the block normally, the server must have exited with status 0."""
        self.stop()
        if exc_type is None:
            assert self.proc.returncode == 0, "".join(self.log[-20:])

    def output(self, timeout: float = 60.0) -> str:
        """All it wrote, once it has exited (waits up to `timeout`; TimeoutExpired if it runs on)."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return "".join(self.log)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful drain), then kill if it has not exited within `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def reference_logprobs(model_dir, ids, temperature=1.0):
    """float64 log_softmax(logits / T) of a direct forward: row t = distribution of ids[t+1]."""
    from transformers import AutoModelForCausalLM

    m = reference_logprobs.cache.get(model_dir)
    if m is None:
        m = reference_logprobs.cache[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = m(torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]).logits[0]
    return torch.log_softmax(logits / temperature, dim=-1).numpy()


reference_logprobs.cache = {}
