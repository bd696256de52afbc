"""`opd teacher --engine sglang` against a real SGLang server (GPU, `pip install sglang==0.5.23`).

The default suite checks the engine against `opd rollout-server` (tests/test_teacher_sglang.py),
whose answers were written from SGLang's source; this test checks the same numbers against
SGLang itself: the tiny model served by `python -m sglang.launch_server --dtype float32`, the
SGLang-fronted teacher compared with opd's HF engine on the same GPU and with a float64 forward.
Run by the lead on a GPU machine:

    DS_ACCELERATOR=cuda python -m pytest -q -m gpu tests/test_teacher_sglang_gpu.py
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from teacher_server.client import ScoreSettings, TeacherClient
from tests.teacher_helpers import reference_logprobs, running_server

pytestmark = pytest.mark.gpu

GPU_BOUND = 2e-3   # fp32 on both sides, different attention / GEMM kernels (TF32 off in SGLang's fp32 path)


@pytest.fixture(scope="module")
def sglang_url(tiny_model_dir, tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("needs `pip install sglang==0.5.23`")
    from rollout.launcher import launch_server

    log = tmp_path_factory.mktemp("sglang") / "sglang.log"
    with launch_server(tiny_model_dir, python=sys.executable, log_path=str(log), timeout_s=600,
                       extra_args=["--dtype", "float32", "--mem-fraction-static", "0.3", "--disable-cuda-graph"]) as srv:
        yield srv.url


def test_real_sglang_equals_the_hf_engine(sglang_url, tiny_model_dir):
    from tests.test_teacher_sglang import Teacher, _seqs

    seqs, starts, ends, extra = _seqs()
    settings = ScoreSettings(top_k=8, statistics=("sampled", "topk", "tail", "extra"), value_encoding="fp32")
    t = Teacher(tiny_model_dir, sglang_url)
    try:
        with TeacherClient(t.grpc, max_retries=0) as c:
            got = c.score(seqs, starts, ends, extra_ids=extra, settings=settings)
    finally:
        t.stop()
    with running_server(tiny_model_dir, device="cuda", max_top_k=32) as (_, url), TeacherClient(url) as c:
        want = c.score(seqs, starts, ends, extra_ids=extra, settings=settings)
    for b, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g.sampled_logprobs, w.sampled_logprobs, atol=GPU_BOUND, rtol=0)
        np.testing.assert_allclose(np.sort(g.topk_logprobs, 1), np.sort(w.topk_logprobs, 1), atol=GPU_BOUND, rtol=0)
        np.testing.assert_allclose(g.tail_logmass, w.tail_logmass, atol=GPU_BOUND, rtol=0)
        np.testing.assert_allclose(g.extra_logprobs, w.extra_logprobs, atol=GPU_BOUND, rtol=0)
        ids = np.asarray(seqs[b])
        rows = np.arange(starts[b] - 1, ends[b] - 1)
        ref = reference_logprobs(tiny_model_dir, ids)
        np.testing.assert_allclose(g.sampled_logprobs, ref[rows, ids[rows + 1]], atol=GPU_BOUND, rtol=0)
