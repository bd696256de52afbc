"""Local engine: log-prob consistency against an independent forward, sampling options, weights."""

import asyncio

import pytest
import torch

from rollout import SamplingParams, SyncEngine
from rollout.local_engine import LocalEngine
from rollout.sampling import filter_logprobs_


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from opd.tiny import build_model

    d = tmp_path_factory.mktemp("tiny_rollout_engine")
    build_model(d, size="test")
    return str(d)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = LocalEngine.from_pretrained(tiny_dir, max_batch_size=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def sync(engine):
    s = SyncEngine(engine)
    yield s
    s.close()


PROMPTS = [[1, 351, 205, 354, 2, 205, 1, 503, 205], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 2, 205, 1, 503, 205],
           [1, 7, 8, 2]]


def reference_logprobs(model, prompt, response, temperature):
    """Definition: one unpadded forward over prompt+response, log_softmax(logits / T) at each token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    scale = temperature if temperature >= 1e-6 else 1.0
    lp = torch.log_softmax(logits / scale, -1)
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 20), (0.0, 1.0, -1)])
def test_logprobs_match_independent_forward(engine, sync, temperature, top_p, top_k):
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=5,
                            ignore_eos=True)
    rollouts = sync.generate(PROMPTS, params)
    assert len(rollouts) == 9
    for r in rollouts:
        assert len(r.response_ids) == 12 and r.finish_reason == "length"
        ref = reference_logprobs(engine.model, r.prompt_ids, r.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
        assert r.response_mask == [1] * 12


def test_seeded_sampling_is_reproducible_and_batch_independent(sync):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=11, ignore_eos=True)
    a = sync.generate(PROMPTS, params)
    b = sync.generate(PROMPTS[:1], params)  # different batch composition, same seeds for prompt 0
    assert [r.response_ids for r in a[:2]] == [r.response_ids for r in b]
    assert a[0].response_ids != a[1].response_ids  # distinct seeds per sample


def test_top_k_one_is_greedy(sync):
    g = sync.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    k1 = sync.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, ignore_eos=True))
    assert [r.response_ids for r in g] == [r.response_ids for r in k1]


def test_filter_keeps_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = filter_logprobs_(logp.clone(), torch.tensor([0.8]), torch.tensor([-1]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = filter_logprobs_(logp.clone(), torch.tensor([1.0]), torch.tensor([3]))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]


def test_stop_token_and_max_tokens(sync):
    greedy = sync.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))[0]
    stop_at = greedy.response_ids[3]
    first = greedy.response_ids.index(stop_at)
    r = sync.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop_at,),
                                                   ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.response_ids == greedy.response_ids[:first + 1]
    r0 = sync.generate(PROMPTS[:1], SamplingParams(max_new_tokens=0))[0]
    assert r0.response_ids == [] and r0.finish_reason == "length"


def test_streams_in_completion_order(engine):
    async def run():
        order = []
        params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
        short = SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)
        long_task = [r async for r in engine.generate(PROMPTS[:1], params)]  # warm-up, not timed
        assert long_task
        async def consume(gen, tag):
            async for _ in gen:
                order.append(tag)
        await asyncio.gather(consume(engine.generate(PROMPTS[:1], params), "long"),
                             consume(engine.generate(PROMPTS[1:2], short), "short"))
        return order
    assert asyncio.run(run()) == ["short", "long"]


def test_weight_update_in_place_and_version(tiny_dir, tmp_path):
    eng = LocalEngine.from_pretrained(tiny_dir)
    s = SyncEngine(eng)
    try:
        p = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
        before = s.generate(PROMPTS[:1], p)[0]
        sd = {k: v.clone() for k, v in eng.model.state_dict().items()}
        w = sd["lm_head.weight"]
        w[before.response_ids[0]] = -100.0  # make the first greedy token impossible
        s.update_weights_from_state_dict({"lm_head.weight": w}, version=3)
        after = s.generate(PROMPTS[:1], p)[0]
        assert after.policy_version == 3 and after.response_ids[0] != before.response_ids[0]
        with pytest.raises(ValueError, match="unknown parameter names"):
            eng.load_state_dict_({"nope.weight": w})
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
        s.update_weights_from_disk(str(tmp_path), version=4)
        assert eng.policy_version == 4
    finally:
        s.close()
        eng.close()
