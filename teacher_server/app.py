"""Assembling a teacher server from model directories (used by `opd teacher` and by tests).

Several models (`TeacherConfig.models`, `opd teacher --model NAME=DIR ...`) share one process, one
device and one engine queue; checkpoints that are the same (model hash, dtype, quantisation) are
loaded once and served under each of their names."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teacher_server import __version__, fp8
from teacher_server.engine import ScoringEngine
from teacher_server.fingerprint import model_hash, tokenizer_fingerprint
from teacher_server.model import load_model, resolve_device
from teacher_server.service import ServedModel, ServerConfig, TeacherServer
from teacher_server.validate import STAT_NAMES, Limits
from teacher_server.wire import pb

log = logging.getLogger("opd.teacher")


@dataclass
class TeacherConfig:
    model: str = ""                       # one model directory (served under the directory's name) ...
    models: list[tuple[str, str]] = field(default_factory=list)   # ... or (name, directory) pairs; first = default
    dtype: str = "bf16"
    device: str = "cpu"
    max_batch_tokens: int = 0             # 0 = auto (`auto_batch_tokens`)
    chunk_size: int = 1024
    max_top_k: int = 256
    max_extra_ids: int = 256
    max_sequence_length: int = 0          # 0 = the model's max_position_embeddings
    max_queue_tokens: int = 1 << 20
    allow_full: bool = True
    random_weights_seed: int | None = None
    prefix_sharing: bool = True           # score samples of one prompt against one prompt forward
    prefix_min_tokens: int = 16           # shortest common prefix worth sharing
    cache_mb: int = 0                     # in-memory statistics cache (0 = off)
    cache_dir: str | None = None          # on-disk statistics store (content-addressed files)
    quantize: str = "none"                # "fp8": the body's linear layers as fp8 GEMMs (fp8.py)
    pipeline_depth: int = 2               # batches launched and not yet finished (engine pipeline)
    head_part_rows: int = 1024            # scored rows per head part copied out and delivered
    batch_wait_s: float = 0.002           # linger for a stream's next request
    engine: str = "hf"                    # "sglang": score with SGLang servers (sglang_engine.py)
    sglang_url: str | None = None         # comma-separated base URLs (engine "sglang")
    sglang_api_key: str | None = None
    sglang_timeout_s: float = 600.0
    sglang_wait_s: float = 60.0
    tp: int = 0                           # tensor-parallel ranks (tp.py; 0 = the plain one-process engine)
    server: ServerConfig = field(default_factory=ServerConfig)


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def parse_model_arg(text: str) -> tuple[str, str]:
    """`--model NAME=DIR` -> (NAME, DIR); `--model DIR` -> (DIR's name, DIR). A path that exists as
    given is a DIR, even with a '=' in it."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():
        return Path(text.rstrip("/")).name or text, text
    if not MODEL_NAME.fullmatch(name) or not path:
        raise ValueError(f"--model {text!r}: expected DIR or NAME=DIR with NAME of letters, digits and ._:/- "
                         f"(at most 128, starting with a letter or digit)")
    return name, path


def model_specs(cfg: TeacherConfig) -> list[tuple[str, str]]:
    """The (name, directory) pairs to serve, checked: names unique, every directory a model
    directory (before any model loads)."""
    specs = list(cfg.models) or ([(Path(cfg.model.rstrip("/")).name or cfg.model, cfg.model)] if cfg.model else [])
    if not specs:
        raise ValueError("--model: give at least one model directory (DIR or NAME=DIR)")
    seen: dict[str, str] = {}
    for name, path in specs:
        if name in seen:
            raise ValueError(f"--model {name}={path}: the name {name!r} is already given to {seen[name]}; "
                             f"expected one name per model (NAME=DIR)")
        seen[name] = path
        if not (Path(path) / "config.json").exists():
            raise ValueError(f"--model {name}={path}: no config.json there (expected a Hugging Face model directory)")
    return specs


BATCH_TOKENS = (16384, 32768)


def auto_batch_tokens(model, device) -> int:
    """The default token budget of one forward: 32,768 on a GPU with room for two such batches'
    activations (twice over, for the pipelined head and allocator slack) in what the loaded
    model left free, else 16,384. Bigger batches hold more prompt groups whole: prefix sharing
    on 16 prompts of 1024 tokens x 8 samples of 1024 went from 1.61x to 1.72x of plain scoring
    on an H100 (docs/benchmarks.md); plain batches gain nothing and lose nothing."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return BATCH_TOKENS[0]
    free, _ = torch.cuda.mem_get_info(dev)
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    hidden = int(getattr(cfg, "hidden_size", 4096))
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden))
    per_token = 2 * (3 * inter + 4 * hidden)   # bf16 bytes at the MLP's peak: gate, up, product, residuals
    return pick_batch_tokens(free, per_token)


def pick_batch_tokens(free_bytes: int, per_token_bytes: int) -> int:
    best = BATCH_TOKENS[0]
    for n in BATCH_TOKENS:
        if 4 * n * per_token_bytes <= free_bytes:
            best = n
    return best


def build_server(cfg: TeacherConfig, metrics=None) -> TeacherServer:
    if cfg.max_batch_tokens < 0:
        raise ValueError(f"--max-batch-tokens {cfg.max_batch_tokens}: expected a positive budget, or 0 for auto")
    if cfg.pipeline_depth < 1:
        raise ValueError(f"--pipeline-depth {cfg.pipeline_depth}: expected at least 1 (1 = no overlap between batches)")
    if cfg.head_part_rows < 1:
        raise ValueError(f"--head-part-rows {cfg.head_part_rows}: expected at least 1")
    if not cfg.batch_wait_s >= 0:
        raise ValueError(f"--batch-wait-ms {cfg.batch_wait_s * 1e3:g}: expected >= 0 (0 = no linger)")
    srv = cfg.server
    if srv.max_workers < 1:
        raise ValueError(f"--max-workers {srv.max_workers}: expected at least 1 (concurrent Score streams)")
    if not (0 < srv.max_unread_mb_per_stream <= 1 << 20):
        raise ValueError(f"--max-unread-mb-per-stream {srv.max_unread_mb_per_stream:g}: expected a number of MiB "
                         f"in (0, 1048576]")
    if not srv.grace_s >= 0:
        raise ValueError(f"--grace-s {srv.grace_s:g}: expected >= 0 seconds")
    if cfg.engine == "sglang":  # SGLang runs the model: teacher_server/sglang_app.py
        from teacher_server.sglang_app import build_sglang_server

        return build_sglang_server(cfg, metrics)
    if cfg.quantize not in fp8.QUANTIZE_MODES:
        raise ValueError(f"--quantize {cfg.quantize!r}: expected one of {fp8.QUANTIZE_MODES}")
    if cfg.quantize == "fp8":
        why = fp8.supported(resolve_device(cfg.device))
        if why:
            raise ValueError(why)
    specs = model_specs(cfg)
    cache = None
    if cfg.cache_mb > 0 or cfg.cache_dir:
        from teacher_server.cache import StatsCache

        cache = StatsCache(cfg.cache_mb << 20, cfg.cache_dir)
    loaded: dict[tuple[str, str, str], tuple[ScoringEngine, Limits, pb.TeacherInfo]] = {}
    loaded_from: dict[tuple[str, str, str], str] = {}
    primary: ScoringEngine | None = None
    served: list[ServedModel] = []
    for name, path in specs:
        key = (model_hash(path, cfg.random_weights_seed), cfg.dtype, cfg.quantize)
        if key not in loaded:
            loaded[key] = _load(cfg, path, cache, key[0])
            loaded_from[key] = path
            log.info("model %r: %s (%s)", name, path, loaded[key][2].dtype)
        else:
            log.info("model %r: %s is the checkpoint already loaded for %s; served from the same weights", name,
                     path, [m.name for m in served if m.info.model_hash == key[0]])
        engine, limits, info = loaded[key]
        if primary is None:
            primary = engine
        named = pb.TeacherInfo()
        named.CopyFrom(info)
        named.model_name = name
        if Path(path).resolve() != Path(loaded_from[key]).resolve():
            # the same weights beside another tokenizer (or chat template): describe this one's
            named.tokenizer_fingerprint, named.tokenizer_size, named.chat_template, _ = _tokenizer_info(path)
        primary.add_model(name, engine)

        def load(name=name, path=path, mhash=key[0]):  # a fresh copy, set like the engine serving `name` now
            eng = _load(cfg, path, cache, mhash)[0]
            now = primary.engine_for(name)
            eng.compile, eng.head, eng.split_uneven, eng.packing = now.compile, now.head, now.split_uneven, now.packing
            return eng

        served.append(ServedModel(name, limits, named, load))
    return TeacherServer(primary, served[0].limits, served[0].info, cfg.server, metrics, served)


def _tokenizer_info(path: str) -> tuple[str, int, str, int | None]:
    """(fingerprint, length, chat template, pad id) of the tokenizer in `path`; empty without one."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        return tokenizer_fingerprint(tok), len(tok), tok.chat_template or "", tok.pad_token_id
    except Exception as exc:  # a model directory without a tokenizer can still be served
        log.warning("no tokenizer in %s (%s): fingerprint checks will be skipped by clients", path, exc)
        return "", 0, "", None


def _load(cfg: TeacherConfig, path: str, cache, mhash: str) -> tuple[ScoringEngine, Limits, pb.TeacherInfo]:
    """Load one model directory: its engine (not started), request limits and TeacherInfo."""
    tp_kw = {}
    if cfg.tp:  # this process is rank 0 of the group `tp.launch` set up
        from teacher_server import tp

        model = tp.load_model(path, cfg.dtype, cfg.device, cfg.random_weights_seed)
        tp_kw = {"group": tp.current()}
    else:
        model = load_model(path, cfg.dtype, cfg.device, cfg.random_weights_seed)
    if cfg.quantize == "fp8":
        (tp.quantize_body if cfg.tp else fp8.quantize_body)(
            model.get_decoder() if hasattr(model, "get_decoder") else model.base_model)
        torch.cuda.empty_cache()
    tok_fp, tok_len, template, pad = _tokenizer_info(path)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    max_len = cfg.max_sequence_length or int(getattr(model.config, "max_position_embeddings", 4096))
    budget = cfg.max_batch_tokens or auto_batch_tokens(model, cfg.device)
    log.info("max batch tokens: %d%s", budget, "" if cfg.max_batch_tokens else " (auto)")
    engine_cls = tp.TPScoringEngine if cfg.tp else ScoringEngine
    engine = engine_cls(model, **tp_kw, device=cfg.device, max_batch_tokens=budget,
                           chunk_size=cfg.chunk_size, max_queue_tokens=cfg.max_queue_tokens, pad_id=pad or 0,
                           prefix_sharing=cfg.prefix_sharing, prefix_min_tokens=cfg.prefix_min_tokens,
                           cache=cache, model_id=f"{mhash}:{cfg.dtype}" + ("" if cfg.quantize == "none" else f":{cfg.quantize}"),
                           pipeline_depth=cfg.pipeline_depth, head_part_rows=cfg.head_part_rows,
                           batch_wait_s=cfg.batch_wait_s)
    limits = Limits(vocab_size=vocab, max_sequence_length=max_len, max_top_k=min(cfg.max_top_k, vocab),
                    max_extra_ids=cfg.max_extra_ids, allow_full=cfg.allow_full)
    info = pb.TeacherInfo(
        model_name=Path(path).name, model_hash=mhash,
        vocab_size=vocab, tokenizer_size=tok_len, tokenizer_fingerprint=tok_fp, max_sequence_length=max_len,
        max_top_k=limits.max_top_k, dtype=str(model.dtype).replace("torch.", "") + ("" if cfg.quantize == "none" else f"+{cfg.quantize}"),
        server_version=__version__,
        chat_template=template, max_extra_ids=cfg.max_extra_ids, max_batch_tokens=engine.max_batch_tokens,
        statistics=[pb.Statistic.Name(s) for s in STAT_NAMES], full_distribution_allowed=cfg.allow_full)
    return engine, limits, info
