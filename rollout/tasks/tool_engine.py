"""A rollout engine that runs the multi-turn tool loop, for tasks that need tools (task "calc").

`ToolEngine(engine, tokenizer, tool_names)` has the rollout-engine interface the trainer uses
(`generate`, `load_state_dict_`, `update_weights_from_disk`, `close`, ...): `generate` runs
`rollout.agent.ToolAgent` over the wrapped engine (model turn -> tool calls -> tool output as
mask-0 tokens -> next model turn), everything else is passed through. `max_new_tokens` is the
budget of the whole trajectory (model + tool tokens).

The trainer wraps its rollout engines in it for any built-in task that names tools
(`student_trainer.trainer.task_tools`); `with_tools(engine, tokenizer, task)` does the same for a
task object (`rollout.evaluate.model_accuracy` evaluates a model through the loop this way).
"""

from __future__ import annotations


class ToolEngine:
    def __init__(self, engine, tokenizer, tool_names=("calculator",), *, max_turns: int = 3):
        from rollout.agent import AgentConfig, ToolAgent
        from rollout.tools import default_tools

        reg = default_tools()
        unknown = set(tool_names) - set(reg.tools)
        if unknown:
            raise ValueError(f"unknown tools {sorted(unknown)}; built in: {sorted(reg.tools)}")
        reg.tools = {k: v for k, v in reg.tools.items() if k in tool_names}
        self.inner = engine
        self.agent = ToolAgent(engine, tokenizer, reg, AgentConfig(max_turns=max_turns, max_tool_response_tokens=32))

    def generate(self, prompt_ids_list, params, *, group_ids=None, metadata=None):
        return self.agent.generate(prompt_ids_list, params, group_ids=group_ids, metadata=metadata)

    def __getattr__(self, name):  # load_state_dict_, update_weights_from_disk, close, policy_version, ...
        return getattr(self.inner, name)


def with_tools(engine, tokenizer, task):
    return ToolEngine(engine, tokenizer, task.tools) if getattr(task, "tools", ()) else engine

