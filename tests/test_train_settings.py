"""Every documented trainer setting run through the trainer as `opd train` runs it (the Trainer from
`load_config`, a real teacher server on 127.0.0.1, real DeepSpeed, the tiny built-in models), each
with an assertion about what the setting does: loss values against float64 references computed
from the definitions, the term names per step, the tokens that enter the loss, the group weights
against a hand computation from the step's rewards, where the rollouts came from. Plus `opd demo`
and `opd eval` through their command lines.

Time: the trainer runs share one teacher server and the built models (module fixtures), several
settings share a run where they do not interfere, and each run takes one to three steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from student_trainer.config import DIVERGENCES, load_config
from tests.teacher_helpers import running_server
from tests.trainer_helpers import capture_steps

ROOT = Path(__file__).resolve().parents[1]


REWARD = "tests.test_train_settings:parity_reward"  # loss.reward_fn / --reward of the data-file runs


def parity_reward(text: str, answer) -> float:
    """A reward for the data-file runs that varies between rollouts (random tiny models never solve
    a problem) and depends on the answer the file gives for the prompt."""
    return float((len(text) + int(answer)) % 2 == 0)


# ---- shared models, one teacher server --------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from opd.tiny import build_model

    root = tmp_path_factory.mktemp("settings")
    teacher = build_model(root / "teacher", "test", seed=1)
    # a confident teacher (logits x 8): its distributions are far from the near-uniform random
    # student's, so the divergences differ clearly and teacher rollouts are unlike student rollouts
    m = AutoModelForCausalLM.from_pretrained(str(teacher))
    with torch.no_grad():
        m.model.norm.weight.mul_(8.0)
    m.save_pretrained(str(teacher))
    student = build_model(root / "student", "test", seed=2, tokenizer_dir=teacher)
    return str(teacher), str(student)


@pytest.fixture(scope="module")
def teacher_url(models):
    with running_server(models[0]) as (_, url):
        yield url


def _args(student, out, *extra, url=None):
    base = [f"model.student={student}", "model.dtype=fp32", f"run.out_dir={out}", "rollout.max_new_tokens=8",
            "data.prompts_per_step=2", "rollout.n=2", "optim.lr=1e-3", "run.plot=false", "run.export_hf=false",
            "run.progress=false", "run.tensorboard=false", "teacher.max_backoff_s=0.5"]
    if url:
        base.append(f"teacher.url={url}")
    if not any(e.startswith("data.path=") for e in extra):
        base.append("data.task=arithmetic")
    return base + list(extra)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---- float64 references from the definitions ------------------------------------------------------------
class Reference:
    """The student in float64: per response token, log pS over the vocabulary."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    def load(self, state_dict):
        self.model.load_state_dict({k: v.double() for k, v in state_dict.items()})

    def logprobs(self, s):
        with torch.no_grad():
            logits = self.model(torch.tensor([s.token_ids])).logits[0]
        return torch.log_softmax(logits[s.prompt_len - 1:len(s.token_ids) - 1], -1)


def _kl(lp, lq):
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def reference_terms(lp, s, clip_eps=0.2) -> dict:
    """Per response token, every loss term in float64 on the teacher's top-k + tail support."""
    t = s.teacher
    out = {}
    y = torch.tensor(s.token_ids[s.prompt_len:])
    lpy = lp.gather(1, y[:, None])[:, 0]
    old = torch.tensor(s.rollout_logprobs, dtype=torch.float64)
    ratio = (lpy - old).exp()

    def clipped(adv):
        return -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)

    out["sft"] = -lpy
    out["ppo"] = clipped(torch.full_like(lpy, s.advantage))
    if t:
        ids = torch.from_numpy(np.asarray(t["topk_ids"])).long()
        lT = torch.cat([torch.from_numpy(np.asarray(t["topk_logprobs"], dtype=np.float64)),
                        torch.from_numpy(np.asarray(t["tail_logmass"], dtype=np.float64))[:, None]], 1)
        rest = torch.logsumexp(lp.scatter(1, ids, -math.inf), -1)
        lS = torch.cat([lp.gather(1, ids), rest[:, None]], 1)
        pT, pS = lT.exp(), lS.exp()
        out["forward_kl"] = _kl(lT, lS)
        out["reverse_kl"] = _kl(lS, lT)
        lm = (0.5 * pT + 0.5 * pS).log()
        out["jsd"] = 0.5 * _kl(lT, lm) + 0.5 * _kl(lS, lm)
        out["skew_forward_kl"] = _kl(lT, (0.1 * pT + 0.9 * pS).log())
        out["skew_reverse_kl"] = _kl(lS, (0.1 * pS + 0.9 * pT).log())
        out["tv"] = 0.5 * (pT - pS).abs().sum(-1)
        lty = torch.from_numpy(np.asarray(t["sampled_logprobs"], dtype=np.float64))
        d = lpy - lty
        out["k1"], out["k2"], out["k3"] = d, 0.5 * d * d, torch.expm1(-d) + d
        out["pg"] = clipped(lty - old)
    return out


def reference_loss(ref: Reference, samples, terms) -> float:
    """token_mean: sum over tokens of sample weight x sum_term weight x term, over all response tokens."""
    total, n = 0.0, 0
    for s in samples:
        per = reference_terms(ref.logprobs(s), s)
        total += s.weight * sum(w * per[name] for name, w in terms).sum().item()
        n += s.num_response
    return total / n


def _file_prompts(tokenizer, problems):
    from rollout.chat import encode_chat

    return {tuple(encode_chat(tokenizer, [{"role": "user", "content": p}])): a for p, a in problems}


def _check_file_prompts_and_rewards(trainer, data, prompts):
    """Every rollout starts with a prompt of the file and is graded against that prompt's answer."""
    for s in data.samples:
        answer = prompts[tuple(s.token_ids[:s.prompt_len])]
        text = trainer.tokenizer.decode(s.token_ids[s.prompt_len:], skip_special_tokens=True)
        assert s.reward == parity_reward(text, answer)


def _groups(samples):
    out = {}
    for s in samples:
        out.setdefault(s.group, []).append(s)
    return out


# ---- objectives, schedules, weights ---------------------------------------------------------------------
def test_warmup_schedule_tip_eval_outputs_and_resume(models, teacher_url, tmp_path, capsys, caplog):
    """warmup.steps=1 on teacher rollouts, then the forward->reverse KL schedule switching at step
    index 2, TIP keeping half the tokens, eval every 2 steps, progress line, plot, TensorBoard; the
    run stops after 2 steps and `--resume` continues it to 3 (the schedule continues, the warm-up
    is not repeated, the data position continues)."""
    from student_trainer.trainer import Trainer

    caplog.set_level(logging.INFO, logger="opd.train")
    teacher, student = models
    out = tmp_path / "run"
    extra = ["warmup.steps=1", f"warmup.teacher_model={teacher}", "loss.fkl_to_rkl_switch_step=2",
             "loss.token_keep_ratio=0.5", "run.eval_every=2", "run.eval_prompts=4", "run.progress=true",
             "run.tensorboard=true", "rollout.max_new_tokens=10"]
    a = Trainer(load_config(None, _args(student, out, *extra, "run.steps=2", url=teacher_url)))
    got = capture_steps(a)
    try:
        a.run()
    finally:
        a.close()
    b = Trainer(load_config(None, _args(student, out, *extra, "run.steps=3", "run.plot=true", url=teacher_url)),
                resume=True)  # the plot at the end of the resumed run draws all three steps
    assert b.start_step == 2
    got_b = capture_steps(b)
    try:
        b.run()
    finally:
        b.close()
    got.update(got_b)

    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the schedule: forward KL before step index 2, reverse KL from it on (also after the resume)
    assert [r["loss_terms"] for r in rows] == ["1*forward_kl", "1*forward_kl", "1*reverse_kl"]
    for r, term in zip(rows, ("forward_kl", "forward_kl", "reverse_kl")):
        assert r["loss"] == pytest.approx(r[f"loss/{term}"], rel=1e-4), r
    other = rows[2]["loss/forward_kl"]
    assert abs(other - rows[2]["loss"]) > 1e-3 * abs(other)  # the two KLs differ: the switch is visible

    # warm-up: the step-1 rollouts were sampled by the teacher model (the rollout engine's log-probs
    # of the sampled tokens are the teacher server's), later ones by the student
    def gap(d):
        return float(np.mean(np.concatenate([np.abs(np.asarray(s.rollout_logprobs) - s.teacher["sampled_logprobs"])
                                             for s in d.samples])))
    assert gap(got[0]) < 0.02
    assert gap(got[1]) > 0.5 and gap(got[2]) > 0.5

    # TIP: ceil(ratio x response tokens) of each micro-batch enter the loss (one micro-batch here)
    for r, step in zip(rows, range(3)):
        n = sum(s.num_response for s in got[step].samples)
        assert r["micro_batches"] == 1 and r["tokens"] == n
        assert r["loss_tokens"] == math.ceil(0.5 * n) < n

    # resume: step index 2 took the prompts at data position 2, not those of step 0 again
    want = {tuple(p.prompt_ids) for p in b.data.batch(2, 2)}
    assert {tuple(s.token_ids[:s.prompt_len]) for s in got[2].samples} == want
    assert want != {tuple(p.prompt_ids) for p in b.data.batch(0, 2)}

    # eval_every=2: greedy eval accuracy at step 2 only
    assert "eval_accuracy" not in rows[0] and "eval_accuracy" not in rows[2]
    assert 0.0 <= rows[1]["eval_accuracy"] <= 1.0
    assert not [k for k in rows[1] if k.startswith("eval_accuracy/")]  # one task: no per-task copy

    # the progress line, with rate and ETA, once per step
    err = capsys.readouterr().err
    for done, total in ((1, 2), (2, 2), (3, 3)):
        line = rf"\[train\] step {done}/{total} \| loss [0-9.]+ .*\| [0-9.]+ step/s ETA \d+s"
        assert re.search(line, err), err[-2000:]
    assert "eval_acc" in err

    # the plot: a PNG of the curves of all three steps
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "metrics.png")).shape[:2] == (height, width)

    # TensorBoard: event files when the package is installed; otherwise said once, and no directory
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tensorboard").exists()
        assert "run.tensorboard: no event files" in caplog.text
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ev = EventAccumulator(str(out / "tensorboard"))
        ev.Reload()
        assert {"loss", "loss_tokens", "reward"} <= set(ev.Tags()["scalars"])


@pytest.fixture(scope="module")
def divergence_run(models, teacher_url, tmp_path_factory):
    """One trainer and one step's rollouts scored by the teacher, shared by every divergence."""
    from student_trainer.trainer import Trainer

    teacher, student = models
    args = _args(student, tmp_path_factory.mktemp("div"), "run.steps=50", url=teacher_url)
    tr = Trainer(load_config(None, args))
    data = tr.producer.produce(0)
    yield tr, data, args, Reference(student)
    tr.close()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_name_trains_that_divergence(divergence_run, name):
    """loss.divergence=NAME: the step's loss is NAME of the student against the teacher, float64
    from the definition (jsd beta 0.5, skew alpha 0.1, the teacher top-k + tail support, pg with
    the importance ratio against the rollout's log-probs), and the weights move."""
    tr, data, args, ref = divergence_run
    tr.cfg = load_config(None, args + [f"loss.divergence={name}"])
    before = {k: v.clone() for k, v in tr.engine.full_state_dict().items()}
    ref.load(before)
    expect = reference_loss(ref, data.samples, ((name, 1.0),))
    m = tr._train_step(data)
    assert m["loss_terms"] == f"1*{name}"
    assert m["loss"] == pytest.approx(expect, rel=2e-4, abs=1e-6)
    assert abs(expect) > 1e-3  # a confident teacher: every term is far from 0 here
    after = tr.engine.full_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_divergences_differ(divergence_run):
    """The references are not all one number (a name mapped to the wrong term would show).
    k1 and pg are equal in value by definition while the weights are those the rollouts were
    sampled with (importance ratio 1): pg's surrogate -A * ratio with A = -(log pS - log pT) is
    then log pS - log pT, k1's value; they differ in their gradients and once the weights move."""
    tr, data, _, ref = divergence_run
    ref.load(tr.engine.full_state_dict())
    values = [reference_loss(ref, data.samples, ((n, 1.0),)) for n in DIVERGENCES]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            if {DIVERGENCES[i], DIVERGENCES[j]} == {"k1", "pg"}:
                continue
            gap = abs(values[i] - values[j])
            assert gap > 1e-3 * max(abs(values[i]), abs(values[j])), (DIVERGENCES[i], DIVERGENCES[j])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


PROBLEMS = [(f"What is {a} plus {b}?", str(a + b)) for a, b in ((1, 2), (3, 4), (5, 7), (2, 9), (8, 8), (6, 1))]


def _math500(tmp_path):
    path = tmp_path / "math500.jsonl"
    _write_jsonl(path, [{"problem": p, "answer": a, "unique_id": i} for i, (p, a) in enumerate(PROBLEMS)])
    return path


def _grpo_advantages(rewards):
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


def _sequence_logprobs(ref, samples):
    out = []
    for s in samples:
        lp = ref.logprobs(s)
        out.append(lp.gather(1, torch.tensor(s.token_ids[s.prompt_len:])[:, None]).sum().item())
    return np.array(out)


def _one_step_on_the_file(cfg, student, weights_after: bool = False):
    """Run a one-step trainer on PROBLEMS from a data file: its metrics, the step's StepData (its
    prompts and rewards checked against the file), a float64 reference of the initial student,
    the weights after the step (if asked) and the closed trainer."""
    from student_trainer.trainer import Trainer

    tr = Trainer(cfg)
    got = capture_steps(tr)
    ref = Reference(student)
    try:
        m = tr.run()
        after = tr.engine.full_state_dict() if weights_after else None
    finally:
        tr.close()
    data = got[0]
    _check_file_prompts_and_rewards(tr, data, _file_prompts(tr.tokenizer, PROBLEMS))
    return m, data, ref, after, tr


def test_grpo_objective_on_a_jsonl_file(models, tmp_path):
    """objective=grpo, no teacher; data.path JSONL in the MATH-500 layout (problem / answer):
    advantages are GRPO's group-normalised rewards (hand computation), the loss is the PPO term
    (float64 reference), and the step makes the positive-advantage rollouts more likely than the
    negative ones (sum_s A_s x change of log pS(rollout s) > 0)."""
    _, student = models
    cfg = load_config(None, _args(student, tmp_path / "g", f"data.path={_math500(tmp_path)}", "loss.objective=grpo",
                                  f"loss.reward_fn={REWARD}", "rollout.n=4",
                                  "run.steps=1"))
    m, data, ref, after, tr = _one_step_on_the_file(cfg, student, weights_after=True)
    assert tr.teacher is None
    groups = _groups(data.samples)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups.values())
    assert any(len({s.reward for s in ss}) > 1 for ss in groups.values()), "no group with mixed rewards"
    for ss in groups.values():
        adv = _grpo_advantages([s.reward for s in ss]) if len({s.reward for s in ss}) > 1 else np.zeros(len(ss))
        for s, a in zip(ss, adv):
            assert s.advantage == pytest.approx(a, abs=1e-5)
    assert m["loss_terms"] == "1*ppo"
    assert m["loss"] == pytest.approx(reference_loss(ref, data.samples, (("ppo", 1.0),)), rel=1e-4, abs=1e-7)
    before_lp = _sequence_logprobs(ref, data.samples)
    ref.load(after)
    moved = _sequence_logprobs(ref, data.samples) - before_lp
    adv = np.array([s.advantage for s in data.samples])
    assert float(adv @ moved) > 1e-3 * float(np.abs(adv) @ np.abs(moved)), (adv, moved)


def test_paced_weights_on_a_jsonl_file(models, teacher_url, tmp_path):
    """sample_weighting=paced (objective opd): every rollout of a prompt gets k(p) = p(1-p) of the
    prompt's pass rate, normalised to mean 1 over the batch (hand computation from the step's
    rewards); the loss is the weighted reverse KL (float64 reference); zero-weight rollouts add no
    tokens to the loss."""
    _, student = models
    cfg = load_config(None, _args(student, tmp_path / "p", f"data.path={_math500(tmp_path)}",
                                  "loss.sample_weighting=paced", f"loss.reward_fn={REWARD}", "rollout.n=4",
                                  "data.prompts_per_step=3", "run.steps=1", url=teacher_url))
    m, data, ref, _, _ = _one_step_on_the_file(cfg, student)
    groups = _groups(data.samples)
    pass_rate = {g: np.mean([s.reward for s in ss]) for g, ss in groups.items()}
    kernel = {g: p * (1 - p) for g, p in pass_rate.items()}
    assert len(set(kernel.values())) > 1, f"pass rates {pass_rate}: every weight equal, nothing to check"
    norm = np.mean([kernel[s.group] for s in data.samples])
    for s in data.samples:
        assert s.weight == pytest.approx(kernel[s.group] / norm, rel=1e-6)
    assert m["loss_terms"] == "1*reverse_kl"
    assert m["loss_tokens"] == sum(s.num_response for s in data.samples if s.weight > 0)
    expect = reference_loss(ref, data.samples, (("reverse_kl", 1.0),))
    assert m["loss"] == pytest.approx(expect, rel=1e-5)
    unweighted = reference_loss(ref, [dataclasses.replace(s, weight=1.0) for s in data.samples], (("reverse_kl", 1.0),))
    assert abs(unweighted - expect) > 1e-4 * expect  # 10x the tolerance above


def test_opd_plus_grpo_with_reward_weights_on_a_parquet_file(models, teacher_url, tmp_path):
    """objective=opd+grpo (reverse KL + rl_weight x PPO on GRPO advantages), data.path Parquet in
    the DAPO-Math layout (chat-list prompt / reward_model.ground_truth), sample_weighting=reward:
    w = n_g softmax(r / reward_beta) within each group; the loss against a float64 reference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, student = models
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "dapo", "prompt": [{"role": "user", "content": p}], "reward_model": {"ground_truth": a}}
        for p, a in PROBLEMS]), path)
    cfg = load_config(None, _args(student, tmp_path / "og", f"data.path={path}", "loss.objective=opd+grpo",
                                  "loss.rl_weight=0.5", "loss.sample_weighting=reward", "loss.reward_beta=0.5",
                                  f"loss.reward_fn={REWARD}", "rollout.n=4",
                                  "run.steps=1", url=teacher_url))
    m, data, ref, _, _ = _one_step_on_the_file(cfg, student)
    groups = _groups(data.samples)
    assert any(len({s.reward for s in ss}) > 1 for ss in groups.values()), "no group with mixed rewards"
    for ss in groups.values():
        r = np.array([s.reward for s in ss])
        e = np.exp(r / 0.5 - (r / 0.5).max())
        w = len(r) * e / e.sum()
        adv = _grpo_advantages(r) if r.std() > 0 else np.zeros_like(r)
        for s, wi, a in zip(ss, w, adv):
            assert s.weight == pytest.approx(wi, rel=1e-6)
            assert s.advantage == pytest.approx(a, abs=1e-5)
    assert m["loss_terms"] == "1*reverse_kl+0.5*ppo"
    expect = reference_loss(ref, data.samples, (("reverse_kl", 1.0), ("ppo", 0.5)))
    assert m["loss"] == pytest.approx(expect, rel=1e-5)
    # the weights matter: the unweighted loss is another number
    unweighted = reference_loss(ref, [dataclasses.replace(s, weight=1.0) for s in data.samples],
                                (("reverse_kl", 1.0), ("ppo", 0.5)))
    assert abs(unweighted - expect) > 1e-4 * abs(expect)


def test_sft_objective_needs_no_teacher(models, tmp_path):
    """objective=sft: the NLL of the rollouts' tokens (float64 reference), no teacher server."""
    from student_trainer.trainer import Trainer

    _, student = models
    tr = Trainer(load_config(None, _args(student, tmp_path / "sft", "loss.objective=sft", "run.steps=1")))
    assert tr.teacher is None
    got = capture_steps(tr)
    ref = Reference(student)
    try:
        m = tr.run()
    finally:
        tr.close()
    assert m["loss_terms"] == "1*sft"
    assert m["loss"] == pytest.approx(reference_loss(ref, got[0].samples, (("sft", 1.0),)), rel=1e-5)


def test_bf16_default_zero3_and_gradient_checkpointing(models, teacher_url, tmp_path):
    """model.dtype left at its default (bf16), optim.zero_stage=3, model.gradient_checkpointing:
    parameters are ZeRO-3 partitions in bf16, every decoder layer is recomputed by checkpointing,
    the step's loss is the float64 reverse KL of the bf16 weights, and the HF export is bf16."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from student_trainer.trainer import Trainer

    _, student = models
    args = [a for a in _args(student, tmp_path / "z3", "optim.zero_stage=3", "model.gradient_checkpointing=true",
                             "run.steps=1", "run.export_hf=true", url=teacher_url) if a != "model.dtype=fp32"]
    cfg = load_config(None, args)
    assert cfg.model.dtype == "bf16"
    tr = Trainer(cfg)
    got = capture_steps(tr)
    try:
        st = tr.engine.module.student
        params = list(st.parameters())
        assert all(p.numel() == 0 and p.ds_tensor.dtype == torch.bfloat16 for p in params)  # partitioned
        assert st.training and st.is_gradient_checkpointing
        calls = [0]
        for layer in st.model.layers:
            fn = layer._gradient_checkpointing_func

            def counted(*a, fn=fn, **k):
                calls[0] += 1
                return fn(*a, **k)
            layer._gradient_checkpointing_func = counted
        before = tr.engine.full_state_dict()
        assert all(v.dtype == torch.bfloat16 for v in before.values())
        ref = Reference(student)
        ref.load(before)  # the bf16 weights, in float64
        m = tr.run()
        after = tr.engine.full_state_dict()
    finally:
        tr.close()
    assert calls[0] >= len(st.model.layers) * m["micro_batches"]
    assert m["loss"] == pytest.approx(reference_loss(ref, got[0].samples, (("reverse_kl", 1.0),)), rel=2e-2)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with safe_open(str(tmp_path / "z3" / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "z3" / "hf"), dtype=torch.bfloat16)
    torch.testing.assert_close(exported.state_dict()["lm_head.weight"], after["lm_head.weight"], rtol=0, atol=0)


# ---- refusals ------------------------------------------------------------------------------------
def test_teacher_with_another_tokenizer_or_template_is_refused(models, tmp_path, monkeypatch, capsys):
    """`opd train` against a teacher whose tokenizer (or only chat template) differs from the
    student's: exit 2 with a message naming the problem and the key that overrides it."""
    from transformers import AutoTokenizer

    from opd import cli
    from opd.tiny import build_model

    teacher, student = models
    other_tok = build_model(tmp_path / "other_tok", "test", seed=1, vocab_size=600)
    other_tpl = build_model(tmp_path / "other_tpl", "test", seed=1, tokenizer_dir=teacher)
    tok = AutoTokenizer.from_pretrained(str(other_tpl))
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>model")
    tok.save_pretrained(str(other_tpl))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for model, message in ((other_tok, "tokenizer mismatch"), (other_tpl, "chat template differs")):
        with running_server(str(model)) as (_, url):
            code = cli.main(["train", *[f"--{a}" for a in _args(student, tmp_path / "x", "run.steps=1", url=url)],
                             "--log-level", "WARNING"])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        assert "opd train: config error: teacher.url:" in err and message in err
        assert "teacher.allow_tokenizer_mismatch=true" in err


# ---- opd demo and opd eval through their command lines -------------------------------------------
def _run_cli(*args, timeout=300):
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "opd", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def test_opd_demo_short_run(tmp_path):
    """`opd demo` end to end in a few steps (a barely trained teacher: --teacher-min-accuracy 0):
    report.json, one metrics.jsonl row per step, the plot, the HF export, and the loss falls."""
    out, steps = tmp_path / "demo", 10
    r = _run_cli("demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--steps", str(steps),
                 "--prompts-per-step", "8", "--eval-size", "8", "--eval-every", "0", "--teacher-steps", "2",
                 "--teacher-min-accuracy", "0", "--warmup-steps", "3")
    assert "student accuracy after" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= rep[key] <= 1.0
    if rep["teacher_accuracy"] > 0:
        assert rep["student_over_teacher"] == pytest.approx(rep["student_accuracy_after"] / rep["teacher_accuracy"])
    else:
        assert rep["student_over_teacher"] is None
    assert rep["steps"] == steps and rep["warmup_steps"] == 3 and rep["eval_problems"] == 8 and rep["wall_seconds"] > 0
    assert rep["wire_bytes_per_token"] > 0 and 0.0 <= rep["teacher_wait_frac_last_step"] <= 1.0
    assert Path(rep["metrics_jsonl"]) == out / "metrics.jsonl" and Path(rep["student_final"]) == out / "hf"
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert math.isfinite(row["loss"]) and row["tokens"] > 0 and row["loss_terms"] == "1*forward_kl"
    losses = [row["loss"] for row in rows]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))
    ids = torch.tensor([tok.encode("12+34=")])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_opd_eval_cli_avg_and_pass_at_k(tiny_model_dir, tmp_path):
    """`opd eval`: the printed avg@n and pass@k per data source equal a direct computation from
    the per-sample rewards (recomputed here from the responses) with the unbiased estimator."""
    data = tmp_path / "problems.jsonl"
    _write_jsonl(data, [{"problem": p, "answer": a, "data_source": src}
                        for (p, a), src in zip(PROBLEMS, ["alpha", "alpha", "alpha", "beta", "beta", "beta"])])
    samples = tmp_path / "samples.jsonl"
    n = 4
    r = _run_cli("eval", "--model", tiny_model_dir, "--data", str(data), "--n", str(n), "--k", "1,2,4",
                 "--temperature", "1.0", "--max-new-tokens", "6", "--reward", REWARD,
                 "--out", str(samples))
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(rows) == n * len(PROBLEMS)
    by = {}
    for row in rows:
        assert row["reward"] == parity_reward(row["response"], row["answer"])
        by.setdefault(row["source"], {}).setdefault(row["index"], []).append(row["reward"])
    printed = {}
    lines = r.stdout.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("source"))
    cols = lines[head].split()[1:]
    for line in lines[head + 1:head + 3]:
        name, *vals = line.split()
        printed[name] = dict(zip(cols, map(float, vals)))
    assert set(printed) == {"alpha", "beta"}
    mixed = 0
    for src, problems in by.items():
        rewards = list(problems.values())
        assert all(len(x) == n for x in rewards) and len(rewards) == 3
        assert printed[src]["avg@4"] == pytest.approx(np.mean([np.mean(x) for x in rewards]), abs=6e-5)
        for k in (1, 2, 4):
            direct = np.mean([1.0 - math.comb(n - int(sum(x)), k) / math.comb(n, k) for x in rewards])
            assert printed[src][f"pass@{k}"] == pytest.approx(direct, abs=6e-5)
        mixed += sum(0 < sum(x) < n for x in rewards)
    assert mixed > 0  # some problem with both outcomes: pass@k differs from avg there
