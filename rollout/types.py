"""The data that crosses the rollout boundary: sampling options in, finished rollouts out.

A `Rollout` is one sampled trajectory in token space. The trainer consumes exactly these tokens
(no re-tokenisation anywhere): `prompt_ids + response_ids` is the sequence, `response_mask` marks
which response tokens the model produced (1) and which the environment inserted (0, tool output).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

GREEDY_TEMPERATURE = 1e-6  # below this, sampling is greedy (SGLang's threshold)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options (the subset SGLang and the local engine share).

    `stop` mixes token ids (int) and strings; eos always stops unless `ignore_eos`.
    `seed` makes sampling reproducible: sample j of prompt i uses a seed derived from (seed, i, j).
    `top_k <= 0` and `top_p >= 1` disable those filters.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[int | str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return tuple(s for s in self.stop if isinstance(s, int))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """The seed of one sample, or None. Distinct per (prompt, sample), stable across runs."""
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + prompt_index * 10_007 + sample_index) % (2**63 - 1)


FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Rollout:
    """One finished trajectory. `logprobs[t]` is log_softmax(logits / T)[response_ids[t]] under the
    policy that sampled it (unscaled logits when greedy, as SGLang); 0.0 where response_mask is 0."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    response_mask: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    policy_version: int = 0
    group_id: int = 0  # the group this sample belongs to (same prompt); defaults to prompt_index
    prompt_index: int = 0  # position of the prompt in the generate() call
    sample_index: int = 0  # 0..n-1 within the group
    num_turns: int = 1
    tool_calls: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    reward: float | None = None

    def __post_init__(self):
        assert len(self.response_ids) == len(self.logprobs) == len(self.response_mask), (
            len(self.response_ids), len(self.logprobs), len(self.response_mask))
        assert self.finish_reason in FINISH_REASONS, self.finish_reason

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def num_model_tokens(self) -> int:
        return sum(self.response_mask)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rollout":
        return cls(**d)
