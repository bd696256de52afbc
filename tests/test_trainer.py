"""The trainer through real parts: a teacher server (in-process gRPC on 127.0.0.1 or a separate
process), DeepSpeed ZeRO with the CPU optimizer, the local rollout engine."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from student_trainer.config import ConfigError, load_config
from tests.teacher_helpers import running_server


def _cfg(student, url, out, *extra):
    return load_config(None, [f"model.student={student}", "model.dtype=fp32", "data.task=arithmetic",
                              f"teacher.url={url}", f"run.out_dir={out}", "rollout.max_new_tokens=12",
                              "data.prompts_per_step=4", "rollout.n=2", "optim.lr=3e-3", "run.plot=false",
                              "run.export_hf=false", "run.progress=false", "teacher.max_backoff_s=0.5", *extra])


def _params(trainer):
    return {k: v.clone() for k, v in trainer.engine.full_state_dict().items()}


@pytest.mark.parametrize("args,message", [
    (["loss.divergnce=x"], "unknown config key loss.divergnce; valid keys of [loss]"),
    (["losss.divergence=x"], "unknown config section [losss]"),
    (["optim.zero_stage=4"], "optim.zero_stage: 4 is not one of 2, 3"),
    (["rollout.n=two"], "rollout.n: 'two' is not a valid int"),
    (["loss.token_keep_ratio=0"], "loss.token_keep_ratio: 0.0 must be in (0, 1]"),
    (["loss.objective=dpo"], "loss.objective: 'dpo' is not one of opd, grpo, opd+grpo, sft"),
])
def test_bad_config_names_the_key(args, message):
    base = ["model.student=/x", "data.task=arithmetic", "teacher.url=127.0.0.1:1"]
    with pytest.raises(ConfigError) as ei:
        load_config(None, base + args)
    assert message in str(ei.value)


def test_fp32_weight_grad_override_reaches_the_loss_config():
    from student_trainer.trainer import _loss_config

    base = ["model.student=/x", "data.task=arithmetic", "teacher.url=127.0.0.1:1"]
    assert _loss_config(load_config(None, base).loss, ()).fp32_weight_grad is True
    cfg = load_config(None, base + ["--loss.fp32_weight_grad=false"])
    assert cfg.loss.fp32_weight_grad is False
    assert _loss_config(cfg.loss, (("reverse_kl", 1.0),)).fp32_weight_grad is False
    with pytest.raises(ConfigError, match="loss.fp32_weight_grad: 'maybe' is not a valid bool"):
        load_config(None, base + ["loss.fp32_weight_grad=maybe"])


def test_bad_config_file_and_cli_exit_code(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"loss": {"divergence": "reverse_kl",}}')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(str(bad))
    r = subprocess.run([sys.executable, "-m", "opd", "train", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "config error" in r.stderr
    r = subprocess.run([sys.executable, "-m", "opd", "train", "--model.student=/x", "--data.task=arithmetic",
                        "--teacher-url", "127.0.0.1:1", "--optim.lr=-1", "--print-config"], capture_output=True, text=True)
    assert r.returncode == 2 and "optim.lr: -1.0 must be > 0" in r.stderr


def test_train_device_resolution(monkeypatch):
    from student_trainer.trainer import resolve_train_device

    assert resolve_train_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.device=cuda:1: CUDA is not available"):
            resolve_train_device("cuda:1")
        return
    n = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", str(n - 1))
    monkeypatch.setenv("WORLD_SIZE", str(n))
    assert resolve_train_device("cuda") == f"cuda:{n - 1}"  # torchrun: the process's own GPU
    with pytest.raises(ConfigError, match="allowed: cuda:0"):
        resolve_train_device(f"cuda:{n}")


def test_tool_task_rollouts_run_the_tool_loop(models, tmp_path):
    """data.task=calc: the trainer's rollout engine is the multi-turn tool loop (a step of GRPO,
    which needs no teacher, runs through it); single-turn tasks keep the plain engine."""
    from rollout.tasks.tool_engine import ToolEngine
    from student_trainer.trainer import Trainer, task_tools

    assert task_tools("calc") == ("calculator",)
    assert task_tools("sort") == () and task_tools("arithmetic") == () and task_tools("") == ()
    _, student = models
    cfg = load_config(None, [f"model.student={student}", "model.dtype=fp32", "data.task=calc",
                             "loss.objective=grpo", f"run.out_dir={tmp_path}", "rollout.max_new_tokens=24",
                             "data.prompts_per_step=2", "rollout.n=2", "run.steps=1", "run.plot=false",
                             "run.export_hf=false", "run.progress=false"])
    tr = Trainer(cfg)
    try:
        assert isinstance(tr.rollout, ToolEngine)
        last = tr.run()
        assert last["step"] == 1 and last["tokens"] > 0 and last["turns"] >= 1.0
    finally:
        tr.close()


def test_loss_falls_and_resume_is_exact(models, tmp_path):
    from student_trainer.trainer import Trainer

    teacher, student = models
    with running_server(teacher) as (_, url):
        # uninterrupted: 6 steps
        a = Trainer(_cfg(student, url, tmp_path / "a", "run.steps=6"))
        hist = []
        a.on_step = lambda step, m: hist.append(m["loss"])
        a.run()
        full = _params(a)
        a.close()
        assert hist[-1] < hist[0], f"loss did not fall: {hist}"
        rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        for key in ("loss/reverse_kl", "loss/entropy", "teacher_tail_s", "rollout_s", "train_s",
                    "wire_bytes_per_token", "tokens_per_s", "teacher_wait_frac"):
            assert key in rows[-1]

        # interrupted after step 3 (checkpoint every 3), then resumed
        class Stop(Exception):
            pass

        def boom(step, m):
            if step == 3:
                raise Stop

        b = Trainer(_cfg(student, url, tmp_path / "b", "run.steps=6", "run.save_every=3"), on_step=boom)
        with pytest.raises(Stop):
            b.run()
        at_stop, lr_at_stop = _params(b), b.engine.lr
        b.close()
        assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step3"
        c = Trainer(_cfg(student, url, tmp_path / "b", "run.steps=6", "run.save_every=3"), resume=True)
        assert c.start_step == 3 and c.engine.lr == lr_at_stop
        loaded = _params(c)
        for k in at_stop:  # the checkpoint restores the interrupted state bit for bit
            torch.testing.assert_close(loaded[k], at_stop[k], rtol=0, atol=0, msg=f"{k} not restored exactly")
        c.run()
        resumed = _params(c)
        c.close()
    # The continued run follows the uninterrupted one. Not bit for bit: the teacher server and the
    # rollout engine batch whatever is queued, and batch composition moves fp32 results by ~1e-7.
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-4, msg=f"{k} differs after resume")
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def _start_teacher(model, port=0):
    proc = subprocess.Popen([sys.executable, "-m", "opd", "teacher", "--model", model, "--port", str(port),
                             "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if "serving" in line and "on 127.0.0.1:" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(line.rsplit(":", 1)[1])
    raise RuntimeError("teacher did not start")


def test_teacher_restart_mid_run_loses_no_step(models, tmp_path):
    from student_trainer.trainer import Trainer

    teacher, student = models
    proc, port = _start_teacher(teacher)
    restarted = {}

    def on_step(step, m):
        if step == 2:  # the teacher dies; a new one comes up on the same port a little later
            proc.send_signal(signal.SIGKILL)
            proc.wait()

            def later():
                time.sleep(2.0)
                restarted["proc"] = _start_teacher(teacher, port)[0]

            threading.Thread(target=later, daemon=True).start()

    tr = Trainer(_cfg(student, f"127.0.0.1:{port}", tmp_path / "r", "run.steps=5"), on_step=on_step)
    try:
        tr.run()
        retries = tr.teacher.retries
    finally:
        tr.close()
        if "proc" in restarted:
            restarted["proc"].kill()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert retries > 0


def test_two_processes_with_torchrun_share_one_teacher(models, tmp_path):
    """torchrun, 2 ranks (gloo on CPU): each rank rolls out its own prompts; gradients are
    all-reduced, so both ranks report the same gradient norm; rank 0 writes the checkpoints."""
    teacher, student = models
    with running_server(teacher) as (_, url):
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "opd", "train",
             "--teacher-url", url, f"--model.student={student}", "--model.dtype=fp32", "--data.task=arithmetic",
             "--data.prompts_per_step=2", "--rollout.n=2", "--rollout.max_new_tokens=8", "--run.steps=2",
             "--run.save_every=1", f"--run.out_dir={tmp_path / 'mp'}", "--run.plot=false", "--run.progress=false",
             "--log-level", "WARNING"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    finals = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(finals) == 2 and finals[0]["step"] == finals[1]["step"] == 2
    assert finals[0]["grad_norm"] == pytest.approx(finals[1]["grad_norm"], rel=1e-6)
    assert (tmp_path / "mp" / "checkpoints" / "latest").read_text() == "step2"
    assert (tmp_path / "mp" / "hf" / "model.safetensors").exists()


def test_staleness_one_overlaps_and_lags_at_most_one_step(models, tmp_path):
    from student_trainer.trainer import Trainer

    teacher, student = models
    with running_server(teacher) as (_, url):
        tr = Trainer(_cfg(student, url, tmp_path / "s1", "run.steps=4", "rollout.staleness=1"))
        tr.run()
        tr.close()
    rows = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["policy_lag"] in (0, 1) for r in rows)
    assert any(r["policy_lag"] == 1 for r in rows[1:])  # rollouts really ran one step ahead
    assert all(0.0 <= r["teacher_wait_frac"] <= 1.0 for r in rows)
