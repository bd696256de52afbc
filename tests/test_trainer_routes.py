"""Several teachers and a privileged teacher context, through the trainer as `opd train` runs it
(issue 20): real teacher servers on 127.0.0.1 (tiny models of distinct seeds), real DeepSpeed, the
local rollout engine. References are float64 forwards of the teacher models from their
directories, and the losses are recomputed by hand from the statistics the trainer attached.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from student_trainer.config import ConfigError, load_config
from tests.teacher_helpers import reference_logprobs, running_server
from tests.trainer_helpers import capture_steps


@pytest.fixture(scope="module")
def teachers(models, tmp_path_factory):
    """Teacher A (the session's, seed 1) and teacher B (seed 3, the same tokenizer), one server each."""
    from opd.tiny import build_model

    teacher_a, student = models
    teacher_b = str(build_model(tmp_path_factory.mktemp("routes") / "teacher_b", "test", seed=3,
                                tokenizer_dir=teacher_a))
    with running_server(teacher_a) as (_, url_a), running_server(teacher_b) as (_, url_b):
        yield {"a": (teacher_a, url_a), "b": (teacher_b, url_b), "student": student}


def _args(student, out, *extra):
    return [f"model.student={student}", "model.dtype=fp32", f"run.out_dir={out}", "rollout.max_new_tokens=8",
            "data.prompts_per_step=4", "rollout.n=2", "optim.lr=1e-3", "run.plot=false", "run.export_hf=false",
            "run.progress=false", "run.tensorboard=false", "teacher.max_backoff_s=0.5",
            "teacher.value_encoding=fp32", *extra]


def _student_logprobs(student_dir, ids, prompt_len, temperature):
    """float64 log-softmax(z / T) of the student at the response positions of `ids`."""
    lp = reference_logprobs(student_dir, ids, temperature)  # the same cached float64 forward
    return torch.from_numpy(lp[prompt_len - 1:len(ids) - 1])


def _rkl_rows(lp_s, t) -> torch.Tensor:
    """Reverse KL(student || teacher) per response row on the teacher's top-k + tail support."""
    ids = torch.from_numpy(np.asarray(t["topk_ids"])).long()
    lT = torch.cat([torch.from_numpy(np.asarray(t["topk_logprobs"], dtype=np.float64)),
                    torch.from_numpy(np.asarray(t["tail_logmass"], dtype=np.float64))[:, None]], 1)
    rest = torch.logsumexp(lp_s.scatter(1, ids, -math.inf), -1)
    lS = torch.cat([lp_s.gather(1, ids), rest[:, None]], 1)
    p = lS.exp()
    return torch.where(p > 0, p * (lS - lT), torch.zeros_like(p)).sum(-1)


def _check_stats(s, teacher_dir, ids, start, temperature, top_k):
    """The statistics the trainer attached to sample `s` equal a float64 forward of `teacher_dir` on
    `ids`, whose rows from `start` are s's response tokens."""
    R = s.num_response
    assert list(ids[start:]) == s.token_ids[s.prompt_len:]
    ref = reference_logprobs(teacher_dir, ids, temperature)[start - 1:start - 1 + R]
    t = s.teacher
    assert t["topk_ids"].shape == (R, top_k)
    y = np.asarray(s.token_ids[s.prompt_len:])
    np.testing.assert_allclose(t["sampled_logprobs"], ref[np.arange(R), y], atol=2e-4)
    for r in range(R):
        order = np.sort(ref[r])[::-1]
        if order[top_k - 1] - order[top_k] > 1e-4:  # no near-tie at the k-th place
            assert set(t["topk_ids"][r].tolist()) == set(np.argsort(ref[r])[::-1][:top_k].tolist())
        np.testing.assert_allclose(t["topk_logprobs"][r], ref[r][t["topk_ids"][r]], atol=2e-4)
        tail = np.log1p(-np.exp(ref[r][t["topk_ids"][r]]).sum())
        assert abs(float(t["tail_logmass"][r]) - tail) < 2e-4


def test_two_teachers_routed_by_task(teachers, tmp_path):
    """data.task=arithmetic,sort, the default teacher A (teacher.url) and a route sort -> teacher B
    with its own top_k, temperature and weight: every sample's statistics equal a float64 forward of
    the teacher its route names, a prompt group is scored by one teacher, the step's loss weighs each
    teacher's samples by its weight (the student at the route's temperature), and metrics.jsonl has
    per-teacher samples, wait, bytes/token, loss and KL equal to the float64 values. (Routes without
    a default teacher: the two tests below.)"""
    from student_trainer.trainer import Trainer

    (dir_a, url_a), (dir_b, url_b), student = teachers["a"], teachers["b"], teachers["student"]
    args = _args(student, tmp_path / "r", "data.task=arithmetic,sort", "run.steps=2",
                 f"teacher.url={url_a}", f"teacher.routes.sort.url={url_b}", "teacher.routes.sort.top_k=8", "teacher.routes.sort.temperature=2.0",
                 "teacher.routes.sort.weight=3.0", "optim.lr=1e-9")  # (the weights barely move: one reference)
    tr = Trainer(load_config(None, args))
    got = capture_steps(tr)
    try:
        assert tr.teacher is tr.producer.teachers["default"].client
        tr.run()
        prompts = {s: tr.data.batch(s, 4) for s in got}
    finally:
        tr.close()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # teacher name -> (model dir, temperature, top_k, weight); the task each takes
    spec = {"default": (dir_a, 1.0, 16, 1.0), "sort": (dir_b, 2.0, 8, 3.0)}
    name_of = {"arithmetic": "default", "sort": "sort"}
    used = set()
    for step, data in got.items():
        groups: dict[int, set] = {}
        for s in data.samples:
            name = name_of[prompts[step][s.group].metadata["task"]]
            assert s.route == name
            groups.setdefault(s.group, set()).add(s.route)
            d, temp, k, w = spec[name]
            _check_stats(s, d, s.token_ids, s.prompt_len, temp, k)
            assert s.weight == w
            used.add(name)
        assert all(len(r) == 1 for r in groups.values())  # a group never splits
        m = rows[step]
        # per teacher: counts, wire bytes, wait, and its loss / KL against float64 by hand
        total, ntok = 0.0, 0
        for name, (d, temp, k, w) in spec.items():
            mine = [s for s in data.samples if s.route == name]
            assert m[f"teacher/{name}/samples"] == len(mine)
            assert m[f"teacher/{name}/tokens"] == sum(s.num_response for s in mine)
            if not mine:
                continue
            assert m[f"teacher/{name}/wire_bytes_per_token"] > 2 * k  # k fp32 values (zstd) + ids per token
            assert 0.0 <= m[f"teacher/{name}/wait_s"] <= m["produce_s"]
            assert 0.0 < m[f"teacher/{name}/score_s"]
            rkl = torch.cat([_rkl_rows(_student_logprobs(student, s.token_ids, s.prompt_len, temp), s.teacher)
                             for s in mine]) if step == 0 else None
            if rkl is not None:
                assert m[f"teacher/{name}/reverse_kl"] == pytest.approx(float(rkl.mean()), rel=1e-4)
                assert m[f"teacher/{name}/loss"] == pytest.approx(float(rkl.mean()), rel=1e-4)
                total += w * float(rkl.sum())
            ntok += sum(s.num_response for s in mine)
        if step == 0:
            assert m["loss"] == pytest.approx(total / ntok, rel=1e-4)
    assert used == {"default", "sort"}


def test_a_row_without_a_route_is_refused_at_start(teachers, tmp_path, capsys):
    """`opd train`: a data file whose data_source has no route, and no default teacher: exit 2
    naming the record, the key, its value and the routes (before any teacher is asked). A built-in
    task without a route: exit 2 when the config is parsed."""
    from opd import cli

    student = teachers["student"]
    data = tmp_path / "mix.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i), "data_source": "ab"[i % 2]}) + "\n"
                            for i in range(4)) + json.dumps({"prompt": "q", "answer": "1", "data_source": "c"}) + "\n")
    code = cli.main(["train", *[f"--{a}" for a in _args(student, tmp_path / "x", f"data.path={data}",
                                                        "loss.reward_fn=math", "teacher.routes.a.url=127.0.0.1:1",
                                                        "teacher.routes.b.url=127.0.0.1:1")],
                     "--log-level", "WARNING"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "config error: teacher.routes: record 4 of data.path" in err and "data_source='c'" in err
    assert "routes: a, b" in err and "no default teacher (teacher.url)" in err
    code = cli.main(["train", *[f"--{a}" for a in _args(student, tmp_path / "y", "data.task=arithmetic,sort",
                                                        "teacher.routes.sort.url=127.0.0.1:1")], "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and "teacher.routes: data.task arithmetic has no route (routes: sort)" in err


def test_handshake_runs_per_teacher_and_names_it(teachers, tmp_path, capsys):
    """The route sort points at a teacher with another tokenizer: `opd train` exits 2 naming that
    route's key and name; the other route's teacher is fine."""
    from opd import cli
    from opd.tiny import build_model

    (_, url_a), student = teachers["a"], teachers["student"]
    other = build_model(tmp_path / "other_tok", "test", seed=1, vocab_size=600)
    with running_server(str(other)) as (_, url_other):
        code = cli.main(["train", *[f"--{a}" for a in _args(student, tmp_path / "x", "data.task=arithmetic,sort",
                                                            f"teacher.routes.arithmetic.url={url_a}",
                                                            f"teacher.routes.sort.url={url_other}")],
                         "--log-level", "WARNING"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"config error: teacher.routes.sort.url ('sort' teacher at {url_other}): tokenizer mismatch" in err


def test_routes_config_file_and_overrides(tmp_path):
    """teacher.routes from a YAML file, merged with --teacher.routes.NAME.KEY overrides; the
    default teacher's keys fill what a route leaves unset."""
    from student_trainer.config import teacher_specs

    f = tmp_path / "c.yaml"
    f.write_text("model: {student: /x}\ndata: {task: 'arithmetic,sort'}\nloss: {temperature: 1.5}\n"
                 "teacher:\n  url: h:1\n  top_k: 32\n  routes:\n    sort: {url: h:2, weight: 2.0}\n")
    cfg = load_config(str(f), ["teacher.routes.sort.top_k=4", "teacher.routes.arithmetic.prompt_template={question}!"])
    specs = teacher_specs(cfg)
    assert set(specs) == {"default", "sort", "arithmetic"}
    assert (specs["sort"].url, specs["sort"].top_k, specs["sort"].weight, specs["sort"].temperature) == ("h:2", 4, 2.0, 1.5)
    assert (specs["arithmetic"].url, specs["arithmetic"].top_k, specs["arithmetic"].prompt_template) == ("h:1", 32,
                                                                                                     "{question}!")
    with pytest.raises(ConfigError, match=r"teacher.routes.default: route name 'default' is not allowed"):
        load_config(str(f), ["teacher.routes.default.url=h:3"])
    with pytest.raises(ConfigError, match=r"teacher.routes.sort.weight=2: a teacher's weight multiplies"):
        load_config(str(f), ["loss.objective=opd+grpo", "loss.rl_weight=1"])
    with pytest.raises(ConfigError, match=r"expected --teacher.routes.NAME.KEY=VALUE"):
        load_config(str(f), ["teacher.routes.sort=1"])
    # not wired in this build (the teacher server's side is in another branch): refused when parsed
    from teacher_server.client import TeacherClient

    if not hasattr(TeacherClient, "update_weights"):
        with pytest.raises(ConfigError, match=r"teacher.refresh_every: 2: this build's teacher client has no"):
            load_config(str(f), ["teacher.refresh_every=2"])
    with pytest.raises(ConfigError, match=r"teacher.refresh_every: -1 must be >= 0"):
        load_config(str(f), ["teacher.refresh_every=-1"])


def test_privileged_context_with_a_frozen_self_teacher(models, tmp_path):
    """Self-distillation: the teacher server serves the student's own initial weights and scores
    each response after a prompt built from teacher.prompt_template over the data row (question +
    worked solution). The statistics equal a float64 forward of the student's weights on that
    teacher prompt + the response at the response positions, and the step's loss equals the
    reverse KL computed by hand from them."""
    from transformers import AutoTokenizer

    from student_trainer.trainer import Trainer

    _, student = models
    template = "{question}\nReference solution: {solution}\n"
    with running_server(student) as (_, url):
        tr = Trainer(load_config(None, _args(student, tmp_path / "p", "data.task=arithmetic", f"teacher.url={url}",
                                             f"teacher.prompt_template={template}", "run.steps=1", "optim.lr=1e-9")))
        got = capture_steps(tr)
        try:
            m = tr.run()
            prompts = tr.data.batch(0, 4)
        finally:
            tr.close()
    tok = AutoTokenizer.from_pretrained(student)
    total, ntok = 0.0, 0
    for s in got[0].samples:
        row = prompts[s.group].metadata["row"]
        assert row["question"] in tok.decode(s.token_ids[:s.prompt_len])  # the student saw the plain question
        text = f"{row['question']}\nReference solution: {row['solution']}\n"
        tp = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)
        assert tp != s.token_ids[:s.prompt_len] and "Reference solution" in tok.decode(tp)
        ids = tp + s.token_ids[s.prompt_len:]
        _check_stats(s, student, ids, len(tp), 1.0, 16)
        rkl = _rkl_rows(_student_logprobs(student, s.token_ids, s.prompt_len, 1.0), s.teacher)
        total += float(rkl.sum())
        ntok += s.num_response
    assert total > 0  # the privileged prompt moves the self-teacher away from the student
    assert m["loss"] == pytest.approx(total / ntok, rel=1e-4)
    assert m["loss/reverse_kl"] == pytest.approx(total / ntok, rel=1e-4)


def test_prompt_template_field_missing_names_the_record(models, tmp_path, capsys):
    """A data file row without a field the template names: exit 2 naming the record and field."""
    from opd import cli

    _, student = models
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q0", "answer": "1", "hint": "h"}) + "\n"
                    + json.dumps({"prompt": "q1", "answer": "2"}) + "\n")
    code = cli.main(["train", *[f"--{a}" for a in _args(student, tmp_path / "x", f"data.path={data}",
                                                        "loss.reward_fn=math", "teacher.url=127.0.0.1:1",
                                                        "teacher.prompt_template={prompt} hint: {hint}")],
                     "--log-level", "WARNING"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert ("config error: teacher.prompt_template: record 1 of data.path " in err
            and "has no field 'hint' (its fields: prompt, answer, data_source)" in err)
    assert Path(data).exists()


def test_file_rows_route_and_fill_the_template(teachers, tmp_path):
    """A JSONL file with two data_source values: source x goes to teacher A, which scores the
    response after the record's prompt plus its hint (a field only the file has); source y goes to
    teacher B with the student's own prompt. The statistics equal float64 forwards of each."""
    from transformers import AutoTokenizer

    from student_trainer.trainer import Trainer

    (dir_a, url_a), (dir_b, url_b), student = teachers["a"], teachers["b"], teachers["student"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "answer": str(2 * i), "hint": f"twice {i}",
                                        "data_source": "xy"[i % 2]}) + "\n" for i in range(4)))
    tr = Trainer(load_config(None, _args(student, tmp_path / "f", f"data.path={data}", "run.steps=1",
                                         f"teacher.routes.x.url={url_a}", "teacher.routes.x.prompt_template="
                                         "{prompt}\nHint: {hint}", f"teacher.routes.y.url={url_b}")))
    got = capture_steps(tr)
    try:
        tr.run()
        prompts = tr.data.batch(0, 4)
    finally:
        tr.close()
    tok = AutoTokenizer.from_pretrained(student)
    seen = set()
    for s in got[0].samples:
        row = prompts[s.group].metadata["row"]
        assert s.route == row["data_source"]
        seen.add(s.route)
        if s.route == "x":
            text = f"{row['prompt']}\nHint: {row['hint']}"
            tp = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)
            _check_stats(s, dir_a, tp + s.token_ids[s.prompt_len:], len(tp), 1.0, 16)
        else:
            _check_stats(s, dir_b, s.token_ids, s.prompt_len, 1.0, 16)
    assert seen == {"x", "y"}


def test_mixed_tasks_interleave_and_grade_by_their_own_task(models):
    """data.task=arithmetic,sort: one example of each in turn (the single-task sources' examples, in
    their order), each prompt graded by its own task's grader and carrying its row fields."""
    from transformers import AutoTokenizer

    from rollout.tasks import get_task
    from rollout.tasks.encoding import prompt_ids
    from student_trainer.data import TASK_ROW_FIELDS, builtin_source

    tok = AutoTokenizer.from_pretrained(models[1])
    src = builtin_source(tok, "arithmetic,sort", seed=0, n_train=8, n_eval=4)
    ar, so = (get_task(n).make_examples("train", 8, seed=0) for n in ("arithmetic", "sort"))
    assert len(src.train) == 16 and len(src.eval) == 8 and len(src.rows) == 16
    for i in range(16):
        p, ex, name = src.train[i], (ar, so)[i % 2][i // 2], ("arithmetic", "sort")[i % 2]
        assert p.metadata["task"] == name and p.prompt_ids == prompt_ids(tok, ex)
        assert tuple(p.metadata["row"]) == TASK_ROW_FIELDS and src.rows[i] is p.metadata["row"]
        assert p.metadata["row"]["solution"] == ex.response and p.metadata["row"]["question"] == ex.question
        assert src.reward(ex.response, p) == 1.0  # the worked response, graded by its own task
    # an arithmetic answer ("Answer: 122") is not a sort answer, and the other way round
    assert src.reward(so[0].response, src.train[0]) == 0.0 and src.reward(ar[0].response, src.train[1]) == 0.0


def test_eval_accuracy_per_task_of_a_mix(teachers, tmp_path, monkeypatch):
    """`opd train` on data.task=arithmetic,sort with run.eval_every=1: metrics.jsonl has the eval
    accuracy of each task beside the overall one (what the quality bench's --until-flat reads on a
    mix). The greedy texts are fixed here (the reference response for chosen eval prompts, "" for
    the rest; the real decoding path is the single-task eval's, test_train_settings), so the
    expected values are exact: arithmetic 2/3, sort 1/3, overall 1/2 on 6 interleaved prompts."""
    from transformers import AutoTokenizer

    import rollout.evaluate as ev
    from opd import cli
    from rollout.tasks import get_task
    from rollout.tasks.encoding import prompt_ids

    student = teachers["student"]
    tok = AutoTokenizer.from_pretrained(student)
    right = {}  # prompt ids -> the reference response, for arithmetic eval examples 0 and 1 and sort's 0
    for name, picks in (("arithmetic", (0, 1)), ("sort", (0,))):
        exs = get_task(name).make_examples("eval", 3, seed=0)
        right.update({tuple(prompt_ids(tok, exs[i])): exs[i].response for i in picks})
    seen = []

    async def texts(engine, tokenizer, prompts, max_new_tokens):
        seen.append(len(prompts))
        return [right.get(tuple(p), "") for p in prompts]

    monkeypatch.setattr(ev, "greedy_texts", texts)
    out = tmp_path / "m"
    code = cli.main(["train", *[f"--{a}" for a in _args(student, out, "data.task=arithmetic,sort", "run.steps=2",
                                                        f"teacher.url={teachers['a'][1]}", "run.eval_every=1",
                                                        "run.eval_prompts=6")], "--log-level", "WARNING"])
    assert code == 0
    assert seen == [6, 6]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["eval_accuracy"] == pytest.approx(0.5)
        assert r["eval_accuracy/arithmetic"] == pytest.approx(2 / 3)
        assert r["eval_accuracy/sort"] == pytest.approx(1 / 3)
    # a second `opd train` in the same process: the first one's process group was torn down through
    # DeepSpeed, so its cached groups do not outlive it ("Group ... is not registered" before)
    assert cli.main(["train", *[f"--{a}" for a in _args(student, tmp_path / "again", "data.task=arithmetic",
                                                        "run.steps=1", f"teacher.url={teachers['a'][1]}")],
                     "--log-level", "WARNING"]) == 0


def test_refresh_every_pushes_the_student_to_the_teacher(models, tmp_path):
    """teacher.refresh_every=1 through `opd train`, against a server hosting the student's initial
    weights under a name (teacher.model): after two steps the server reports weight version 2 and
    scores exactly as the exported student does (float64 forward), no longer as the initial one.
    The teacher sees a privileged prompt, so it differs from the student and the step trains."""
    from opd import cli
    from teacher_server.client import ScoreSettings, TeacherClient

    _, student = models
    out = tmp_path / "refresh"
    with running_server(student, models=[("self", student)]) as (_, url):
        code = cli.main(["train", *[f"--{a}" for a in _args(student, out, "data.task=arithmetic", f"teacher.url={url}",
                                                            "teacher.model=self", "teacher.refresh_every=1",
                                                            "teacher.prompt_template={question} = {answer}",
                                                            "run.steps=2", "optim.lr=1e-2", "run.export_hf=true")],
                         "--log-level", "WARNING"])
        assert code == 0
        client = TeacherClient(url, model="self", settings=ScoreSettings(value_encoding="fp32"))
        try:
            info = client.info()
            assert [m.weight_version for m in info.models if m.model_name == "self"] == [2]
            ids = [3, 17, 42, 9, 88, 120, 7, 64, 31, 5]
            (st,) = client.score([ids], [3])
        finally:
            client.close()
    assert st.weight_version == 2
    want = reference_logprobs(str(out / "hf"), ids)[2:len(ids) - 1]
    sampled = np.asarray(st.sampled_logprobs, dtype=np.float64)
    np.testing.assert_allclose(sampled, want[np.arange(len(sampled)), ids[3:]], atol=1e-4)
    before = reference_logprobs(student, ids)[2:len(ids) - 1]
    assert np.abs(sampled - before[np.arange(len(sampled)), ids[3:]]).max() > 1e-3  # the weights did change
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "teacher_weight_version" in r]
    assert [r["teacher_weight_version"] for r in steps] == [1, 2] and all(r["teacher_refresh_mb"] > 0 for r in steps)
