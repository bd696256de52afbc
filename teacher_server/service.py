"""The gRPC edge: `opd.teacher.v1.Teacher` servicer, health, reflection, auth, lifecycle.

The servicer converts messages to `ScoreItem`s and results back to messages; all compute lives
in `ScoringEngine`. Handlers are registered by hand (generic handlers), so no generated
`_pb2_grpc` module (and its grpcio version check) is needed.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from teacher_server import codec
from teacher_server import head as H
from teacher_server.engine import QueueFull, ScoreItem, ScoringEngine
from teacher_server.validate import InvalidRequest, Limits, to_item
from teacher_server.wire import pb

log = logging.getLogger("opd.teacher")
SERVICE = "opd.teacher.v1.Teacher"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def encode_result(item: ScoreItem, res: dict, opts: pb.ScoreOptions) -> pb.ScoreResult:
    comp, enc, level = opts.compression, opts.value_encoding, opts.zstd_level or 3
    out = pb.ScoreResult(request_id=item.request_id, num_positions=item.num_positions,
                         server_seconds=float(res.get("_server_seconds", 0.0)),
                         batch_sequences=int(res.get("_batch_sequences", 1)))
    if H.SAMPLED in res:
        out.sampled_logprobs.CopyFrom(codec.encode_values(res[H.SAMPLED], enc, comp, level))
    if "topk_ids" in res:
        out.topk_ids.CopyFrom(codec.encode_ids(res["topk_ids"], comp, level))
        out.topk_logprobs.CopyFrom(codec.encode_values(res["topk_logprobs"], enc, comp, level))
    for key, field in ((H.TAIL, "tail_logmass"), (H.LSE, "logsumexp"), (H.ENTROPY, "entropy")):
        if key in res:  # scalars per position stay fp32: they are 4 B/token and feed exact terms
            getattr(out, field).CopyFrom(codec.encode_values(res[key], pb.FP32, comp, level))
    if H.EXTRA in res:
        out.extra_logprobs.CopyFrom(codec.encode_values(res[H.EXTRA], enc, comp, level))
    if H.FULL in res:
        out.full_logprobs.CopyFrom(codec.encode_values(res[H.FULL], enc, comp, level))
    return out


class _Call:
    """State of one Score stream: results waiting to be sent, and whether it was cancelled."""

    def __init__(self):
        self.results: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.outstanding = 0
        self.lock = threading.Lock()
        self.all_read = False

    def deliver(self, item, res):
        self.results.put((item, res))

    def finish_one(self):
        with self.lock:
            self.outstanding -= 1
            done = self.all_read and self.outstanding == 0
        if done:
            self.results.put(None)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 64
    queue_wait_s: float = 30.0
    max_inflight_per_call: int = 256
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    grace_s: float = 30.0


ENCODE_GROUP = 32  # most ready results of one stream encoded at once
_ENCODE_POOL: futures.ThreadPoolExecutor | None = None
_ENCODE_POOL_LOCK = threading.Lock()


def _encode_pool() -> futures.ThreadPoolExecutor:
    """One process-wide pool for result encoding (a few threads: zstd compression is the cost)."""
    global _ENCODE_POOL
    with _ENCODE_POOL_LOCK:
        if _ENCODE_POOL is None:
            import os

            _ENCODE_POOL = futures.ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2))),
                                                      thread_name_prefix="opd-encode")
        return _ENCODE_POOL


class TeacherServicer:
    def __init__(self, engine: ScoringEngine, limits: Limits, info: pb.TeacherInfo, cfg: ServerConfig, metrics=None):
        self.engine, self.limits, self.info, self.cfg = engine, limits, info, cfg
        self.metrics = metrics

    def GetInfo(self, request, context):
        return self.info

    def Score(self, request_iterator, context):
        call = _Call()
        context.add_callback(call.cancelled.set)
        inflight = threading.Semaphore(self.cfg.max_inflight_per_call)
        opts_by_id: dict[int, pb.ScoreOptions] = {}

        def on_result(item, res):
            call.deliver(item, res)

        def read():
            try:
                for i, req in enumerate(request_iterator):
                    if call.cancelled.is_set():
                        break
                    item, opts = to_item(req, i, self.limits)
                    item.deliver, item.is_cancelled = on_result, call.cancelled.is_set
                    opts_by_id[id(item)] = opts
                    # back-pressure: stop reading the stream while too much of it is in flight
                    while not inflight.acquire(timeout=0.5):
                        if call.cancelled.is_set():
                            return
                    # A stream with work in flight waits for room (its own results free it);
                    # one with nothing in flight gets RESOURCE_EXHAUSTED after queue_wait_s.
                    waited_since = time.monotonic()
                    while True:
                        try:
                            with call.lock:
                                call.outstanding += 1
                            self.engine.submit(item, wait_s=0.2)
                            break
                        except QueueFull as exc:
                            with call.lock:
                                call.outstanding -= 1
                                own_work = call.outstanding > 0
                            if call.cancelled.is_set():
                                return
                            if not own_work and time.monotonic() - waited_since >= self.cfg.queue_wait_s:
                                call.results.put(("abort", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)))
                                return
            except InvalidRequest as exc:
                call.results.put(("abort", grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                return
            except Exception as exc:  # stream broken by the client
                if not call.cancelled.is_set():
                    call.results.put(("abort", grpc.StatusCode.CANCELLED, f"request stream failed: {exc}"))
                return
            with call.lock:
                call.all_read = True
                done = call.outstanding == 0
            if done:
                call.results.put(None)

        threading.Thread(target=read, name="opd-score-reader", daemon=True).start()
        while True:
            # A batch's results arrive together: take every ready message and encode the items
            # concurrently (zstd and numpy release the GIL), then answer in arrival order.
            ready = [call.results.get()]
            while len(ready) < ENCODE_GROUP:
                try:
                    ready.append(call.results.get_nowait())
                except queue.Empty:
                    break
            jobs = {}
            for msg in ready:
                if msg is not None and msg[0] != "abort" and not isinstance(msg[1], BaseException):
                    item, res = msg
                    opts = opts_by_id.pop(id(item))
                    jobs[id(item)] = (_encode_pool().submit(encode_result, item, res, opts) if len(ready) > 1
                                      else encode_result(item, res, opts))
            for msg in ready:
                if msg is None:
                    return
                if msg[0] == "abort":
                    call.cancelled.set()
                    if self.metrics:
                        self.metrics.error(msg[1].name)
                    context.abort(msg[1], msg[2])
                item, res = msg
                inflight.release()
                call.finish_one()
                if isinstance(res, BaseException):
                    if self.metrics:
                        self.metrics.error("INTERNAL")
                    context.abort(grpc.StatusCode.INTERNAL, f"request_id={item.request_id!r}: scoring failed: {res}")
                out = jobs.pop(id(item))
                if isinstance(out, futures.Future):
                    out = out.result()
                if self.metrics:
                    self.metrics.scored(item, time.monotonic() - item.enqueued_at, out.ByteSize())
                yield out


class _TokenAuth(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` metadata (health checks exempt)."""

    def __init__(self, token: str):
        self._token = token.encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        md = dict(details.invocation_metadata or ())
        got = md.get("authorization", "")
        if hmac.compare_digest(got.encode(), b"Bearer " + self._token):
            return continuation(details)
        return self._deny_stream if details.method.endswith("/Score") else self._deny


class TeacherServer:
    """Owns the grpc.Server, the health servicer and the engine's lifecycle."""

    def __init__(self, engine: ScoringEngine, limits: Limits, info: pb.TeacherInfo, cfg: ServerConfig, metrics=None):
        self.engine, self.cfg = engine, cfg
        interceptors = [_TokenAuth(cfg.auth_token)] if cfg.auth_token else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
                                  options=CHANNEL_OPTIONS, interceptors=interceptors)
        self.servicer = TeacherServicer(engine, limits, info, cfg, metrics)
        handlers = {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self.servicer.GetInfo, request_deserializer=pb.GetInfoRequest.FromString,
                response_serializer=pb.TeacherInfo.SerializeToString),
            "Score": grpc.stream_stream_rpc_method_handler(
                self.servicer.Score, request_deserializer=pb.ScoreRequest.FromString,
                response_serializer=pb.ScoreResult.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        self.set_serving(False)
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            ca = open(cfg.tls_client_ca, "rb").read() if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=ca is not None)
            self.port = self.server.add_secure_port(addr, creds)
        else:
            self.port = self.server.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"could not bind {addr}")
        self._stopped = threading.Event()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.health.set(name, status)

    def start(self) -> "TeacherServer":
        self.engine.start()
        self.server.start()
        return self

    def warm_up_and_serve(self) -> None:
        """One forward through the real path, then SERVING."""
        vocab = self.servicer.limits.vocab_size
        ids = (np.arange(16) % max(2, vocab - 1)).astype(np.int64)
        item = ScoreItem("warmup", ids, 1, 16, top_k=min(8, self.servicer.limits.max_top_k),
                         stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL}))
        self.engine.score([item], use_cache=False)  # a real forward, even with a warm cache
        self.set_serving(True)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        grace = self.cfg.grace_s if grace is None else grace
        done = self.server.stop(grace)
        done.wait(grace + 5)
        self.engine.stop(timeout=5)

    def wait(self) -> None:
        self.server.wait_for_termination()
