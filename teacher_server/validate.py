"""Turning a wire `ScoreRequest` into a validated `ScoreItem`, or a clear error.

Every error names the field, the index of the request in its stream and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teacher_server import codec
from teacher_server import head as H
from teacher_server.engine import ScoreItem
from teacher_server.wire import pb

STAT_NAMES = {pb.SAMPLED_LOGPROB: H.SAMPLED, pb.TOPK: H.TOPK, pb.TAIL_LOGMASS: H.TAIL, pb.LOGSUMEXP: H.LSE,
              pb.ENTROPY: H.ENTROPY, pb.EXTRA_LOGPROBS: H.EXTRA, pb.FULL_LOGPROBS: H.FULL}
DEFAULT_STATS = (pb.SAMPLED_LOGPROB, pb.TOPK, pb.TAIL_LOGMASS)


class InvalidRequest(ValueError):
    pass


MAX_REQUEST_ID_BYTES = 256
ECHO_CHARS = 64   # at most this much of a caller's request_id is echoed in an error message


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """repr() of caller-supplied text for an error message, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_sequence_length: int
    max_top_k: int = 256
    max_extra_ids: int = 256
    max_full_values: int = 1 << 24   # rows x vocab of FULL_LOGPROBS per request
    allow_full: bool = True


def _allowed_enum(enum) -> str:
    return ", ".join(f"{n}({v})" for n, v in enum.items())


def to_item(req: pb.ScoreRequest, index: int, limits: Limits) -> tuple[ScoreItem, pb.ScoreOptions]:
    where = f"requests[{index}] (request_id={echo(req.request_id)})"

    def bad(field: str, msg: str):
        raise InvalidRequest(f"{where}.{field}: {msg}")

    rid_bytes = len(req.request_id.encode("utf-8"))
    if rid_bytes > MAX_REQUEST_ID_BYTES:
        bad("request_id", f"{rid_bytes} bytes; at most {MAX_REQUEST_ID_BYTES} allowed")
    if not req.HasField("token_ids"):
        bad("token_ids", "missing; send an int32 Tensor of the sequence's token ids")
    shape = list(req.token_ids.shape)
    if len(shape) == 1 and shape[0] > limits.max_sequence_length:  # refused before anything is decoded
        bad("token_ids", f"length {shape[0]} exceeds the server's max_sequence_length {limits.max_sequence_length}")
    try:
        ids = codec.decode_ids(req.token_ids, max_elements=limits.max_sequence_length)
    except (ValueError, Exception) as exc:  # zstd errors are not ValueErrors
        bad("token_ids", f"cannot decode: {exc}")
    if ids.ndim != 1:
        bad("token_ids", f"must be 1-D, got shape {list(ids.shape)}")
    n = len(ids)
    if n == 0:
        bad("token_ids", "empty sequence; send at least 2 tokens (a prefix and one target)")
    if n > limits.max_sequence_length:
        bad("token_ids", f"length {n} exceeds the server's max_sequence_length {limits.max_sequence_length}")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        pos = int(np.argmax((ids < 0) | (ids >= limits.vocab_size)))
        bad("token_ids", f"id {int(ids[pos])} at position {pos} is outside the vocabulary [0, {limits.vocab_size})")
    start, end = req.target_start, req.target_end or n
    if not (1 <= start < end <= n):
        bad("target_start/target_end", f"span [{start}, {end}) is not within [1, {n}] with start < end "
            f"(targets are token positions; position 0 has no prefix)")
    o = req.options
    if not 0 <= o.top_k <= limits.max_top_k:
        bad("options.top_k", f"{o.top_k} is outside [0, {limits.max_top_k}] (the server's max_top_k)")
    if o.temperature < 0 or not np.isfinite(o.temperature):
        bad("options.temperature", f"{o.temperature} must be > 0 (0 means the default 1.0)")
    if o.value_encoding not in pb.ValueEncoding.values():
        bad("options.value_encoding", f"{o.value_encoding} is not one of {_allowed_enum(pb.ValueEncoding)}")
    if o.compression not in pb.Compression.values():
        bad("options.compression", f"{o.compression} is not one of {_allowed_enum(pb.Compression)}")
    if not 0 <= o.zstd_level <= 22:
        bad("options.zstd_level", f"{o.zstd_level} is outside [0, 22]")
    stats = set()
    for s in (o.statistics or DEFAULT_STATS):
        if s not in STAT_NAMES:
            bad("options.statistics", f"{s} is not one of {_allowed_enum(pb.Statistic)} (0 excluded)")
        stats.add(STAT_NAMES[s])
    if (H.TOPK in stats) and o.top_k == 0 and o.statistics:
        bad("options.top_k", "TOPK was requested with top_k = 0; ask for top_k >= 1")
    P = end - start
    extra = None
    if H.EXTRA in stats:
        if not req.HasField("extra_ids"):
            bad("extra_ids", "EXTRA_LOGPROBS requested but extra_ids is missing: send int32 [positions, m]")
        shape = list(req.extra_ids.shape)
        if len(shape) == 2 and shape[1] > limits.max_extra_ids:
            bad("extra_ids", f"{shape[1]} ids per position exceed the server's max_extra_ids {limits.max_extra_ids}")
        try:
            extra = codec.decode_ids(req.extra_ids, max_elements=P * limits.max_extra_ids)
        except Exception as exc:
            bad("extra_ids", f"cannot decode: {exc}")
        if extra.ndim != 2 or extra.shape[0] != P:
            bad("extra_ids", f"shape {list(extra.shape)} must be [{P}, m] (one row per scored position)")
        if extra.shape[1] == 0:
            bad("extra_ids", f"shape {list(extra.shape)} has no ids per position; send [{P}, m] with "
                f"1 <= m <= {limits.max_extra_ids}, or leave EXTRA_LOGPROBS out")
        if extra.shape[1] > limits.max_extra_ids:
            bad("extra_ids", f"{extra.shape[1]} ids per position exceed the server's max_extra_ids {limits.max_extra_ids}")
        if extra.size and (extra.min() < 0 or extra.max() >= limits.vocab_size):
            bad("extra_ids", f"ids must be within [0, {limits.vocab_size})")
    elif req.HasField("extra_ids"):
        bad("extra_ids", "sent without EXTRA_LOGPROBS in options.statistics")
    if H.FULL in stats:
        if not limits.allow_full:
            bad("options.statistics", "FULL_LOGPROBS is disabled on this server (start it with --allow-full)")
        if P * limits.vocab_size > limits.max_full_values:
            bad("options.statistics", f"FULL_LOGPROBS for {P} positions x {limits.vocab_size} ids exceeds "
                f"{limits.max_full_values} values per request; score fewer positions")
    top_k = o.top_k if (H.TOPK in stats or H.TAIL in stats) else 0
    item = ScoreItem(request_id=req.request_id, token_ids=ids.astype(np.int64), target_start=start,
                     target_end=end, top_k=top_k, stats=frozenset(stats),
                     temperature=float(o.temperature or 1.0), extra_ids=extra)
    return item, o
