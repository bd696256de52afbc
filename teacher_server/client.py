"""Python client for the teacher server, usable from any training framework.

    from teacher_server.client import TeacherClient
    client = TeacherClient("127.0.0.1:50051", tokenizer=tok)         # checks the tokenizer
    stats = client.score([ids], target_starts=[len(prompt)], top_k=64)
    stats[0].topk_ids, stats[0].topk_logprobs, stats[0].tail_logmass   # numpy, [P, k] / [P]

A server may serve several models (`opd teacher --model a=DIR --model b=DIR`):
`TeacherClient(url, model="b")` scores with "b" (default: the server's default model) and checks
the tokenizer against "b"'s. `client.update_weights(model.named_parameters(), version=3)` replaces
the served model's weights (every endpoint's, one after the other); results report the weight
version they were scored with (`TeacherStats.weight_version`).

Several endpoints ("h1:50051,h2:50051") are used round-robin per call; a call that fails with
UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED (or a replica that is NOT_SERVING) is retried,
with exponential backoff, on the next endpoint, resending only the sequences not yet answered.
Invalid requests are never retried: they raise `TeacherRequestError` with the server's message.
A `dns:///NAME:PORT` target (e.g. a Kubernetes headless Service) is resolved by gRPC itself and its
calls are spread over all the addresses of NAME with gRPC's round_robin load balancing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server import codec
from teacher_server.service import CHANNEL_OPTIONS, SERVICE
from teacher_server.wire import pb

log = logging.getLogger("opd.teacher.client")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
STATISTICS = {"sampled": pb.SAMPLED_LOGPROB, "topk": pb.TOPK, "tail": pb.TAIL_LOGMASS, "logsumexp": pb.LOGSUMEXP,
              "entropy": pb.ENTROPY, "extra": pb.EXTRA_LOGPROBS, "full": pb.FULL_LOGPROBS}


class TeacherRequestError(ValueError):
    """The server rejected a request as invalid (not retried)."""


class TokenizerMismatchError(RuntimeError):
    pass


class TeacherUnavailableError(RuntimeError):
    pass


@dataclass
class TeacherStats:
    """Teacher statistics for one sequence; rows = scored positions (see the proto's semantics)."""
    request_id: str
    num_positions: int
    sampled_logprobs: np.ndarray | None = None   # [P] float32
    topk_ids: np.ndarray | None = None           # [P, k] int64, ascending per row
    topk_logprobs: np.ndarray | None = None      # [P, k] float32
    tail_logmass: np.ndarray | None = None       # [P] float32
    logsumexp: np.ndarray | None = None          # [P]
    entropy: np.ndarray | None = None            # [P]
    extra_logprobs: np.ndarray | None = None     # [P, m]
    full_logprobs: np.ndarray | None = None      # [P, V]
    wire_bytes: int = 0
    server_seconds: float = 0.0
    endpoint: str = ""
    weight_version: int = 0                      # the served model's weight version (0 = as loaded)

    @classmethod
    def from_message(cls, m: pb.ScoreResult, endpoint: str = "") -> "TeacherStats":
        s = cls(request_id=m.request_id, num_positions=m.num_positions, wire_bytes=m.ByteSize(),
                server_seconds=m.server_seconds, endpoint=endpoint, weight_version=m.weight_version)
        if m.HasField("sampled_logprobs"):
            s.sampled_logprobs = codec.decode_values(m.sampled_logprobs)
        if m.HasField("topk_ids"):
            s.topk_ids = codec.decode_ids(m.topk_ids)
            s.topk_logprobs = codec.decode_values(m.topk_logprobs)
        for f in ("tail_logmass", "logsumexp", "entropy", "extra_logprobs", "full_logprobs"):
            if m.HasField(f):
                setattr(s, f, codec.decode_values(getattr(m, f)))
        return s

    def to_torch(self, device="cpu") -> dict:
        import torch

        out = {}
        for f in ("sampled_logprobs", "topk_ids", "topk_logprobs", "tail_logmass", "logsumexp", "entropy",
                  "extra_logprobs", "full_logprobs"):
            v = getattr(self, f)
            if v is not None:
                out[f] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        return out


@dataclass
class ScoreSettings:
    top_k: int = 64
    statistics: tuple[str, ...] = ("sampled", "topk", "tail")
    temperature: float = 1.0
    value_encoding: str = "bf16"
    compression: str = "zstd"
    zstd_level: int = 3

    def to_options(self) -> pb.ScoreOptions:
        for s in self.statistics:
            if s not in STATISTICS:
                raise ValueError(f"statistics: {s!r} is not one of {sorted(STATISTICS)}")
        if self.value_encoding not in codec.ENCODINGS:
            raise ValueError(f"value_encoding: {self.value_encoding!r} is not one of {sorted(codec.ENCODINGS)}")
        if self.compression not in codec.COMPRESSIONS:
            raise ValueError(f"compression: {self.compression!r} is not one of {sorted(codec.COMPRESSIONS)}")
        return pb.ScoreOptions(top_k=self.top_k, statistics=[STATISTICS[s] for s in self.statistics],
                               temperature=self.temperature, value_encoding=codec.ENCODINGS[self.value_encoding],
                               compression=codec.COMPRESSIONS[self.compression], zstd_level=self.zstd_level)


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    eps = [e.strip().removeprefix("grpc://") for e in endpoints if e.strip()]
    if not eps:
        raise ValueError("teacher url: give at least one HOST:PORT")
    for e in eps:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"teacher url: {e!r} is not HOST:PORT")
    return eps


class _Endpoint:
    def __init__(self, target: str, credentials, token: str | None):
        self.target = target
        opts = CHANNEL_OPTIONS + [("grpc.enable_retries", 0)]
        if target.startswith("dns:"):  # gRPC resolves the name; calls spread over all its addresses
            opts.append(("grpc.lb_policy_name", "round_robin"))
        self.channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                        else grpc.insecure_channel(target, options=opts))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.get_info = self.channel.unary_unary(f"/{SERVICE}/GetInfo", request_serializer=pb.GetInfoRequest.SerializeToString,
                                                 response_deserializer=pb.TeacherInfo.FromString)
        self.score = self.channel.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                                response_deserializer=pb.ScoreResult.FromString)
        self.update_weights = self.channel.stream_unary(   # requests come serialized (`_weight_messages`)
            f"/{SERVICE}/UpdateWeights", request_serializer=None,
            response_deserializer=pb.UpdateWeightsResponse.FromString)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.down_until = 0.0


@dataclass
class Sequence_:
    token_ids: np.ndarray
    target_start: int
    target_end: int = 0
    extra_ids: np.ndarray | None = None


class TeacherClient:
    def __init__(self, endpoints: str | Sequence[str], *, tokenizer=None, allow_tokenizer_mismatch: bool = False,
                 settings: ScoreSettings | None = None, timeout_s: float = 600.0, max_retries: int = 8,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, token: str | None = None,
                 root_certificates: bytes | None = None, client_cert: tuple[bytes, bytes] | None = None,
                 check_health: bool = True, model: str | None = None):
        """`model`: the served model to score with and whose tokenizer is checked (None: the
        server's default model, the only one a one-model server has)."""
        creds = None
        if root_certificates is not None or client_cert is not None:
            key, chain = client_cert if client_cert else (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates, key, chain)
        self.endpoints = [_Endpoint(e, creds, token) for e in parse_endpoints(endpoints)]
        self._rr = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self.settings = settings or ScoreSettings()
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.check_health = check_health
        self._ids = itertools.count()
        self._info: pb.TeacherInfo | None = None
        self.model = model or ""
        self._model_checked = not self.model
        self.retries = 0
        if tokenizer is not None:
            self.check_tokenizer(tokenizer, allow_tokenizer_mismatch)

    # ---- handshake ---------------------------------------------------------------------------
    def info(self) -> pb.TeacherInfo:
        if self._info is None:
            req = pb.GetInfoRequest(model=self.model)
            self._info = self._with_retries(lambda ep: ep.get_info(req, timeout=30, metadata=ep.metadata))
        return self._info

    def check_model(self) -> None:
        """With a `model` named: the server must list it (a server from before several models
        ignores the name and would answer with its one model)."""
        if self._model_checked:
            return
        info = self.info()
        names = [m.model_name for m in info.models]
        if self.model not in names:
            raise TeacherRequestError(f"model {self.model!r}: the teacher serves " + (
                f"{names}" if names else f"one model ({info.model_name!r}) and does not take model names (an "
                f"opd teacher from before several models); leave model unset"))
        self._model_checked = True

    def check_tokenizer(self, tokenizer, allow_mismatch: bool = False) -> None:
        from teacher_server.fingerprint import tokenizer_fingerprint

        self.check_model()
        info = self.info()
        mine = tokenizer_fingerprint(tokenizer)
        if not info.tokenizer_fingerprint:
            log.warning("teacher %s reports no tokenizer fingerprint; cannot check the tokenizer", info.model_name)
            return
        if mine != info.tokenizer_fingerprint:
            msg = (f"tokenizer mismatch: the teacher {info.model_name!r} uses tokenizer {info.tokenizer_fingerprint[:12]} "
                   f"({info.tokenizer_size} tokens) but yours is {mine[:12]} ({len(tokenizer)} tokens). Token ids would "
                   f"mean different strings on the two sides. Use the teacher's tokenizer, or pass "
                   f"allow_tokenizer_mismatch=True if you know the vocabularies agree.")
            if not allow_mismatch:
                raise TokenizerMismatchError(msg)
            log.warning(msg)

    # ---- endpoint selection and retries --------------------------------------------------------
    def _next_endpoint(self) -> _Endpoint:
        with self._lock:
            now = time.monotonic()
            for _ in range(len(self.endpoints)):
                ep = self.endpoints[next(self._rr)]
                if ep.down_until <= now:
                    return ep
            return min(self.endpoints, key=lambda e: e.down_until)

    def _healthy(self, ep: _Endpoint) -> bool:
        if not self.check_health or len(self.endpoints) == 1:
            return True
        try:
            r = ep.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _back_off(self, exc, ep: _Endpoint, delay: float, what: str) -> None:
        """Raise what must not be retried; otherwise mark `ep` down for `delay` and sleep it."""
        code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise TeacherRequestError(exc.details()) from None
        if code not in RETRYABLE:
            raise exc
        ep.down_until = time.monotonic() + delay
        self.retries += 1
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        log.warning("teacher %s: %s (%s); %s in %.1fs", ep.target, code.name, detail, what, delay)
        time.sleep(delay)

    def _with_retries(self, fn):
        delay, last = self.backoff_s, None
        for attempt in range(self.max_retries + 1):
            ep = self._next_endpoint()
            try:
                if not self._healthy(ep):
                    raise _NotServing(ep.target)
                return fn(ep)
            except (grpc.RpcError, _NotServing) as exc:
                last = exc
                self._back_off(exc, ep, delay, f"retry {attempt + 1}/{self.max_retries}")
                delay = min(delay * 2, self.max_backoff_s)
        raise TeacherUnavailableError(f"teacher unavailable after {self.max_retries} retries over "
                                      f"{[e.target for e in self.endpoints]}: {last}")

    # ---- scoring -------------------------------------------------------------------------------
    def _requests(self, seqs: dict[str, Sequence_], opts: pb.ScoreOptions) -> Iterator[pb.ScoreRequest]:
        for rid, s in seqs.items():
            r = pb.ScoreRequest(request_id=rid, token_ids=codec.encode_plain_ids(s.token_ids),
                                target_start=int(s.target_start), target_end=int(s.target_end or 0), options=opts,
                                model=self.model)
            if s.extra_ids is not None:
                r.extra_ids.CopyFrom(codec.encode_plain_ids(np.asarray(s.extra_ids).reshape(len(s.extra_ids), -1)))
            yield r

    def score_iter(self, token_ids: Iterable[Sequence[int]], target_starts: Sequence[int],
                   target_ends: Sequence[int] | None = None, extra_ids: Sequence | None = None,
                   settings: ScoreSettings | None = None) -> Iterator[tuple[int, TeacherStats]]:
        """Yield (index, stats) as results arrive (any order). Failed streams are retried on the
        next endpoint for the sequences not yet answered; each index is yielded exactly once."""
        opts = (settings or self.settings).to_options()
        self.check_model()
        token_ids = list(token_ids)
        call = next(self._ids)
        pending: dict[str, Sequence_] = {}
        index: dict[str, int] = {}
        for i, ids in enumerate(token_ids):
            rid = f"{call}-{i}"
            index[rid] = i
            pending[rid] = Sequence_(np.asarray(ids, dtype=np.int32), int(target_starts[i]),
                                     int(target_ends[i]) if target_ends is not None else 0,
                                     None if extra_ids is None else np.asarray(extra_ids[i]))
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            if not pending:
                return
            ep = self._next_endpoint()
            before = len(pending)
            try:
                if not self._healthy(ep):
                    raise _NotServing(ep.target)
                stream = ep.score(self._requests(dict(pending), opts), timeout=self.timeout_s, metadata=ep.metadata)
                for msg in stream:
                    if msg.request_id in pending:
                        del pending[msg.request_id]
                        yield index[msg.request_id], TeacherStats.from_message(msg, ep.target)
                if pending:
                    raise _NotServing(f"{ep.target} closed the stream with {len(pending)} sequences unanswered")
                return
            except (grpc.RpcError, _NotServing) as exc:
                if isinstance(exc, grpc.RpcError) and len(pending) < before:
                    delay = self.backoff_s  # the attempt made progress: back off from the start again
                self._back_off(exc, ep, delay, f"{len(pending)} sequences left; retry {attempt + 1}/{self.max_retries}")
                delay = min(delay * 2, self.max_backoff_s)
        raise TeacherUnavailableError(f"teacher unavailable after {self.max_retries} retries; "
                                      f"{len(pending)} sequences unanswered")

    def score(self, token_ids, target_starts, target_ends=None, extra_ids=None, settings=None) -> list[TeacherStats]:
        """Score sequences; returns stats in input order."""
        out: list[TeacherStats | None] = [None] * len(token_ids)
        for i, s in self.score_iter(token_ids, target_starts, target_ends, extra_ids, settings):
            out[i] = s
        return out  # type: ignore[return-value]

    # ---- weights -------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]], version: int,
                       model: str | None = None, *, partial: bool = False, bucket_mb: float = 64.0,
                       compression: str = "none", timeout_s: float | None = None) -> list[pb.UpdateWeightsResponse]:
        """Replace a served model's weights with `named_tensors` ((name, tensor) pairs, names as
        the model's `named_parameters()`; any device and float dtype, sent exactly in their own
        dtype) and call them `version` (an integer above the model's current one). `model`: the
        served model (None: this client's `model`). Every parameter must be sent unless `partial`.
        Streamed in messages of at most `bucket_mb` MiB of tensor data (a larger tensor goes in
        pieces; a message ends early after a tensor of 1 MiB or more, so no tensor is read after
        the next is taken from `named_tensors`), one endpoint after the other; the server swaps
        them in between two batches once the whole stream arrived and checked out, so a failed
        update leaves the old weights serving.
        Returns each endpoint's answer. Raises TeacherRequestError for a refused update (bad name,
        shape, dtype, version; a server that cannot update that model), grpc.RpcError otherwise.
        Not retried."""
        if compression not in codec.COMPRESSIONS:
            raise ValueError(f"compression: {compression!r} is not one of {sorted(codec.COMPRESSIONS)}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb: {bucket_mb!r}; expected > 0")
        if version < 1:
            raise ValueError(f"version: {version!r}; expected an integer >= 1 (0 is the weights loaded at start)")
        dns = [ep.target for ep in self.endpoints if ep.target.startswith("dns:")]
        if dns:
            raise ValueError(f"update_weights: {dns[0]} spreads calls over several servers; give each server's "
                             f"HOST:PORT so every replica gets the update")
        target = self.model if model is None else model
        tensors = named_tensors if len(self.endpoints) == 1 else list(named_tensors)
        out = []
        for ep in self.endpoints:
            msgs = _weight_messages(tensors, int(version), target, partial, int(bucket_mb * (1 << 20)),
                                    codec.COMPRESSIONS[compression])
            try:
                out.append(ep.update_weights(msgs, timeout=timeout_s or self.timeout_s, metadata=ep.metadata))
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                    raise TeacherRequestError(f"{ep.target}: {exc.details()}") from None
                raise
        self._info = None   # the weight version changed
        return out

    def close(self) -> None:
        for ep in self.endpoints:
            ep.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NotServing(Exception):
    pass


def _varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _len_key(field: int, size: int) -> bytes:
    """The key (`field`, wire type 2: length-delimited) and the length `size` that open a bytes or
    message field in the protobuf wire format."""
    return _varint(field << 3 | 2) + _varint(size)


_REQ_TENSORS = pb.UpdateWeightsRequest.DESCRIPTOR.fields_by_name["tensors"].number
_PIECE_DATA = pb.TensorPiece.DESCRIPTOR.fields_by_name["data"].number
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


_KEEP_SMALL = 1 << 20   # a tensor's last piece below this is copied to keep filling the message


def _weight_messages(named_tensors, version: int, model: str, partial: bool, bucket_bytes: int,
                     compression: int) -> Iterator[bytes]:
    """Serialized UpdateWeightsRequests of at most `bucket_bytes` of tensor data each (a tensor
    that does not fit in what is left of a message goes in pieces: consecutive element ranges of
    the flattened tensor). protobuf serializes every field but the tensors' data; each piece's
    data is framed after its message's other fields (fields may come in any order on the wire), so
    it is copied once, from the tensor's memory into the message, instead of once for every level
    of message nesting and again to serialize. No tensor's memory is read after the next one is
    taken from `named_tensors` (the caller may free or reuse it then, as ZeRO-3 buckets do): at a
    tensor's end a message with 1 MiB or more of its data still to copy ends early; less is
    copied out, and the message goes on filling."""
    head = pb.UpdateWeightsRequest(model=model, version=version, partial=partial).SerializeToString()
    parts, size, sent = [head], 0, False
    for name, t in named_tensors:
        flat = t.detach().reshape(-1)
        numel, item, off = flat.numel(), max(1, flat.element_size()), 0
        borrowed = []   # indices in `parts` of this tensor's memory, not copied yet
        while True:
            per = max(1, (bucket_bytes - size) // item)
            tensor, data = codec.weight_parts(flat[off:off + per], compression)
            nbytes = memoryview(data).nbytes
            tensor = tensor.SerializeToString() + _len_key(_TENSOR_DATA, nbytes)
            piece = pb.TensorPiece(name=name, shape=list(t.shape), offset=off).SerializeToString()
            piece += _len_key(_PIECE_DATA, len(tensor) + nbytes)
            parts += [_len_key(_REQ_TENSORS, len(piece) + len(tensor) + nbytes), piece, tensor, data]
            borrowed.append(len(parts) - 1)
            size += min(per, numel - off) * item
            off += per
            if size >= bucket_bytes:
                yield b"".join(parts)
                parts, size, sent, borrowed = [head], 0, True, []
            if off >= numel:
                break
        if borrowed and sum(memoryview(parts[i]).nbytes for i in borrowed) >= _KEEP_SMALL:
            yield b"".join(parts)
            parts, size, sent = [head], 0, True
        else:
            for i in borrowed:
                parts[i] = bytes(parts[i])
    if len(parts) > 1 or not sent:
        yield b"".join(parts)


class AsyncTeacherClient:
    """asyncio front of `TeacherClient`: the blocking stream runs in a worker thread, so an event
    loop can keep generating rollouts while the teacher scores."""

    def __init__(self, *args, **kwargs):
        self.sync = TeacherClient(*args, **kwargs)

    async def info(self) -> pb.TeacherInfo:
        return await asyncio.to_thread(self.sync.info)

    async def score(self, token_ids, target_starts, target_ends=None, extra_ids=None, settings=None) -> list[TeacherStats]:
        return await asyncio.to_thread(self.sync.score, token_ids, target_starts, target_ends, extra_ids, settings)

    async def update_weights(self, named_tensors, version: int, model: str | None = None, **kw):
        return await asyncio.to_thread(self.sync.update_weights, named_tensors, version, model, **kw)

    async def close(self) -> None:
        self.sync.close()
