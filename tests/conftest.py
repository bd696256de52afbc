import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny built-in model (random weights, vocab 512), built once per test session."""
    from opd.tiny import build_model

    return str(build_model(tmp_path_factory.mktemp("tiny") / "model", size="test", seed=0))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny teacher (seed 1) and student (seed 2, the teacher's tokenizer), built once per test
    session and shared by the trainer and rollout-engine tests (read-only: tests write elsewhere)."""
    from opd.tiny import build_model

    root = tmp_path_factory.mktemp("models")
    teacher = build_model(root / "teacher", "test", seed=1)
    student = build_model(root / "student", "test", seed=2, tokenizer_dir=teacher)
    return str(teacher), str(student)
