"""`opd teacher --http-port P`: an HTTP front beside gRPC, over the same `ScoringEngine`.

It answers two subsets of other servers' HTTP APIs, shaped as those servers shape them, so
trainers written against them use an opd teacher unchanged (docs/interop.md):

- vLLM's OpenAI completions with prompt log-probs (TRL's async distillation trainer and
  `VLLMClient.get_sequence_logprobs`): GET /health, GET /v1/models, POST /v1/completions with
  `prompt` = token ids (one list, or a list of lists), `max_tokens` 1, `prompt_logprobs` k.
  `choices[i].prompt_logprobs[j]` is None for j = 0, else a dict token id (string) ->
  {logprob, rank, decoded_token} holding the realised token first, then the top-k by rank
  (vLLM's insertion order). As vLLM 0.34: -inf is sent as -9999.0; top-k ranks are 1..k; the
  realised token's rank is its place in the top-k, else k + 1 (a lower bound: the server does
  not count the whole vocabulary). `temperature` scales the log-probs, as a vLLM server started
  with `--logprobs-mode processed_logprobs` (what TRL asks for); 0 means 1 (greedy: unscaled)
  and (0, 0.01) is raised to 0.01, as vLLM does. No
  token is generated: `text` is "", `finish_reason` "length", `completion_tokens` 0.
- SGLang 0.5.23's input log-probs (slime, miles): POST /generate with `input_ids`,
  `sampling_params.max_new_tokens` 0, `return_logprob` true, `logprob_start_len` s >= 0,
  optional `top_logprobs_num` and `token_ids_logprob`. `meta_info.input_token_logprobs` runs
  over input_ids[s:] as [logprob, id, text|null] with a null log-prob at index 0;
  `input_top_logprobs` / `input_token_ids_logprobs` hold None at index 0, then per position a
  list of [logprob, id, text|null] (top-k by log-prob; the requested ids in their order). As in
  SGLang, input log-probs ignore `temperature` (unscaled logits); -inf is sent as null.

Several models (`opd teacher --model NAME=DIR ...`): /v1/models lists every NAME and
/v1/completions routes by `model` (absent: the default model; unknown: 404 naming the models, as
vLLM). SGLang's /generate has no model field: POST /generate scores with the default model, and
POST /models/NAME/generate with NAME (any route may take the /models/NAME prefix, so a client
given http://host:port/models/NAME as its base URL talks to NAME). One model: its name is
`--served-model-name` (default: the --model name), as before.

Everything outside these subsets (generation, streaming, text prompts, unknown fields) is a 400
naming the field. Same engine, queue, batching, prefix sharing and cache as gRPC; the same
bearer token (`Authorization: Bearer <token>`; 401 without it; /health stays open); a full
queue or a draining server answers 503 (the peers' clients retry 5xx).

Server: the standard library's ThreadingHTTPServer, as `opd rollout-server` uses: the engine's
API is blocking (submit, then a delivery callback on the engine's thread), so one thread per
connection is the natural fit, and no web framework is needed for four routes. JSON: msgspec
when it is installed (about 5-8x faster than the json module on top-k tables; bench/
bench_http_front.py measures both), else the json module; both write the same text.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import numpy as np

from teacher_server import head as H
from teacher_server.engine import QueueFull, ScoreItem

try:  # optional speed-up; same output as the json module
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - depends on the environment
    _msgspec = None

log = logging.getLogger("opd.teacher")

MAX_BODY_BYTES = 256 * 1024 * 1024
VLLM_NEG_INF = -9999.0          # vLLM's clamp_prompt_logprobs sends -inf as this
VLLM_MIN_TEMP = 1e-2            # vLLM: 0 is greedy (logits unscaled); (0, 0.01) is raised to 0.01

# /v1/completions fields this server accepts (everything else is a 400 naming the field)
VLLM_FIELDS = {"model", "prompt", "max_tokens", "temperature", "prompt_logprobs", "n", "echo", "stream",
               "logprobs", "return_token_ids", "seed", "user"}
# /generate fields
SGLANG_FIELDS = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
                 "token_ids_logprob", "return_text_in_logprobs", "rid", "stream", "return_prompt_token_ids"}
# sampling_params keys accepted: max_new_tokens must be 0; the others only steer generation or text
SGLANG_SAMPLING_KEYS = {"max_new_tokens", "temperature", "skip_special_tokens", "spaces_between_special_tokens",
                        "top_p", "top_k", "min_p", "n", "sampling_seed", "stop", "stop_token_ids", "ignore_eos",
                        "no_stop_trim"}


def dumps(obj) -> bytes:
    if _msgspec is not None:
        return _msgspec.json.encode(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class BadRequest(ValueError):
    def __init__(self, field: str | None, msg: str, status: int = 400):
        super().__init__(f"{field}: {msg}" if field else msg)
        self.field, self.status = field, status


class Unavailable(RuntimeError):
    pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise BadRequest(key, f"{v!r} must be a number >= 0")
    return float(v)


class HttpFront:
    """The HTTP server; `server` is the running `TeacherServer` (its engine, limits, info, config
    and metrics are shared with gRPC)."""

    def __init__(self, server, host: str = "127.0.0.1", port: int = 0, served_model_name: str | None = None,
                 tokenizer_dir: str | dict[str, str] | None = None):
        """`tokenizer_dir`: the default model's tokenizer directory, or {served name: directory}."""
        self.server = server
        svc = server.servicer
        self.engine, self.info = server.engine, svc.info
        self.cfg = server.cfg
        self.metrics = getattr(svc, "metrics", None)
        served = getattr(svc, "models", None) or {svc.info.model_name: None}
        default = getattr(svc, "default_model", svc.info.model_name)
        self.model_name = served_model_name or self.info.model_name   # the default model's HTTP name
        # HTTP name -> the servicer's model name (one model: --served-model-name, as before)
        self.route = {self.model_name: default} if len(served) == 1 else {n: n for n in served}
        self.names = list(self.route)
        self.created = int(time.time())
        self._local = threading.local()
        dirs = tokenizer_dir if isinstance(tokenizer_dir, dict) else {default: tokenizer_dir} if tokenizer_dir else {}
        self._tokenizers: dict[str, object] = {}
        self._decoded: dict[str, dict[int, str | None]] = {}
        for name, d in dirs.items():
            if not d or name not in served:
                continue
            try:
                from transformers import AutoTokenizer

                self._tokenizers[name] = AutoTokenizer.from_pretrained(d)
                self._decoded[name] = {}
            except Exception as exc:  # noqa: BLE001 - decoded_token / text become null
                log.warning("http front: no tokenizer in %s (%s): decoded_token and text are null", d, exc)
        self._default = default
        self._slots = threading.BoundedSemaphore(max(1, self.cfg.max_workers))
        self._inflight = 0
        self._lock = threading.Lock()
        self.closing = False
        handler = type("_Handler", (_Handler,), {"front": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        if self.cfg.tls_cert:  # the gRPC port's certificate (and client CA) serve HTTPS here too
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
            if self.cfg.tls_client_ca:
                ctx.load_verify_locations(self.cfg.tls_client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "HttpFront":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="opd-http-front", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new requests (503), let in-flight ones finish within `grace`, then close."""
        self.closing = True
        end = time.monotonic() + grace
        while self._inflight and time.monotonic() < end:
            time.sleep(0.05)
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def serving(self) -> bool:
        return not self.closing and not getattr(self.server.servicer, "draining", False)

    def authorized(self, header: str | None) -> bool:
        token = self.cfg.auth_token
        if not token:
            return True
        return hmac.compare_digest((header or "").encode(), b"Bearer " + token.encode())

    # ---- models ------------------------------------------------------------------------------
    def select(self, http_name: str | None, field: str = "model") -> None:
        """Score this thread's request with model `http_name` (None: the default); a 404 naming
        the models served otherwise (vLLM's answer to an unknown model)."""
        if http_name is None:
            self._local.model, self._local.http_name = self._default, self.model_name
            return
        if http_name not in self.route:
            raise BadRequest(field, f"The model `{http_name}` does not exist. Valid aliases: {', '.join(self.names)}.",
                             404)
        self._local.model, self._local.http_name = self.route[http_name], http_name

    @property
    def current(self) -> str:
        return getattr(self._local, "model", None) or self._default

    @property
    def current_http_name(self) -> str:
        return getattr(self._local, "http_name", None) or self.model_name

    @property
    def limits(self):
        """The request limits of the model this thread's request is scored with."""
        models = getattr(self.server.servicer, "models", None)
        return models[self.current].limits if models else self.server.servicer.limits

    @property
    def _tokenizer(self):
        return self._tokenizers.get(self.current)

    def decoded(self, tid: int) -> str | None:
        tok = self._tokenizer
        if tok is None:
            return None
        cache = self._decoded[self.current]
        s = cache.get(tid)
        if s is None:
            s = cache[tid] = tok.decode([tid])
        return s

    # ---- scoring -----------------------------------------------------------------------------
    def _ids(self, seq, field: str) -> np.ndarray:
        if not isinstance(seq, list) or not all(_is_int(t) for t in seq):
            raise BadRequest(field, "must be a list of token ids (ints); this server takes token ids, not text")
        n, lim = len(seq), self.limits
        if n == 0:
            raise BadRequest(field, "is empty; send at least one token id")
        if n > lim.max_sequence_length:
            raise BadRequest(field, f"length {n} exceeds the server's max sequence length {lim.max_sequence_length}")
        ids = np.asarray(seq, dtype=np.int64)
        bad = (ids < 0) | (ids >= lim.vocab_size)
        if bad.any():
            pos = int(np.argmax(bad))
            raise BadRequest(field, f"id {int(ids[pos])} at position {pos} is outside the vocabulary [0, {lim.vocab_size})")
        return ids

    def _extra(self, ids, field: str) -> np.ndarray:
        if not isinstance(ids, list) or not ids or not all(_is_int(t) for t in ids):
            raise BadRequest(field, "must be a non-empty list of token ids (ints)")
        if len(ids) > self.limits.max_extra_ids:
            raise BadRequest(field, f"{len(ids)} ids exceed the server's --max-extra-ids {self.limits.max_extra_ids}")
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= self.limits.vocab_size:
            raise BadRequest(field, f"ids must be within [0, {self.limits.vocab_size})")
        return arr

    def _top_k(self, k, field: str, allow_all: bool = False) -> int:
        if allow_all and k == -1:
            if self.limits.vocab_size > self.limits.max_top_k:
                raise BadRequest(field, f"-1 (the whole vocabulary of {self.limits.vocab_size}) exceeds the server's "
                                 f"--max-top-k {self.limits.max_top_k}")
            return self.limits.vocab_size
        if not _is_int(k) or not 0 <= k <= self.limits.max_top_k:
            raise BadRequest(field, f"{k!r} is outside [0, {self.limits.max_top_k}] (the server's --max-top-k)")
        return k

    def score(self, jobs: list[tuple[np.ndarray, int, int, float, np.ndarray | None]]) -> list[dict | None]:
        """jobs: (ids, target_start, top_k, temperature, extra ids | None) per sequence. Returns
        the engine's result per job (None when the span is empty). Raises Unavailable."""
        if not self.serving:
            raise Unavailable("teacher is draining (shutting down); use another replica")
        if not self._slots.acquire(timeout=self.cfg.queue_wait_s):
            raise Unavailable(f"teacher serves {self.cfg.max_workers} HTTP scoring requests at once; retry later")
        try:
            results: list = [None] * len(jobs)
            items: list[ScoreItem] = []
            done = threading.Event()
            cancelled = threading.Event()
            left = [0]
            lock = threading.Lock()

            index: dict[int, int] = {}

            def deliver(item, res):
                results[index[id(item)]] = res
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            for i, (ids, start, k, temp, extra) in enumerate(jobs):
                if start >= len(ids):
                    continue
                stats = {H.SAMPLED} | ({H.TOPK} if k > 0 else set()) | ({H.EXTRA} if extra is not None else set())
                P = len(ids) - start
                item = ScoreItem(request_id=f"http-{i}", token_ids=ids, target_start=start, target_end=len(ids),
                                 top_k=k, stats=frozenset(stats), temperature=temp,
                                 extra_ids=None if extra is None else np.tile(extra, (P, 1)),
                                 deliver=deliver, is_cancelled=cancelled.is_set, model=self.current)
                index[id(item)] = i
                items.append(item)
            left[0] = len(items)
            if not items:
                return results
            t0 = time.monotonic()
            try:
                for it in items:
                    self.engine.submit(it, wait_s=self.cfg.queue_wait_s)
            except QueueFull as exc:
                cancelled.set()
                raise Unavailable(str(exc)) from None
            except ValueError as exc:  # refused by the engine (--engine sglang: temperature != 1)
                cancelled.set()
                raise BadRequest(None, str(exc)) from None
            done.wait()
            for it in items:
                res = results[index[id(it)]]
                if isinstance(res, BaseException):
                    if getattr(res, "grpc_status", None) is not None and res.grpc_status.name == "UNAVAILABLE":
                        raise Unavailable(str(res))   # --engine sglang with SGLang down: 503, clients retry
                    raise RuntimeError(f"scoring failed: {type(res).__name__}: {res}")
            self._local.scored = (items, t0)   # counted once the reply's size is known (`record`)
            return results
        finally:
            self._slots.release()

    def record(self, nbytes: int) -> None:
        """Count this thread's last scored request in the server's metrics, its reply's bytes
        shared out over its sequences (the same counters gRPC feeds)."""
        items, t0 = getattr(self._local, "scored", ((), 0.0))
        self._local.scored = ((), 0.0)
        if self.metrics is None or not items:
            return
        for it in items:
            try:
                self.metrics.scored(it, time.monotonic() - t0, nbytes // len(items))
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.debug("http front: metrics failed", exc_info=True)

    # ---- vLLM: /v1/completions -----------------------------------------------------------------
    def models(self) -> dict:
        data = []
        for name in self.names:
            self.select(name)
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "opd",
                         "root": name, "parent": None, "max_model_len": self.limits.max_sequence_length,
                         "permission": []})
        return {"object": "list", "data": data}

    def completions(self, body: dict) -> tuple[int, dict]:
        unknown = sorted(set(body) - VLLM_FIELDS)
        if unknown:
            raise BadRequest(unknown[0], f"is not supported by this teacher's /v1/completions (it scores prompts "
                             f"only); accepted fields: {sorted(VLLM_FIELDS)}")
        model = body.get("model")
        if model is not None:
            if getattr(self._local, "prefixed", False) and model != self.current_http_name:
                raise BadRequest("model", f"{model!r} differs from the model of the URL's /models/"
                                 f"{self.current_http_name} prefix; send one or the other")
            self.select(model if isinstance(model, str) else repr(model))
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            raise BadRequest("prompt", "text prompts are not supported; send token ids (a list of ints, or a list of "
                             "such lists)")
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt", "required: a list of token ids, or a list of such lists for a batch")
        batch = isinstance(prompt[0], list)
        seqs = [self._ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)] if batch else [self._ids(prompt, "prompt")]
        if "max_tokens" not in body or body["max_tokens"] is None:
            raise BadRequest("max_tokens", "missing (vLLM then generates 16 tokens); this teacher only scores "
                             "prompts: send max_tokens 1")
        if body["max_tokens"] != 1 or not _is_int(body["max_tokens"]):
            msg = ("must be at least 1 (vLLM: 0 only with echo)" if body["max_tokens"] == 0 else
                   "generation is not supported; this teacher only scores prompts: send max_tokens 1")
            raise BadRequest("max_tokens", f"{body['max_tokens']!r}: {msg}")
        for key, ok, want in (("n", 1, "1"), ("echo", False, "false"), ("stream", False, "false"),
                              ("logprobs", None, "null (sampled-token log-probs need generation)")):
            if key in body and body[key] != ok and not (key in ("echo", "stream", "n") and body[key] is None):
                raise BadRequest(key, f"{body[key]!r} is not supported; send {want}")
        if body.get("prompt_logprobs") is None:
            raise BadRequest("prompt_logprobs", "required: the number of top log-probs per prompt position (0 = the "
                             "realised token only)")
        k = self._top_k(body["prompt_logprobs"], "prompt_logprobs", allow_all=True)
        temp = _number(body, "temperature", 1.0)
        temp = 1.0 if temp == 0 else max(temp, VLLM_MIN_TEMP)
        results = self.score([(ids, 1, k, temp, None) for ids in seqs])
        with_ids = bool(body.get("return_token_ids"))
        choices = []
        for i, (ids, res) in enumerate(zip(seqs, results)):
            choices.append({"index": i, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                            "token_ids": [] if with_ids else None,
                            "prompt_logprobs": self._vllm_positions(ids, res, k),
                            "prompt_token_ids": ids.tolist() if with_ids else None})
        n = sum(len(s) for s in seqs)
        return 200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": self.current_http_name, "choices": choices,
                     "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                               "prompt_tokens_details": None},
                     "system_fingerprint": None, "kv_transfer_params": None}

    def _vllm_positions(self, ids: np.ndarray, res: dict | None, k: int) -> list:
        out: list = [None]
        if res is None:
            return out
        sampled = _floats(res[H.SAMPLED], VLLM_NEG_INF)
        targets = ids[1:].tolist()
        if k:
            tids, tvals = _by_rank(res["topk_ids"], res["topk_logprobs"])
            tids, tvals = tids.tolist(), _floats(tvals, VLLM_NEG_INF)
        dec = self.decoded if self._tokenizer is not None else (lambda t: None)
        ranks = range(1, k + 1)
        for r, t in enumerate(targets):
            pos = {str(t): {"logprob": sampled[r], "rank": k + 1, "decoded_token": dec(t)}}
            if k:
                row = tids[r]
                pos.update({str(tid): {"logprob": v, "rank": rank, "decoded_token": dec(tid)}
                            for tid, v, rank in zip(row, tvals[r], ranks)})
            out.append(pos)
        return out

    # ---- SGLang: /generate ---------------------------------------------------------------------
    def generate(self, body: dict) -> tuple[int, dict | list]:
        unknown = sorted(set(body) - SGLANG_FIELDS)
        if unknown:
            raise BadRequest(unknown[0], f"is not supported by this teacher's /generate (it scores input_ids only); "
                             f"accepted fields: {sorted(SGLANG_FIELDS)}")
        if "text" in body:
            raise BadRequest("text", "not supported; send input_ids")
        inp = body.get("input_ids")
        if not isinstance(inp, list) or not inp:
            raise BadRequest("input_ids", "required: a list of token ids, or a list of such lists for a batch")
        batch = isinstance(inp[0], list)
        seqs = [self._ids(p, f"input_ids[{i}]") for i, p in enumerate(inp)] if batch else [self._ids(inp, "input_ids")]
        B = len(seqs)

        def per_item(key, default):
            v = body.get(key, default)
            if isinstance(v, list) and key != "token_ids_logprob":
                if not batch or len(v) != B:
                    raise BadRequest(key, f"a list must have the batch length {B}" if batch else "must not be a list")
                return v
            return [v] * B

        if body.get("stream"):
            raise BadRequest("stream", "streaming is not supported; send false")
        sps = body.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * B
        if len(sps) != B:
            raise BadRequest("sampling_params", f"a list must have the batch length {B}")
        for sp in sps:
            if not isinstance(sp, dict):
                raise BadRequest("sampling_params", "must be an object")
            unknown = sorted(set(sp) - SGLANG_SAMPLING_KEYS)
            if unknown:
                raise BadRequest(f"sampling_params.{unknown[0]}", f"is not supported; accepted keys: "
                                 f"{sorted(SGLANG_SAMPLING_KEYS)}")
            if sp.get("max_new_tokens") != 0:
                raise BadRequest("sampling_params.max_new_tokens", f"{sp.get('max_new_tokens', '(absent: 128)')!r}: "
                                 "generation is not supported; this teacher only scores input_ids: send 0")
            _number(sp, "temperature", 1.0)   # checked; input log-probs ignore it, as in SGLang
            if sp.get("n", 1) not in (1, None):
                raise BadRequest("sampling_params.n", f"{sp['n']!r} is not supported; send 1")
        ret = per_item("return_logprob", False)
        starts = per_item("logprob_start_len", -1)
        tops = per_item("top_logprobs_num", 0)
        tid_lists = body.get("token_ids_logprob")
        if tid_lists is None or tid_lists == []:
            extras = [None] * B
        elif isinstance(tid_lists, list) and tid_lists and isinstance(tid_lists[0], list):
            if not batch or len(tid_lists) != B:
                raise BadRequest("token_ids_logprob", f"a list of lists must have the batch length {B}" if batch else
                                 "one request takes one list of ids (for every position)")
            extras = [self._extra(x, f"token_ids_logprob[{i}]") if x else None for i, x in enumerate(tid_lists)]
        else:
            extras = [self._extra(tid_lists, "token_ids_logprob")] * B
        text = bool(body.get("return_text_in_logprobs", False))
        jobs = []
        for i, ids in enumerate(seqs):
            where = f"[{i}]" if batch else ""
            if ret[i] is not True:
                raise BadRequest(f"return_logprob{where}", f"{ret[i]!r}: this teacher only returns input log-probs: "
                                 "send true")
            s = starts[i]
            if not _is_int(s) or not 0 <= s < len(ids):
                raise BadRequest(f"logprob_start_len{where}", f"{s!r} must be within [0, {len(ids) - 1}] (the input has "
                                 f"{len(ids)} tokens; -1 would mean output log-probs only)")
            jobs.append((ids, s + 1, self._top_k(tops[i], f"top_logprobs_num{where}"), 1.0, extras[i]))
        rids = body.get("rid")
        if isinstance(rids, list):
            if len(rids) != B:
                raise BadRequest("rid", f"a list must have the batch length {B}")
        elif rids is None:
            rids = [uuid.uuid4().hex for _ in range(B)]
        else:
            rids = [str(rids)] if not batch else [f"{rids}_{i}" for i in range(B)]
        t0 = time.perf_counter()
        results = self.score(jobs)
        dt = time.perf_counter() - t0
        out = []
        for i, ((ids, start, k, _, extra), res) in enumerate(zip(jobs, results)):
            meta = {"id": rids[i], "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(ids),
                    "completion_tokens": 0, "cached_tokens": 0,
                    "weight_version": _weight_version(res)}
            meta.update(self._sglang_lists(ids, start - 1, res, k, extra, text))
            meta["e2e_latency"] = dt
            item = {"text": "", "output_ids": [], "meta_info": meta}
            if body.get("return_prompt_token_ids"):
                item["prompt_token_ids"] = ids.tolist()
            out.append(item)
        return 200, (out if batch else out[0])

    def _sglang_lists(self, ids: np.ndarray, s: int, res: dict | None, k: int, extra, text: bool) -> dict:
        toks = ids[s:].tolist()
        lps = [None] + (_floats(res[H.SAMPLED], None) if res is not None else [])
        if text:
            dec = self.decoded
            entries = lambda vals, tids: [[v, t, dec(t)] for t, v in zip(tids, vals)]  # noqa: E731
        else:
            entries = lambda vals, tids: [[v, t, None] for t, v in zip(tids, vals)]  # noqa: E731
        meta = {"input_token_logprobs": entries(lps, toks), "output_token_logprobs": [],
                "output_token_logprobs_length": 0}
        if k > 0:
            rows: list = [None]
            if res is not None:
                tids, tvals = _by_rank(res["topk_ids"], res["topk_logprobs"])
                rows += map(entries, _floats(tvals, None), tids.tolist())
            meta["input_top_logprobs"], meta["output_top_logprobs"] = rows, []
        if extra is not None:
            rows = [None]
            if res is not None:
                e_ids = extra.tolist()
                rows += (entries(r_vals, e_ids) for r_vals in _floats(res[H.EXTRA], None))
            meta["input_token_ids_logprobs"], meta["output_token_ids_logprobs"] = rows, []
        return meta


def _weight_version(res: dict | None) -> str:
    """SGLang's meta_info.weight_version: "default" for the weights loaded at start, else the
    version of the last UpdateWeights (as a string, SGLang's type)."""
    v = int((res or {}).get("_weight_version", 0))
    return "default" if v == 0 else str(v)


def _by_rank(ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k by log-prob, highest first (ties by id); the engine sends them by id."""
    order = np.lexsort((ids, -vals.astype(np.float64)), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(vals, order, -1)


def _floats(a: np.ndarray, neg_inf) -> list:
    """float32 values as Python floats (the same values vLLM's and SGLang's .tolist() give),
    -inf replaced by `neg_inf`."""
    a = np.asarray(a, dtype=np.float64)
    if np.isneginf(a).any():
        obj = a.astype(object)
        obj[np.isneginf(a)] = neg_inf
        return obj.tolist()
    return a.tolist()


class _Handler(BaseHTTPRequestHandler):
    front: HttpFront
    protocol_version = "HTTP/1.1"   # keep-alive: the peers' clients reuse connections
    timeout = 600                   # an idle keep-alive connection's thread ends after this

    def log_message(self, fmt, *args):  # quiet: one line per scoring call is too much
        log.debug("http %s - %s", self.address_string(), fmt % args)

    def _send(self, code: int, obj=None, raw: bytes | None = None) -> int:
        data = raw if raw is not None else (b"" if obj is None else dumps(obj))
        self.send_response(code)
        if obj is not None or raw is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if data:
            self.wfile.write(data)
        return len(data)

    def _error(self, code: int, msg: str, field: str | None, vllm: bool) -> None:
        if self.front.metrics is not None:
            try:
                self.front.metrics.error({400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND",
                                          413: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}.get(code, "INTERNAL"))
            except Exception:  # noqa: BLE001
                pass
        if vllm:  # vLLM's ErrorResponse
            kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(code, "InternalServerError")
            self._send(code, {"error": {"message": msg, "type": kind, "param": field, "code": code}})
        else:     # SGLang 0.5.23's contract error
            self._send(code, {"error": msg})

    def _body(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise BadRequest(None, "chunked request bodies are not supported; send Content-Length", 411)
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY_BYTES:
            self.close_connection = True   # the body is left unread
            raise BadRequest(None, f"request body of {n} bytes exceeds {MAX_BODY_BYTES}", 413)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise BadRequest(None, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest(None, f"body must be a JSON object, got {type(body).__name__}")
        return body

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        front = self.front
        path = urlparse(self.path).path.rstrip("/") or "/"
        front.select(None)
        front._local.prefixed = False
        if path.startswith("/models/"):   # /models/NAME/<route>: the route, for model NAME
            names = [n for n in front.names if path.startswith(f"/models/{n}/") or path == f"/models/{n}"]
            if names:
                name = max(names, key=len)
                front.select(name)
                front._local.prefixed = True
                path = path[len(f"/models/{name}"):] or "/"
        vllm = path.startswith("/v1")
        if path in ("/health", "/health_generate"):
            if method == "POST":
                self._body()
            self._send(200 if front.serving else 503)
            return
        if not front.authorized(self.headers.get("Authorization")):
            self.close_connection = True   # the body is left unread
            self._send(401, {"error": "Unauthorized"})
            return
        routes = {("GET", "/v1/models"): lambda b: (200, front.models()),
                  ("POST", "/v1/completions"): front.completions,
                  ("POST", "/generate"): front.generate}
        fn = routes.get((method, path))
        with front._lock:
            front._inflight += 1
        try:
            body = self._body() if method == "POST" else {}
            if fn is None:
                known = ", ".join(f"{m} {p}" for m, p in routes)
                raise BadRequest(None, f"{method} {path} is not served here; this teacher answers {known}, GET /health"
                                 + (f", each also under /models/NAME for the models {front.names}"
                                    if len(front.names) > 1 else ""), 404)
            code, obj = fn(body)
            front.record(self._send(code, obj))
        except BadRequest as exc:
            self._error(exc.status, str(exc), exc.field, vllm)
        except Unavailable as exc:
            self._error(503, str(exc), None, vllm)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("http %s %s failed", method, path)
            self._error(500, f"{type(exc).__name__}: {exc}", None, vllm)
        finally:
            with front._lock:
                front._inflight -= 1
