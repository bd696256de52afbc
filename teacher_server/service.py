"""The gRPC edge: `opd.teacher.v1.Teacher` servicer, health, reflection, auth, lifecycle.

The servicer converts messages to `ScoreItem`s and results back to messages; all compute lives
in `ScoringEngine`. One server may serve several models (`ServedModel`, `opd teacher --model
NAME=DIR ...`) from one engine queue; a request names its model (none = the default).
`UpdateWeights` replaces a model's weights between batches (`_WeightUpdate`). Handlers are registered by hand (generic handlers), so no generated
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
from typing import Callable

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from teacher_server import codec
from teacher_server import head as H
from teacher_server.engine import QueueFull, ScoreItem, ScoringEngine
from teacher_server.validate import InvalidRequest, Limits, echo, to_item
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
                         batch_sequences=int(res.get("_batch_sequences", 1)),
                         weight_version=int(res.get("_weight_version", 0)))
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


MAX_DETAILS_CHARS = 1024   # error details travel in trailers (gRPC metadata, 8 KiB by default): keep them short
CANCELLED = object()       # the call ended (client cancel, deadline, server stop): the handler returns
HEALTH_RESERVE_THREADS = 16  # handler threads Score streams never take: health, GetInfo, reflection


def _details(msg: str) -> str:
    return msg if len(msg) <= MAX_DETAILS_CHARS else msg[: MAX_DETAILS_CHARS - 25] + f"... ({len(msg)} chars)"


def result_nbytes(item: ScoreItem, vocab_size: int) -> int:
    """Bytes of the result arrays an item will produce (before encoding): what a stream's unread
    results are counted in (`--max-unread-mb-per-stream`)."""
    per_pos = 4 * len(item.stats & {H.SAMPLED, H.TAIL, H.LSE, H.ENTROPY})
    if H.TOPK in item.stats:
        per_pos += 12 * item.top_k                     # int64 ids + float32 log-probs
    if H.EXTRA in item.stats and item.extra_ids is not None:
        per_pos += 4 * item.extra_ids.shape[1]
    if H.FULL in item.stats:
        per_pos += 4 * vocab_size
    return item.num_positions * per_pos + 256


class _Call:
    """State of one Score stream: results waiting to be sent, whether it ended, and the bytes of
    the results it has in flight (queued, computed or waiting to be sent)."""

    def __init__(self, max_unread_bytes: int):
        self.results: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.outstanding = 0
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.all_read = False
        self.unread_bytes = 0
        self.max_unread_bytes = max_unread_bytes

    def cancel(self):
        """The call is over: wake the handler and the reader, whatever they wait for."""
        self.cancelled.set()
        self.results.put(CANCELLED)
        with self.room:
            self.room.notify_all()

    def reserve(self, nbytes: int) -> bool:
        """Wait until the stream's unread results leave room for `nbytes` more (one result is
        always allowed, however large); False if the call ended meanwhile."""
        with self.room:
            while self.unread_bytes and self.unread_bytes + nbytes > self.max_unread_bytes:
                if self.cancelled.is_set():
                    return False
                self.room.wait(0.5)
            if self.cancelled.is_set():
                return False
            self.unread_bytes += nbytes
            self.outstanding += 1
            return True

    def unreserve(self, nbytes: int) -> None:
        with self.room:
            self.unread_bytes -= nbytes
            self.room.notify_all()

    def deliver(self, item, res):
        self.results.put((item, res))

    def finish_one(self, nbytes: int):
        with self.room:
            self.outstanding -= 1
            self.unread_bytes -= nbytes
            self.room.notify_all()
            done = self.all_read and self.outstanding == 0
        if done:
            self.results.put(None)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 64                  # concurrent Score streams (health and GetInfo have threads of their own)
    queue_wait_s: float = 30.0
    max_inflight_per_call: int = 256
    max_unread_mb_per_stream: float = 64.0  # result bytes a stream may have in flight and unread
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    grace_s: float = 30.0


@dataclass
class ServedModel:
    """One model name this server answers to: its request limits and its TeacherInfo (whose
    model_name is `name`). `load` builds a fresh engine of the same checkpoint: an update of a
    name that shares its engine with another name (the same checkpoint, loaded once) runs on
    such a copy, so the other name keeps its weights."""
    name: str
    limits: Limits
    info: pb.TeacherInfo
    load: Callable[[], ScoringEngine] | None = None


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
    """Handlers take raw bytes and parse them themselves, so a message that does not parse gets
    INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL). Score streams are admitted
    up to `max_workers` at once; the handler pool has `HEALTH_RESERVE_THREADS` more threads, so
    health checks and GetInfo are answered even when every Score slot is taken. While the server
    drains (`draining`), new calls get UNAVAILABLE and the open streams finish."""

    def __init__(self, engine: ScoringEngine, limits: Limits, info: pb.TeacherInfo, cfg: ServerConfig, metrics=None,
                 models: list[ServedModel] | None = None):
        # limits / info: the default model's (the first of `models`)
        self.engine, self.limits, self.info, self.cfg = engine, limits, info, cfg
        self.metrics = metrics
        models = models or [ServedModel(info.model_name, limits, info)]
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        if hasattr(engine, "add_model"):
            for m in models:
                if m.name not in engine.models:
                    engine.add_model(m.name)
        elif len(models) > 1:
            raise ValueError(f"{type(engine).__name__} serves one model; {len(models)} were given")
        self._update_lock = threading.Lock()   # one UpdateWeights at a time
        if metrics is not None:
            for m in models:
                metrics.weight_version.labels(model=m.name).set(0)
        self.draining = False
        self._slots = threading.Semaphore(cfg.max_workers)
        self._lock = threading.Lock()
        self.open_streams = 0       # Score streams admitted and not finished
        self._waiting = 0           # Score calls waiting for a slot (each holds a pool thread)
        self._calls: set[_Call] = set()

    def _abort(self, context, code: grpc.StatusCode, msg: str):
        if self.metrics:
            self.metrics.error(code.name)
        context.abort(code, _details(msg))

    def GetInfo(self, request: bytes, context):
        if self.draining:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, "teacher is draining (shutting down); use another replica")
        try:
            req = pb.GetInfoRequest.FromString(request)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse GetInfoRequest: {exc}")
        try:
            return self.info_for(req.model)
        except InvalidRequest as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"GetInfoRequest.{exc}")

    def model(self, name: str) -> ServedModel:
        """The served model `name` ("" = the default), or InvalidRequest naming the models served."""
        m = self.models.get(name or self.default_model)
        if m is None:
            raise InvalidRequest(f"model: {echo(name)} is not served here; this server serves "
                                 f"{sorted(self.models)} (default {self.default_model!r})")
        return m

    def engine_for(self, name: str):
        """The engine running served model `name` (an engine without several models: itself)."""
        return self.engine.engine_for(name) if hasattr(self.engine, "engine_for") else self.engine

    def info_for(self, name: str = "") -> pb.TeacherInfo:
        """TeacherInfo of model `name` (default: the default model), listing every model served."""
        m = self.model(name)
        entries = []
        for other in self.models.values():
            e = pb.TeacherInfo()
            e.CopyFrom(other.info)
            e.weight_version = getattr(self.engine_for(other.name), "weight_version", 0)
            entries.append(e)
        out = pb.TeacherInfo()
        out.CopyFrom(m.info)
        out.weight_version = getattr(self.engine_for(m.name), "weight_version", 0)
        out.models.extend(entries)
        out.default_model = self.default_model
        return out

    def cancel_all(self) -> None:
        """End every open stream's waits (server stop after the grace period)."""
        with self._lock:
            calls = list(self._calls)
        for c in calls:
            c.cancel()

    def _admit(self, context) -> bool:
        """Take a Score slot: at once if one is free; else wait (up to queue_wait_s) while few
        others wait, since each waiting call holds a handler thread."""
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            if self._waiting >= HEALTH_RESERVE_THREADS // 2:
                return False
            self._waiting += 1
        try:
            deadline = time.monotonic() + self.cfg.queue_wait_s
            while time.monotonic() < deadline and context.is_active() and not self.draining:
                if self._slots.acquire(timeout=0.2):
                    return True
            return False
        finally:
            with self._lock:
                self._waiting -= 1

    def Score(self, request_iterator, context):
        if self.draining:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, "teacher is draining (shutting down); use another replica")
        if not self._admit(context):
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"teacher serves {self.cfg.max_workers} Score streams at once (--max-workers); retry later")
        call = _Call(int(self.cfg.max_unread_mb_per_stream * (1 << 20)))
        with self._lock:
            self._calls.add(call)
            self.open_streams += 1
        if self.metrics:
            self.metrics.streams.inc()
        try:
            if not context.add_callback(call.cancel):  # the call already ended
                call.cancel()
            yield from self._score(call, request_iterator, context)
        finally:
            call.cancel()   # the reader stops, queued work of this call is dropped by the engine
            with self._lock:
                self._calls.discard(call)
                self.open_streams -= 1
            self._slots.release()
            if self.metrics:
                self.metrics.streams.dec()

    def _score(self, call: _Call, request_iterator, context):
        inflight = threading.Semaphore(self.cfg.max_inflight_per_call)
        opts_by_id: dict[int, tuple[pb.ScoreOptions, int]] = {}

        def read():
            i = -1
            try:
                for i, raw in enumerate(request_iterator):
                    if call.cancelled.is_set():
                        return
                    try:
                        req = pb.ScoreRequest.FromString(raw)
                    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
                        raise InvalidRequest(f"requests[{i}]: cannot parse ScoreRequest ({len(raw)} bytes): {exc}")
                    try:
                        served = self.model(req.model)
                    except InvalidRequest as exc:
                        raise InvalidRequest(f"requests[{i}] (request_id={echo(req.request_id)}).{exc}") from None
                    item, opts = to_item(req, i, served.limits)
                    item.model = served.name
                    item.deliver, item.is_cancelled = call.deliver, call.cancelled.is_set
                    nbytes = result_nbytes(item, served.limits.vocab_size)
                    opts_by_id[id(item)] = (opts, nbytes)
                    # back-pressure: stop reading the stream while too much of it is in flight
                    while not inflight.acquire(timeout=0.5):
                        if call.cancelled.is_set():
                            return
                    if not call.reserve(nbytes):   # ... or while its unread results hold too many bytes
                        return
                    # A stream with work in flight waits for room (its own results free it);
                    # one with nothing in flight gets RESOURCE_EXHAUSTED after queue_wait_s.
                    waited_since = time.monotonic()
                    while True:
                        try:
                            self.engine.submit(item, wait_s=0.2)
                            break
                        except QueueFull as exc:
                            with call.lock:
                                own_work = call.outstanding > 1
                            if call.cancelled.is_set():
                                return
                            if not own_work and time.monotonic() - waited_since >= self.cfg.queue_wait_s:
                                call.results.put(("abort", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)))
                                return
            except InvalidRequest as exc:
                call.results.put(("abort", grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                return
            except Exception as exc:  # noqa: BLE001 - stream broken by the client
                if not call.cancelled.is_set():
                    call.results.put(("abort", grpc.StatusCode.CANCELLED, f"request stream failed after "
                                      f"{i + 1} requests: {type(exc).__name__}"))
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
            try:
                first = call.results.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            ready = [first]
            while len(ready) < ENCODE_GROUP and ready[-1] is not CANCELLED:
                try:
                    ready.append(call.results.get_nowait())
                except queue.Empty:
                    break
            jobs = {}
            for msg in ready:
                if isinstance(msg, tuple) and msg[0] != "abort" and not isinstance(msg[1], BaseException):
                    item, res = msg
                    opts = opts_by_id[id(item)][0]
                    jobs[id(item)] = (_encode_pool().submit(encode_result, item, res, opts) if len(ready) > 1
                                      else encode_result(item, res, opts))
            for msg in ready:
                if msg is None:
                    return
                if msg is CANCELLED:
                    if context.is_active():   # ended by the server (stop after the grace period)
                        self._abort(context, grpc.StatusCode.UNAVAILABLE, "teacher stopped before this stream finished")
                    return
                if msg[0] == "abort":
                    call.cancel()
                    self._abort(context, msg[1], msg[2])
                item, res = msg
                nbytes = opts_by_id.pop(id(item))[1]
                if isinstance(res, BaseException):  # an engine may say which code (SGLang down: UNAVAILABLE)
                    call.cancel()
                    self._abort(context, getattr(res, "grpc_status", grpc.StatusCode.INTERNAL),
                                f"request_id={echo(item.request_id)}: scoring failed: {type(res).__name__}: {res}")
                out = jobs.pop(id(item))
                if isinstance(out, futures.Future):
                    out = out.result()
                if self.metrics:
                    self.metrics.scored(item, time.monotonic() - item.enqueued_at, out.ByteSize())
                yield out
                inflight.release()
                call.finish_one(nbytes)


    # ---- weights -----------------------------------------------------------------------------
    def UpdateWeights(self, request_iterator, context):
        """Read the whole stream into host memory, validating each piece against the loaded
        model; then swap the weights in between two batches. Any error (a bad piece, a stream
        that breaks or ends short) leaves the model serving its old weights."""
        if self.draining:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, "teacher is draining (shutting down); use another replica")
        with self._update_lock:
            problem = None
            try:
                update = _WeightUpdate(self)
                i = -1
                for i, raw in enumerate(request_iterator):
                    try:
                        req = pb.UpdateWeightsRequest.FromString(raw)
                    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
                        raise InvalidRequest(f"messages[{i}]: cannot parse UpdateWeightsRequest ({len(raw)} bytes): "
                                             f"{exc}") from None
                    update.add(i, req)
                resp = update.apply()
            except InvalidRequest as exc:
                problem = (grpc.StatusCode.INVALID_ARGUMENT, f"UpdateWeights {exc}")
            except _Refused as exc:
                problem = (grpc.StatusCode.FAILED_PRECONDITION, f"UpdateWeights: {exc}")
            except Exception as exc:  # noqa: BLE001 - the stream broke (client gone): nothing was applied
                log.warning("UpdateWeights stream failed after %d messages (%s: %s); the weights are unchanged",
                            i + 1, type(exc).__name__, exc)
                problem = (grpc.StatusCode.CANCELLED, f"UpdateWeights stream failed after {i + 1} messages "
                           f"({type(exc).__name__}); the weights are unchanged")
            finally:
                update = None   # the host copy of the tensors goes now
        if problem is not None:
            self._abort(context, *problem)
        log.info("model %r: weights version %d (%d tensors, %.1f MB, swapped in %.3fs)", resp.model, resp.version,
                 resp.tensors, resp.bytes / 1e6, resp.apply_seconds)
        if self.metrics:
            self.metrics.weight_version.labels(model=resp.model).set(resp.version)
            self.metrics.weight_updates.labels(model=resp.model).inc()
        return resp


class _Refused(Exception):
    """An update the server will not apply to this model (FAILED_PRECONDITION)."""


class _WeightUpdate:
    """One UpdateWeights stream: pieces are checked as they arrive (name, whole shape, dtype,
    order) and copied into host tensors of the parameter's dtype; `apply` checks completeness
    and swaps them in. The host copy bounds what a stream may send: every element of a
    parameter once, nothing else."""

    def __init__(self, servicer: TeacherServicer):
        self.servicer = servicer
        self.served: ServedModel | None = None
        self.version = 0
        self.partial = False
        self.staged: dict[str, torch.Tensor] = {}   # name -> flat host tensor being filled
        self.filled: dict[str, int] = {}
        self.bytes = 0

    def add(self, i: int, req: pb.UpdateWeightsRequest) -> None:
        where = f"messages[{i}]"
        if self.served is None:
            try:
                served = self.servicer.model(req.model)
            except InvalidRequest as exc:
                raise InvalidRequest(f"{where}.{exc}") from None
            self.served, self.version, self.partial = served, int(req.version), bool(req.partial)
            self.engine = self.servicer.engine_for(served.name)
            if not getattr(self.engine, "updatable_weights", False):
                raise _Refused(f"model {served.name!r} runs on {type(self.engine).__name__}, which cannot update weights")
            if self.engine.quantized:
                raise _Refused(f"model {served.name!r} is served fp8-quantised (--quantize fp8); its weights cannot "
                               f"be updated")
            if self.version <= self.engine.weight_version:
                raise InvalidRequest(f"{where}.version: {self.version}; expected an integer greater than the current "
                                     f"weight version {self.engine.weight_version} of model {served.name!r}")
            self.params = self.engine.parameters_by_name()
        else:
            if req.model and req.model != self.served.name:
                raise InvalidRequest(f"{where}.model: {echo(req.model)} differs from the stream's model "
                                     f"{self.served.name!r}")
            if req.version and req.version != self.version:
                raise InvalidRequest(f"{where}.version: {req.version} differs from the stream's version {self.version}")
        for j, piece in enumerate(req.tensors):
            self._piece(f"{where}.tensors[{j}]", piece)

    def _piece(self, where: str, piece: pb.TensorPiece) -> None:
        name = piece.name
        param = self.params.get(name)
        if param is None:
            some = ", ".join(list(self.params)[:3])
            raise InvalidRequest(f"{where}.name: {echo(name)} is not a parameter of model {self.served.name!r} "
                                 f"({len(self.params)} parameters, e.g. {some})")
        if list(piece.shape) != list(param.shape):
            raise InvalidRequest(f"{where}.shape: {list(piece.shape)[:9]} for {name!r}; the loaded parameter has "
                                 f"shape {list(param.shape)}")
        n_all, done = param.numel(), self.filled.get(name, 0)
        if done == n_all:
            raise InvalidRequest(f"{where}: {name!r} was already sent in full")
        if piece.offset != done:
            raise InvalidRequest(f"{where}.offset: {piece.offset} for {name!r}; expected {done} (pieces of a "
                                 f"tensor come in order)")
        flat = self.staged.get(name)
        if flat is None:
            flat = self.staged[name] = torch.empty(n_all, dtype=param.dtype)
        try:   # straight into the host copy, in the parameter's dtype
            n, nbytes = codec.decode_weight_into(piece.data, flat[done:])
        except ValueError as exc:
            raise InvalidRequest(f"{where}.data ({name!r}): {exc}") from None
        if n == 0:
            raise InvalidRequest(f"{where}.data ({name!r}): empty piece")
        # checked as stored, in the parameter's dtype: a finite value that overflows it is refused too
        if not codec.all_finite(flat[done:done + n]):
            raise InvalidRequest(f"{where}.data ({name!r}): holds NaN or infinite values "
                                 f"(as {str(param.dtype).removeprefix('torch.')}, the parameter's dtype)")
        self.filled[name] = done + n
        self.bytes += nbytes

    def apply(self) -> pb.UpdateWeightsResponse:
        if self.served is None:
            raise InvalidRequest("stream: empty; send at least one UpdateWeightsRequest")
        short = [f"{n} ({self.filled[n]} of {self.params[n].numel()} elements)" for n in self.staged
                 if self.filled[n] != self.params[n].numel()]
        if short:
            raise InvalidRequest(f"stream: ended with tensors incomplete: {', '.join(short[:5])}"
                                 + (f" and {len(short) - 5} more" if len(short) > 5 else ""))
        if not self.staged:
            raise InvalidRequest("stream: no tensors; send the model's parameters (TensorPiece)")
        if not self.partial:
            sent = {id(self.params[n]) for n in self.staged}
            missing, seen = [], set()
            for n, p in self.params.items():
                if id(p) not in sent and id(p) not in seen:
                    seen.add(id(p))
                    missing.append(n)
            if missing:
                raise InvalidRequest(f"stream: {len(missing)} parameters of model {self.served.name!r} were not sent "
                                     f"(e.g. {', '.join(missing[:5])}); send every parameter, or set partial=true")
        tensors = {n: t.view(self.params[n].shape) for n, t in self.staged.items()}
        svc, name = self.servicer, self.served.name
        engine = self.engine
        if len(svc.engine.names_of(engine)) > 1:
            # one checkpoint loaded once for several names: give this name a copy of its own
            if self.served.load is None:
                raise _Refused(f"model {name!r} shares its weights with {svc.engine.names_of(engine)} and this "
                               f"server cannot load a copy; start it with one name per checkpoint")
            log.info("model %r shares its weights with %s: loading a copy of its own for the update", name,
                     [n for n in svc.engine.names_of(engine) if n != name])
            copy = self.served.load()
            copy.update_weights(tensors, self.version)
            copy.prepare()
            t0 = time.perf_counter()
            svc.engine.replace_model(name, copy)
            seconds = time.perf_counter() - t0
        else:
            seconds = engine.update_weights(tensors, self.version, owner=svc.engine)
        return pb.UpdateWeightsResponse(model=name, version=self.version, tensors=len(tensors), bytes=self.bytes,
                                        apply_seconds=seconds)

class _TokenAuth(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` metadata (health checks exempt)."""

    def __init__(self, token: str):
        self._token = token.encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))
        self._deny_upload = grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx))

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        md = dict(details.invocation_metadata or ())
        got = md.get("authorization", "")
        if hmac.compare_digest(got.encode(), b"Bearer " + self._token):
            return continuation(details)
        if details.method.endswith("/Score"):
            return self._deny_stream
        return self._deny_upload if details.method.endswith("/UpdateWeights") else self._deny


class TeacherServer:
    """Owns the grpc.Server, the health servicer and the engine's lifecycle."""

    def __init__(self, engine: ScoringEngine, limits: Limits, info: pb.TeacherInfo, cfg: ServerConfig, metrics=None,
                 models: list[ServedModel] | None = None):
        self.engine, self.cfg = engine, cfg
        interceptors = [_TokenAuth(cfg.auth_token)] if cfg.auth_token else []
        # Score streams take at most max_workers threads (TeacherServicer._admit); the rest answer
        # health checks, GetInfo and reflection however busy the server is
        self._pool = futures.ThreadPoolExecutor(max_workers=cfg.max_workers + HEALTH_RESERVE_THREADS,
                                                thread_name_prefix="opd-grpc")
        self.server = grpc.server(self._pool, options=CHANNEL_OPTIONS, interceptors=interceptors)
        self.servicer = TeacherServicer(engine, limits, info, cfg, metrics, models)
        handlers = {
            # raw bytes in (no request_deserializer): the handlers parse, so garbage is INVALID_ARGUMENT
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self.servicer.GetInfo, response_serializer=pb.TeacherInfo.SerializeToString),
            "Score": grpc.stream_stream_rpc_method_handler(
                self.servicer.Score, response_serializer=pb.ScoreResult.SerializeToString),
            "UpdateWeights": grpc.stream_unary_rpc_method_handler(
                self.servicer.UpdateWeights, response_serializer=pb.UpdateWeightsResponse.SerializeToString),
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

    def begin_drain(self) -> None:
        """Health NOT_SERVING and new calls refused from now on (`stop` does it too)."""
        self.set_serving(False)
        self.servicer.draining = True

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop. While draining (up to the grace period) the server keeps answering:
        health says NOT_SERVING, new Score and GetInfo calls get UNAVAILABLE, open streams
        finish. Then the gRPC server stops, ending what is left, and so does the engine."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.begin_drain()
        grace = self.cfg.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        while self.servicer.open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        done = self.server.stop(max(0.0, min(1.0, deadline - time.monotonic())))
        self.servicer.cancel_all()   # wakes any handler still waiting, so its thread ends
        done.wait(10)
        self.engine.stop(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        self.server.wait_for_termination()
