"""SGLang's semantics on the trainer side, and `opd rollout-server` held to SGLang 0.5.23's own
definitions (tests/sglang_reference.py fetches its wheel and imports its request/response classes).

Nothing here was recorded from a running SGLang (none can run on these machines): the expected
behaviour is SGLang's own code (its JSON-contract decoder, SamplingParams.verify(), the API-key
decision function) run on the same inputs, plus its route table and request classes read from
source. Fixtures under tests/fixtures/sglang/ were written by hand from sglang 0.5.23 source.
"""

import asyncio
import json
import logging
import sys
import time

import pytest

from rollout import SamplingParams
from rollout.local_engine import LocalEngine
from rollout.server import RolloutService, ServerThread, make_server
from rollout.sglang_client import SGLangEngine, SGLangError, http_json, to_sglang_sampling_params
from rollout.sglang_contract import ADMIN_OPTIONAL_ROUTES, auth_status
from tests import sglang_reference

PROMPT = [1, 351, 205, 354, 2, 205, 1, 503, 205]
KEY = "sk-opd-test"


@pytest.fixture(scope="module")
def sgl():
    try:
        root = sglang_reference.ensure_source()
    except RuntimeError as e:  # no PyPI: say so loudly rather than pass without the reference
        pytest.fail(f"{e}\nThese tests check the stand-in against SGLang's own classes; they need PyPI once "
                    "(or OPD_SGLANG_CACHE pointing at an unpacked sglang 0.5.23 wheel).")
    return sglang_reference.load_modules(root)


@pytest.fixture(scope="module")
def engine(models):
    eng = LocalEngine.from_pretrained(models[1])
    yield eng
    eng.close()


def _sglang_verdict(sgl, body, vocab):
    """What SGLang 0.5.23 answers: (400, {"error": str}) from its contract gate,
    (400, {"error": {"message": str}}) from SamplingParams.verify(), or None (admitted)."""
    try:
        sgl.api_types.GenerateRequest.from_json_value(body)
    except sgl.api_types.JsonContractError as e:
        return 400, {"error": str(e)}
    sps = body.get("sampling_params") or {}
    for sp in sps if isinstance(sps, list) else [sps]:
        try:
            sgl.sampling_params.SamplingParams(**sp).verify(vocab)
        except ValueError as e:
            return 400, {"error": {"message": str(e)}}
    return None


def test_stand_in_matches_sglang_classes(sgl, engine, models):
    """Requests the client sends parse in SGLang's classes; the stand-in refuses exactly what SGLang
    refuses (same status, shape and text), answers in SGLang's response structs, and guards the
    routes SGLang's API-key middleware guards."""
    from rollout.sglang_contract import SAMPLING_FIELDS

    vocab = engine.vocab_size
    # 1. Every sampling-params shape the client builds parses and verifies in SGLang's SamplingParams.
    variants = [SamplingParams(), SamplingParams(temperature=0.0, max_new_tokens=3),
                SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, stop=(2, "\n\n"), ignore_eos=True),
                SamplingParams(temperature=1.3, top_k=1, max_new_tokens=1)]
    for i, p in enumerate(variants):
        sp = to_sglang_sampling_params(p, seed=None if i % 2 else 2**62 + i)
        body = {"input_ids": PROMPT, "sampling_params": sp, "return_logprob": True, "rid": f"r{i}"}
        assert _sglang_verdict(sgl, body, vocab) is None, body
        assert set(body) <= sgl.request_fields["GenerateReqInput"]
    assert tuple(SAMPLING_FIELDS) == tuple(sgl.api_types._FIELDS_SamplingParams)

    # 2. Control bodies the client sends: every field is one of the route's request class (SGLang
    # drops unknown fields silently, so a typo would go unnoticed there).
    sent = []
    import rollout.sglang_client as client_mod

    real = client_mod.http_json
    client_mod.http_json = lambda url, body=None, **kw: (sent.append((url, body)), (200, {"success": True}))[1]
    try:
        c = SGLangEngine("http://127.0.0.1:9")

        async def calls():
            await c.update_weights_from_disk("/x", 3)
            await c.pause_generation("retract")
            await c.continue_generation()
            await c.release_memory_occupation(["kv_cache"])
            await c.resume_memory_occupation()
            await c.begin_weight_update()
            await c.end_weight_update()
            await c.flush_cache()
        asyncio.run(calls())
        c.close()
    finally:
        client_mod.http_json = real
    for url, body in sent:
        path = url[len("http://127.0.0.1:9"):]
        cls = sgl.routes[path]["body"]
        if cls in sgl.request_fields:
            assert set(body or {}) <= sgl.request_fields[cls], (path, body, cls)
        else:  # /flush_cache takes a query parameter only
            assert not body, (path, body)

    # 3. Strictness: the stand-in's answer to each body equals SGLang's own verdict.
    svc = RolloutService(engine, models[1])
    with ServerThread(svc) as url:
        bad = [{"temperature": "0.7"}, {"max_new_tokens": 5.0}, {"seed": 3}, {"top_k": 0}, {"top_p": 0},
               {"temperature": -1}, {"temperature": True}, {"n": "2"}, {"stop_token_ids": ["1"]},
               {"max_new_tokens": -1}, {"min_p": 2.0}, {"sampling_seed": 1.5}, {"logit_bias": {"9999": 1.0}},
               {"ignore_eos": 1}, [{"max_new_tokens": 2}, {"temprature": 1.0}]]
        bodies = [{"input_ids": PROMPT if not isinstance(sp, list) else [PROMPT, PROMPT], "sampling_params": sp}
                  for sp in bad]
        # Top-level values FastAPI's own parse of GenerateReqInput admits (lax bools) reach the contract gate.
        bodies += [{"input_ids": PROMPT, "return_logprob": "yes"}, {"input_ids": PROMPT, "stream": 1}]
        for body in bodies:
            want = _sglang_verdict(sgl, body, vocab)
            assert want is not None, body
            assert http_json(url + "/generate", body) == want, body
        # Top-level values of the wrong type that FastAPI refuses before the contract gate: SGLang
        # answers 400 in its pydantic-error shape there; the stand-in answers 400 with the contract's text.
        for body in [{"input_ids": "1 2 3"}, {"input_ids": [1.5, 2]}, {"input_ids": PROMPT, "rid": 7}]:
            want = _sglang_verdict(sgl, body, vocab)
            assert want is not None and http_json(url + "/generate", body) == want, body
        # Admitted by SGLang, and by the stand-in: null means the default there.
        ok = {"input_ids": PROMPT, "return_logprob": True,
              "sampling_params": {"temperature": 0, "top_k": -1, "max_new_tokens": 3, "top_p": None, "n": None}}
        assert _sglang_verdict(sgl, ok, vocab) is None
        status, single = http_json(url + "/generate", ok)
        assert status == 200
        # Known difference, on purpose: keys SGLang implements and the stand-in does not are refused.
        s, r = http_json(url + "/generate", {"input_ids": PROMPT, "sampling_params": {"frequency_penalty": 0.5}})
        assert _sglang_verdict(sgl, {"input_ids": PROMPT, "sampling_params": {"frequency_penalty": 0.5}}, vocab) is None
        assert s == 400 and "not supported by opd rollout-server" in r["error"]["message"]

        # 4. Responses decode in SGLang's response structs and carry the fields it sends.
        status, batch = http_json(url + "/generate", {"input_ids": [PROMPT, PROMPT[:4]], "return_logprob": True,
                                                      "sampling_params": {"max_new_tokens": 4, "n": 2}})
        svc.abort_next(1, after_tokens=2)
        _, aborted = http_json(url + "/generate", {"input_ids": PROMPT, "return_logprob": True,
                                                   "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
        assert aborted["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted", "status_code": None,
                                                         "err_type": None}
        assert len(aborted["output_ids"]) == 2  # partial output, HTTP 200, as SGLang's aborts
        # Fields of GenerateMetaInfo a token-in/out request without top-k/hidden states/images gets:
        not_applicable = {"output_top_logprobs", "input_top_logprobs", "output_token_ids_logprobs",
                          "input_token_ids_logprobs", "hidden_states", "image_tokens", "audio_tokens", "video_tokens"}
        meta_fields = set(sgl.api_types.GenerateMetaInfo.__struct_fields__) - not_applicable
        at = sgl.api_types
        for item in [single, aborted] + batch:
            decoded = at.GenerateResponse.from_json_value(item)
            # the decoder falls back to a plain dict for a finish_reason that does not fit its structs
            assert isinstance(decoded.meta_info.finish_reason, (at.FinishStop, at.FinishLength, at.FinishAbort))
            assert [e.token_id for e in decoded.meta_info.output_token_logprobs] == item["output_ids"]
            assert decoded.output_ids == item["output_ids"] and decoded.meta_info.id == item["meta_info"]["id"]
            assert meta_fields <= set(item["meta_info"]), meta_fields - set(item["meta_info"])
            assert set(item) <= set(sgl.api_types.GenerateResponse.__struct_fields__)
        s, info = http_json(url + "/model_info", method="GET")
        assert s == 200 and set(info) == sgl.model_info_keys
    # The client reads what SGLang's own encoder writes (here an aborted sample and a stop).
    from rollout.sglang_client import parse_generate_item

    lp = [at.LogprobEntry(logprob=-0.5, token_id=17), at.LogprobEntry(logprob=-1.5, token_id=4)]
    for fr, kind in [(at.FinishAbort(message="Abort before prefill"), "abort"), (at.FinishStop(matched=4), "stop")]:
        wire = at.GenerateResponse(output_ids=[17, 4], meta_info=at.GenerateMetaInfo(
            id="r", prompt_tokens=9, completion_tokens=2, finish_reason=fr, output_token_logprobs=lp,
            weight_version="3")).to_json_value()
        got = parse_generate_item(json.loads(json.dumps(wire)))
        assert (got.finish_reason, got.output_ids, got.logprobs, got.weight_version) == (kind, [17, 4], [-0.5, -1.5], "3")

    # 5. API keys: the stand-in's decision equals SGLang's middleware on every route either serves.
    assert ADMIN_OPTIONAL_ROUTES <= {p for p, r in sgl.routes.items() if r["auth"] == "ADMIN_OPTIONAL"}
    served = ADMIN_OPTIONAL_ROUTES | {"/generate", "/model_info", "/get_model_info", "/server_info", "/health",
                                      "/health_generate", "/ready", "/no_such_route"}
    level = sgl.auth.AuthLevel
    for path in sorted(served):
        lv = level[sgl.routes[path]["auth"]] if path in sgl.routes else level.NORMAL
        for api_key, admin in [(None, None), (KEY, None), (KEY, "adm"), (None, "adm")]:
            for header in [None, f"Bearer {KEY}", f"bearer {KEY}", "Bearer adm", KEY, "Bearer  " + KEY]:
                d = sgl.auth.decide_request_auth(method="POST", path=path, authorization_header=header,
                                                 api_key=api_key, admin_api_key=admin, auth_level=lv)
                want = 200 if d.allowed else d.error_status_code
                assert auth_status("POST", path, header, api_key, admin) == want, (path, api_key, admin, header)

    # ... and over HTTP: `opd rollout-server --api-key`, through the trainer's client.
    from rollout.launcher import launch_server

    with launch_server(models[1], command=[sys.executable, "-m", "opd", "rollout-server"],
                       extra_args=["--api-key", KEY, "--admin-api-key", "adm"], timeout_s=120) as srv:
        url = srv.url
        assert http_json(url + "/generate", {"input_ids": PROMPT}) == (401, {"error": "Unauthorized"})
        assert http_json(url + "/model_info", method="GET")[0] == 401
        assert http_json(url + "/update_weights_from_disk", {"model_path": "/x"})[0] == 401
        assert http_json(url + "/health", method="GET")[0] == 200  # open, as in SGLang
        assert http_json(url + "/health_generate", method="GET")[0] == 200
        good = SGLangEngine(url, api_key=KEY, admin_api_key="adm")
        nokey = SGLangEngine(url, max_attempts=3)
        try:
            assert asyncio.run(good.model_info())["weight_version"] == "default"
            assert asyncio.run(good.health())
            asyncio.run(good.pause_generation("retract"))  # a control route: the admin key
            asyncio.run(good.continue_generation())
            plain = SGLangEngine(url, api_key=KEY)
            with pytest.raises(SGLangError, match="401"):  # the api key alone does not open it
                asyncio.run(plain.continue_generation())
            plain.close()
            out = asyncio.run(good.sample(PROMPT, SamplingParams(max_new_tokens=2)))
            assert out is not None and len(out.output_ids) == 2
            from student_trainer.config import ConfigError
            from student_trainer.trainer import engine_info

            with pytest.raises(ConfigError, match=r"rollout.urls: .*401.*rollout.api_key"):
                engine_info(nokey, "rollout.urls")  # what the trainer checks at start
            assert engine_info(good, "rollout.urls")["model_path"] == models[1]
            assert asyncio.run(nokey.sample(PROMPT, SamplingParams(max_new_tokens=2))) is None
            assert nokey.stats["failed"] == 1 and nokey.stats["dropped"] == 1  # a 401 is not retried
            assert "401" in nokey.last_error
        finally:
            good.close()
            nokey.close()


def test_aborts_and_a_dead_engine(engine, models, tmp_path, caplog, monkeypatch):
    """Aborted samples are retried then dropped (never yielded); /pause_generation(mode=abort) and
    /abort_request abort for real; an engine that dies is skipped with a warning, probed with
    backoff, and rejoins once healthy, after reloading the weights it missed."""
    svc_a, svc_b = RolloutService(engine, models[1]), RolloutService(engine, models[1])
    ta, tb = ServerThread(svc_a), ServerThread(svc_b)
    url_a, url_b = ta.__enter__(), tb.__enter__()
    port_b = tb.server.server_address[1]
    client = SGLangEngine([url_a, url_b], max_attempts=2, retry_backoff_s=0.01, probe_backoff_s=0.2,
                          max_probe_backoff_s=0.8)
    try:
        p = SamplingParams(n=2, max_new_tokens=4, ignore_eos=True, seed=1)
        # Retried: one abort, then a full sample.
        one = SGLangEngine(url_a, max_attempts=2, retry_backoff_s=0.01)
        svc_a.abort_next(1)
        got = asyncio.run(one.sample(PROMPT, SamplingParams(max_new_tokens=4, ignore_eos=True)))
        assert got.finish_reason == "length" and len(got.output_ids) == 4
        assert one.stats["aborted"] == 1 and one.stats["retried"] == 1 and one.stats["dropped"] == 0
        # Dropped: aborted on every attempt; generate() yields only the samples that finished.
        svc_a.abort_next(2)

        async def collect(eng, prompts, params):
            return [r async for r in eng.generate(prompts, params)]
        assert asyncio.run(collect(one, [PROMPT], SamplingParams(max_new_tokens=3))) == []
        assert one.stats["dropped"] == 1 and one.stats["aborted"] == 3 and one.stats["retried"] == 2
        # The tool loop over such an engine ends that trajectory as aborted (the trainer drops it).
        from rollout.agent import ToolAgent
        from rollout.tools import default_tools

        svc_a.abort_next(2)
        traj = asyncio.run(ToolAgent(one, engine.tokenizer, default_tools()).run(PROMPT, SamplingParams(max_new_tokens=3)))
        assert traj.finish_reason == "abort" and traj.response_ids == [] and one.stats["dropped"] == 2
        # Through a router: /generate goes to the router URL only, control calls to the workers only.
        routed = SGLangEngine([url_b], router_url=url_a)
        before = (svc_a.generated, svc_b.generated)
        assert len(asyncio.run(collect(routed, [PROMPT], SamplingParams(n=2, max_new_tokens=2)))) == 2
        assert (svc_a.generated, svc_b.generated) == (before[0] + 2, before[1])
        asyncio.run(routed.pause_generation("retract"))
        assert svc_b.paused and not svc_a.paused
        asyncio.run(routed.continue_generation())
        assert not svc_b.paused
        routed.close()
        one.close()

        # Real aborts through SGLang's routes: pause_generation(mode=abort) ends what is running
        # with its partial output; /abort_request by rid.
        import threading

        res = {}
        long = {"input_ids": PROMPT, "return_logprob": True, "rid": "long-1",
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
        th = threading.Thread(target=lambda: res.update(r=http_json(url_a + "/generate", long)))
        th.start()
        while not any(s.out_ids for s in list(engine._live.values())):
            time.sleep(0.005)
        assert http_json(url_a + "/pause_generation", {"mode": "abort"})[0] == 200
        th.join(30)
        status, r = res["r"]
        assert status == 200 and r["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(r["output_ids"]) < 400 and len(r["meta_info"]["output_token_logprobs"]) == len(r["output_ids"])
        assert http_json(url_a + "/continue_generation", {})[0] == 200
        th = threading.Thread(target=lambda: res.update(r=http_json(url_b + "/generate", long)))
        th.start()
        while not engine._live:
            time.sleep(0.005)
        assert http_json(url_b + "/abort_request", {"rid": "long-1"})[0] == 200
        th.join(30)
        assert res["r"][1]["meta_info"]["finish_reason"]["type"] == "abort"

        # A dead engine: every sample still comes back, from the live one; counted and warned.
        client.stats.clear()
        tb.__exit__(None, None, None)
        with caplog.at_level(logging.WARNING, logger="opd.rollout"):
            out = asyncio.run(collect(client, [PROMPT, PROMPT[:5]], p))
        assert len(out) == 4 and client.stats["engine_down"] == 1 and client.alive_urls() == [url_a]
        assert any("is down" in r.message and url_b in r.message for r in caplog.records)
        # Weights move on while it is down: only the live engine gets them.
        sd = {k: v.clone() for k, v in engine.model.state_dict().items()}
        from safetensors.torch import save_file

        save_file(sd, str(tmp_path / "model.safetensors"))
        asyncio.run(client.update_weights_from_disk(str(tmp_path), 7))
        assert svc_a.weight_version == "7"
        # It comes back (same port, fresh process state: weight_version "default"); after the probe
        # backoff it reloads the newest checkpoint and serves again.
        svc_b2 = RolloutService(engine, models[1])
        srv = make_server(svc_b2, "127.0.0.1", port_b)
        th_b = threading.Thread(target=srv.serve_forever, daemon=True)
        th_b.start()
        try:
            out, deadline = [], time.monotonic() + 30
            with caplog.at_level(logging.WARNING, logger="opd.rollout"):
                while not client.stats["engine_rejoined"] and time.monotonic() < deadline:
                    time.sleep(0.1)  # the next probe is due within the capped backoff (0.8 s)
                    got = asyncio.run(collect(client, [PROMPT], p))
                    assert len(got) == 2
                    out += got
            assert client.stats["engine_rejoined"] == 1 and svc_b2.weight_version == "7"
            out += asyncio.run(collect(client, [PROMPT] * 2, p))  # round-robin over both again
            assert svc_b2.generated >= 2 and client.alive_urls() == [url_a, url_b]
            assert {r.policy_version for r in out} == {7}
            assert any("rejoins" in r.message for r in caplog.records)
        finally:
            srv.shutdown()
            srv.server_close()
        # Every engine down: a request waits for one to come back instead of spending its attempts.
        only_b = SGLangEngine([url_b], max_attempts=1, probe_backoff_s=0.1, max_probe_backoff_s=0.2)
        only_b._mark_down(url_b, "test")
        srv = make_server(RolloutService(engine, models[1]), "127.0.0.1", port_b)
        later = threading.Timer(0.5, srv.serve_forever)
        later.daemon = True
        later.start()
        try:
            got = asyncio.run(only_b.sample(PROMPT, SamplingParams(max_new_tokens=2)))
            assert got is not None and only_b.stats["failed"] == 0 and only_b.stats["engine_rejoined"] == 1
            only_b.wait_for_engine_s = 0.3
            only_b._mark_down(url_b, "test")
            srv.shutdown()
            srv.server_close()
            assert asyncio.run(only_b.sample(PROMPT, SamplingParams(max_new_tokens=2))) is None
            assert "no rollout engine answered" in only_b.last_error
            from student_trainer.config import ConfigError
            from student_trainer.trainer import engine_info

            with pytest.raises(ConfigError, match="warmup.rollout_url: no SGLang engine answered"):
                engine_info(only_b, "warmup.rollout_url", poll_s=0.05)  # nothing listens there any more
        finally:
            only_b.close()
    finally:
        client.close()
        ta.__exit__(None, None, None)


def test_trainer_sglang_warmup_engine_aborts_and_api_key(models, tmp_path):
    """`opd train` with rollout.engine=sglang: warm-up rollouts come from the engine serving the
    teacher (warmup.rollout_url), never the student's engines; an aborted rollout is dropped with
    its whole group and counted, the step goes on; every engine takes an API key."""
    from student_trainer.config import ConfigError, load_config
    from student_trainer.trainer import Trainer
    from tests.teacher_helpers import running_server

    teacher, student = models
    eng_s, eng_t = LocalEngine.from_pretrained(student), LocalEngine.from_pretrained(teacher)
    students = [RolloutService(eng_s, student, api_key=KEY), RolloutService(eng_s, student, api_key=KEY)]
    warm = RolloutService(eng_t, teacher, api_key=KEY)
    threads = [ServerThread(s) for s in students + [warm]]
    urls = [t.__enter__() for t in threads]
    seen = {}
    try:
        with running_server(teacher) as (_, turl):
            base = [f"model.student={student}", "model.dtype=fp32", "data.task=arithmetic", f"teacher.url={turl}",
                    f"run.out_dir={tmp_path}", "rollout.max_new_tokens=6", "data.prompts_per_step=4", "rollout.n=2",
                    "run.plot=false", "run.export_hf=false", "run.progress=false", "rollout.engine=sglang",
                    f"rollout.urls={urls[0]},{urls[1]}", "rollout.weight_sync=disk", "warmup.steps=1",
                    "rollout.max_attempts=1", "run.steps=2"]
            with pytest.raises(ConfigError, match="needs warmup.rollout_url"):
                load_config(None, base)
            with pytest.raises(ConfigError, match="also a student engine"):
                load_config(None, base + [f"warmup.rollout_url={urls[1]}"])
            cfg = load_config(None, base + [f"warmup.rollout_url={urls[2]}", f"rollout.api_key={KEY}"])
            warm.abort_next(1)  # the first warm-up sample is aborted (1 token) and, with one attempt, dropped

            def on_step(step, m):
                seen[step] = (m, [s.generated for s in students], warm.generated)
            tr = Trainer(cfg, on_step=on_step)
            try:
                tr.run()
            finally:
                tr.close()
    finally:
        for t in threads:
            t.__exit__(None, None, None)
        eng_s.close()
        eng_t.close()
    (m1, st1, w1), (m2, st2, w2) = seen[1], seen[2]
    assert st1 == [0, 0] and w1 == 8  # step 1 (warm-up): 4 prompts x 2 samples, all from the teacher engine
    assert m1["loss_terms"] == "1*forward_kl" and m1["rollout_aborted"] == 1 and m1["groups_dropped"] == 1
    assert m1["rollout_dropped"] == 1
    assert w2 == 8 and sum(st2) == 8 and min(st2) > 0  # step 2: the student engines, round-robin
    assert m2["rollout_aborted"] == 0 and m2["groups_dropped"] == 0 and "forward_kl" not in m2["loss_terms"]
    assert [s.weight_version for s in students] == ["2", "2"] and warm.weight_version == "default"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("groups_dropped") for r in rows if "groups_dropped" in r] == [1, 0]


@pytest.mark.parametrize("args,parts", [
    (["rollout.engine=sglang", "rollout.urls=http://a:1", "warmup.steps=2"], ["warmup.steps", "warmup.rollout_url"]),
    (["rollout.engine=sglang", "rollout.urls=http://a:1,http://b:1", "warmup.steps=2", "warmup.rollout_url=http://b:1/"],
     ["warmup.rollout_url", "http://b:1", "student engine"]),
    (["rollout.engine=sglang", "rollout.urls=http://a:1", "warmup.steps=2", "warmup.rollout_url=http://t:1",
      "warmup.teacher_model=/t"], ["warmup.teacher_model", "'/t'", "warmup.rollout_url"]),
    (["warmup.steps=2", "warmup.teacher_model=/t", "warmup.rollout_url=http://t:1"], ["warmup.rollout_url", "sglang"]),
    (["warmup.rollout_url=http://t:1"], ["warmup.rollout_url", "warmup.steps > 0"]),
    (["rollout.api_key=k"], ["rollout.api_key", "rollout.engine=sglang"]),
    (["rollout.engine=sglang", "rollout.urls=http://a:1", "rollout.max_attempts=0"], ["rollout.max_attempts", "0", ">= 1"]),
])
def test_sglang_keys_checked_when_parsed(args, parts):
    from student_trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.student=/x", "data.task=arithmetic", "teacher.url=127.0.0.1:1", *args])
    assert all(p in str(e.value) for p in parts), str(e.value)
