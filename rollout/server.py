"""`opd rollout-server`: the local engine behind the subset of SGLang's HTTP API the trainer uses.

Same paths, request fields and response shapes as SGLang 0.5.23 (docs/rollout.md lists them), so
`SGLangEngine` and other SGLang clients run against it on a CPU machine. Concurrent /generate
requests are batched by the engine's queue. Paths that only make sense on a GPU (NCCL groups,
CUDA-IPC tensors) answer SGLang's failure shape; memory release/resume are accepted no-ops.

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
from rollout.types import SamplingParams

# sampling_params keys SGLang 0.5.23 knows; any other key is a 400, as there.
SUPPORTED_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos",
                           "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n",
                           "sampling_seed", "stream_interval", "min_p", "min_new_tokens", "frequency_penalty",
                           "presence_penalty", "repetition_penalty"}
KNOWN_UNSUPPORTED_KEYS = {"stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias",
                          "custom_params", "beam_width", "choice", "watermark"}
# Keys accepted only at their neutral value here.
NEUTRAL = {"min_p": 0.0, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
           "repetition_penalty": 1.0}
MEMORY_TAGS = {"weights", "kv_cache", "cuda_graph"}
GPU_ONLY_PATHS = {"/init_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_tensor",
                  "/destroy_weights_update_group"}


class RequestError(ValueError):
    pass


def to_sampling_params(sp: dict) -> tuple[SamplingParams, int | None]:
    """SGLang `sampling_params` dict -> (SamplingParams with n, sampling_seed)."""
    if not isinstance(sp, dict):
        raise RequestError(f"sampling_params must be an object, got {type(sp).__name__}")
    unknown = sorted(set(sp) - SUPPORTED_SAMPLING_KEYS - KNOWN_UNSUPPORTED_KEYS)
    if unknown:
        raise RequestError(f"unknown sampling_params keys {unknown}; valid keys: {sorted(SUPPORTED_SAMPLING_KEYS)}")
    unsupported = sorted(k for k in sp if k in KNOWN_UNSUPPORTED_KEYS and sp[k] is not None)
    unsupported += sorted(k for k, v in NEUTRAL.items() if k in sp and sp[k] is not None and sp[k] != v)
    if unsupported:
        raise RequestError(f"sampling_params {unsupported} are not supported by opd rollout-server")
    stop = sp.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    top_k = sp.get("top_k", -1)
    try:
        params = SamplingParams(
            n=int(sp.get("n", 1)), temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
            top_k=-1 if top_k is None else int(top_k), max_new_tokens=int(sp.get("max_new_tokens", 128)),
            stop=tuple(stop) + tuple(int(t) for t in sp.get("stop_token_ids") or ()),
            ignore_eos=bool(sp.get("ignore_eos", False)))
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from e
    seed = sp.get("sampling_seed")
    return params, None if seed is None else int(seed)


def finish_reason_json(res: SeqResult, params: SamplingParams) -> dict:
    if res.finish_reason == "stop":
        return {"type": "stop", "matched": res.matched}
    if res.finish_reason == "length":
        return {"type": "length", "length": params.max_new_tokens}
    return {"type": "abort", "message": res.error or "aborted", "status_code": None, "err_type": None}


class RolloutService:
    """The HTTP-independent part: request dicts in, SGLang-shaped response objects out."""

    def __init__(self, engine: LocalEngine, model_path: str, weight_version: str = "default",
                 skip_tokenizer_init: bool = False):
        self.engine = engine
        self.model_path = model_path
        self.weight_version = weight_version
        self.skip_tokenizer_init = skip_tokenizer_init or engine.tokenizer is None
        self.paused = False

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
                "frontend": "python", "max_batch_size": self.engine.max_batch_size, "paused": self.paused}

    def generate(self, body: dict) -> dict | list:
        t0 = time.time()
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
        parsed = [to_sampling_params(sp) for sp in sps]
        rid = body.get("rid")
        return_logprob = body.get("return_logprob", False)
        if isinstance(return_logprob, list):
            if any(p.n > 1 for p, _ in parsed):
                raise RequestError("list-valued return_logprob is not allowed with n > 1")
            if len(return_logprob) != len(prompts):
                raise RequestError("return_logprob list must have the batch length")
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
                metas.append((r, params, lp, sps[i]))
        if any(p.n > 1 for p, _ in parsed):
            single = False  # SGLang turns n > 1 into a batch: the response is a list
        try:
            results = self.engine.generate_blocking(requests)
        except ValueError as e:
            raise RequestError(str(e)) from e
        out = [self._item(res, *m, t0) for res, m in zip(results, metas)]
        return out[0] if single else out

    def _item(self, res: SeqResult, rid: str, params: SamplingParams, return_logprob: bool, sp: dict, t0: float) -> dict:
        meta = {"id": rid, "finish_reason": finish_reason_json(res, params), "prompt_tokens": res.prompt_len,
                "completion_tokens": len(res.output_ids), "cached_tokens": 0, "reasoning_tokens": 0,
                "num_retractions": 0, "weight_version": self.weight_version,
                "weight_versions": [{"version": self.weight_version, "start": 0, "end": len(res.output_ids)}]}
        if return_logprob:
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

    def update_weights_from_disk(self, body: dict) -> dict:
        if not body.get("model_path"):
            raise RequestError("model_path is required")
        version = body.get("weight_version")
        self.engine.load_from_disk_(body["model_path"])
        self._set_version(version)
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}


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
            if path == "/update_weights_from_disk":
                return self._send(200, svc.update_weights_from_disk(body))
            if path in ("/begin_weight_update", "/end_weight_update"):
                return self._send(200, {"success": True, "message": ""})
            if path == "/update_weight_version":
                svc._set_version(body.get("new_version"))
                return self._send(200, {"success": True, "message": "", "new_version": svc.weight_version})
            if path == "/flush_cache":
                return self._send(200, text="Cache flushed.\n")
            if path in ("/release_memory_occupation", "/resume_memory_occupation"):
                bad = sorted(set(body.get("tags") or []) - MEMORY_TAGS)
                if bad:
                    return self._send(400, {"error": {"message": f"unknown memory tags {bad}; valid: {sorted(MEMORY_TAGS)}"}})
                return self._send(200, None)
            if path == "/pause_generation":
                svc.paused = True
                svc.engine.pause()
                return self._send(200, {"message": "Generation paused successfully.", "status": "ok"})
            if path == "/continue_generation":
                svc.paused = False
                svc.engine.resume()
                return self._send(200, {"message": "Generation continued successfully.", "status": "ok"})
            if path == "/abort_request":
                return self._send(200, ...)
            if path in GPU_ONLY_PATHS:
                return self._send(400, {"success": False, "message": f"{path} needs SGLang on a GPU; opd rollout-server "
                                        "supports /update_weights_from_disk"})
            return self._send(404, {"error": f"no route {path}"})
        except (RequestError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            if path.startswith("/update_weights"):
                return self._send(400, {"success": False, "message": str(e)})
            return self._send(400, {"error": str(e)})
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


def main(args) -> int:
    import torch

    if args.random_seed is not None:
        torch.manual_seed(args.random_seed)
    engine = LocalEngine.from_pretrained(args.model_path, device=args.device, dtype=getattr(torch, args.dtype),
                                         max_batch_size=args.max_batch_size)
    svc = RolloutService(engine, args.model_path, args.weight_version, args.skip_tokenizer_init)
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
