"""Assembling `opd teacher --engine sglang`: its flags, their checks, and a TeacherServer whose
engine is `sglang_engine.SGLangScoringEngine` (docs/sglang-scoring.md). app.build_server calls
`build_sglang_server` for `engine="sglang"`; cli.py adds the flags and runs `check_args`."""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
from pathlib import Path
from urllib.parse import urlparse

from teacher_server.sglang_engine import SUPPORTED, SGLangScoringEngine, SGLangUnavailable, SGLangHttp

log = logging.getLogger("opd.teacher")

ENGINES = ("hf", "sglang")


# ---- configuration -------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--engine", default="hf", choices=ENGINES,
                   help="hf: load --model and score with it; sglang: score with the SGLang server(s) at --sglang-url "
                        "(input-token log-probs; --model still gives the tokenizer and config for the handshake; "
                        "docs/sglang-scoring.md)")
    p.add_argument("--sglang-url", default=None,
                   help="with --engine sglang: comma-separated base URLs of SGLang servers (or routers) serving the "
                        "teacher, e.g. http://10.0.0.5:30000")
    p.add_argument("--sglang-api-key", default=None, help="with --engine sglang: SGLang's --api-key (sent as a bearer token)")
    p.add_argument("--sglang-timeout-s", type=float, default=600.0,
                   help="with --engine sglang: how long one /generate request to SGLang may take")
    p.add_argument("--sglang-wait-s", type=float, default=60.0,
                   help="with --engine sglang: at start, how long to wait for an SGLang URL to answer /health")


def check_args(args) -> str | None:
    """The first configuration error of the SGLang flags ('--flag value: what is allowed'), or None."""
    urls = getattr(args, "sglang_url", None)
    if getattr(args, "engine", "hf") != "sglang":
        if urls:
            return f"--sglang-url {urls}: only used with --engine sglang (got --engine {args.engine})"
        return None
    if not urls:
        return "--engine sglang: needs --sglang-url URL[,URL...] (the SGLang servers to score with)"
    try:
        parse_urls(urls)
    except ValueError as exc:
        return str(exc)
    for flag, value, default in (("--quantize", getattr(args, "quantize", "none"), "none"),
                                 ("--tp", getattr(args, "tp", None), None),
                                 ("--random-weights-seed", getattr(args, "random_weights_seed", None), None)):
        if value is not None and value != default and not (flag == "--tp" and value in (0, 1)):
            return (f"{flag} {value}: not available with --engine sglang (the SGLang server runs the model; "
                    f"set its precision and parallelism there)")
    if not args.sglang_timeout_s > 0:
        return f"--sglang-timeout-s {args.sglang_timeout_s:g}: expected > 0 seconds"
    if not args.sglang_wait_s >= 0:
        return f"--sglang-wait-s {args.sglang_wait_s:g}: expected >= 0 seconds"
    return None


def parse_urls(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in text.split(",") if u.strip())
    if not urls:
        raise ValueError(f"--sglang-url {text!r}: expected one or more http://host:port URLs, comma-separated")
    for u in urls:
        p = urlparse(u)
        if p.scheme not in ("http", "https") or not p.hostname or p.path not in ("", "/"):
            raise ValueError(f"--sglang-url {u!r}: expected http://host:port (or https://), without a path")
    if len(set(urls)) != len(urls):
        raise ValueError(f"--sglang-url {text!r}: a URL is listed twice")
    return urls


# ---- assembling a server -------------------------------------------------------------------------
def wait_for(urls, http_: SGLangHttp, wait_s: float) -> dict[str, dict]:
    """/model_info of every URL that answers within `wait_s` (at least one must)."""
    deadline = time.monotonic() + wait_s
    infos, last = {}, {}
    while True:
        for u in urls:
            if u in infos:
                continue
            try:
                status, out = http_.request(u, "/model_info", None, method="GET", timeout=10)
            except (OSError, http.client.HTTPException) as exc:
                last[u] = f"{type(exc).__name__}: {exc}"
                continue
            if status == 401:
                raise ValueError(f"--sglang-api-key: {u}/model_info answered 401; give the SGLang server's --api-key")
            if status == 200 and isinstance(out, dict):
                infos[u] = out
            else:
                last[u] = f"HTTP {status}"
        if len(infos) == len(urls) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not infos:
        raise SGLangUnavailable(f"--sglang-url: no SGLang server answered /model_info within --sglang-wait-s "
                                f"{wait_s:g}: " + "; ".join(f"{u} ({last.get(u, '?')})" for u in urls))
    for u in urls:
        if u not in infos:
            log.warning("SGLang %s does not answer yet (%s); starting with the others", u, last.get(u))
    return infos


def config_hash(model_dir: str) -> str:
    """sha256 over config.json and the weight files' names and sizes (not their contents: the
    weights of a cluster-sized teacher need not be on this machine, or be read at start)."""
    d = Path(model_dir)
    h = hashlib.sha256(b"opd-sglang-teacher|")
    cfg = d / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin"))):
        h.update(f"{f.name}:{f.stat().st_size}|".encode())
    return h.hexdigest()


def build_sglang_server(cfg, metrics=None):
    """A TeacherServer whose engine is SGLang at cfg.sglang_url (app.build_server's other branch)."""
    from transformers import AutoConfig, AutoTokenizer

    from teacher_server import __version__
    from teacher_server.fingerprint import tokenizer_fingerprint
    from teacher_server.service import TeacherServer
    from teacher_server.validate import Limits
    from teacher_server.wire import pb

    urls = parse_urls(cfg.sglang_url or "")
    try:
        mcfg = AutoConfig.from_pretrained(cfg.model)
    except Exception as exc:  # noqa: BLE001 - say which flag
        raise ValueError(f"--model {cfg.model}: cannot read its config.json ({exc}); with --engine sglang it gives "
                         f"the tokenizer and config of the model SGLang serves") from None
    text_cfg = getattr(mcfg, "get_text_config", lambda: mcfg)()
    vocab = int(text_cfg.vocab_size)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        tok_fp, tok_len, template, = tokenizer_fingerprint(tok), len(tok), tok.chat_template or ""
    except Exception as exc:  # noqa: BLE001
        log.warning("no tokenizer in %s (%s): fingerprint checks will be skipped by clients", cfg.model, exc)
        tok_fp, tok_len, template = "", 0, ""
    http_ = SGLangHttp(cfg.sglang_api_key, cfg.sglang_timeout_s)
    infos = wait_for(urls, http_, cfg.sglang_wait_s)
    for u, info in infos.items():
        mt = info.get("model_type")
        if mt and getattr(mcfg, "model_type", None) and mt != mcfg.model_type:
            raise ValueError(f"--sglang-url {u} serves a {mt!r} model but --model {cfg.model} is a "
                             f"{mcfg.model_type!r}; give the directory of the model SGLang serves")
    version = sorted({str(i.get("weight_version", "default")) for i in infos.values()})
    dtype, sglang_max = "unknown", None
    try:
        status, sinfo = http_.request(next(iter(infos)), "/server_info", None, method="GET", timeout=10)
    except (OSError, http.client.HTTPException):
        status, sinfo = 0, None
    if status == 200 and isinstance(sinfo, dict):
        dtype = str(sinfo.get("dtype") or dtype)
        if isinstance(sinfo.get("max_req_input_len"), int) and sinfo["max_req_input_len"] > 0:
            sglang_max = sinfo["max_req_input_len"]   # longer prompts are a 400 there: refuse them here
    mhash = config_hash(cfg.model)
    cache = None
    if cfg.cache_mb > 0 or cfg.cache_dir:
        from teacher_server.cache import StatsCache

        cache = StatsCache(cfg.cache_mb << 20, cfg.cache_dir)
    max_len = cfg.max_sequence_length or int(getattr(text_cfg, "max_position_embeddings", 4096))
    if sglang_max is not None and sglang_max < max_len:
        log.info("max sequence length %d: SGLang's max_req_input_len", sglang_max)
        max_len = sglang_max
    engine = SGLangScoringEngine(urls, vocab_size=vocab, api_key=cfg.sglang_api_key, timeout_s=cfg.sglang_timeout_s,
                                 max_batch_tokens=cfg.max_batch_tokens or 16384, max_queue_tokens=cfg.max_queue_tokens,
                                 prefix_sharing=cfg.prefix_sharing, prefix_min_tokens=cfg.prefix_min_tokens,
                                 cache=cache, model_id=f"{mhash}:sglang:{','.join(version)}",
                                 batch_wait_s=cfg.batch_wait_s)
    # FULL_LOGPROBS passes the generic checks so the engine refuses it with its own reason
    limits = Limits(vocab_size=vocab, max_sequence_length=max_len, max_top_k=min(cfg.max_top_k, vocab),
                    max_extra_ids=cfg.max_extra_ids, allow_full=True)
    info = pb.TeacherInfo(
        model_name=Path(cfg.model).name, model_hash=mhash, vocab_size=vocab, tokenizer_size=tok_len,
        tokenizer_fingerprint=tok_fp, max_sequence_length=max_len, max_top_k=limits.max_top_k,
        dtype=f"sglang:{dtype}", server_version=__version__, chat_template=template,
        max_extra_ids=cfg.max_extra_ids, max_batch_tokens=engine.max_batch_tokens,
        statistics=list(SUPPORTED), full_distribution_allowed=False)
    server = TeacherServer(engine, limits, info, cfg.server, metrics)
    engine.on_health = lambda ok: None if server.servicer.draining else server.set_serving(ok)
    log.info("scoring with SGLang at %s (weight_version %s, dtype %s)", ", ".join(urls), ",".join(version), dtype)
    return server
