"""Issue 17, "found broken": each fix kept by a test that goes through the trainer (the Trainer
object, or `python -m opd train`), with float64 references where a value is checked.

One tiny model pair for the module; runs of 2 steps with 2 prompts x 2 samples.
"""

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from student_trainer.config import CHOICES, DIVERGENCES, ConfigError, load_config
from tests.teacher_helpers import reference_logprobs, running_server

PAD_VOCAB = 520  # the padded teacher's logit width (the tokenizer and the student have 512)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """(teacher, padded teacher, student): the padded teacher is the teacher with 8 extra lm-head
    rows (no token of the tokenizer) whose logits are large enough to enter its top-k often. The
    tokenizer is the session's (conftest.tiny_model_dir): built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.tiny import build_model

    root = tmp_path_factory.mktemp("fixes")
    teacher = build_model(root / "teacher", "test", seed=1, tokenizer_dir=tiny_model_dir)
    student = build_model(root / "student", "test", seed=2, tokenizer_dir=teacher)
    m = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    m.resize_token_embeddings(PAD_VOCAB, mean_resizing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = m.get_output_embeddings().weight
        head[512:] = torch.randn(PAD_VOCAB - 512, head.shape[1], generator=g) * head[:512].std() * 3
    padded = root / "teacher_padded"
    m.save_pretrained(str(padded), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(str(padded))
    return str(teacher), str(padded), str(student)


def _overrides(student, out, *extra):
    return [f"model.student={student}", "model.dtype=fp32", "data.task=arithmetic", f"run.out_dir={out}",
            "rollout.max_new_tokens=8", "data.prompts_per_step=2", "rollout.n=2", "run.steps=2", "run.plot=false",
            "run.export_hf=false", "run.progress=false", "run.tensorboard=false", "teacher.max_backoff_s=0.5",
            *extra]


# ---- 2. configuration checked when parsed ---------------------------------------------------------

BASE = ["model.student=/x", "data.task=arithmetic", "teacher.url=127.0.0.1:1"]

# every enum-like key with a value it refuses
BAD_ENUMS = {
    "model.dtype": "fp8", "model.attn_implementation": "flash_attention_2", "loss.divergence": "revrse_kl",
    "loss.support": "bogus", "loss.objective": "dpo", "loss.reduction": "mean", "loss.token_score": "max",
    "loss.sample_weighting": "rank", "rollout.engine": "vllm", "rollout.weight_sync": "nfs",
    "teacher.value_encoding": "int4", "teacher.compression": "gzip", "optim.zero_stage": "1",
    "rollout.staleness": "2",
}

BAD = [
    *[([f"{k}={v}"], [k, v]) for k, v in BAD_ENUMS.items()],
    (["data.task=bogus"], ["data.task", "'bogus'", "arithmetic, sort, reverse, calc"]),
    (["run.device=gpu"], ["run.device", "'gpu'", "cpu, cuda, cuda:N"]),
    (["data.task=", "data.path=/p.jsonl", "loss.reward_fn=nope"], ["loss.reward_fn", "'nope'", "exact, math"]),
    (["loss.reward_fn=exact"], ["loss.reward_fn", "'exact'", "its own grader"]),
    (["data.path=/p.jsonl"], ["data.path and data.task", "give one"]),
    (["warmup.steps=5"], ["warmup.steps", "5", "warmup.teacher_model"]),
    (["warmup.teacher_model=/t"], ["warmup.teacher_model", "'/t'", "warmup.steps > 0"]),
    (["warmup.steps=2", "warmup.teacher_model=/t", "loss.objective=grpo"], ["warmup.steps", "opd, opd+grpo or sft"]),
    (["teacher.student_top_k=4", "loss.divergence=k3"], ["teacher.student_top_k", "4", "divergence=k3"]),
    (["teacher.student_top_k=4", "loss.objective=grpo"], ["teacher.student_top_k", "objective=grpo"]),
    (["teacher.student_top_k=4", "loss.support=topk"], ["loss.support", "'topk'", "auto, union"]),
    (["teacher.student_top_k=4", "rollout.staleness=1"], ["teacher.student_top_k", "rollout.staleness=0"]),
    (["teacher.student_top_k=4", "optim.zero_stage=3"], ["teacher.student_top_k", "optim.zero_stage=2"]),
    (["teacher.student_top_k=-1"], ["teacher.student_top_k", "-1", ">= 0"]),
    (["loss.support=union"], ["loss.support", "'union'", "teacher.student_top_k > 0"]),
    (["loss.support=topk", "loss.divergence=k1"], ["loss.support", "'topk'", "divergence=k1"]),
    (["loss.fkl_to_rkl_switch_step=3", "loss.divergence=jsd"], ["loss.fkl_to_rkl_switch_step", "'jsd'", "reverse_kl"]),
    (["loss.fkl_to_rkl_switch_step=3", "loss.objective=sft"], ["loss.fkl_to_rkl_switch_step", "objective=opd"]),
    (["loss.fkl_to_rkl_window=4"], ["loss.fkl_to_rkl_window", "4", "fkl_to_rkl_switch_step >= 0"]),
    (["loss.objective=opd+grpo"], ["loss.rl_weight", "0.0", "opd+grpo"]),
    (["loss.rl_weight=0.5"], ["loss.rl_weight", "0.5", "opd+grpo"]),
    (["loss.sft_weight=0.5", "loss.objective=grpo"], ["loss.sft_weight", "0.5", "opd or opd+grpo"]),
    (["loss.token_keep_ratio=0.5", "loss.objective=grpo"], ["loss.token_keep_ratio", "0.5", "opd or opd+grpo"]),
    (["loss.beta=1.5"], ["loss.beta", "1.5", "[0, 1]"]),
    (["loss.gamma=-0.1"], ["loss.gamma", "-0.1", "[0, 1]"]),
    (["rollout.top_p=0"], ["rollout.top_p", "0.0", "(0, 1]"]),
    (["optim.betas=0.9,1.5"], ["optim.betas", "[0, 1)"]),
    (["run.keep_checkpoints=0"], ["run.keep_checkpoints", "0", ">= 1"]),
]


@pytest.mark.parametrize("args,parts", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_refused_when_parsed(args, parts):
    with pytest.raises(ConfigError) as ei:
        load_config(None, BASE + args)
    for p in parts:
        assert p in str(ei.value), (p, str(ei.value))


def test_every_enum_key_is_checked_and_every_divergence_name_is_a_loss_term():
    from student_trainer.losses import ALL_TERMS

    assert set(BAD_ENUMS) == set(CHOICES)  # a new enum key needs a case above
    assert set(DIVERGENCES) == set(ALL_TERMS) - {"ppo", "sft"}
    for name in DIVERGENCES:  # and each of them is accepted
        assert load_config(None, BASE + [f"loss.divergence={name}"]).loss.divergence == name


def test_opd_train_exits_2_and_print_config_shows_the_resolved_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "opd", "train", *[f"--{a}" for a in BASE], "--loss.divergence=revrse_kl"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "loss.divergence: 'revrse_kl' is not one of forward_kl, reverse_kl" in r.stderr
    r = subprocess.run([sys.executable, "-m", "opd", "train", "--model.student=/x", "--data.task=arithmetic",
                        "--teacher-url", "127.0.0.1:1", "--warmup.steps=5"], capture_output=True, text=True)
    assert r.returncode == 2 and "warmup.steps: 5 needs warmup.teacher_model" in r.stderr
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("loss:\n  divergence: jsd\n  beta: 0.25\nteacher:\n  top_k: 8\n")
    r = subprocess.run([sys.executable, "-m", "opd", "train", "--config", str(cfg_file), "--model.student=/x",
                        "--data.task=arithmetic", "--teacher-url", "127.0.0.1:7", "--teacher.student_top_k=4",
                        "--print-config"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    resolved = load_config(str(cfg_file), ["model.student=/x", "data.task=arithmetic", "teacher.url=127.0.0.1:7",
                                           "teacher.student_top_k=4"]).to_dict()
    assert shown == json.loads(json.dumps(resolved))  # every key, as JSON has it (tuples as lists)
    assert shown["loss"]["divergence"] == "jsd" and shown["loss"]["beta"] == 0.25  # the file
    assert shown["teacher"]["url"] == "127.0.0.1:7" and shown["teacher"]["student_top_k"] == 4  # the flags
    assert shown["optim"]["zero_stage"] == 2 and shown["model"]["attn_implementation"] == "sdpa"  # defaults


# ---- 5. packed micro-batches == separate samples, for each accepted attention implementation ------

def _samples(stats: bool):
    from student_trainer.batching import Sample

    g = np.random.default_rng(0)
    out = []
    for j, (n, p) in enumerate([(9, 4), (7, 2), (11, 6)]):
        ids = g.integers(5, 500, n).tolist()
        s = Sample(token_ids=ids, prompt_len=p, response_mask=[1] * (n - p), rollout_logprobs=[0.0] * (n - p),
                   group=j)
        if stats:
            lp = np.log(g.dirichlet(np.ones(6), n - p)).astype(np.float32)
            s.teacher = {"topk_ids": np.stack([np.sort(g.choice(512, 5, replace=False)) for _ in range(n - p)]),
                         "topk_logprobs": lp[:, :5], "tail_logmass": lp[:, 5], "sampled_logprobs": lp[:, 0]}
        out.append(s)
    return out


@pytest.mark.parametrize("impl", CHOICES["model.attn_implementation"])
def test_packed_equals_separate(models, impl):
    """The trainer's module (StudentWithLoss, the model loaded as the Trainer loads it) on one packed
    micro-batch of 3 samples vs each sample alone: hidden states and the loss agree (eager got the
    boolean block mask wrong before: ~2 apart)."""
    from student_trainer import losses as L
    from student_trainer.batching import build_micro_batch
    from student_trainer.trainer import StudentWithLoss, load_causal_lm

    _, _, student = models
    mod = StudentWithLoss(load_causal_lm(student, torch.float32, attn_implementation=impl))
    assert mod.student.config._attn_implementation == impl
    samples = _samples(stats=True)
    packed = build_micro_batch(samples)
    assert packed.attention_mask is not None
    cfg = L.DistillLossConfig(divergence="reverse_kl", support="topk", metrics=False)
    n = torch.tensor(float(sum(s.num_response for s in samples)))
    with torch.no_grad():
        h_packed = mod.hidden_states(packed)
        loss_packed, _ = mod(packed, cfg, n, torch.tensor(3.0))
        h_sep, loss_sep = [], 0.0
        for j, s in enumerate(samples):
            mb = build_micro_batch([s], j)
            h_sep.append(mod.hidden_states(mb))
            loss_sep += mod(mb, cfg, n, torch.tensor(3.0))[0]
    torch.testing.assert_close(h_packed, torch.cat(h_sep), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_packed, loss_sep, rtol=1e-5, atol=1e-7)


# ---- 1 + 6 + 5: the student's top ids reach the loss; padded teacher slots fold into the tail ----

def _ref_union_rkl(z_V, t_lp, t_ids, s_ids):
    """float64 reverse KL over U = teacher top-k (real ids) | student top-M, + the rest, from the
    teacher's exact distribution over ITS vocabulary (padded ids included in the rest)."""
    ls = torch.log_softmax(z_V, -1)
    u = sorted(set(t_ids) | set(s_ids))
    pT = t_lp.exp()
    pT_u = pT[u]
    pT_rest = 1.0 - pT_u.sum()  # everything else, the padded rows' mass included
    rest = torch.ones_like(ls, dtype=torch.bool)
    rest[u] = False
    lS = torch.cat([ls[u], torch.logsumexp(ls[rest], -1, keepdim=True)])
    lT = torch.cat([pT_u.log(), pT_rest.log().reshape(1)])
    return (lS.exp() * (lS - lT)).sum()


def test_student_top_k_and_padded_teacher_through_the_trainer(models, tmp_path, monkeypatch):
    """teacher.student_top_k=4 against a teacher with a padded vocabulary (520 > 512), eager attention:
    every micro-batch carries the student's own top-4 ids at each scored position (equal to a fresh
    top-4 of the current weights), padded teacher slots are marked and their mass is in the tail
    (float64 teacher reference), and the loss equals a float64 reverse KL over the union support
    computed from the teacher's exact distribution and separate per-sample forwards."""
    from student_trainer.trainer import StudentWithLoss, Trainer

    teacher, padded, student = models
    seen = {"calls": 0, "rows": 0, "pad_slots": 0, "extra_new": 0}
    orig = StudentWithLoss.forward

    def checked(self, mb, loss_cfg, global_tokens, global_seqs, *a):
        loss, met = orig(self, mb, loss_cfg, global_tokens, global_seqs, *a)
        with torch.no_grad():
            st = mb.stats
            assert st is not None and st.s_topk_ids is not None and st.extra_logprobs is not None
            assert st.s_topk_ids.shape == (mb.rows.numel(), 4)
            w = self.student.get_output_embeddings().weight.double()
            ref = 0.0
            row = 0
            for seg in _segments(mb):
                ids, p = seg
                mb1 = _single(ids)
                z = self.hidden_states(mb1).double()[p - 1:len(ids) - 1] @ w.T  # separate forward
                t_lp = torch.from_numpy(reference_logprobs(padded, ids))[p - 1:len(ids) - 1]
                for r in range(z.shape[0]):
                    s_ids = st.s_topk_ids[row].tolist()
                    top = torch.topk(z[r], 5).values
                    if (top[3] - top[4]).abs() > 1e-4:  # no near-tie at the 4th place
                        assert set(s_ids) == set(torch.topk(z[r], 4).indices.tolist())
                    real = st.topk_ids[row][~st.topk_pad[row]] if st.topk_pad is not None else st.topk_ids[row]
                    seen["pad_slots"] += 0 if st.topk_pad is None else int(st.topk_pad[row].sum())
                    # the teacher's top-8 over 520 ids, padded ones dropped: the same real ids
                    t_top = torch.topk(t_lp[r], 9)
                    if t_top.values[7] - t_top.values[8] > 1e-4:  # no near-tie at the 8th place
                        assert set(real.tolist()) == {i for i in t_top.indices[:8].tolist() if i < 512}
                    real_set = set(real.tolist())
                    tail_ref = torch.log1p(-t_lp[r].exp()[sorted(real_set)].sum())
                    assert abs(float(st.tail_logmass[row]) - float(tail_ref)) < 1e-4
                    seen["extra_new"] += len(set(s_ids) - real_set)
                    ref += float(mb.mask[row]) * _ref_union_rkl(z[r], t_lp[r], sorted(real_set), s_ids)
                    row += 1
            assert row == mb.rows.numel()
            ref = ref / float(global_tokens)
            assert abs(float(loss) - ref) <= 1e-4 * abs(ref) + 1e-6, (float(loss), ref)
            seen["calls"] += 1
            seen["rows"] += row
        return loss, met

    monkeypatch.setattr(StudentWithLoss, "forward", checked)
    with running_server(padded) as (_, url):
        tr = Trainer(load_config(None, _overrides(student, tmp_path, f"teacher.url={url}", "teacher.top_k=8",
                                                  "teacher.student_top_k=4", "teacher.value_encoding=fp32",
                                                  "model.attn_implementation=eager")))
        try:
            assert tr.engine.module.student.config._attn_implementation == "eager"
            last = tr.run()
        finally:
            tr.close()
    assert last["step"] == 2 and seen["calls"] >= 2 and seen["rows"] > 0
    assert seen["pad_slots"] > 0, "no padded teacher id entered a top-k: the fold was not exercised"
    assert seen["extra_new"] > 0, "the student's top ids never added a category"


def _segments(mb):
    """(token ids, prompt_len) of each sample of a packed micro-batch, from its tensors."""
    ids, pos, rows = mb.input_ids[0].tolist(), mb.position_ids[0].tolist(), set(mb.rows.tolist())
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    out = []
    for a, b in zip(starts, starts[1:]):
        first_row = min(r for r in rows if a <= r < b)
        out.append((ids[a:b], first_row - a + 1))
    return out


def _single(ids):
    from student_trainer.batching import Sample, build_micro_batch

    return build_micro_batch([Sample(token_ids=ids, prompt_len=1, response_mask=[1] * (len(ids) - 1),
                                     rollout_logprobs=[0.0] * (len(ids) - 1), group=0)])


# ---- 7. a step that trains nothing is reported ----------------------------------------------------------

def test_zero_signal_steps_warned_and_counted(models, tmp_path, caplog):
    """GRPO with a random student (0% accuracy on arithmetic: every group's rewards are equal, every
    advantage 0): each step logs a warning with the reason and metrics.jsonl counts the steps."""
    from student_trainer.trainer import Trainer

    _, _, student = models
    tr = Trainer(load_config(None, _overrides(student, tmp_path, "loss.objective=grpo")))
    try:
        with caplog.at_level(logging.WARNING, logger="opd.train"):
            tr.run()
    finally:
        tr.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [0.0, 0.0]
    assert [r["zero_signal"] for r in rows] == [1, 1] and [r["zero_signal_steps"] for r in rows] == [1, 2]
    assert all(r["loss"] == 0.0 for r in rows)
    msgs = [r.getMessage() for r in caplog.records if "trains nothing" in r.getMessage()]
    assert len(msgs) == 2 and "every GRPO advantage is 0" in msgs[0] and "equal rewards" in msgs[0]


def test_zero_signal_reasons():
    """The other ways a step trains nothing (PACED weights all 0, no scored token) are named; a
    mix with a distillation term never counts, even when every GRPO advantage is 0."""
    import torch as _t

    from student_trainer import losses as L
    from student_trainer.batching import Sample
    from student_trainer.trainer import _zero_signal_reason

    def mk(reward, group, mask=(1, 1)):
        return Sample(token_ids=[1, 2, 3, 4], prompt_len=2, response_mask=list(mask), rollout_logprobs=[0.0, 0.0],
                      group=group, reward=reward)

    ss = [mk(0.0, 0), mk(0.0, 0), mk(1.0, 1), mk(1.0, 1)]
    w = L.paced_weights(_t.tensor([s.reward for s in ss]), group_ids_B=_t.tensor([s.group for s in ss]))
    for s, x in zip(ss, w.tolist()):
        s.weight = x
    assert "PACED" in _zero_signal_reason(ss, (("reverse_kl", 1.0),))
    ss = [mk(0.5, 0, (0, 0)), mk(0.5, 0, (0, 0))]
    assert "no model-generated token" in _zero_signal_reason(ss, (("reverse_kl", 1.0),))
    ss = [mk(0.0, 0), mk(0.0, 0)]  # advantages 0
    assert "GRPO advantage" in _zero_signal_reason(ss, (("ppo", 1.0),))
    assert _zero_signal_reason(ss, (("reverse_kl", 1.0), ("ppo", 0.5))) is None
    ss[0].advantage = 0.7
    assert _zero_signal_reason(ss, (("ppo", 1.0),)) is None
