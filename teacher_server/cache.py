"""A statistics cache: re-scoring the same sequence with the same options costs a lookup.

Key: sha256 over (teacher model id, token ids, scored span, top_k, statistics, temperature, extra
ids). The value encoding and compression are NOT in the key: the cache holds the engine's float32
results and every wire encoding is made from them.

Memory: an LRU bounded by bytes (`max_bytes`). Disk (optional `directory`): one file per key,
content-addressed (`ab/abcdef....npz`, numpy's npz without pickles), written to a temporary name
and renamed into place, so readers never see a partial file and concurrent servers may share one
directory. The disk store is not size-bounded: prune it with ordinary file tools.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def item_key(model_id: str, item) -> str:
    h = hashlib.sha256()
    h.update(f"opd-stats-v1|{model_id}|{item.target_start}|{item.target_end}|{item.top_k}|"
             f"{','.join(sorted(item.stats))}|{float(item.temperature)!r}|".encode())
    ids = np.ascontiguousarray(item.token_ids, dtype="<i8")
    h.update(str(len(ids)).encode() + b"|")
    h.update(ids.tobytes())
    if item.extra_ids is not None:
        ex = np.ascontiguousarray(item.extra_ids, dtype="<i8")
        h.update(f"|extra{list(ex.shape)}|".encode())
        h.update(ex.tobytes())
    return h.hexdigest()


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    puts: int = 0
    evictions: int = 0
    disk_writes: int = 0
    bytes: int = 0
    entries: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def _nbytes(res: dict) -> int:
    return sum(v.nbytes for v in res.values()) + 64 * len(res) + 128


class StatsCache:
    def __init__(self, max_bytes: int, directory: str | os.PathLike | None = None):
        self.max_bytes = int(max_bytes)
        self.dir = Path(directory) if directory else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.counters = CacheCounters()

    # ---- lookups --------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        """The cached statistics (a new dict of read-only arrays), or None."""
        c = self.counters
        with self._lock:
            res = self._mem.get(key)
            if res is not None:
                self._mem.move_to_end(key)
                c.hits += 1
                return dict(res)
        res = self._read_disk(key)
        with self._lock:
            if res is None:
                c.misses += 1
                return None
            c.hits += 1
            c.disk_hits += 1
            self._insert(key, res)
            return dict(res)

    def put(self, key: str, res: dict) -> None:
        clean = {}
        for k, v in res.items():
            if k.startswith("_"):
                continue
            a = np.array(v, copy=True)
            a.flags.writeable = False
            clean[k] = a
        with self._lock:
            self.counters.puts += 1
            self._insert(key, clean)
        if self.dir is not None:
            self._write_disk(key, clean)

    # ---- internals ----------------------------------------------------------------------------
    def _insert(self, key: str, res: dict) -> None:
        """Called with the lock held."""
        size = _nbytes(res)
        if size > self.max_bytes:
            return
        c = self.counters
        old = self._mem.pop(key, None)
        if old is not None:
            c.bytes -= _nbytes(old)
        self._mem[key] = res
        c.bytes += size
        while c.bytes > self.max_bytes and self._mem:
            _, ev = self._mem.popitem(last=False)
            c.bytes -= _nbytes(ev)
            c.evictions += 1
        c.entries = len(self._mem)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def _read_disk(self, key: str) -> dict | None:
        if self.dir is None:
            return None
        p = self._path(key)
        try:
            with np.load(p, allow_pickle=False) as z:
                res = {k: z[k] for k in z.files}
        except (FileNotFoundError, OSError, ValueError, KeyError):
            return None
        for a in res.values():
            a.flags.writeable = False
        return res

    def _write_disk(self, key: str, res: dict) -> None:
        p = self._path(key)
        if p.exists():
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **res)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, p)
            with self._lock:
                self.counters.disk_writes += 1
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
