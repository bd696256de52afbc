"""Shared set-up of the Triton kernel tests: on a GPU machine they are `gpu` tests; with
TRITON_INTERPRET=1 the same tests run on the CPU under Triton's interpreter (smaller shapes)."""
import os

import pytest

from teacher_server.kernels import HAVE_TRITON

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERP else "cuda"
MARKS = [pytest.mark.skipif(not HAVE_TRITON, reason="triton does not import")] + ([] if INTERP else [pytest.mark.gpu])


def force_triton(monkeypatch, module):
    """Force `module`'s Triton path (a failure raises instead of falling back to eager) and drop
    its cached self-test results."""
    monkeypatch.setattr(module, "KERNELS", "triton")
    monkeypatch.setattr(module, "_STATE", {})
    return monkeypatch
