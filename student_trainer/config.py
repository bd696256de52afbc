"""Trainer configuration: small frozen dataclasses per component, a JSON/YAML file plus
`--section.key=value` overrides. Unknown sections/keys and bad values fail with a message that
names the key and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelCfg:
    student: str = ""                 # HF directory of the student
    dtype: str = "bf16"               # bf16 | fp32
    gradient_checkpointing: bool = False
    random_init: bool = False         # benchmarks: random weights from the directory's config.json


@dataclass(frozen=True)
class DataCfg:
    path: str = ""                    # JSONL/Parquet prompts (rollout.data layouts); "" with a task
    task: str = ""                    # a built-in task name ("arithmetic") instead of a file
    prompt_key: str = ""
    answer_key: str = ""
    max_prompt_tokens: int = 512
    prompts_per_step: int = 8         # prompts per optimizer step (each sampled rollout.n times)
    shuffle: bool = True
    seed: int = 0


@dataclass(frozen=True)
class RolloutCfg:
    engine: str = "local"             # local | sglang
    urls: str = ""                    # sglang: comma-separated engine URLs
    n: int = 4                        # samples per prompt (a group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    max_batch_size: int = 64          # local engine
    staleness: int = 0                # 0 = strictly on-policy; 1 = rollouts one step ahead
    weight_sync: str = "memory"       # memory (local engine) | disk (portable; sglang)
    sync_dir: str = ""


@dataclass(frozen=True)
class TeacherCfg:
    url: str = ""                     # HOST:PORT[,HOST:PORT...]
    top_k: int = 16
    value_encoding: str = "bf16"
    compression: str = "zstd"
    student_top_k: int = 0            # >0: also send the student's own top-M ids (union support)
    token: str = ""
    timeout_s: float = 600.0
    max_retries: int = 1000           # the teacher going away pauses training, with backoff
    max_backoff_s: float = 10.0
    allow_tokenizer_mismatch: bool = False
    concurrency: int = 4              # scoring calls in flight while rollouts stream in
    batch_sequences: int = 16         # finished rollouts sent per scoring call (whole groups at least)


@dataclass(frozen=True)
class LossCfg:
    objective: str = "opd"            # opd | grpo | opd+grpo | sft
    divergence: str = "reverse_kl"    # any loss-library term (reverse_kl, forward_kl, jsd, pg, k3, ...)
    support: str = "auto"
    temperature: float = 1.0          # the teacher is asked at this temperature; the student uses it too
    beta: float = 0.5
    chunk_size: int = 1024
    reduction: str = "token_mean"
    # Accumulate the lm-head weight gradient over the loss chunks in fp32: V x H x 4 bytes
    # (2.3 GiB at vocab 151,936 x hidden 4096). false accumulates in the weight's dtype (bf16), the
    # choice Liger-Kernel makes: a 16k-token step then fits under 2 GiB of extra memory at hidden
    # 4096, at the cost of bf16 rounding at every chunk's addition.
    fp32_weight_grad: bool = True
    fkl_to_rkl_switch_step: int = -1  # >=0: forward KL before this step, reverse KL after
    fkl_to_rkl_window: int = 0
    rl_weight: float = 0.0            # opd+grpo: weight of the GRPO term
    sft_weight: float = 0.0
    clip_eps: float = 0.2
    gamma: float = 0.0
    token_keep_ratio: float = 1.0     # TIP: keep this fraction of tokens (1.0 = all)
    token_score: str = "product"      # product | soft_or
    sample_weighting: str = "none"    # none | reward | paced
    reward_beta: float = 1.0
    paced_a: float = 1.0
    paced_b: float = 1.0
    reward_fn: str = ""               # grader name for rewards ("" = the task's own)


@dataclass(frozen=True)
class WarmupCfg:
    steps: int = 0                    # forward-KL warm-up steps on teacher-generated rollouts
    teacher_model: str = ""           # HF dir the rollout engine generates with during warm-up


@dataclass(frozen=True)
class OptimCfg:
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    zero_stage: int = 2               # 2 | 3
    offload_optimizer: bool = True    # DeepSpeedCPUAdam on the host
    micro_batch_tokens: int = 4096    # token budget of one packed micro-batch


@dataclass(frozen=True)
class RunCfg:
    steps: int = 100
    out_dir: str = "runs/opd"
    seed: int = 0
    device: str = "cpu"               # cpu | cuda | cuda:N
    save_every: int = 0               # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_prompts: int = 64
    log_every: int = 1
    export_hf: bool = True            # write a Hugging Face directory at the end
    progress: bool = True
    tensorboard: bool = True          # when the tensorboard package is installed
    plot: bool = True                 # PNG of the main curves at the end (matplotlib)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    warmup: WarmupCfg = field(default_factory=WarmupCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


CHOICES = {
    "model.dtype": ("bf16", "fp32"),
    "rollout.engine": ("local", "sglang"),
    "rollout.weight_sync": ("memory", "disk"),
    "teacher.value_encoding": ("fp32", "bf16", "fp16", "q16", "q8"),
    "teacher.compression": ("none", "zstd"),
    "loss.objective": ("opd", "grpo", "opd+grpo", "sft"),
    "loss.reduction": ("token_mean", "seq_mean", "sum"),
    "loss.token_score": ("product", "soft_or"),
    "loss.sample_weighting": ("none", "reward", "paced"),
    "optim.zero_stage": (2, 3),
    "rollout.staleness": (0, 1),
}


def _coerce(key: str, typ, value):
    origin = typing.get_origin(typ)
    try:
        if typ is bool or typ == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if typ in (int, "int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ in (float, "float"):
            return float(value)
        if typ in (str, "str"):
            return str(value)
        if typ in (tuple, "tuple") or origin is tuple:
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else value.split(",")
            return tuple(float(v) for v in value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{key}: {value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


def _apply(section_obj, section: str, values: dict):
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    kw = {}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(f"unknown config key {section}.{k}; valid keys of [{section}]: {', '.join(fields)}")
        kw[k] = _coerce(f"{section}.{k}", fields[k].type, v)
    return dataclasses.replace(section_obj, **kw)


def load_config(path: str | None = None, overrides: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """File (JSON or YAML) then `section.key=value` overrides, then validation."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"--config {path}: no such file")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--config {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    for ov in overrides or []:
        ov = ov.removeprefix("--")
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"override {ov!r}: expected --section.key=value")
        key, value = ov.split("=", 1)
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = value
    cfg = base or TrainConfig()
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; valid sections: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a mapping of keys to values")
        cfg = dataclasses.replace(cfg, **{section: _apply(getattr(cfg, section), section, values)})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v not in allowed:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, allowed))}")
    checks = [
        ("rollout.n", cfg.rollout.n >= 1, "must be >= 1"),
        ("rollout.temperature", cfg.rollout.temperature > 0, "must be > 0"),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens >= 1, "must be >= 1"),
        ("data.prompts_per_step", cfg.data.prompts_per_step >= 1, "must be >= 1"),
        ("teacher.top_k", cfg.teacher.top_k >= 0, "must be >= 0"),
        ("loss.temperature", cfg.loss.temperature > 0, "must be > 0"),
        ("loss.token_keep_ratio", 0 < cfg.loss.token_keep_ratio <= 1, "must be in (0, 1]"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.micro_batch_tokens", cfg.optim.micro_batch_tokens >= 16, "must be >= 16"),
        ("run.steps", cfg.run.steps >= 0, "must be >= 0"),
    ]
    for key, ok, msg in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} {msg}")
    if not cfg.model.student:
        raise ConfigError("model.student: required (a Hugging Face model directory)")
    if not cfg.data.path and not cfg.data.task:
        raise ConfigError("data.path or data.task: one is required")
    if cfg.loss.objective != "grpo" and cfg.loss.objective != "sft" and not cfg.teacher.url:
        raise ConfigError("teacher.url: required for objective "
                          f"{cfg.loss.objective!r} (or pass --teacher-url HOST:PORT)")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.urls:
        raise ConfigError("rollout.urls: required with rollout.engine=sglang")
