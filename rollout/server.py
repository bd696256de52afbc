"""`opd rollout-server`: the local engine behind the subset of SGLang's HTTP API the trainer uses.

Same paths, request fields and response shapes as SGLang 0.5.23 (docs/rollout.md lists them), so
`SGLangEngine` and other SGLang clients run against it on a CPU machine. Concurrent /generate
requests are batched by the engine's queue. The weight-update protocol (process group over gloo,
or NCCL with --device cuda; the begin/end session; bucketed broadcasts; CUDA-IPC tensors with
--device cuda; versions; memory release/resume, where released weights lose their contents as in
SGLang without a CPU backup) is in rollout/server_weights.py.

    opd tiny-model /tmp/tiny && opd rollout-server --model-path /tmp/tiny --port 0
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from rollout.local_engine import LocalEngine, SeqResult
from rollout.server_weights import WEIGHT_ROUTES, WeightUpdates
from rollout.sglang_contract import (TOP_K_ALL, ContractError, auth_status, check_generate_body,
                                     check_sampling_params, verify_sampling_params)
from rollout.types import SamplingParams

# sampling_params keys SGLang 0.5.23 knows (and how they are checked): sglang_contract.SAMPLING_FIELDS.
# Keys SGLang implements and this stand-in does not (refused here with 400 when not null):
KNOWN_UNSUPPORTED_KEYS = {"stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias",
                          "custom_params", "beam_width", "choice", "watermark"}
# Keys accepted only at their neutral value here.
NEUTRAL = {"min_p": 0.0, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
           "repetition_penalty": 1.0}
MEMORY_TAGS = {"weights", "kv_cache", "cuda_graph"}


class RequestError(ValueError):
    pass


def to_sampling_params(sp: dict, vocab_size: int = 1 << 31) -> tuple[SamplingParams, int | None]:
    """SGLang `sampling_params` dict -> (SamplingParams with n, sampling_seed), refused as SGLang
    refuses it: ContractError for a wrong JSON type or an unknown key, VerifyError for a value out
    of range (rollout/sglang_contract.py); RequestError for what SGLang takes but this stand-in
    does not implement (penalties, grammars, ...)."""
    check_sampling_params(sp)
    r = verify_sampling_params(sp, vocab_size)
    unsupported = sorted(k for k in sp if k in KNOWN_UNSUPPORTED_KEYS and sp[k] is not None)
    unsupported += sorted(k for k, v in NEUTRAL.items() if k in sp and sp[k] is not None and sp[k] != v)
    if unsupported:
        raise RequestError(f"sampling_params {unsupported} are not supported by opd rollout-server")
    stop = sp.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    max_new = r["max_new_tokens"]
    params = SamplingParams(
        n=int(r["n"]), temperature=0.0 if r["greedy"] else float(r["temperature"]), top_p=float(r["top_p"]),
        top_k=-1 if r["top_k"] >= TOP_K_ALL or r["greedy"] else int(r["top_k"]),
        max_new_tokens=128 if max_new is None else max_new,
        stop=tuple(stop) + tuple(int(t) for t in sp.get("stop_token_ids") or ()),
        ignore_eos=bool(sp.get("ignore_eos") or False))
    seed = r["sampling_seed"]
    return params, None if seed is None else int(seed)


def finish_reason_json(res: SeqResult, params: SamplingParams) -> dict:
    if res.finish_reason == "stop":
        return {"type": "stop", "matched": res.matched}
    if res.finish_reason == "length":
        return {"type": "length", "length": params.max_new_tokens}
    return {"type": "abort", "message": res.error or "aborted", "status_code": None, "err_type": None}


class RolloutService(WeightUpdates):
    """The HTTP-independent part: request dicts in, SGLang-shaped response objects out. The weight
    routes (process group, session, updates) are in rollout/server_weights.py."""

    def __init__(self, engine: LocalEngine, model_path: str, weight_version: str = "default",
                 skip_tokenizer_init: bool = False, api_key: str | None = None, admin_api_key: str | None = None):
        self.engine = engine
        self.model_path = model_path
        self.weight_version = weight_version
        self.skip_tokenizer_init = skip_tokenizer_init or engine.tokenizer is None
        self.paused = False
        self._init_weight_updates()
        self.api_key, self.admin_api_key = api_key or None, admin_api_key or None
        self.generated = 0  # sequences this server was asked for (tests check where rollouts come from)
        self._abort_next, self._abort_after_tokens = 0, 1
        self._lock = threading.Lock()

    def abort_next(self, count: int, after_tokens: int = 1) -> None:
        """Test hook: the next `count` sequences finish as SGLang's aborted requests do (HTTP 200,
        finish_reason abort, the `after_tokens` tokens generated so far)."""
        with self._lock:
            self._abort_next, self._abort_after_tokens = count, after_tokens

    def abort(self, body: dict) -> None:
        """/abort_request: {"rid": str, "abort_all": bool}; unknown rids are ignored, as there."""
        if body.get("abort_all"):
            self.engine.abort(None, "Abort all requests")
        elif body.get("rid"):
            self.engine.abort(str(body["rid"]), "Abort request")

    def pause(self, mode: str) -> None:
        """/pause_generation: `abort` ends everything in flight (partial outputs come back) and
        returns once nothing runs; `retract` / `in_place` hold new batches (the running one ends)."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_generation mode {mode!r} is not one of abort, retract, in_place")
        if mode == "abort":
            deadline = time.time() + 60
            while self.engine.num_unfinished() and time.time() < deadline:
                self.engine.abort(None, "Abort all requests")
                time.sleep(0.01)
        self.paused = True
        self.engine.pause()

    def _set_version(self, version) -> None:
        if version is None:
            return
        self.weight_version = str(version)
        try:
            self.engine.set_policy_version(int(version))
        except ValueError:
            pass  # non-integer version strings are reported but not tracked as policy_version

    def model_info(self) -> dict:
        cfg = self.engine.model.config
        return {"model_path": self.model_path, "served_model_name": self.model_path, "tokenizer_path": self.model_path,
                "is_generation": True, "preferred_sampling_params": None, "weight_version": self.weight_version,
                "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
                "disaggregation_mode": "null", "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None)}

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "max_total_num_tokens": None, "version": "opd-rollout-server",
                "frontend": "python", "max_batch_size": self.engine.max_batch_size, "paused": self.paused,
                "dtype": str(self.engine.model.dtype).replace("torch.", ""),
                "tp_size": 1, "dp_size": 1}

    def generate(self, body: dict) -> dict | list:
        t0 = time.time()
        check_generate_body(body)  # SGLang's JSON contract: 400 {"error": str}
        if ("text" in body) == ("input_ids" in body):
            raise RequestError("send exactly one of `text` and `input_ids`")
        if body.get("stream"):
            raise RequestError("stream=true is not supported by opd rollout-server")
        if "input_ids" in body:
            prompts, single = body["input_ids"], True
            if not isinstance(prompts, list) or not prompts:
                raise RequestError("input_ids must be a non-empty list of token ids or a list of such lists")
            if isinstance(prompts[0], list):
                single = False
            else:
                prompts = [prompts]
        else:
            if self.skip_tokenizer_init:
                raise RequestError("`text` needs a tokenizer; send input_ids")
            texts = body["text"]
            single = isinstance(texts, str)
            texts = [texts] if single else texts
            prompts = [self.engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        sps = body.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(prompts)
        if len(sps) != len(prompts):
            raise RequestError(f"sampling_params has {len(sps)} entries for {len(prompts)} inputs")
        parsed = [to_sampling_params(sp, self.engine.vocab_size) for sp in sps]
        rid = body.get("rid")
        return_logprob = body.get("return_logprob", False)
        if isinstance(return_logprob, list):
            if any(p.n > 1 for p, _ in parsed):
                raise RequestError("list-valued return_logprob is not allowed with n > 1")
            if len(return_logprob) != len(prompts):
                raise RequestError("return_logprob list must have the batch length")
        scoring = self._input_logprob_options(body, prompts, parsed, return_logprob, single)
        requests, metas = [], []
        for i, (ids, (params, seed)) in enumerate(zip(prompts, parsed)):
            lp = return_logprob[i] if isinstance(return_logprob, list) else bool(return_logprob)
            for j in range(params.n):
                if params.n > 1:
                    r, s = uuid.uuid4().hex, None if seed is None else seed + j
                elif isinstance(rid, list):
                    r, s = rid[i], seed
                elif rid is not None:
                    r, s = (rid if single else f"{rid}_{i}"), seed
                else:
                    r, s = uuid.uuid4().hex, seed
                requests.append((ids, params, s))
                metas.append((r, params, lp, sps[i], (ids, scoring[i])))
        if any(p.n > 1 for p, _ in parsed):
            single = False  # SGLang turns n > 1 into a batch: the response is a list
        with self._lock:
            self.generated += len(requests)
            aborts = [None] * len(requests)
            for k in range(min(self._abort_next, len(requests))):
                aborts[k] = self._abort_after_tokens
            self._abort_next -= min(self._abort_next, len(requests))
        try:
            results = self.engine.generate_blocking(requests, rids=[m[0] for m in metas], abort_at=aborts)
        except ValueError as e:
            raise RequestError(str(e)) from e
        out = [self._item(res, *m, t0) for res, m in zip(results, metas)]
        return out[0] if single else out

    def _input_logprob_options(self, body: dict, prompts: list, parsed: list, return_logprob, single: bool) -> list:
        """Per prompt: None, or (logprob_start_len, top_logprobs_num, token_ids_logprob) of a request
        for input log-probs, normalised and refused as SGLang 0.5.23 does (io_struct.normalize_batch_
        and_arguments, TokenizerManager._validate_token_ids_logprob, Scheduler.handle_generate_request).
        The stand-in answers them for prefill-only requests (max_new_tokens 0, n 1), SGLang's prompt
        scoring; input log-probs of a generation request are refused as not implemented here."""
        B = len(prompts)

        def per_item(key, default):
            v = body.get(key)
            if v is None:
                return [default] * B
            if not isinstance(v, list):
                return [v] * B
            if single or len(v) != B:
                raise RequestError(f"{key}: a list is taken for a batch of the same length only by opd rollout-server")
            return v

        starts, tops = per_item("logprob_start_len", -1), per_item("top_logprobs_num", 0)
        tids = body.get("token_ids_logprob") or None
        if tids is None:
            tids = [None] * B
        elif not isinstance(tids[0], list):
            tids = [list(tids)] * B
        elif single or len(tids) != B:
            raise RequestError("token_ids_logprob: a list of lists is taken for a batch of the same length only "
                               "by opd rollout-server")
        vocab = self.engine.vocab_size
        out = []
        for i in range(B):
            tid = tids[i] or None
            for t in tid or ():  # checked for every request, as SGLang's tokenizer manager does
                if not 0 <= t < vocab:
                    raise RequestError(f"token_ids_logprob contains out-of-vocabulary token id {t}; valid range is "
                                       f"[0, {vocab}).")
            lp = return_logprob[i] if isinstance(return_logprob, list) else bool(return_logprob)
            s, k = starts[i], tops[i]
            if not lp or (s == -1 and not k and tid is None):
                out.append(None)
                continue
            params = parsed[i][0]
            if params.max_new_tokens != 0 or params.n != 1:
                if s != -1 or k or tid is not None:
                    raise RequestError("input log-probs, top_logprobs_num and token_ids_logprob are answered by opd "
                                       "rollout-server for prompt scoring only (max_new_tokens 0, n 1)")
                out.append(None)
                continue
            if s < -1:
                raise RequestError(f"logprob_start_len {s} is not supported by opd rollout-server (-1 or >= 0)")
            if s > len(prompts[i]):
                raise RequestError(f"req.logprob_start_len={s} is higher than the number of input tokens "
                                   f"len(req.origin_input_ids)={len(prompts[i])}. Please use a smaller logprob_start_len.")
            if k < 0 or k > vocab:
                raise RequestError(f"top_logprobs_num {k} is not supported by opd rollout-server ([0, {vocab}])")
            out.append((len(prompts[i]) if s == -1 else s, k, tid))
        return out

    def _input_logprobs(self, ids: list[int], start: int, k: int, tid: list[int] | None) -> dict:
        """SGLang's prefill-only meta_info lists over input_ids[start:]: entry 0 is a placeholder
        (null log-prob, null top-k row), entry i scores input_ids[start + i] given what precedes it,
        from float32 log_softmax of unscaled logits (no temperature), top-k by torch.topk (highest
        first), the requested ids in their order. As SGLang: -inf goes out as null (orjson writes
        non-finite floats as null), and an id >= vocab_size - 1 is reported as 0 in
        input_token_logprobs (scheduler's logprob_result_processor clips it)."""
        import torch

        def fl(t) -> list:
            return [None if v == float("-inf") else v for v in t.tolist()]

        n, vocab = len(ids) - start, self.engine.vocab_size
        meta = {"input_token_logprobs": [], "output_token_logprobs": [], "output_token_logprobs_length": 0}
        if k > 0:
            meta["input_top_logprobs"], meta["output_top_logprobs"] = [], []
        if tid is not None:
            meta["input_token_ids_logprobs"], meta["output_token_ids_logprobs"] = [], []
        if n == 0:
            return meta
        logp = self.engine.prompt_logprobs(ids)
        scoring = logp[start: len(ids) - 1]  # row j scores position start + 1 + j
        toks = torch.tensor(ids[start + 1:], dtype=torch.long)
        vals = fl(scoring.gather(1, toks[:, None])[:, 0]) if len(toks) else []
        meta["input_token_logprobs"] = [[v, t if t < vocab - 1 else 0, None]
                                        for v, t in zip([None] + vals, ids[start:])]
        if k > 0:
            tv, ti = torch.topk(scoring, k, dim=-1, sorted=True)
            meta["input_top_logprobs"] = [None] + [[[v, t, None] for v, t in zip(fl(a), b.tolist())]
                                                   for a, b in zip(tv, ti)]
        if tid is not None:
            g = scoring[:, torch.tensor(tid, dtype=torch.long)]
            meta["input_token_ids_logprobs"] = [None] + [[[v, t, None] for v, t in zip(fl(a), tid)] for a in g]
        return meta

    def _item(self, res: SeqResult, rid: str, params: SamplingParams, return_logprob: bool, sp: dict,
              scoring: tuple, t0: float) -> dict:
        meta = {"id": rid, "finish_reason": finish_reason_json(res, params), "prompt_tokens": res.prompt_len,
                "completion_tokens": len(res.output_ids), "cached_tokens": 0, "reasoning_tokens": 0,
                "num_retractions": 0, "weight_version": self.weight_version,
                "weight_versions": [{"version": self.weight_version, "start": 0, "end": len(res.output_ids)}]}
        ids, opts = scoring
        if return_logprob and opts is not None and res.finish_reason != "abort":
            meta.update(self._input_logprobs(list(ids), *opts))
        elif return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(res.logprobs, res.output_ids)]
            meta["output_token_logprobs_length"] = len(res.output_ids)
        meta["e2e_latency"] = time.time() - t0
        item = {"output_ids": res.output_ids, "meta_info": meta}
        if not self.skip_tokenizer_init:
            text = self.engine.tokenizer.decode(res.output_ids, skip_special_tokens=sp.get("skip_special_tokens", True))
            if isinstance(res.matched, str) and not sp.get("no_stop_trim", False):
                text = text[:text.find(res.matched)] if res.matched in text else text
            item = {"text": text, **item}
        return item


class _Handler(BaseHTTPRequestHandler):
    service: RolloutService  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: one line per request is too much for rollouts
        pass

    def _send(self, code: int, obj=None, text: str | None = None) -> None:
        data = (text if text is not None else ("" if obj is ... else json.dumps(obj))).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        if n == 0:
            return {}
        body = json.loads(self.rfile.read(n))
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        return body

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    do_PUT = do_POST

    def _route(self):
        svc, path = self.service, urlparse(self.path).path
        status = auth_status(self.command, path, self.headers.get("Authorization"), svc.api_key, svc.admin_api_key)
        if status != 200:  # SGLang's middleware answers before reading the body
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            return self._send(status, {"error": "Unauthorized" if status == 401 else "Forbidden"})
        try:
            body = self._body()
            if path in ("/health", "/ready"):
                return self._send(503 if (svc.paused and path == "/ready") else 200, ...)
            if path == "/health_generate":
                svc.engine.generate_blocking([([0], SamplingParams(temperature=0.0, max_new_tokens=1), None)])
                return self._send(200, ...)
            if path in ("/model_info", "/get_model_info"):
                return self._send(200, svc.model_info())
            if path in ("/server_info", "/get_server_info"):
                return self._send(200, svc.server_info())
            if path == "/generate":
                return self._send(200, svc.generate(body))
            if path in WEIGHT_ROUTES:
                return self._send(*svc.weight_route(path, body))
            if path == "/get_weights_by_name":
                return self._send(*svc.get_weights_by_name(body))
            if path == "/update_weight_version":
                svc._set_version(body.get("new_version"))
                return self._send(200, {"success": True, "message": "", "new_version": svc.weight_version})
            if path == "/flush_cache":
                return self._send(200, text="Cache flushed.\n")
            if path in ("/release_memory_occupation", "/resume_memory_occupation"):
                bad = sorted(set(body.get("tags") or []) - MEMORY_TAGS)
                if bad:
                    return self._send(400, {"error": {"message": f"unknown memory tags {bad}; valid: {sorted(MEMORY_TAGS)}"}})
                return self._send(*svc.memory_route(path, body))
            if path == "/pause_generation":
                svc.pause(body.get("mode") or "abort")
                return self._send(200, {"message": "Generation paused successfully.", "status": "ok"})
            if path == "/continue_generation":
                svc.paused = False
                svc.engine.resume()
                return self._send(200, {"message": "Generation continued successfully.", "status": "ok"})
            if path == "/abort_request":
                svc.abort(body)
                return self._send(200, ...)
            return self._send(404, {"error": f"no route {path}"})
        except ContractError as e:  # SGLang's JSON-contract gate
            return self._send(400, {"error": str(e)})
        except (RequestError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            if path.startswith("/update_weights"):
                return self._send(400, {"success": False, "message": str(e)})
            return self._send(400, {"error": {"message": str(e)}})  # SGLang's ValueError shape
        except Exception as e:  # keep serving; report like SGLang's runtime errors
            return self._send(500, {"error": {"message": repr(e)}})


def make_server(service: RolloutService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class ServerThread:
    """An in-process server on a daemon thread (tests, the demo): `with ServerThread(svc) as url: ...`."""

    def __init__(self, service: RolloutService, host: str = "127.0.0.1", port: int = 0):
        self.server = make_server(service, host, port)
        h, p = self.server.server_address[:2]
        self.url = f"http://{h}:{p}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="rollout-http")

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def add_arguments(parser) -> None:
    parser.add_argument("--model-path", "--model", dest="model_path", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000, help="0 picks a free port (printed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--skip-tokenizer-init", action="store_true", help="omit `text` in responses, as SGLang")
    parser.add_argument("--random-seed", type=int, default=None, help="seeds torch for unseeded requests")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but "
                        "/health*, /ready, /metrics, as SGLang does")
    parser.add_argument("--admin-api-key", default=None, help="the key the control routes (weights, pause, abort, "
                        "memory, cache) take instead of --api-key, as SGLang does")


def main(args) -> int:
    import torch

    if args.random_seed is not None:
        torch.manual_seed(args.random_seed)
    engine = LocalEngine.from_pretrained(args.model_path, device=args.device, dtype=getattr(torch, args.dtype),
                                         max_batch_size=args.max_batch_size)
    svc = RolloutService(engine, args.model_path, args.weight_version, args.skip_tokenizer_init,
                         api_key=args.api_key, admin_api_key=args.admin_api_key)
    server = make_server(svc, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"opd rollout-server: serving {args.model_path} at http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0
