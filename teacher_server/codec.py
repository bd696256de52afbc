"""Packing teacher statistics into `Tensor` messages and back.

Every tensor travels as little-endian bytes + shape + dtype. Two cheap transforms make zstd
effective on these arrays:
  * ids are sorted ascending per row and delta-coded (first id, then differences), so they
    become small non-negative integers;
  * bytes are "shuffled" into planes (all low bytes, then all next bytes, ...), so the mostly
    zero high bytes of small integers and the slowly varying exponent bytes of floats form runs.

Lossy value encodings and their documented bounds (absolute error on a log-prob x <= 0):
  FP32  exact
  BF16  |err| <= 2^-8 |x|        (round to nearest even)
  FP16  |err| <= 2^-11 |x|       (|x| <= 65504)
  Q16   |err| <= 2^-11           (fixed point, step 2^-10; x clamped to [-64, 0])
  Q8    |err| <= (max - min) / 510 per row (affine over the row's finite range, 255 steps)
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from teacher_server.wire import pb

ENCODINGS = {"fp32": pb.FP32, "bf16": pb.BF16, "fp16": pb.FP16, "q16": pb.Q16, "q8": pb.Q8}
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "zstd": pb.ZSTD}
Q16_SCALE = 1024.0
Q16_MIN = -65535.0 / Q16_SCALE

_NP_DTYPES = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.INT32: np.int32, pb.UINT16: np.uint16,
              pb.UINT8: np.uint8, pb.INT64: np.int64, pb.BFLOAT16: np.uint16}
_tls = threading.local()


def error_bound(encoding: int, x: np.ndarray) -> np.ndarray:
    """The documented worst-case absolute error of `encoding` for values x (elementwise)."""
    ax = np.abs(x.astype(np.float64))
    if encoding == pb.FP32:
        return np.zeros_like(ax)
    if encoding == pb.BF16:
        return ax * 2.0**-8
    if encoding == pb.FP16:
        return ax * 2.0**-11 + 2.0**-24
    if encoding == pb.Q16:
        return np.full_like(ax, 2.0**-11)
    raise ValueError("Q8 bounds are per row: (row max - row min) / 510")


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_tls, "c", None)
    if cache is None:
        cache = _tls.c = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstandard.ZstdDecompressor()
    return d


def _pack(arr: np.ndarray, dtype: int, compression: int, level: int, shuffle: bool, **fields) -> pb.Tensor:
    arr = np.ascontiguousarray(arr)
    raw = arr.view(np.uint8)
    itemsize = arr.dtype.itemsize
    if shuffle and itemsize > 1 and arr.size > 1:
        raw = raw.reshape(-1, itemsize).T
    data = np.ascontiguousarray(raw).tobytes()
    if compression == pb.ZSTD:
        data = _compressor(level or 3).compress(data)
    return pb.Tensor(data=data, shape=list(arr.shape), dtype=dtype, compression=compression,
                     byte_shuffled=bool(shuffle and itemsize > 1 and arr.size > 1), **fields)


INT_DTYPES = (pb.INT32, pb.INT64, pb.UINT16, pb.UINT8)   # the dtypes token ids may travel in


def _dtype_name(dtype: int) -> str:
    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return str(dtype)


def _decompress_exact(data: bytes, size: int) -> bytes:
    """zstd-decompress `data`, which must decode to exactly `size` bytes: never more than
    `size` + 1 bytes are produced (a frame that declares or yields more is refused before it
    is inflated), so a small message cannot expand into a large allocation."""
    declared = zstandard.frame_content_size(data)
    if declared >= 0 and declared != size:
        raise ValueError(f"zstd frame declares {declared} bytes; the tensor's shape and dtype need {size}")
    out = bytearray()
    with _decompressor().stream_reader(data, read_across_frames=True) as r:
        while len(out) <= size:
            chunk = r.read(min(size + 1 - len(out), 1 << 20))
            if not chunk:
                break
            out += chunk
    if len(out) != size:
        raise ValueError(f"zstd data decompresses to {'more than ' if len(out) > size else ''}{len(out)} bytes; "
                         f"the tensor's shape and dtype need {size}")
    return bytes(out)


def _unpack_raw(t: pb.Tensor, max_elements: int | None = None, data: bytes | None = None) -> np.ndarray:
    """The tensor's array (`data`: t.data, when the caller read it already). The declared shape
    and dtype fix the byte count before anything is decoded; `max_elements` (when given) bounds
    the shape, and zstd data is inflated to exactly that byte count, never further (see
    `_decompress_exact`). Plain data that needs no unshuffling is viewed, not copied (read-only)."""
    if t.dtype not in _NP_DTYPES:
        raise ValueError(f"tensor dtype {t.dtype} is not one of {sorted(_NP_DTYPES)}")
    np_dtype = np.dtype(_NP_DTYPES[t.dtype]).newbyteorder("<")
    shape = tuple(int(s) for s in t.shape)
    if len(shape) > 8 or any(s < 0 for s in shape):
        raise ValueError(f"tensor shape {list(shape)[:9]} must have at most 8 non-negative dimensions")
    n = 1
    for s in shape:
        n *= s
    limit = max_elements if max_elements is not None else (1 << 31)
    if n > limit:
        raise ValueError(f"tensor shape {list(shape)} holds {n} elements; at most {limit} allowed here")
    need = n * np_dtype.itemsize
    data = t.data if data is None else data
    if t.compression == pb.ZSTD:
        data = _decompress_exact(data, need)
    elif t.compression != pb.COMPRESSION_NONE:
        raise ValueError(f"tensor compression {t.compression} is not one of none(0), zstd(1)")
    if len(data) != need:
        raise ValueError(f"tensor data has {len(data)} bytes; shape {list(shape)} of {np_dtype} needs {need}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if t.byte_shuffled and n:
        buf = buf.reshape(np_dtype.itemsize, n).T
    return np.ascontiguousarray(buf).view(np_dtype).reshape(shape)


# ---- ids -------------------------------------------------------------------------------------

def encode_ids(ids: np.ndarray, compression: int = pb.ZSTD, level: int = 3, delta: bool = True) -> pb.Tensor:
    """int ids [..., k] (each row sorted ascending when delta=True) -> Tensor(int32)."""
    ids = np.asarray(ids, dtype=np.int32)
    if delta and ids.ndim >= 1 and ids.shape[-1] > 1:
        coded = ids.copy()
        coded[..., 1:] = np.diff(ids, axis=-1)
    else:
        coded = ids
    return _pack(coded, pb.INT32, compression, level, shuffle=True, delta_coded=bool(delta))


def encode_plain_ids(ids: np.ndarray, compression: int = pb.COMPRESSION_NONE) -> pb.Tensor:
    """Token ids of a request (no delta coding: sequences are not sorted)."""
    return _pack(np.asarray(ids, dtype=np.int32), pb.INT32, compression, 3, shuffle=False)


def decode_ids(t: pb.Tensor, max_elements: int | None = None) -> np.ndarray:
    """Integer ids (INT32, INT64, UINT16 or UINT8 on the wire; float dtypes are refused, never
    reinterpreted) -> int64 array of the declared shape (at most `max_elements` ids)."""
    if t.dtype not in INT_DTYPES:
        raise ValueError(f"dtype {_dtype_name(t.dtype)} is not an integer dtype; ids travel as one of "
                         f"{', '.join(_dtype_name(d) for d in INT_DTYPES)}")
    arr = _unpack_raw(t, max_elements)
    arr = arr.astype(np.int64)
    if t.delta_coded and arr.ndim >= 1 and arr.shape[-1] > 1:
        arr = np.cumsum(arr, axis=-1)
    return arr


# ---- values ----------------------------------------------------------------------------------

def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, in uint32 (7x faster than a uint64 detour). No overflow: the largest
    non-NaN pattern, 0xFF800000 (-inf), plus 0x8000 stays below 2^32; NaN lanes are replaced."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = u + np.uint32(0x7FFF)
    r += (u >> 16) & np.uint32(1)
    out = (r >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def encode_values(x: np.ndarray, encoding: int = pb.FP32, compression: int = pb.ZSTD, level: int = 3) -> pb.Tensor:
    """float log-probs -> Tensor in the given value encoding (see module docstring for bounds)."""
    x = np.asarray(x, dtype=np.float32)
    if encoding == pb.FP32:
        return _pack(x, pb.FLOAT32, compression, level, True, encoding=pb.FP32)
    if encoding == pb.BF16:
        return _pack(_f32_to_bf16_bits(x), pb.BFLOAT16, compression, level, True, encoding=pb.BF16)
    if encoding == pb.FP16:
        return _pack(np.clip(x, -65504, 65504).astype(np.float16), pb.FLOAT16, compression, level, True,
                     encoding=pb.FP16)
    if encoding == pb.Q16:
        q = np.rint(-np.clip(np.nan_to_num(x, neginf=Q16_MIN), Q16_MIN, 0.0) * Q16_SCALE).astype(np.uint16)
        return _pack(q, pb.UINT16, compression, level, True, encoding=pb.Q16)
    if encoding == pb.Q8:
        rows = x.reshape(-1, x.shape[-1]) if x.ndim >= 1 and x.size else x.reshape(-1, 1)
        finite = np.where(np.isfinite(rows), rows, np.nan)
        with np.errstate(all="ignore"):
            lo = np.nan_to_num(np.nanmin(finite, axis=1), nan=0.0).astype(np.float32)
            hi = np.nan_to_num(np.nanmax(finite, axis=1), nan=0.0).astype(np.float32)
        span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
        clipped = np.clip(np.nan_to_num(rows, neginf=-np.inf), lo[:, None], hi[:, None])
        q = np.rint((clipped - lo[:, None]) / span[:, None] * 255.0).astype(np.uint8).reshape(x.shape)
        params = _pack(np.stack([lo, hi], axis=1), pb.FLOAT32, pb.COMPRESSION_NONE, 0, False)
        return _pack(q, pb.UINT8, compression, level, False, encoding=pb.Q8, row_params=params)
    raise ValueError(f"value_encoding {encoding} is not one of fp32(0), bf16(1), fp16(2), q16(3), q8(4)")


def decode_values(t: pb.Tensor) -> np.ndarray:
    raw = _unpack_raw(t)
    if t.encoding == pb.BF16:
        return _bf16_bits_to_f32(raw)
    if t.encoding == pb.Q16:
        return (raw.astype(np.float32) / -Q16_SCALE).astype(np.float32)
    if t.encoding == pb.Q8:
        params = _unpack_raw(t.row_params)
        rows = raw.reshape(params.shape[0], -1).astype(np.float32)
        lo, hi = params[:, 0:1], params[:, 1:2]
        return (lo + rows / 255.0 * (hi - lo)).reshape(raw.shape).astype(np.float32)
    return raw.astype(np.float32)


def tensor_nbytes(t: pb.Tensor) -> int:
    """Bytes this tensor occupies in a serialized message (data + its small header)."""
    return t.ByteSize() if t.ByteSize() else 0


# ---- weights (UpdateWeights) -------------------------------------------------------------------
WEIGHT_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)   # the dtypes weight pieces travel in


def weight_parts(t, compression: int = pb.COMPRESSION_NONE, level: int = 3):
    """A torch tensor's elements, flattened, for the wire: (`Tensor` message without its data,
    the data as a buffer). The buffer is the tensor's own memory (a CPU tensor in bf16, fp16 or
    fp32 is not copied; other float dtypes go as float32, a GPU tensor is copied to the host), so
    a caller may frame it into a message without another copy (`client._weight_messages`).
    Uncompressed data travels in element order (byte shuffling only helps zstd, and costs a
    strided copy on each side); zstd data is byte-shuffled, then compressed. Exact: no rounding."""
    import torch

    flat = t.detach().reshape(-1)
    if flat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        flat = flat.float()
    flat = flat.cpu().contiguous()
    dtype = {torch.bfloat16: pb.BFLOAT16, torch.float16: pb.FLOAT16, torch.float32: pb.FLOAT32}[flat.dtype]
    if compression == pb.COMPRESSION_NONE:
        head = pb.Tensor(shape=[flat.numel()], dtype=dtype, compression=compression)
        return head, flat.view(torch.uint8).numpy().data
    arr = flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()
    packed = _pack(arr, dtype, compression, level, True)
    data = packed.data
    packed.ClearField("data")
    return packed, data


def encode_weight(t, compression: int = pb.COMPRESSION_NONE, level: int = 3) -> pb.Tensor:
    """A torch tensor's elements, flattened, as a 1-D Tensor in its own dtype (bf16 as its bits;
    other float dtypes as float32); see `weight_parts`. Exact: no rounding on the way."""
    head, data = weight_parts(t, compression, level)
    head.data = bytes(data)
    return head


_TORCH_OF = {pb.FLOAT32: "float32", pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16"}


def decode_weight_into(t: pb.Tensor, out) -> tuple[int, int]:
    """Write weight piece `t` into the first elements of `out` (a 1-D CPU torch tensor: the part of
    a parameter's host copy still to be filled), converted to out's dtype; returns how many
    elements it wrote and the bytes of data it read (as sent: compressed for zstd). Raises
    ValueError for a dtype that is not a weight dtype, a shape that is not 1-D or longer than
    `out`, or broken data. One copy when the wire dtype is out's dtype (the common case); the data
    is never inflated beyond `out`'s size (see `_unpack_raw`)."""
    import torch

    if t.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {_dtype_name(t.dtype)} is not a weight dtype; send one of "
                         f"{', '.join(_dtype_name(d) for d in WEIGHT_DTYPES)}")
    if len(t.shape) != 1:
        raise ValueError(f"shape {list(t.shape)[:9]} must be 1-D (a piece of the flattened tensor)")
    data = t.data   # (each read of a bytes field copies it: once)
    arr = _unpack_raw(t, out.numel(), data)   # read-only over `data` unless it had to decode
    n = arr.size
    dst = out[:n]
    wire = getattr(torch, _TORCH_OF[t.dtype])
    if wire == out.dtype:
        if wire == torch.bfloat16:   # as its bits (numpy has no bfloat16)
            np.copyto(dst.view(torch.int16).numpy(), arr.view("<i2"), casting="equiv")
        else:
            np.copyto(dst.numpy(), arr, casting="equiv")
    else:   # another float dtype than the parameter's: torch converts (round to nearest even)
        host = arr.view("<i2") if wire == torch.bfloat16 else arr
        src = torch.from_numpy(host.astype(host.dtype.newbyteorder("=")))   # a writable copy, native order
        dst.copy_(src.view(torch.bfloat16) if wire == torch.bfloat16 else src)
    return n, len(data)


def all_finite(x) -> bool:
    """Whether every element of float tensor `x` (non-empty) is finite: its minimum and maximum
    both are (`torch.aminmax` propagates NaN), one vectorised pass that needs no mask the size of
    `x` (several times faster than `torch.isfinite(x).all()` on the CPU)."""
    import torch

    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
