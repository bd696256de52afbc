"""`opd teacher --model DIR ...`: load a model once and serve teacher statistics over gRPC
(`--model NAME=DIR` repeated: several models from one process and one queue)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def add_arguments(p):
    p.add_argument("--model", required=True, action="append",
                   help="Hugging Face causal-LM directory (config.json + weights + tokenizer), served under the "
                        "directory's name; or NAME=DIR. Repeat it to serve several models from one process, one device "
                        "and one queue (requests name their model; the first is the default; a batch never mixes "
                        "models; the same checkpoint given twice is loaded once)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; loopback unless told otherwise (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051, help="port to bind (0 = any free port; the bound port is printed)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute dtype of the model")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quantize", default="none", choices=["none", "fp8"],
                   help="fp8: the decoder layers' linear layers as float8 e4m3 GEMMs with per-channel weight and "
                        "per-token activation scales (CUDA, compute capability >= 8.9; 1.37x tokens/s on an H100, "
                        "changes the teacher's log-probs a little: see docs/benchmarks.md); the head stays in --dtype")
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="token budget of one forward (padded: longest sequence x sequences; packed: tokens after "
                        "prefix sharing); 0 = auto: 32768 on a GPU with room for it, else 16384")
    p.add_argument("--chunk-size", type=int, default=1024, help="positions per lm-head/log-softmax/top-k chunk (memory = chunk x vocab)")
    p.add_argument("--max-top-k", type=int, default=256, help="largest top_k a caller may ask for")
    p.add_argument("--max-extra-ids", type=int, default=256, help="most caller-supplied ids per position")
    p.add_argument("--max-sequence-length", type=int, default=0, help="longest sequence accepted (0 = the model's max positions)")
    p.add_argument("--max-queue-tokens", type=int, default=1 << 20,
                   help="tokens waiting in the queue before new work waits, then gets RESOURCE_EXHAUSTED")
    p.add_argument("--queue-wait-s", type=float, default=30.0, help="how long new work waits for queue room")
    p.add_argument("--max-workers", type=int, default=64,
                   help="Score streams served at once (each holds a handler thread; health checks and GetInfo "
                        "have threads of their own)")
    p.add_argument("--max-unread-mb-per-stream", type=float, default=64.0,
                   help="MiB of results one Score stream may have queued, computed and not yet read by its client; "
                        "beyond it the server stops taking that stream's requests until the client reads "
                        "(one request is always taken, however large its result)")
    p.add_argument("--no-full", action="store_true", help="refuse FULL_LOGPROBS requests")
    p.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM/SIGINT, time in-flight calls get to finish")
    p.add_argument("--random-weights-seed", type=int, default=None,
                   help="benchmarks: build the model from config.json with random weights instead of loading them")
    p.add_argument("--no-prefix-sharing", action="store_true",
                   help="forward every sequence in full, even when several share a prompt prefix")
    p.add_argument("--prefix-min-tokens", type=int, default=16, help="shortest common prefix worth sharing")
    p.add_argument("--cache-mb", type=int, default=0,
                   help="in-memory statistics cache in MiB (0 = off): re-scoring a sequence costs a lookup")
    p.add_argument("--cache-dir", default=None,
                   help="directory of an on-disk statistics store shared across restarts (content-addressed files)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "body", "head", "all"],
                   help="torch.compile the body and/or the head's row reduction (auto = all on CUDA, off on CPU); "
                        "compiled and warmed up before the server reports SERVING, eager on failure")
    p.add_argument("--head", default="fast", choices=["fast", "reference"],
                   help="statistics head implementation (reference = the former fp32 passes, for comparisons)")
    p.add_argument("--no-split-uneven", action="store_true",
                   help="pad a batch of uneven lengths to its longest instead of forwarding similar-length sub-batches")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="forward a batch as one packed row, each shared prompt once, no padding (auto = on CUDA with the "
                        "compiled body; on = also elsewhere, with a dense mask; off = padded batches and a KV cache for "
                        "shared prefixes)")
    p.add_argument("--pipeline-depth", type=int, default=2,
                   help="batches in flight at once: the next batch's body runs while the last one's results are "
                        "copied out, encoded and sent (1 = one batch at a time)")
    p.add_argument("--head-part-rows", type=int, default=1024,
                   help="scored rows per head part: each part's statistics are copied to the host and delivered "
                        "while the head computes the next")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="while the queue holds less than one batch, wait this long for a stream's next request "
                        "(at most 10x in all) before forming a batch; 0 = never wait")
    p.add_argument("--auth-token", default=os.environ.get("OPD_TEACHER_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' metadata (default: $OPD_TEACHER_TOKEN; none = open)")
    p.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA bundle; when given, clients must present certificates")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (HTTP /metrics)")
    p.add_argument("--http-port", type=_port, default=None,
                   help="also answer HTTP on this port (0 = any free port): vLLM's /v1/completions with prompt_logprobs "
                        "(TRL) and SGLang's /generate input log-probs (slime, miles), same engine and token "
                        "(docs/interop.md)")
    p.add_argument("--served-model-name", default=None,
                   help="model id the HTTP front reports in /v1/models and accepts as 'model' (default: the --model "
                        "name; one model only: with several, the HTTP front uses their NAMEs)")
    p.add_argument("--tp", type=int, default=0,
                   help="tensor-parallel ranks on this node (0 = off): the model sharded by transformers' TP plan, "
                        "rank 0 serves, every batch runs on all ranks, the head merges vocabulary shards exactly; "
                        "spawns the ranks itself, or run under `torchrun --nproc_per_node N -m opd teacher --tp N` "
                        "(docs/deploy.md)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    from teacher_server import sglang_app

    sglang_app.add_arguments(p)   # --engine, --sglang-url, ...


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port in [0, 65535] (0 = any free port)")
    return port


def main(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from teacher_server.app import TeacherConfig, build_server, parse_model_arg
    from teacher_server.service import ServerConfig

    try:
        models = [parse_model_arg(m) for m in args.model]
    except ValueError as exc:
        print(f"opd teacher: {exc}", file=sys.stderr)
        return 2
    if args.served_model_name and len(models) > 1:
        print(f"opd teacher: --served-model-name {args.served_model_name!r}: only with one --model; with "
              f"{len(models)} models the HTTP front serves each under its NAME (--model NAME=DIR)", file=sys.stderr)
        return 2
    from teacher_server.sglang_app import SGLangUnavailable, check_args

    problem = check_args(args)
    if not problem and args.engine == "sglang" and len(models) > 1:
        problem = (f"--engine sglang: {len(models)} --model flags; an SGLang-fronted server serves the one model its "
                   f"--sglang-url serves (run one opd teacher per SGLang deployment)")
    if problem:
        print(f"opd teacher: {problem}", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.http_port and args.http_port in (args.port, args.metrics_port):
        print(f"opd teacher: --http-port {args.http_port}: the same port as "
              f"{'--port' if args.http_port == args.port else '--metrics-port'}; expected another port (or 0)",
              file=sys.stderr)
        return 2
    if args.tp:  # checked before any model loads; followers run their loop and return here
        from teacher_server import tp

        if len(models) > 1:
            print(f"opd teacher: --tp {args.tp}: one --model only ({len(models)} given); run one tensor-parallel "
                  f"server per model", file=sys.stderr)
            return 2
        args.model = models[0][1]   # tp.check_args / the followers read one directory

        problem = tp.check_args(args)
        if problem:
            print(f"opd teacher: {problem}", file=sys.stderr)
            return 2
        rc = tp.launch(args)
        if rc is not None:
            return rc
    server_cfg = ServerConfig(host=args.host, port=args.port, max_workers=args.max_workers, queue_wait_s=args.queue_wait_s,
                              max_unread_mb_per_stream=args.max_unread_mb_per_stream,
                              auth_token=args.auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_client_ca=args.tls_client_ca, grace_s=args.grace_s)
    cfg = TeacherConfig(model=models[0][1], models=models, dtype=args.dtype, device=args.device, max_batch_tokens=args.max_batch_tokens,
                        chunk_size=args.chunk_size, max_top_k=args.max_top_k, max_extra_ids=args.max_extra_ids,
                        max_sequence_length=args.max_sequence_length, max_queue_tokens=args.max_queue_tokens,
                        allow_full=not args.no_full, random_weights_seed=args.random_weights_seed, server=server_cfg,
                        prefix_sharing=not args.no_prefix_sharing, prefix_min_tokens=args.prefix_min_tokens,
                        cache_mb=args.cache_mb, cache_dir=args.cache_dir, quantize=args.quantize,
                        pipeline_depth=args.pipeline_depth, head_part_rows=args.head_part_rows,
                        batch_wait_s=args.batch_wait_ms / 1e3, engine=args.engine, sglang_url=args.sglang_url,
                        sglang_api_key=args.sglang_api_key, sglang_timeout_s=args.sglang_timeout_s,
                        sglang_wait_s=args.sglang_wait_s, tp=args.tp)
    metrics = None
    if args.metrics_port is not None:
        from teacher_server.metrics import TeacherMetrics

        metrics = TeacherMetrics()
    try:
        server = build_server(cfg, metrics)
    except ValueError as exc:
        print(f"opd teacher: {exc}", file=sys.stderr)
        return 2
    except SGLangUnavailable as exc:  # --engine sglang: no server answered within --sglang-wait-s
        print(f"opd teacher: {exc}", file=sys.stderr)
        return 1
    for eng in getattr(server.engine, "engines", lambda: [server.engine])():
        eng.compile, eng.head, eng.split_uneven = args.compile, args.head, not args.no_split_uneven
        eng.packing = args.packing
    if metrics is not None:
        metrics.attach(server.engine)
        metrics.serve(args.host, args.metrics_port)
    stop = threading.Event()

    def on_signal(signum, frame):
        logging.getLogger("opd.teacher").info("signal %d: NOT_SERVING, draining for up to %.0fs", signum, args.grace_s)
        stop.set()

    if args.tp:
        tp.watch(server, stop)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http = None
    if args.http_port is not None:
        from teacher_server.http_front import HttpFront

        try:  # bound now, served once the engine is warm
            http = HttpFront(server, args.host, args.http_port, args.served_model_name, dict(models))
        except OSError as exc:
            print(f"opd teacher: --http-port {args.http_port}: cannot bind {args.host}:{args.http_port} ({exc})",
                  file=sys.stderr)
            return 2
    server.start()
    server.warm_up_and_serve()
    if http is not None:
        http.start()
        print(f"opd teacher: HTTP (vLLM /v1/completions, SGLang /generate) for {', '.join(http.names)} on "
              f"{args.host}:{http.port}", flush=True)
    for m in server.servicer.models.values():
        info = m.info
        print(f"opd teacher: serving {info.model_name} ({info.dtype}, vocab {info.vocab_size}) on "
              f"{args.host}:{server.port}", flush=True)
    # poll: a signal delivered to one of the server's other threads would not wake a main
    # thread blocked in a plain wait, and its Python handler would never run
    while not stop.wait(0.5):
        pass
    drain_http = None
    if http is not None:  # both fronts drain at once, within one grace period, health NOT_SERVING from the start
        server.begin_drain()
        drain_http = threading.Thread(target=http.stop, args=(args.grace_s,), name="opd-http-drain", daemon=True)
        drain_http.start()
    server.stop(args.grace_s)
    if drain_http is not None:
        drain_http.join(args.grace_s + 5)
    print("opd teacher: stopped", flush=True)
    return tp.finish(server) if args.tp else 0
