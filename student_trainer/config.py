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
    # sdpa | eager. Packed micro-batches need a 4-D block-diagonal mask, which both honour (eager
    # gets it as an additive float mask); flash_attention_2 / flex_attention are refused.
    attn_implementation: str = "sdpa"
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
    urls: str = ""                    # sglang: comma-separated engine URLs (each gets the weight updates)
    router_url: str = ""              # sglang: /generate goes through this sglang-router instead of round-robin
    api_key: str = ""                 # sglang: the engines' --api-key ("" = env OPD_ROLLOUT_API_KEY, else none)
    admin_api_key: str = ""           # sglang: their --admin-api-key, sent on weight/control routes ("" = env
                                      # OPD_ROLLOUT_ADMIN_API_KEY, else api_key)
    max_attempts: int = 3             # sglang: tries per sample (aborted or failed ones are retried, then dropped)
    n: int = 4                        # samples per prompt (a group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    max_batch_size: int = 64          # local engine
    staleness: int = 0                # 0 = strictly on-policy; 1 = rollouts one step ahead
    # How the trainer's weights reach the engines after every optimizer step (docs/rollout.md):
    # local engine: memory | disk; sglang: distributed (a process group with the engines, NCCL on
    # GPUs / gloo on CPU) | disk (safetensors in sync_dir + /update_weights_from_disk) | tensor
    # (CUDA-IPC handles to an engine on the trainer's GPU). auto = memory (local), distributed (sglang).
    weight_sync: str = "auto"
    sync_dir: str = ""                # disk: a directory the engines can read ("" = run.out_dir/weights_sync)
    sync_address: str = ""            # distributed: the trainer's address the engines connect to
                                      # ("" = 127.0.0.1 if every engine URL is loopback, else the
                                      # local address that routes to the first engine)
    sync_port: int = 0                # distributed: rendezvous port of rank r is sync_port + r (0 = free port)
    sync_bucket_mb: float = 512.0     # distributed / tensor: MiB of tensors sent per update call
    sync_retries: int = 3             # an update the engine answers with success: false is retried
    sync_timeout_s: float = 600.0     # distributed: group rendezvous and broadcast timeout
    release_memory: bool = False      # sglang, engine on the trainer's GPU: its KV cache and weights are
                                      # released while the trainer trains, resumed for the weight push


@dataclass(frozen=True)
class RouteCfg:
    """One entry of ``teacher.routes`` (docs/teachers.md): the teacher of the prompts whose
    ``teacher.route_key`` equals the route's name. Unset keys take the default teacher's value."""
    url: str = ""                     # HOST:PORT[,HOST:PORT...] ("" = teacher.url)
    top_k: int = -1                   # -1 = teacher.top_k
    temperature: float = 0.0          # the teacher is asked at it, the student's loss uses it (0 = loss.temperature)
    weight: float = 1.0               # multiplies the loss of this route's samples
    prompt_template: str = ""         # the teacher's prompt from the data row ("" = teacher.prompt_template)
    model: str = ""                   # the model named on requests to a multi-model server ("" = teacher.model)


@dataclass(frozen=True)
class TeacherCfg:
    url: str = ""                     # HOST:PORT[,HOST:PORT...]: the default teacher ("" = none: every
                                      # prompt must match a route)
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
    # Routing (docs/teachers.md): a prompt goes to routes[str(row[route_key])], else to the default
    # teacher (teacher.url); a prompt group is scored by one teacher.
    route_key: str = "data_source"    # a (dotted) key of the data row; built-in tasks: task / data_source
    routes: dict = field(default_factory=dict)   # {key value: RouteCfg}
    weight: float = 1.0               # the default teacher's loss multiplier
    # Privileged context: the teacher scores the response after a prompt built from this template
    # over the row's fields ("{question}\nReference solution: {solution}"); "" = the student's prompt
    prompt_template: str = ""
    model: str = ""                   # the model named on scoring requests ("" = the server's default)
    refresh_every: int = 0            # >0: the student's weights to the default teacher every N steps (0 = off)


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
    teacher_model: str = ""           # local engine: the HF dir the warm-up rollouts are generated with
    rollout_url: str = ""             # sglang: an engine serving the teacher model (URL[,URL...]) for them


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


# Names `loss.divergence` accepts: the loss library's full-distribution divergences and sampled-token
# terms (losses.ALL_TERMS) except `ppo` (objective grpo / opd+grpo) and `sft` (objective sft or
# loss.sft_weight), which are objectives of their own.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv",
               "k1", "k2", "k3", "pg")
DISTRIBUTION_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")

CHOICES = {
    "model.dtype": ("bf16", "fp32"),
    "model.attn_implementation": ("sdpa", "eager"),
    "loss.divergence": DIVERGENCES,
    "loss.support": ("auto", "topk", "union", "full"),
    "rollout.engine": ("local", "sglang"),
    "rollout.weight_sync": ("auto", "memory", "disk", "distributed", "tensor"),
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
        if section == "teacher" and k == "routes":
            kw[k] = _routes(v, section_obj.routes)
        else:
            kw[k] = _coerce(f"{section}.{k}", fields[k].type, v)
    return dataclasses.replace(section_obj, **kw)


def _routes(value, current: dict) -> dict:
    """``teacher.routes``: a mapping of route names to mappings of RouteCfg keys (a JSON string on
    the command line); ``--teacher.routes.NAME.KEY=V`` overrides arrive as such mappings too."""
    if isinstance(value, str):
        try:
            value = json.loads(value or "{}")
        except json.JSONDecodeError:
            raise ConfigError(f"teacher.routes: {value!r} is not a JSON mapping of route names to settings "
                              "(or use --teacher.routes.NAME.KEY=VALUE)") from None
    if not isinstance(value, dict):
        raise ConfigError(f"teacher.routes: must be a mapping of route names to settings, got {type(value).__name__}")
    out = dict(current)
    for name, entry in value.items():
        key = f"teacher.routes.{name}"
        if isinstance(entry, RouteCfg):
            out[str(name)] = entry
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: must be a mapping of route keys ({', '.join(RouteCfg.__dataclass_fields__)}), "
                              f"got {entry!r}")
        out[str(name)] = _apply(out.get(str(name), RouteCfg()), key, entry)
    return out


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
        if section == "teacher" and name.startswith("routes."):  # --teacher.routes.NAME.KEY=VALUE
            route, _, rkey = name[len("routes."):].rpartition(".")
            if not route or not rkey:
                raise ConfigError(f"override {ov!r}: expected --teacher.routes.NAME.KEY=VALUE "
                                  f"(keys: {', '.join(RouteCfg.__dataclass_fields__)})")
            routes = data.setdefault("teacher", {}).setdefault("routes", {})
            if isinstance(routes, str):
                routes = data["teacher"]["routes"] = _routes(routes, {})
            entry = routes.setdefault(route, {})
            if isinstance(entry, RouteCfg):
                entry = routes[route] = dataclasses.asdict(entry)
            entry[rkey] = value
            continue
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
    if cfg.rollout.weight_sync == "auto":
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(
            cfg.rollout, weight_sync=default_weight_sync(cfg.rollout.engine)))
    return cfg


# rollout.engine -> the weight_sync values it can use (the first is what `auto` means).
WEIGHT_SYNC_BY_ENGINE = {"local": ("memory", "disk"), "sglang": ("distributed", "disk", "tensor")}


def default_weight_sync(engine: str) -> str:
    return WEIGHT_SYNC_BY_ENGINE[engine][0]


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
        ("data.max_prompt_tokens", cfg.data.max_prompt_tokens >= 1, "must be >= 1"),
        ("rollout.top_p", 0 < cfg.rollout.top_p <= 1, "must be in (0, 1]"),
        ("rollout.top_k", cfg.rollout.top_k == -1 or cfg.rollout.top_k >= 1, "must be -1 (off) or >= 1"),
        ("rollout.max_batch_size", cfg.rollout.max_batch_size >= 1, "must be >= 1"),
        ("teacher.student_top_k", cfg.teacher.student_top_k >= 0, "must be >= 0"),
        ("teacher.timeout_s", cfg.teacher.timeout_s > 0, "must be > 0"),
        ("teacher.max_retries", cfg.teacher.max_retries >= 0, "must be >= 0"),
        ("teacher.max_backoff_s", cfg.teacher.max_backoff_s > 0, "must be > 0"),
        ("teacher.concurrency", cfg.teacher.concurrency >= 1, "must be >= 1"),
        ("teacher.batch_sequences", cfg.teacher.batch_sequences >= 1, "must be >= 1"),
        ("loss.beta", 0 <= cfg.loss.beta <= 1, "must be in [0, 1]"),
        ("loss.chunk_size", cfg.loss.chunk_size >= 1, "must be >= 1"),
        ("loss.fkl_to_rkl_window", cfg.loss.fkl_to_rkl_window >= 0, "must be >= 0"),
        ("loss.fkl_to_rkl_switch_step", cfg.loss.fkl_to_rkl_switch_step >= -1, "must be -1 (off) or >= 0"),
        ("loss.rl_weight", cfg.loss.rl_weight >= 0, "must be >= 0"),
        ("loss.sft_weight", cfg.loss.sft_weight >= 0, "must be >= 0"),
        ("loss.clip_eps", cfg.loss.clip_eps > 0, "must be > 0"),
        ("loss.gamma", 0 <= cfg.loss.gamma <= 1, "must be in [0, 1]"),
        ("loss.reward_beta", cfg.loss.reward_beta > 0, "must be > 0"),
        ("loss.paced_a", cfg.loss.paced_a > 0, "must be > 0"),
        ("loss.paced_b", cfg.loss.paced_b > 0, "must be > 0"),
        ("warmup.steps", cfg.warmup.steps >= 0, "must be >= 0"),
        ("optim.min_lr_ratio", 0 <= cfg.optim.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "must be >= 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.betas", len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         "must be two numbers in [0, 1)"),
        ("optim.grad_clip", cfg.optim.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("run.save_every", cfg.run.save_every >= 0, "must be >= 0"),
        ("run.keep_checkpoints", cfg.run.keep_checkpoints >= 1, "must be >= 1"),
        ("run.eval_every", cfg.run.eval_every >= 0, "must be >= 0"),
        ("run.eval_prompts", cfg.run.eval_prompts >= 1, "must be >= 1"),
        ("run.log_every", cfg.run.log_every >= 1, "must be >= 1"),
    ]
    for key, ok, msg in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} {msg}")
    if not cfg.model.student:
        raise ConfigError("model.student: required (a Hugging Face model directory)")
    if not cfg.data.path and not cfg.data.task:
        raise ConfigError("data.path or data.task: one is required")
    if cfg.loss.objective != "grpo" and cfg.loss.objective != "sft" and not cfg.teacher.url and not cfg.teacher.routes:
        raise ConfigError("teacher.url: required for objective "
                          f"{cfg.loss.objective!r} (or pass --teacher-url HOST:PORT, or give teacher.routes)")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.urls:
        raise ConfigError("rollout.urls: required with rollout.engine=sglang")
    _cross_checks(cfg)


DEFAULT_TEACHER = "default"  # the name of the teacher of teacher.url in messages and metrics


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher as the producer uses it: the default (teacher.*) or a route, unset keys resolved."""
    name: str                         # "default" or the route's name (a value of teacher.route_key)
    key: str                          # its config prefix: "teacher" or "teacher.routes.NAME"
    url: str
    model: str
    top_k: int
    temperature: float
    weight: float
    prompt_template: str


def teacher_specs(cfg: TrainConfig) -> dict[str, TeacherSpec]:
    """Every configured teacher by name: the default one (if teacher.url is set) and each route."""
    t = cfg.teacher
    out = {}
    if t.url:
        out[DEFAULT_TEACHER] = TeacherSpec(DEFAULT_TEACHER, "teacher", t.url, t.model, t.top_k, cfg.loss.temperature,
                                           t.weight, t.prompt_template)
    for name, r in t.routes.items():
        out[name] = TeacherSpec(name, f"teacher.routes.{name}", r.url or t.url, r.model or t.model,
                                t.top_k if r.top_k < 0 else r.top_k, r.temperature or cfg.loss.temperature, r.weight,
                                r.prompt_template or t.prompt_template)
    return out


def template_fields(template: str, key: str) -> list[str]:
    """The row fields a prompt template names (``{question}``, ``{reward_model[ground_truth]}``
    names ``reward_model``); a malformed template is a ConfigError naming `key`."""
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{key}: {template!r} is not a valid template ({exc}); fields are written "
                          "{name}, a literal brace {{ or }}") from None
    out = []
    for _, name, _, _ in parts:
        if name is None:
            continue
        root = name.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ConfigError(f"{key}: {template!r} has a positional field {{{name}}}; name a field of the data "
                              "row, e.g. {question}")
        if root not in out:
            out.append(root)
    return out


def _teacher_checks(cfg: TrainConfig) -> None:
    """teacher.routes, route_key, prompt templates, model, refresh_every (docs/teachers.md)."""
    t, lc = cfg.teacher, cfg.loss
    for key, ok, msg in [("teacher.weight", t.weight > 0, "must be > 0"),
                         ("teacher.refresh_every", t.refresh_every >= 0, "must be >= 0 (0 = off)")]:
        if not ok:
            raise ConfigError(f"{key}: {getattr(t, key.split('.')[1])!r} {msg}")
    uses_teacher = lc.objective not in ("grpo", "sft")
    if t.routes and not uses_teacher:
        raise ConfigError(f"teacher.routes: set, but loss.objective={lc.objective} asks no teacher "
                          "(routes apply to opd and opd+grpo)")
    for name, r in t.routes.items():
        key = f"teacher.routes.{name}"
        if not name.strip() or name == DEFAULT_TEACHER:
            raise ConfigError(f"{key}: route name {name!r} is not allowed (empty, or {DEFAULT_TEACHER!r}, the name "
                              "of the teacher of teacher.url)")
        for k, ok, msg in [("top_k", r.top_k >= -1, "must be -1 (teacher.top_k) or >= 0"),
                           ("temperature", r.temperature >= 0, "must be >= 0 (0 = loss.temperature)"),
                           ("weight", r.weight > 0, "must be > 0")]:
            if not ok:
                raise ConfigError(f"{key}.{k}: {getattr(r, k)!r} {msg}")
        if not r.url and not t.url:
            raise ConfigError(f"{key}.url: required: there is no default teacher (teacher.url) to inherit it from")
    if t.refresh_every and not t.url:
        raise ConfigError(f"teacher.refresh_every: {t.refresh_every} pushes the student's weights to the default "
                          "teacher (teacher.url), which is not set")
    if t.refresh_every and not uses_teacher:
        raise ConfigError(f"teacher.refresh_every: {t.refresh_every} needs a teacher objective (opd, opd+grpo; here "
                          f"{lc.objective})")
    specs = teacher_specs(cfg) if uses_teacher else {}
    weighted = sorted(f"{s.key}.weight={s.weight:g}" for s in specs.values() if s.weight != 1.0)
    if weighted and (lc.objective != "opd" or lc.sft_weight):
        raise ConfigError(f"{weighted[0]}: a teacher's weight multiplies its samples' whole loss, which here also "
                          f"holds the {'GRPO' if lc.objective != 'opd' else 'SFT'} term (allowed with weights != 1: "
                          "loss.objective=opd without loss.sft_weight)")
    for spec in specs.values():
        if spec.prompt_template:
            template_fields(spec.prompt_template, f"{spec.key}.prompt_template")
    if not cfg.data.task or not specs:
        return
    # built-in tasks: every row's fields and route value are known now
    from student_trainer.data import TASK_ROW_FIELDS

    tasks = [x.strip() for x in cfg.data.task.split(",")]
    if t.route_key not in TASK_ROW_FIELDS:
        raise ConfigError(f"teacher.route_key: {t.route_key!r} is not a field of built-in task rows "
                          f"(allowed: {', '.join(TASK_ROW_FIELDS)})")
    for spec in specs.values():
        for f in template_fields(spec.prompt_template, f"{spec.key}.prompt_template"):
            if f not in TASK_ROW_FIELDS:
                raise ConfigError(f"{spec.key}.prompt_template: field {{{f}}} is not a field of built-in task rows "
                                  f"(allowed: {', '.join(TASK_ROW_FIELDS)})")
    if t.route_key in ("task", "data_source"):  # the row's value is the task's name
        for name in t.routes:
            if name not in tasks:
                raise ConfigError(f"teacher.routes.{name}: no prompt of data.task={cfg.data.task} has "
                                  f"{t.route_key}={name!r} (values: {', '.join(tasks)})")
        missing = [x for x in tasks if x not in t.routes]
        if missing and not t.url:
            raise ConfigError(f"teacher.routes: data.task {', '.join(missing)} has no route (routes: "
                              f"{', '.join(t.routes)}) and there is no default teacher (teacher.url)")


def _cross_checks(cfg: TrainConfig) -> None:
    """Rules that tie keys together: a setting that another one makes meaningless or impossible."""
    lc, t = cfg.loss, cfg.teacher
    dev = cfg.run.device
    if not (dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"run.device: {dev!r} is not one of cpu, cuda, cuda:N")
    if cfg.data.path and cfg.data.task:
        raise ConfigError(f"data.path and data.task: both given ({cfg.data.path!r}, {cfg.data.task!r}); give one")
    if cfg.data.task:
        from student_trainer.data import BUILTIN_TASKS

        tasks = [x.strip() for x in cfg.data.task.split(",")]
        for x in tasks:
            if x not in BUILTIN_TASKS:
                raise ConfigError(f"data.task: {x!r} is not one of {', '.join(BUILTIN_TASKS)} (several, mixed: "
                                  "a comma-separated list)")
        if len(set(tasks)) < len(tasks):
            raise ConfigError(f"data.task: {cfg.data.task!r} names a task twice")
        if lc.reward_fn:
            raise ConfigError(f"loss.reward_fn: {lc.reward_fn!r} grades data.path prompts; the built-in task "
                              f"{cfg.data.task!r} uses its own grader (leave loss.reward_fn empty)")
    if lc.reward_fn:
        from rollout.grading import REWARDS, get_reward_fn

        try:
            get_reward_fn(lc.reward_fn)
        except ValueError as exc:
            raise ConfigError(f"loss.reward_fn: {lc.reward_fn!r}: {exc} (allowed: {', '.join(sorted(REWARDS))} "
                              "or module:function)") from None
    _teacher_checks(cfg)
    distill = lc.objective in ("opd", "opd+grpo")
    schedule = lc.fkl_to_rkl_switch_step >= 0
    if lc.objective == "opd+grpo" and lc.rl_weight <= 0:
        raise ConfigError(f"loss.rl_weight: {lc.rl_weight!r} must be > 0 with loss.objective=opd+grpo "
                          "(it weights the GRPO term)")
    if lc.rl_weight and lc.objective != "opd+grpo":
        raise ConfigError(f"loss.rl_weight: {lc.rl_weight!r} applies only to loss.objective=opd+grpo "
                          f"(here {lc.objective})")
    if lc.sft_weight and not distill:
        raise ConfigError(f"loss.sft_weight: {lc.sft_weight!r} applies only to loss.objective=opd or opd+grpo "
                          f"(here {lc.objective})")
    if schedule:
        if not distill:
            raise ConfigError(f"loss.fkl_to_rkl_switch_step: {lc.fkl_to_rkl_switch_step} needs loss.objective=opd "
                              f"or opd+grpo (here {lc.objective})")
        if lc.divergence != "reverse_kl":
            raise ConfigError(f"loss.fkl_to_rkl_switch_step: {lc.fkl_to_rkl_switch_step} replaces loss.divergence "
                              f"by forward KL then reverse KL; loss.divergence={lc.divergence!r} would be ignored "
                              "(allowed with the schedule: reverse_kl, the default)")
    elif lc.fkl_to_rkl_window:
        raise ConfigError(f"loss.fkl_to_rkl_window: {lc.fkl_to_rkl_window} needs loss.fkl_to_rkl_switch_step >= 0")
    uses_dist = distill and (schedule or lc.divergence in DISTRIBUTION_DIVERGENCES)
    if lc.token_keep_ratio < 1 and not distill:
        raise ConfigError(f"loss.token_keep_ratio: {lc.token_keep_ratio} (TIP) scores tokens with the teacher's "
                          f"statistics: needs loss.objective=opd or opd+grpo (here {lc.objective})")
    if lc.support != "auto" and not uses_dist:
        raise ConfigError(f"loss.support: {lc.support!r} applies to the distribution divergences "
                          f"({', '.join(DISTRIBUTION_DIVERGENCES)}) under objective opd / opd+grpo; "
                          f"here objective={lc.objective}, divergence={lc.divergence} (leave it auto)")
    if t.student_top_k:
        if not uses_dist:
            raise ConfigError(f"teacher.student_top_k: {t.student_top_k} adds the student's top ids to the support "
                              f"of a distribution divergence ({', '.join(DISTRIBUTION_DIVERGENCES)}) under objective "
                              f"opd / opd+grpo; here objective={lc.objective}, divergence={lc.divergence}")
        if lc.support not in ("auto", "union"):
            raise ConfigError(f"loss.support: {lc.support!r} ignores the student's top ids that "
                              f"teacher.student_top_k={t.student_top_k} asks for (allowed: auto, union)")
        if cfg.rollout.staleness:
            raise ConfigError(f"teacher.student_top_k: {t.student_top_k} needs rollout.staleness=0 (the student's "
                              "top ids come from the current weights)")
        if cfg.optim.zero_stage != 2:
            raise ConfigError(f"teacher.student_top_k: {t.student_top_k} needs optim.zero_stage=2 (the producer "
                              "computes the student's top ids with the full weights, which ZeRO-3 partitions)")
    elif lc.support == "union":
        raise ConfigError("loss.support: 'union' needs teacher.student_top_k > 0 (the student's own top ids)")
    if cfg.warmup.steps:
        if lc.objective == "grpo":
            raise ConfigError(f"warmup.steps: {cfg.warmup.steps} (forward KL on teacher rollouts) needs a teacher "
                              "objective: opd, opd+grpo or sft (here grpo)")
        if cfg.rollout.engine == "local" and not cfg.warmup.teacher_model:
            raise ConfigError(f"warmup.steps: {cfg.warmup.steps} needs warmup.teacher_model (the Hugging Face "
                              "directory the warm-up rollouts are generated with)")
        if cfg.rollout.engine == "local" and cfg.warmup.rollout_url:
            raise ConfigError(f"warmup.rollout_url: {cfg.warmup.rollout_url!r} applies to rollout.engine=sglang; "
                              "the local engine generates the warm-up with warmup.teacher_model")
        if cfg.rollout.engine == "sglang":
            if not cfg.warmup.rollout_url:
                raise ConfigError(f"warmup.steps: {cfg.warmup.steps} with rollout.engine=sglang needs "
                                  "warmup.rollout_url (an SGLang engine serving the teacher model; the student's "
                                  "engines cannot produce teacher rollouts)")
            if cfg.warmup.teacher_model:
                raise ConfigError(f"warmup.teacher_model: {cfg.warmup.teacher_model!r} applies to the local engine; "
                                  "with rollout.engine=sglang the warm-up engine is warmup.rollout_url")
            shared = sorted({u.strip().rstrip("/") for u in cfg.warmup.rollout_url.split(",")} &
                            {u.strip().rstrip("/") for u in (cfg.rollout.urls + "," + cfg.rollout.router_url).split(",")
                             if u.strip()})
            if shared:
                raise ConfigError(f"warmup.rollout_url: {', '.join(shared)} is also a student engine (rollout.urls / "
                                  "rollout.router_url); the warm-up needs an engine serving the teacher model")
    elif cfg.warmup.teacher_model or cfg.warmup.rollout_url:
        key = "warmup.teacher_model" if cfg.warmup.teacher_model else "warmup.rollout_url"
        raise ConfigError(f"{key}: {getattr(cfg.warmup, key.split('.')[1])!r} is used only with warmup.steps > 0")
    if cfg.rollout.engine != "sglang":
        for key in ("urls", "router_url", "api_key", "admin_api_key"):
            if getattr(cfg.rollout, key):
                raise ConfigError(f"rollout.{key}: set, but it applies only to rollout.engine=sglang "
                                  f"(here {cfg.rollout.engine})")
    if cfg.rollout.max_attempts < 1:
        raise ConfigError(f"rollout.max_attempts: {cfg.rollout.max_attempts} must be >= 1")
    r = cfg.rollout
    allowed = WEIGHT_SYNC_BY_ENGINE[r.engine]
    if r.weight_sync not in ("auto",) + allowed:
        raise ConfigError(f"rollout.weight_sync: {r.weight_sync!r} does not work with rollout.engine={r.engine} "
                          f"(allowed: {', '.join(('auto',) + allowed)})")
    if r.release_memory and (r.engine != "sglang" or r.staleness != 0):
        raise ConfigError(f"rollout.release_memory: true needs rollout.engine=sglang and rollout.staleness=0 (the "
                          f"engine is idle while the trainer trains); got engine={r.engine}, staleness={r.staleness}")
    if r.weight_sync == "tensor" and not cfg.run.device.startswith("cuda"):
        raise ConfigError(f"rollout.weight_sync: 'tensor' (CUDA-IPC handles) needs run.device=cuda, got "
                          f"run.device={cfg.run.device!r} (allowed on this device: distributed, disk)")
    for key, ok, msg in [("rollout.sync_port", 0 <= r.sync_port < 65536, "must be in [0, 65535]"),
                         ("rollout.sync_bucket_mb", r.sync_bucket_mb > 0, "must be > 0"),
                         ("rollout.sync_retries", r.sync_retries >= 0, "must be >= 0"),
                         ("rollout.sync_timeout_s", r.sync_timeout_s > 0, "must be > 0")]:
        if not ok:
            raise ConfigError(f"{key}: {getattr(r, key.split('.')[1])!r} {msg}")
