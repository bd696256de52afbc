"""Tool loop: exact token trajectories with tool masks; tool parsing and the restricted evaluators."""

import asyncio

import pytest
import torch

from rollout import Rollout, SamplingParams
from rollout.agent import AgentConfig, ToolAgent
from rollout.chat import encode_chat
from rollout.local_engine import LocalEngine
from rollout.tools import calculator, default_tools, parse_tool_calls, python


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from opd.tiny import build_model

    d = tmp_path_factory.mktemp("tiny_rollout_tools")
    build_model(d, size="test")
    return str(d)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = LocalEngine.from_pretrained(tiny_dir)
    yield eng
    eng.close()


class ScriptedFirstTurn:
    """Forces the first model turn to be fixed token ids (to get tool-call text out of a random
    model); every later turn is the real engine."""

    def __init__(self, engine, first_ids):
        self.engine, self.first_ids, self.calls = engine, first_ids, 0

    @property
    def policy_version(self):
        return self.engine.policy_version

    async def generate(self, prompt_ids_list, params, **kw):
        self.calls += 1
        if self.calls == 1:
            ids = self.first_ids[:params.max_new_tokens]
            yield Rollout(list(prompt_ids_list[0]), ids, [0.0] * len(ids), [1] * len(ids), "stop")
            return
        async for r in self.engine.generate(prompt_ids_list, params, **kw):
            yield r


def run_agent(engine, tok, first_text, config=AgentConfig(), max_new_tokens=40):
    first_ids = tok.encode(first_text, add_special_tokens=False) + [tok.eos_token_id]
    messages = [{"role": "user", "content": "What is 12*3?"}]
    prompt = encode_chat(tok, messages)
    agent = ToolAgent(ScriptedFirstTurn(engine, first_ids), tok, default_tools(), config)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=False)
    return asyncio.run(agent.run(prompt, params)), first_ids, prompt, messages


def test_tool_trajectory_is_exact(engine):
    tok = engine.tokenizer
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*3"}}</tool_call>'
    r, first_ids, prompt, messages = run_agent(engine, tok, call)
    assert r.prompt_ids == prompt and r.num_turns == 2
    assert r.tool_calls == [{"turn": 1, "name": "calculator", "arguments": {"expression": "12*3"}, "output": "36",
                             "ok": True}]
    n1 = len(first_ids)
    piece_len = r.response_mask.index(1, n1) - n1
    piece = r.response_ids[n1:n1 + piece_len]
    assert r.response_ids[:n1] == first_ids and r.response_mask[:n1] == [1] * n1
    assert r.response_mask[n1:n1 + piece_len] == [0] * piece_len and r.logprobs[n1:n1 + piece_len] == [0.0] * piece_len
    assert tok.decode(piece) == ("\n<|im_start|>user\n<tool_response>\n36\n</tool_response><|im_end|>\n"
                                 "<|im_start|>assistant\n")
    # The sequence up to the second turn is exactly what the chat template renders for the conversation.
    convo = messages + [{"role": "assistant", "content": call}, {"role": "tool", "content": "36"}]
    assert r.prompt_ids + r.response_ids[:n1 + piece_len] == encode_chat(tok, convo)
    # The second turn is the real engine's output for that exact context, with its log-probs.
    turn2 = r.response_ids[n1 + piece_len:]
    assert r.response_mask[n1 + piece_len:] == [1] * len(turn2) and len(turn2) > 0
    ctx = r.prompt_ids + r.response_ids[:n1 + piece_len]
    direct = asyncio.run(_collect(engine, ctx, SamplingParams(temperature=0.0, max_new_tokens=40 - n1 - piece_len)))
    assert direct.response_ids == turn2
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ctx + turn2])).logits[0, len(ctx) - 1:-1]
    ref = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(turn2)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(r.logprobs[n1 + piece_len:], dtype=torch.float64), ref, atol=1e-4, rtol=0)


async def _collect(engine, ids, params):
    return [x async for x in engine.generate([ids], params)][0]


def test_malformed_call_gets_error_message_not_crash(engine):
    tok = engine.tokenizer
    r, first_ids, _, _ = run_agent(engine, tok, '<tool_call>{"name": "calculator", "arguments": </tool_call>',
                                  max_new_tokens=200)
    assert r.tool_calls[0]["ok"] is False and "not valid JSON" in r.tool_calls[0]["output"]
    text = tok.decode(r.response_ids[len(first_ids):], skip_special_tokens=False)
    assert "<tool_response>\nError: tool call is not valid JSON" in text
    r, _, _, _ = run_agent(engine, tok, '<tool_call>{"name": "rm", "arguments": {}}</tool_call>')
    assert "unknown tool 'rm'" in r.tool_calls[0]["output"]


def test_limits_max_turns_and_truncation(engine):
    tok = engine.tokenizer
    call = '<tool_call>{"name": "python", "arguments": {"expression": "list(range(400))"}}</tool_call>'
    r, first_ids, _, _ = run_agent(engine, tok, call, AgentConfig(max_turns=1))
    assert r.num_turns == 1 and r.tool_calls == [] and r.response_ids == first_ids
    r, first_ids, _, _ = run_agent(engine, tok, call, AgentConfig(max_tool_response_tokens=10), max_new_tokens=200)
    assert r.tool_calls[0]["output"].endswith("...[truncated]")
    assert len(tok.encode(r.tool_calls[0]["output"])) <= 10 + len(tok.encode(" ...[truncated]")) + 1
    r, first_ids, _, _ = run_agent(engine, tok, call, max_new_tokens=len(first_ids) + 5)
    assert r.finish_reason == "length" and r.response_ids == first_ids  # no room for the tool result


def test_parse_tool_calls_forms():
    calls = parse_tool_calls('a <tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call> b '
                             '<tool_call>[1]</tool_call><tool_call>{"name": "g", "arguments": 3}</tool_call>')
    assert calls[0].name == "f" and calls[0].arguments == {"x": 1} and calls[0].error is None
    assert "must be an object" in calls[1].error and "must be a JSON object" in calls[2].error


def test_calculator_and_python_are_restricted():
    assert calculator("2*(3+4)**2/7") == "14.0" and calculator("sqrt(16) + 10 // 3") == "7.0"
    assert python("sorted([3, 1, 2])[::-1]") == "[3, 2, 1]" and python("1 < 2 <= 2 and max(4, 5) == 5") == "True"
    for expr, msg in [("__import__('os')", "not allowed"), ("(1).__class__", "Attribute"), ("9**9**9", "exponent"),
                      ("'a' * 10**9", "longer"), ("factorial(10**8)", "at most"), ("'abc'", "only numbers")]:
        fn = calculator if msg == "only numbers" else python
        with pytest.raises(ValueError, match=msg):
            fn(expr)
    reg = default_tools()
    out, ok = reg.call(parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>')[0])
    assert not ok and "bad arguments" in out
