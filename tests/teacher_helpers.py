"""Shared helpers for teacher-server tests: an in-process server on 127.0.0.1:0 and a float64
reference computed straight from the definition with a plain forward of the same model."""

from __future__ import annotations

import contextlib

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
