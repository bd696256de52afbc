"""`opd rollout-server` over HTTP, and the SGLang client against it (and against recorded fixtures)."""

import asyncio
import json
import sys
from pathlib import Path

import pytest

from rollout import SamplingParams, SyncEngine
from rollout.local_engine import LocalEngine
from rollout.server import RolloutService, ServerThread
from rollout.sglang_client import SGLangEngine, SGLangError, http_json, parse_generate_item

FIXTURES = Path(__file__).parent / "fixtures" / "sglang"
PROMPT = [1, 351, 205, 354, 2, 205, 1, 503, 205]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from opd.tiny import build_model

    d = tmp_path_factory.mktemp("tiny_rollout_server")
    build_model(d, size="test")
    return str(d)


@pytest.fixture(scope="module")
def served(tiny_dir):
    engine = LocalEngine.from_pretrained(tiny_dir)
    svc = RolloutService(engine, tiny_dir)
    with ServerThread(svc) as url:
        yield url, engine
    engine.close()


def test_fixture_shapes_parse():
    single = parse_generate_item(json.loads((FIXTURES / "generate_single.json").read_text()))
    assert single.output_ids[-1] == 151645 and single.finish_reason == "stop" and single.matched == 151645
    assert single.logprobs[0] == -0.41 and single.weight_version == "12"
    batch = [parse_generate_item(x) for x in json.loads((FIXTURES / "generate_n2_skip_tokenizer.json").read_text())]
    assert [b.finish_reason for b in batch] == ["length", "stop"] and batch[1].output_ids == [19, 151645]
    ab = parse_generate_item(json.loads((FIXTURES / "generate_abort.json").read_text()))
    assert ab.finish_reason == "abort" and ab.output_ids == [17, 10] and "Abort" in ab.abort_message
    old = parse_generate_item(json.loads((FIXTURES / "generate_v0410_no_output_ids.json").read_text()))
    assert old.output_ids == [17, 10, 17]
    with pytest.raises(SGLangError, match="return_logprob"):
        parse_generate_item({"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"}}})


def test_server_response_shape_matches_fixture(served):
    url, _ = served
    status, resp = http_json(url + "/generate", {"input_ids": PROMPT, "rid": "s12-p0", "return_logprob": True,
                                                  "sampling_params": {"temperature": 0.0, "max_new_tokens": 5,
                                                                      "ignore_eos": True}})
    assert status == 200
    fixture = json.loads((FIXTURES / "generate_single.json").read_text())
    assert set(fixture) == set(resp)
    assert set(fixture["meta_info"]) - {"response_sent_to_client_ts"} <= set(resp["meta_info"])
    meta = resp["meta_info"]
    assert meta["id"] == "s12-p0" and meta["completion_tokens"] == len(resp["output_ids"]) == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5} and meta["prompt_tokens"] == len(PROMPT)
    assert [e[1] for e in meta["output_token_logprobs"]] == resp["output_ids"]
    assert all(e[2] is None for e in meta["output_token_logprobs"])


def test_server_batch_n_and_errors(served):
    url, _ = served
    status, resp = http_json(url + "/generate", {"input_ids": [PROMPT, PROMPT[:4]], "return_logprob": True,
                                                  "sampling_params": {"max_new_tokens": 3, "n": 2, "sampling_seed": 1}})
    assert status == 200 and isinstance(resp, list) and len(resp) == 4
    assert [r["meta_info"]["prompt_tokens"] for r in resp] == [9, 9, 4, 4]  # prompt-major
    status, resp = http_json(url + "/generate", {"input_ids": PROMPT, "sampling_params": {"seed": 3}})
    assert status == 400 and "seed" in resp["error"]
    status, resp = http_json(url + "/generate", {"input_ids": [], "sampling_params": {}})
    assert status == 400
    status, resp = http_json(url + "/generate", {"input_ids": [10**6]})
    assert status == 400 and "vocabulary" in resp["error"]["message"]  # SGLang's ValueError shape


def test_server_control_endpoints(served, tmp_path):
    url, engine = served
    assert http_json(url + "/health", method="GET")[0] == 200
    assert http_json(url + "/health_generate", method="GET")[0] == 200
    s, info = http_json(url + "/model_info", method="GET")
    assert s == 200 and set(json.loads((FIXTURES / "model_info.json").read_text())) == set(info)
    assert http_json(url + "/flush_cache")[0] == 200
    assert http_json(url + "/release_memory_occupation", {"tags": ["kv_cache"]}) == (200, None)
    assert http_json(url + "/resume_memory_occupation", {"tags": None}) == (200, None)
    assert http_json(url + "/release_memory_occupation", {"tags": ["gpu"]})[0] == 400
    s, r = http_json(url + "/update_weights_from_disk", {"model_path": str(tmp_path)})
    assert s == 400 and r["success"] is False and "safetensors" in r["message"]
    s, r = http_json(url + "/init_weights_update_group", {"master_address": "x", "master_port": 1,
                                                          "rank_offset": 1, "world_size": 2})
    assert s == 400 and r["success"] is False


def test_sglang_client_against_rollout_server(served, tiny_dir, tmp_path):
    url, engine = served
    client = SGLangEngine([url, url], sync_dir=str(tmp_path), base_model_dir=tiny_dir)
    sync = SyncEngine(client)
    try:
        params = SamplingParams(n=3, temperature=0.8, top_k=50, max_new_tokens=6, seed=7)
        rollouts = sync.generate([PROMPT, PROMPT[:5]], params)
        assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(2) for j in range(3)]
        # Same tokens and log-probs as the local engine with the same seeds: the client adds nothing.
        local = SyncEngine(engine)
        ref = local.generate([PROMPT, PROMPT[:5]], params)
        assert [r.response_ids for r in rollouts] == [r.response_ids for r in ref]
        for a, b in zip(rollouts, ref):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6) and a.finish_reason == b.finish_reason
        # Weight sync via the disk path bumps the version reported by the server.
        sd = {k: v.clone() for k, v in engine.model.state_dict().items()}
        sync.update_weights_from_state_dict(sd, version=5)
        assert sync.policy_version == 5
        again = sync.generate([PROMPT], SamplingParams(max_new_tokens=2))
        assert again[0].policy_version == 5
        assert asyncio.run(client.health())
        asyncio.run(client.flush_cache())
        asyncio.run(client.release_memory_occupation(["weights"]))
        asyncio.run(client.resume_memory_occupation())
        asyncio.run(client.pause_generation())
        asyncio.run(client.continue_generation())
        local.close()
    finally:
        sync.close()
        client.close()


def test_launcher_starts_rollout_server_process(tiny_dir):
    from rollout.launcher import launch_server

    with launch_server(tiny_dir, command=[sys.executable, "-m", "opd", "rollout-server"], timeout_s=60) as srv:
        status, resp = http_json(srv.url + "/generate", {"input_ids": PROMPT, "return_logprob": True,
                                                          "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and len(resp["output_ids"]) == 2
