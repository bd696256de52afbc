"""Trainer's weights into SGLang engines (and `opd rollout-server`) after every optimizer step.

Three ways, chosen by `rollout.weight_sync` (docs/rollout.md):

- `distributed`: the trainer and the engines share a process group of their own (NCCL on GPUs,
  gloo on CPU), opened once with `/init_weights_update_group`; every step broadcasts the weights
  bucket by bucket, each bucket announced by `/update_weights_from_distributed`.
- `tensor`: CUDA-IPC handles of the trainer's GPU tensors, for an engine on the same GPU
  (`/update_weights_from_tensor`).
- `disk`: the trainer writes a Hugging Face directory and each engine loads it
  (`/update_weights_from_disk`).

One step, for the first two (SGLang 0.5.23 makes the begin/end session mandatory):
    pause_generation(retract) -> flush_cache -> begin_weight_update
    -> per bucket: update call (flush_cache false; weight_version on the last bucket) + tensors
    -> end_weight_update -> flush_cache -> continue_generation
An update answered with `success: false` (SGLang's answer when, for instance, the cache could not
be flushed under load) is sent again, up to `retries` times. Afterwards every engine must report
the new version in /model_info, or the step fails.

The process group. SGLang's engine joins with its `init_custom_process_group`: a tcp:// rendezvous
at master_address:master_port (the trainer, rank 0, hosts the store), the store wrapped in
`PrefixStore(group_name)`, then torch's `_new_process_group_helper`, which adds the prefixes
"{group_name}/" and "{device}/" and builds the backend. `open_group` builds the same group from
public torch classes (the private helper's signature changed in torch 2.13, and it would register
the group in torch's global registry next to DeepSpeed's default group): same store keys, same
backend, so either side may be SGLang. tests/test_rollout_weight_sync.py checks that a group
opened here and one opened through torch's helper, as SGLang does, talk to each other.

Engines that go away (disk and distributed). An engine that does not answer (connection refused
or reset, timeout, 502/503/504) is taken out of service with a warning naming it, and the step's
push goes on with the others; at every push the engines out of service are asked /health, and one
that answers is back: the push that follows is a whole set of weights, so it has the current ones
before the trainer samples again (the rollout client only uses an engine whose weight_version is
the others'). A process group cannot lose or gain a member: with `distributed` the trainer leaves
its group and the engines in service destroy theirs, and a new group (name `<group>-<n>`) is
opened with the engines in service before the broadcast; an engine lost in the middle of the
broadcast makes the push start over in a new group (with the weights gathered again where that is
possible on one rank). With every engine down the push waits up to timeout_s for one to answer.
Counters: `stats` (engine_down, engine_rejoined, group_reopened).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import copyreg
import datetime
import io
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from urllib.parse import urlparse

import torch

log = logging.getLogger("opd.weight_sync")

DEFAULT_GROUP = "weight_update_group"


class WeightSyncError(RuntimeError):
    pass


class EngineLost(WeightSyncError):
    """The engine did not answer (connection refused or reset, timeout, 502/503/504): it is taken
    out of service until /health answers again (as rollout.sglang_client does for generation)."""

    def __init__(self, url: str, why: str):
        super().__init__(f"{url}: {why}")
        self.url, self.why = url, why


# ---- the process group ------------------------------------------------------------------------
def open_group(master_address: str, master_port: int, rank: int, world_size: int,
               group_name: str = DEFAULT_GROUP, backend: str = "gloo", timeout_s: float = 600.0):
    """Join (rank > 0) or host (rank 0) the weight-update group; returns the torch backend object
    (`.broadcast([tensor], opts)`). Blocks until all `world_size` ranks arrived."""
    import torch.distributed as dist

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r}: expected gloo or nccl")
    if not group_name:
        raise ValueError("group_name must not be empty")
    timeout = datetime.timedelta(seconds=timeout_s)
    # What torch's tcp:// rendezvous makes outside torchrun: rank 0 hosts the store. (Under torchrun,
    # TORCHELASTIC_USE_AGENT_STORE makes that rendezvous a client of the launcher's store on every
    # rank, and a trainer started by torchrun would wait for a store nobody hosts.)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0, timeout=timeout,
                          multi_tenant=True)
    # SGLang's PrefixStore(group_name), then the two prefixes torch's group helper adds
    device = "cpu" if backend == "gloo" else "cuda"
    store = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store)))
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        opts.global_ranks_in_group = []
        opts.group_name = group_name
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    # rank 0 publishes the group's sequence number in the store and the others read it, as the
    # helper does; a peer that waits for it would otherwise time out
    pg._set_sequence_number_for_group()
    return pg


def broadcast(pg, tensor: torch.Tensor) -> None:
    """One broadcast from rank 0 of the group (the trainer), in place on the receivers."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    pg.broadcast([tensor], opts).wait()


def close_group(pg) -> None:
    shutdown = getattr(pg, "shutdown", None)  # NCCL; gloo closes its pairs when collected
    if shutdown is not None:
        try:
            shutdown()
        except Exception:  # best effort at teardown
            pass


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_address_for(urls: Sequence[str]) -> str:
    """The trainer's address as the engines see it: loopback if every engine is local, else the
    address of the interface that routes to the first engine."""
    hosts = [urlparse(u).hostname or "127.0.0.1" for u in urls]

    def loopback(h):
        if h == "localhost":
            return True
        try:
            return ipaddress.ip_address(h).is_loopback
        except ValueError:
            return False
    if all(loopback(h) for h in hosts):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((hosts[0], 9))  # no packet is sent for a UDP connect
        return s.getsockname()[0]


# ---- buckets --------------------------------------------------------------------------------------
def plan_buckets(named_sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Consecutive names grouped so a bucket holds at most bucket_bytes (a larger tensor is alone)."""
    buckets, cur, size = [], [], 0
    for name, nbytes in named_sizes:
        if cur and size + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ---- HTTP to the engines ---------------------------------------------------------------------------
class _Engines:
    """Blocking control calls to a set of engine URLs, concurrently, with SGLang's reply checks."""

    def __init__(self, urls: Sequence[str], api_key: str | None = None, timeout_s: float = 3600.0):
        self.urls = [u.rstrip("/") for u in urls]  # the engines in service (EngineSync takes lost ones out)
        self.api_key, self.timeout_s = api_key or None, timeout_s
        self.on_lost = None  # callable(url, why): an engine stopped answering
        self._pool = cf.ThreadPoolExecutor(max_workers=max(2, 2 * len(self.urls)), thread_name_prefix="wsync-http")

    def call(self, url: str, path: str, body: dict | None = None, method: str = "POST", timeout_s: float | None = None):
        import http.client

        from rollout.sglang_client import http_json

        try:
            status, reply = http_json(url + path, body, method=method, timeout_s=timeout_s or self.timeout_s,
                                      api_key=self.api_key)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off
            raise EngineLost(url, f"{path}: {e!r}") from e
        if status in (502, 503, 504):
            raise EngineLost(url, f"{path} answered {status}")
        return status, reply

    def start(self, path: str, bodies: Sequence[dict], urls: Sequence[str] | None = None) -> list[cf.Future]:
        return [self._pool.submit(self.call, u, path, b) for u, b in zip(self.urls if urls is None else urls, bodies)]

    def gather(self, urls: Sequence[str], futs: Sequence[cf.Future]) -> list:
        """(url, reply) of the engines that answered; one that did not is reported to on_lost and
        left out (without on_lost its EngineLost is raised)."""
        out = []
        for u, f in zip(urls, futs):
            try:
                out.append((u, f.result()))
            except EngineLost as e:
                if self.on_lost is None:
                    raise
                self.on_lost(e.url, e.why)
        return out

    def all(self, path: str, body: dict | None = None, ok_text: bool = False) -> list:
        urls = list(self.urls)
        replies = self.gather(urls, self.start(path, [body or {}] * len(urls), urls))
        return [self.check(u, path, r, ok_text) for u, r in replies]

    @staticmethod
    def check(url: str, path: str, reply, ok_text: bool = False):
        status, body = reply
        if status == 200 and not (isinstance(body, dict) and body.get("success") is False):
            return body
        raise WeightSyncError(f"{url}{path} answered {status}: {body}")

    @staticmethod
    def failed(reply) -> bool:
        """success: false (SGLang answers 400 with it): the call may be sent again."""
        status, body = reply
        return isinstance(body, dict) and body.get("success") is False and status in (200, 400)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class EngineSync:
    """Base: the engines this trainer rank pushes to, the session around an update, the retries."""

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None, retries: int = 3,
                 backoff_s: float = 0.5, timeout_s: float = 600.0):
        self.engines = _Engines(urls, api_key)
        self.owned = list(self.engines.urls)  # this rank's engines, in service or not
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.updates_retried = 0  # over the run
        # over the run: engine_down (taken out of service), engine_rejoined, group_reopened
        self.stats: collections.Counter = collections.Counter()
        self.down: dict[str, str] = {}  # url -> why it was taken out
        self.engines.on_lost = self._mark_down

    @property
    def urls(self) -> list[str]:
        """Every engine this rank pushes to (in service or not)."""
        return self.owned

    @property
    def live(self) -> list[str]:
        """The engines in service now."""
        return self.engines.urls

    # ---- engines that stop answering and come back ------------------------------------------------
    def _mark_down(self, url: str, why: str) -> None:
        if url in self.engines.urls:
            self.engines.urls = [u for u in self.engines.urls if u != url]
            self.down[url] = why
            self.stats["engine_down"] += 1
            self._membership_changed()
            log.warning("rollout engine %s is down (%s): the weight push goes on without it until /health "
                        "answers", url, why)

    def _membership_changed(self) -> None:
        pass

    def _probe(self) -> list[str]:
        """/health on every engine out of service; those that answer are back in service (the push
        that follows brings them the current weights). Returns them."""
        back = []
        for u in list(self.down):
            try:
                ok = self.engines.call(u, "/health", method="GET", timeout_s=10)[0] == 200
            except EngineLost:
                ok = False
            if ok:
                del self.down[u]
                self.engines.urls = [v for v in self.owned if v in self.engines.urls or v == u]
                self.stats["engine_rejoined"] += 1
                self._membership_changed()
                back.append(u)
                log.warning("rollout engine %s answers /health again: it rejoins the weight push and gets the "
                            "current weights before it serves", u)
        return back

    def _down_list(self) -> str:
        return "; ".join(f"{u} ({w})" for u, w in self.down.items())

    def _wait_for_one(self) -> None:
        """Every engine down: wait (up to timeout_s, probing with backoff) for one to come back."""
        deadline, pause = time.monotonic() + self.timeout_s, 0.5
        while not self.live:
            if self._probe():
                return
            if time.monotonic() >= deadline:
                raise WeightSyncError(f"no rollout engine answered /health for {self.timeout_s:.0f} s "
                                      f"(rollout.sync_timeout_s): {self._down_list()}")
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, 5.0)

    # success: false answers after which the broadcast stream is out of step (nothing or part of
    # the bucket was received): sending it again would feed the engine the wrong bytes
    NOT_RETRYABLE = ("must run between", "Failed to receive weights", "init_weights_update_group")

    def _with_retries(self, what: str, attempt, together: bool = False):
        """attempt(urls) -> list of (url, reply); while some answer success: false, send it again to
        those engines (to all of them if `together`: a broadcast needs every rank of the group)."""
        urls = list(self.live)
        for k in range(self.retries + 1):
            replies = attempt(urls)
            bad = [(u, r) for u, r in replies if self.engines.failed(r)]
            for u, r in replies:
                if (u, r) not in bad or any(m in str(r[1].get("message")) for m in self.NOT_RETRYABLE):
                    self.engines.check(u, what, r)
            if not bad:
                return
            if not together:
                urls = [u for u, _ in bad]
            if k == self.retries:
                raise WeightSyncError(f"{what} failed after {self.retries + 1} attempts: "
                                      + "; ".join(f"{u}: {r[1]}" for u, r in bad))
            self.updates_retried += 1
            log.warning("%s answered success: false (%s); retry %d/%d", what, bad[0][1], k + 1, self.retries)
            time.sleep(self.backoff_s * (2 ** k))

    def _begin(self) -> None:
        urls = list(self.live)
        futs = self.engines.start("/begin_weight_update", [{"selector": "all"}] * len(urls), urls)
        replies = self.engines.gather(urls, futs)
        for u, r in replies:
            if self.engines.failed(r) and "already open" in str(r[1].get("message", "")):
                # a session left open by an interrupted update: close it and start over
                self.engines.check(u, "/end_weight_update", self.engines.call(u, "/end_weight_update", {}))
                r = self.engines.call(u, "/begin_weight_update", {"selector": "all"})
            self.engines.check(u, "/begin_weight_update", r)

    def _session(self, body):
        """pause(retract) -> flush -> begin -> body() -> end -> flush -> continue."""
        self.engines.all("/pause_generation", {"mode": "retract"})
        try:
            self.engines.all("/flush_cache", ok_text=True)
            self._begin()
            try:
                body()
            finally:
                self.engines.all("/end_weight_update", {})
            self.engines.all("/flush_cache", ok_text=True)
        finally:
            self.engines.all("/continue_generation", {"torch_empty_cache": False})

    def verify_version(self, version: int) -> None:
        """Each engine must now report the new weight_version (what rollouts will carry)."""
        for u in list(self.live):
            try:
                s, info = self.engines.call(u, "/model_info", method="GET")
            except EngineLost as e:
                self._mark_down(e.url, e.why)
                continue
            got = info.get("weight_version") if isinstance(info, dict) else None
            if s != 200 or got != str(version):
                raise WeightSyncError(f"{u} reports weight_version {got!r} after the update to {version} "
                                      f"(/model_info answered {s})")

    def connect(self) -> None:
        pass

    def release_memory(self) -> None:
        """Before training on a GPU the engine shares: its KV cache and weights give the memory back."""
        if self.live:
            self.engines.all("/release_memory_occupation", {"tags": ["kv_cache", "weights"]})
            self._released = {"kv_cache", "weights"}

    def resume_memory(self, tags: Sequence[str]) -> None:
        """Only what was released (SGLang fails on resuming a tag it did not release)."""
        tags = [t for t in tags if t in getattr(self, "_released", ())]
        if self.live and tags:
            self.engines.all("/resume_memory_occupation", {"tags": tags})
            self._released -= set(tags)

    def close(self) -> None:
        self.engines.close()


class DiskSync(EngineSync):
    """Each engine loads a Hugging Face directory the trainer wrote (one call per engine per step)."""

    def push(self, path: str, version: int) -> None:
        """To the engines in service (and those that answer /health again: the checkpoint is whole, so
        a rejoining engine catches up with it); one that does not answer is taken out of service."""
        body = {"model_path": str(path), "weight_version": str(version), "flush_cache": True,
                "abort_all_requests": False}
        self._probe()
        while True:
            self._wait_for_one()
            self._with_retries("/update_weights_from_disk", lambda urls: self.engines.gather(
                urls, self.engines.start("/update_weights_from_disk", [body] * len(urls), urls)))
            self.verify_version(version)
            if self.live:
                return


class _Regroup(Exception):
    """Internal: the push starts over in a re-opened group."""


class DistributedSync(EngineSync):
    """The trainer is rank 0 of a group with its engines (engine i: ranks rank_offset_i + tp)."""

    def __init__(self, urls: Sequence[str], *, address: str = "", port: int = 0, group_name: str = DEFAULT_GROUP,
                 backend: str = "gloo", **kw):
        super().__init__(urls, **kw)
        self.address = address or local_address_for(self.urls)
        self.port, self.group_name, self.backend = port, group_name, backend
        self.base_name, self.reopens = group_name, 0
        self.pg = None
        self._regroup = False  # an engine left or came back: the group is re-opened before the next broadcast

    def _membership_changed(self) -> None:
        self._regroup = True

    def tp_sizes(self) -> list[int]:
        sizes = []
        for u in self.live:
            s, info = self.engines.call(u, "/server_info", method="GET")
            if s != 200 or not isinstance(info, dict):
                raise WeightSyncError(f"{u}/server_info answered {s}: {info}")
            if int(info.get("dp_size") or 1) != 1:
                raise WeightSyncError(f"{u} runs dp_size {info.get('dp_size')}; SGLang's distributed weight "
                                      "update needs dp_size 1 (run one server per replica)")
            sizes.append(int(info.get("tp_size") or 1))
        return sizes

    def connect(self) -> None:
        """Once: every engine joins (its HTTP call returns after the rendezvous), the trainer hosts it."""
        sizes = self.tp_sizes()
        world = 1 + sum(sizes)
        port = self.port or free_port()
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        bodies = [{"master_address": self.address, "master_port": port, "rank_offset": off, "world_size": world,
                   "group_name": self.group_name, "backend": self.backend} for off in offsets]
        urls = list(self.live)
        futs = self.engines.start("/init_weights_update_group", bodies, urls)
        # Host the group on a daemon thread, so that an engine refusing to join (its reply comes
        # back at once) fails the start now instead of after the rendezvous timeout.
        joined: dict = {}

        def host():
            try:
                joined["pg"] = open_group(self.address, port, 0, world, self.group_name, self.backend, self.timeout_s)
            except BaseException as e:  # reported below
                joined["error"] = e
        t = threading.Thread(target=host, daemon=True, name="wsync-rendezvous")
        t.start()
        while t.is_alive():
            t.join(0.05)
            for u, f in zip(urls, futs):
                if f.done() and t.is_alive():
                    self.engines.check(u, "/init_weights_update_group", f.result())  # raises on a refusal
        for u, f in zip(urls, futs):
            self.engines.check(u, "/init_weights_update_group", f.result())
        if "error" in joined:
            raise WeightSyncError(f"weight-update group at {self.address}:{port}: {joined['error']}")
        self.pg = joined["pg"]
        log.info("weight-update group %r: trainer + %d engine rank(s) at %s:%d (%s)", self.group_name, world - 1,
                 self.address, port, self.backend)

    def reopen(self) -> None:
        """A process group cannot lose or gain a member: the engines in service leave the old group
        (/destroy_weights_update_group; an engine that restarted never had it) and everyone joins a
        new one under a new name (and a new port unless rollout.sync_port fixes it)."""
        if self.pg is not None:
            urls = list(self.live)
            for u, r in self.engines.gather(urls, self.engines.start(
                    "/destroy_weights_update_group", [{"group_name": self.group_name}] * len(urls), urls)):
                if r[0] != 200:
                    log.info("%s/destroy_weights_update_group %r: %s", u, self.group_name, r[1])
            close_group(self.pg)
            self.pg = None
        self._regroup = False
        self.reopens += 1
        self.group_name = f"{self.base_name}-{self.reopens}"
        self.connect()
        self.stats["group_reopened"] += 1
        log.warning("weight-update group re-opened as %r with %d engine(s): %s", self.group_name, len(self.live),
                    ", ".join(self.live))

    def push(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], n_buckets: int, version: int,
             rebuild=None) -> None:
        """buckets: full HF-named tensors, bucket by bucket (consumed in order, exactly once).
        An engine that stops answering is taken out and the group re-opened without it; one that
        answers /health again joins a re-opened group, and the push brings it the current weights
        before it serves. rebuild() -> (n_buckets, buckets) gives the weights again, for an engine
        lost in the middle of the broadcast (None: not possible here, e.g. ZeRO-3 with several
        trainer ranks, whose gathers are collective; then the step fails)."""
        if self.pg is None and not self.down:
            raise WeightSyncError("DistributedSync.connect() was not called")
        self._probe()
        streamed = False
        for _ in range(2 * len(self.owned) + 2):
            self._wait_for_one()
            try:
                if self._regroup or self.pg is None:
                    self.reopen()
                if streamed:
                    if rebuild is None:
                        raise WeightSyncError("an engine was lost in the middle of the weight broadcast, and the "
                                              "weights cannot be gathered again on this rank alone")
                    n_buckets, buckets = rebuild()
                    streamed = False

                def body():
                    nonlocal streamed
                    if self._regroup:  # lost at pause/flush/begin: nothing was broadcast yet
                        raise _Regroup()
                    streamed = True
                    for i, bucket in enumerate(buckets):
                        self._send_bucket(bucket, str(version) if i == n_buckets - 1 else None)
                    streamed = False  # complete
                self._session(body)
                self.verify_version(version)
                return  # (an engine lost after the broadcast got nothing wrong; the next push re-opens)
            except EngineLost as e:
                self._mark_down(e.url, e.why)
            except _Regroup:
                pass
            finally:
                if streamed and rebuild is None:
                    for _ in buckets:  # ZeRO-3: the other ranks' gathers go on; take part, then fail
                        pass
        raise WeightSyncError(f"weight push to {', '.join(self.owned)}: engines kept failing ({self.down})")

    def _lost_in_broadcast(self, futs, urls, err: BaseException) -> None:
        """The broadcast failed (a member died): close the trainer's side, find who is gone (its HTTP
        call fails, or /health does not answer), re-open without it. An engine still waiting in its
        receive answers when its group's timeout ends (neither gloo nor NCCL interrupts a pending
        receive from the other side): up to that timeout is what a death mid-broadcast costs."""
        log.warning("weight broadcast in group %r failed: %r", self.group_name, err)
        close_group(self.pg)
        self.pg = None
        lost = []
        for u, f in zip(urls, futs):
            try:
                f.result(timeout=min(self.timeout_s, 60.0))
            except EngineLost:
                lost.append(u)
            except Exception:  # still waiting, or answered an error: ask /health
                pass
        for u in urls:
            if u not in lost:
                try:
                    if self.engines.call(u, "/health", method="GET", timeout_s=10)[0] != 200:
                        lost.append(u)
                except EngineLost:
                    lost.append(u)
        for u in lost:
            self._mark_down(u, f"weight broadcast failed: {err!r}")
        self._regroup = True
        raise _Regroup()

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        req = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t) for _, t in bucket],
               "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
               "flush_cache": False, "abort_all_requests": False, "weight_version": version}

        def attempt(urls):
            futs = self.engines.start("/update_weights_from_distributed", [req] * len(urls), urls)
            try:
                for _, t in bucket:  # the engines receive once per name, in list order
                    broadcast(self.pg, t.detach().contiguous())
                if self.backend == "nccl":
                    torch.cuda.synchronize()
            except RuntimeError as e:  # gloo/NCCL: a peer went away
                self._lost_in_broadcast(futs, urls, e)
            replies = self.engines.gather(urls, futs)
            broken = [u for u, (_, r) in replies if isinstance(r, dict) and r.get("success") is False
                      and "Failed to receive weights" in str(r.get("message"))]
            for u in broken:  # its receive failed (a peer died, or its timeout): the stream is out of step
                try:
                    if self.engines.call(u, "/health", method="GET", timeout_s=10)[0] != 200:
                        self._mark_down(u, "/health failed after its weight receive failed")
                except EngineLost as e:
                    self._mark_down(u, e.why)
            if broken or self._regroup:  # the group is broken: re-open it and push again
                self._regroup = True
                raise _Regroup()
            return replies
        self._with_retries("/update_weights_from_distributed", attempt, together=True)

    def close(self) -> None:
        if self.pg is not None:
            try:
                self.engines.all("/destroy_weights_update_group", {"group_name": self.group_name})
            except Exception as e:  # an engine that went away has no group left to destroy
                log.warning("destroy_weights_update_group: %s", e)
            close_group(self.pg)
            self.pg = None
        super().close()


# ---- CUDA IPC (/update_weights_from_tensor) ------------------------------------------------------
def _reduce_cuda_tensor_by_uuid(t: torch.Tensor):
    """torch's CUDA-IPC reduction with the device index replaced by the GPU's UUID, as SGLang's
    `monkey_patch_torch_reductions` does, so the engine maps the right GPU whatever its
    CUDA_VISIBLE_DEVICES. The rebuild function stays torch's `rebuild_cuda_tensor`, which SGLang's
    allow-listed unpickler accepts and, patched there, resolves the UUID."""
    from torch.multiprocessing import reductions

    fn, args = reductions.reduce_tensor(t)
    if t.is_cuda:
        args = (*args[:6], str(torch.cuda.get_device_properties(args[6]).uuid), *args[7:])
    return fn, args


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]], tp_size: int = 1) -> list[str]:
    """`serialized_named_tensors` for /update_weights_from_tensor with load_format null: base64 of a
    ForkingPickler pickle of [(name, tensor), ...] (CUDA-IPC handles, not data), one entry per TP rank
    (the same list for each). Keep the tensors alive until the engine replies."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    items = []
    for name, t in named_tensors:
        if not t.is_cuda:
            raise ValueError(f"{name}: CUDA-IPC weight sync needs CUDA tensors, got {t.device}")
        items.append((name, t.detach()))
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table = dict(pickler.dispatch_table or copyreg.dispatch_table)
    pickler.dispatch_table[torch.Tensor] = _reduce_cuda_tensor_by_uuid
    pickler.dispatch_table[torch.nn.Parameter] = _reduce_cuda_tensor_by_uuid
    pickler.dump(items)
    payload = base64.b64encode(buf.getvalue()).decode()
    return [payload] * tp_size


class TensorSync(EngineSync):
    """CUDA-IPC handles to engines on this trainer's GPU (their tp ranks each read their entry)."""

    def connect(self) -> None:
        if not torch.cuda.is_available():
            raise WeightSyncError("rollout.weight_sync=tensor hands CUDA-IPC handles to an engine on the trainer's "
                                  "GPU, and CUDA is not available here; use rollout.weight_sync=distributed or disk")
        self.tp = [int((self.engines.call(u, "/server_info", method="GET")[1] or {}).get("tp_size") or 1)
                   for u in self.urls]

    def push(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], n_buckets: int, version: int) -> None:
        self._probe()
        self._wait_for_one()

        def body():
            for i, bucket in enumerate(buckets):
                torch.cuda.synchronize()  # the optimizer's writes land before another process reads
                reqs = [{"serialized_named_tensors": serialize_named_tensors(bucket, tp), "load_format": None,
                         "flush_cache": False, "abort_all_requests": False,
                         "weight_version": str(version) if i == n_buckets - 1 else None} for tp in self.tp]
                by_url = dict(zip(self.urls, reqs))
                self._with_retries("/update_weights_from_tensor", lambda urls: [
                    (u, f.result()) for u, f in zip(urls, self.engines.start(
                        "/update_weights_from_tensor", [by_url[u] for u in urls], urls))])
        self._session(body)
        self.verify_version(version)
        if not self.live:
            raise WeightSyncError(f"weight push: no engine answered: {self._down_list()}")


def engines_of_rank(urls: Sequence[str], rank: int, world: int) -> list[str]:
    """Engine i is pushed to by trainer rank i % world: each engine gets one update per step."""
    return [u for i, u in enumerate(urls) if i % world == rank]
