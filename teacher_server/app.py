"""Assembling a teacher server from a model directory (used by `opd teacher` and by tests)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teacher_server import __version__, fp8
from teacher_server.engine import ScoringEngine
from teacher_server.fingerprint import model_hash, tokenizer_fingerprint
from teacher_server.model import load_model, resolve_device
from teacher_server.service import ServerConfig, TeacherServer
from teacher_server.validate import STAT_NAMES, Limits
from teacher_server.wire import pb

log = logging.getLogger("opd.teacher")


@dataclass
class TeacherConfig:
    model: str
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
    tp: int = 0                           # tensor-parallel ranks (tp.py; 0 = the plain one-process engine)
    server: ServerConfig = field(default_factory=ServerConfig)


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
    from transformers import AutoTokenizer

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
    if cfg.quantize not in fp8.QUANTIZE_MODES:
        raise ValueError(f"--quantize {cfg.quantize!r}: expected one of {fp8.QUANTIZE_MODES}")
    if cfg.quantize == "fp8":
        why = fp8.supported(resolve_device(cfg.device))
        if why:
            raise ValueError(why)
    tp_kw = {}
    if cfg.tp:  # this process is rank 0 of the group `tp.launch` set up
        from teacher_server import tp

        model = tp.load_model(cfg.model, cfg.dtype, cfg.device, cfg.random_weights_seed)
        tp_kw = {"group": tp.current()}
    else:
        model = load_model(cfg.model, cfg.dtype, cfg.device, cfg.random_weights_seed)
    if cfg.quantize == "fp8":
        (tp.quantize_body if cfg.tp else fp8.quantize_body)(
            model.get_decoder() if hasattr(model, "get_decoder") else model.base_model)
        torch.cuda.empty_cache()
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        tok_fp, tok_len, template, pad = tokenizer_fingerprint(tok), len(tok), tok.chat_template or "", tok.pad_token_id
    except Exception as exc:  # a model directory without a tokenizer can still be served
        log.warning("no tokenizer in %s (%s): fingerprint checks will be skipped by clients", cfg.model, exc)
        tok_fp, tok_len, template, pad = "", 0, "", None
    vocab = int(model.get_output_embeddings().weight.shape[0])
    max_len = cfg.max_sequence_length or int(getattr(model.config, "max_position_embeddings", 4096))
    mhash = model_hash(cfg.model, cfg.random_weights_seed)
    cache = None
    if cfg.cache_mb > 0 or cfg.cache_dir:
        from teacher_server.cache import StatsCache

        cache = StatsCache(cfg.cache_mb << 20, cfg.cache_dir)
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
        model_name=Path(cfg.model).name, model_hash=mhash,
        vocab_size=vocab, tokenizer_size=tok_len, tokenizer_fingerprint=tok_fp, max_sequence_length=max_len,
        max_top_k=limits.max_top_k, dtype=str(model.dtype).replace("torch.", "") + ("" if cfg.quantize == "none" else f"+{cfg.quantize}"),
        server_version=__version__,
        chat_template=template, max_extra_ids=cfg.max_extra_ids, max_batch_tokens=engine.max_batch_tokens,
        statistics=[pb.Statistic.Name(s) for s in STAT_NAMES], full_distribution_allowed=cfg.allow_full)
    return TeacherServer(engine, limits, info, cfg.server, metrics)
