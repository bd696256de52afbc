"""The multi-turn tool loop: generate a model turn, run its tool calls, append the results as
mask-0 tokens, continue, until the model answers without a tool call or a limit is hit.

Works with any RolloutEngine (it calls `generate` turn by turn with n=1), so the same code drives
the local engine and SGLang. The trajectory is assembled in token space only:
    response = turn_1 + tool_piece_1 + turn_2 + ...   mask = 1...1 0...0 1...1
and the model turns are exactly the engine's output ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rollout.chat import ToolTurnFormatter
from rollout.tools import ToolRegistry, parse_tool_calls
from rollout.types import Rollout, SamplingParams


@dataclass(frozen=True)
class AgentConfig:
    max_turns: int = 4  # model turns
    max_tool_response_tokens: int = 256  # per tool output, before the template wrapping
    max_response_tokens: int | None = None  # model + tool tokens of the whole trajectory; default: params.max_new_tokens
    enable_thinking: bool | None = None


class ToolAgent:
    def __init__(self, engine, tokenizer, tools: ToolRegistry, config: AgentConfig = AgentConfig()):
        self.engine, self.tokenizer, self.tools, self.config = engine, tokenizer, tools, config
        self.formatter = ToolTurnFormatter(tokenizer, enable_thinking=config.enable_thinking)
        self.eos_ids = {tokenizer.eos_token_id}

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.config.max_tool_response_tokens:
            return text
        return self.tokenizer.decode(ids[:self.config.max_tool_response_tokens]) + " ...[truncated]"

    async def _turn(self, ids: list[int], params: SamplingParams) -> Rollout | None:
        """One model turn, or None if the engine dropped it (SGLangEngine leaves out samples that
        stayed aborted or failed after its retries)."""
        out = [r async for r in self.engine.generate([ids], params)]
        assert len(out) <= 1
        return out[0] if out else None

    async def run(self, prompt_ids: Sequence[int], params: SamplingParams, *, prompt_index: int = 0,
                  sample_index: int = 0, group_id: int | None = None, metadata: dict | None = None) -> Rollout:
        cfg = self.config
        budget = cfg.max_response_tokens or params.max_new_tokens
        seed = params.sample_seed(prompt_index, sample_index)
        prompt_ids = list(prompt_ids)
        resp, lps, mask, calls = [], [], [], []
        turns, finish, version = 0, "stop", None
        while True:
            remaining = budget - len(resp)
            if remaining <= 0:
                finish = "length"
                break
            turn_seed = None if seed is None else seed + 7919 * turns
            r = await self._turn(prompt_ids + resp, replace(params, n=1, max_new_tokens=remaining, seed=turn_seed))
            if r is None:  # the trajectory is incomplete: reported as aborted (never trained on)
                finish = "abort"
                break
            turns += 1
            version = r.policy_version if version is None else min(version, r.policy_version)
            resp += r.response_ids
            lps += r.logprobs
            mask += [1] * len(r.response_ids)
            finish = r.finish_reason
            if finish != "stop" or not r.response_ids or r.response_ids[-1] not in self.eos_ids:
                break
            tool_calls = parse_tool_calls(self.tokenizer.decode(r.response_ids, skip_special_tokens=False))
            if not tool_calls or turns >= cfg.max_turns:
                break
            outputs = []
            for tc in tool_calls:
                text, ok = await asyncio.to_thread(self.tools.call, tc)
                text = self._truncate(text)
                outputs.append(text)
                calls.append({"turn": turns, "name": tc.name, "arguments": tc.arguments, "output": text, "ok": ok})
            piece = self.formatter.tool_turn_ids(outputs)
            if len(resp) + len(piece) >= budget:  # no room left for another model token
                finish = "length"
                break
            resp += piece
            lps += [0.0] * len(piece)
            mask += [0] * len(piece)
        return Rollout(prompt_ids=prompt_ids, response_ids=resp, logprobs=lps, response_mask=mask,
                       finish_reason=finish, policy_version=version or 0,
                       group_id=prompt_index if group_id is None else group_id, prompt_index=prompt_index,
                       sample_index=sample_index, num_turns=turns, tool_calls=calls, metadata=dict(metadata or {}))

    async def generate(self, prompt_ids_list, params: SamplingParams, *, group_ids=None, metadata=None):
        """n trajectories per prompt, run concurrently, yielded as each finishes."""
        tasks = [asyncio.ensure_future(self.run(
            ids, params, prompt_index=i, sample_index=j, group_id=None if group_ids is None else group_ids[i],
            metadata=None if metadata is None else metadata[i]))
            for i, ids in enumerate(prompt_ids_list) for j in range(params.n)]
        try:
            for fut in asyncio.as_completed(tasks):
                yield await fut
        finally:
            for t in tasks:
                t.cancel()
