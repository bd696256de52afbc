"""Rollouts from SGLang servers through the native HTTP API, token ids in and out.

Checked against SGLang 0.5.23 (http_server.py / io_struct.py; fields in docs/rollout.md). Each
sample is its own /generate request (n=1, `sampling_seed` derived per sample), so every rollout
comes back as soon as it finishes and samples spread over the servers round-robin (or through one
sglang-router URL). Nothing is re-tokenised: `input_ids` go in, `output_ids` and
`meta_info.output_token_logprobs` ([logprob, token_id, text|null] triples) come out.

Control calls (weights, cache, memory, pause) go to every worker's own URL, never the router,
which has no routes for them.

Failures (docs/rollout.md, "SGLang semantics"): a sample that comes back aborted
(`finish_reason` abort, partial tokens) or whose request fails is retried up to `max_attempts`
times, then dropped and counted in `stats`; it never comes out of `generate`. An engine that
does not answer (connection refused, timeout, 502/503/504) is skipped with a warning and probed
on `/health` with exponential backoff; it rejoins once healthy and on the same weight version as
the engines in service (after a reload of the last disk checkpoint if it missed one).
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rollout.types import Rollout, SamplingParams

SGLANG_VERSION_CHECKED = "0.5.23"
API_KEY_ENV = "OPD_ROLLOUT_API_KEY"  # read when no api_key is passed (SGLang itself takes --api-key only)
ADMIN_API_KEY_ENV = "OPD_ROLLOUT_ADMIN_API_KEY"
log = logging.getLogger("opd.rollout")


class SGLangError(RuntimeError):
    pass


class SGLangRequestError(SGLangError):
    """The engine refused the request itself (4xx): retrying the same body cannot help."""


class EngineDown(SGLangError):
    """The engine did not answer (connection refused or reset, timeout, 502/503/504)."""


@dataclass
class _Worker:
    url: str
    alive: bool = True
    backoff_s: float = 0.0
    next_probe: float = 0.0
    probing: bool = False


def http_json(url: str, body: dict | None = None, *, method: str = "POST", timeout_s: float = 3600.0,
              api_key: str | None = None):
    """One JSON request with the standard library. Returns (status, parsed body or text or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    if not raw:
        return status, None
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


@dataclass
class GenerateOutput:
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | abort
    matched: int | str | None
    weight_version: str | None
    prompt_tokens: int | None
    abort_message: str | None = None


def parse_generate_item(item: dict) -> GenerateOutput:
    """One element of a /generate response (see tests/fixtures/sglang/). 0.4.x responses have no
    `output_ids`; the ids are then the second element of each output_token_logprobs entry."""
    meta = item.get("meta_info")
    if not isinstance(meta, dict):
        raise SGLangError(f"/generate item has no meta_info: keys {sorted(item)}")
    lps = meta.get("output_token_logprobs")
    if lps is None:
        raise SGLangError("/generate response has no meta_info.output_token_logprobs; send return_logprob: true")
    ids = item.get("output_ids")
    if ids is None:
        ids = [int(e[1]) for e in lps]
    if len(ids) != len(lps) or any(int(e[1]) != t for e, t in zip(lps, ids)):
        raise SGLangError(f"output_ids ({len(ids)}) and output_token_logprobs ({len(lps)}) do not line up")
    fr = meta.get("finish_reason") or {}
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind not in ("stop", "length", "abort"):
        raise SGLangError(f"unexpected finish_reason {fr!r}")
    return GenerateOutput(output_ids=[int(t) for t in ids], logprobs=[float(e[0]) for e in lps], finish_reason=kind,
                          matched=fr.get("matched") if isinstance(fr, dict) else None,
                          weight_version=meta.get("weight_version"), prompt_tokens=meta.get("prompt_tokens"),
                          abort_message=fr.get("message") if isinstance(fr, dict) else None)


def to_sglang_sampling_params(params: SamplingParams, seed: int | None) -> dict:
    sp = {"n": 1, "temperature": params.temperature, "top_p": params.top_p,
          "top_k": params.top_k if params.top_k > 0 else -1, "max_new_tokens": params.max_new_tokens,
          "skip_special_tokens": False, "no_stop_trim": True}
    if params.stop_token_ids:
        sp["stop_token_ids"] = list(params.stop_token_ids)
    if params.stop_strings:  # rejected by servers started with --skip-tokenizer-init
        sp["stop"] = list(params.stop_strings)
    if params.ignore_eos:
        sp["ignore_eos"] = True
    if seed is not None:  # honoured by SGLang only with --enable-deterministic-inference
        sp["sampling_seed"] = seed
    return sp


class SGLangEngine:
    """`RolloutEngine` over one or more SGLang servers.

    urls: every worker (control calls go to each); router_url: if set, /generate goes there only.
    sync_dir: where update_weights_from_state_dict writes safetensors for the disk path (it must be
    visible to the servers); base_model_dir: its config/tokenizer files are copied beside them.
    """

    def __init__(self, urls: str | Sequence[str], *, router_url: str | None = None, max_concurrency: int = 64,
                 timeout_s: float = 3600.0, api_key: str | None = None, admin_api_key: str | None = None,
                 sync_dir: str | None = None, base_model_dir: str | None = None, policy_version: int = 0,
                 max_attempts: int = 3, retry_backoff_s: float = 0.5, probe_backoff_s: float = 1.0,
                 max_probe_backoff_s: float = 30.0, wait_for_engine_s: float = 600.0):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self._targets = [self.router_url] if self.router_url else self.urls  # where /generate goes
        self._workers = {u: _Worker(u) for u in self.urls + self._targets}
        self._rr_next = 0
        self._lock = threading.Lock()
        api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        admin_api_key = admin_api_key if admin_api_key is not None else (os.environ.get(ADMIN_API_KEY_ENV) or None)
        self.timeout_s, self.api_key, self.admin_api_key = timeout_s, api_key, admin_api_key
        self.sync_dir, self.base_model_dir = sync_dir, base_model_dir
        self.max_attempts, self.retry_backoff_s = max(1, max_attempts), retry_backoff_s
        self.probe_backoff_s, self.max_probe_backoff_s = probe_backoff_s, max_probe_backoff_s
        self.wait_for_engine_s = wait_for_engine_s  # every engine down: a request waits this long for one
        # aborted: samples that came back with finish_reason abort; failed: requests that errored;
        # retried: attempts after the first; dropped: samples given up; engine_down / engine_rejoined.
        self.stats: collections.Counter = collections.Counter()
        self.last_error: str | None = None
        self._last_disk: tuple[str, int] | None = None  # the newest /update_weights_from_disk, for rejoining engines
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="sglang-http")
        self._policy_version = policy_version
        self._trainer_pushes = False  # weights_pushed() was called: every push names its version

    @property
    def policy_version(self) -> int:
        return self._policy_version

    # ---- generation ------------------------------------------------------------------------
    async def _post(self, url: str, body: dict, admin: bool = False, method: str = "POST", timeout_s=None):
        loop = asyncio.get_running_loop()
        key = self.admin_api_key if (admin and self.admin_api_key) else self.api_key
        return await loop.run_in_executor(self._pool, lambda: http_json(
            url, body, method=method, timeout_s=timeout_s or self.timeout_s, api_key=key))

    # ---- engines that stop answering --------------------------------------------------------
    def _mark_down(self, url: str, why: str) -> None:
        with self._lock:
            w = self._workers[url]
            if not w.alive:
                return
            w.alive, w.backoff_s = False, self.probe_backoff_s
            w.next_probe = time.monotonic() + w.backoff_s
            self.stats["engine_down"] += 1
        log.warning("rollout engine %s is down (%s): skipped until /health answers", url, why)

    def alive_urls(self, urls: Sequence[str] | None = None) -> list[str]:
        with self._lock:
            return [u for u in (urls or self.urls) if self._workers[u].alive]

    def _probe(self, w: _Worker) -> None:
        """/health, then the weight version: a rejoining engine must serve the weights the others
        serve (it gets the newest disk checkpoint if it missed it)."""
        ok, why = False, ""
        try:
            status, _ = http_json(w.url + "/health", method="GET", timeout_s=10, api_key=self.api_key)
            ok = status == 200
            why = f"/health {status}"
            if ok and w.url != self.router_url:
                ok, why = self._catch_up(w.url)
        except OSError as e:
            why = repr(e)
        with self._lock:
            w.probing = False
            if ok:
                w.alive, w.backoff_s = True, 0.0
                self.stats["engine_rejoined"] += 1
            else:
                w.backoff_s = min(max(w.backoff_s, self.probe_backoff_s) * 2, self.max_probe_backoff_s)
                w.next_probe = time.monotonic() + w.backoff_s
        if ok:
            log.warning("rollout engine %s is healthy again and rejoins", w.url)
        else:
            log.info("rollout engine %s still out (%s); next probe in %.1fs", w.url, why, w.backoff_s)

    def _version_of(self, url: str) -> str | None:
        status, info = http_json(url + "/model_info", method="GET", timeout_s=10, api_key=self.api_key)
        if status != 200 or not isinstance(info, dict):
            raise OSError(f"/model_info returned {status}")
        return info.get("weight_version")

    def _catch_up(self, url: str) -> tuple[bool, str]:
        others = [u for u in self.alive_urls() if u != url]
        if not others:
            return True, ""
        want, have = self._version_of(others[0]), self._version_of(url)
        if want == have:
            return True, ""
        if self._last_disk is None or str(self._last_disk[1]) != str(want):
            return False, f"weight_version {have!r}, the engines in service have {want!r}"
        path, version = self._last_disk
        status, r = http_json(url + "/update_weights_from_disk", {"model_path": path, "weight_version": str(version),
                              "flush_cache": True}, timeout_s=self.timeout_s, api_key=self.admin_api_key or self.api_key)
        if status != 200 or not (isinstance(r, dict) and r.get("success")):
            return False, f"reloading {path}: {status} {r}"
        return True, ""

    def weights_pushed(self, version: int, disk_path: str | None = None, in_service: Sequence[str] = ()) -> None:
        """The trainer pushed `version` itself (rollout.weight_sync): an engine that rejoins later
        catches up from `disk_path` (a whole checkpoint) if given; engines down here that the push
        reached (and that reported `version` to it) are back in service at once."""
        self._trainer_pushes = True
        if disk_path is not None:
            self._last_disk = (disk_path, int(version))
        back = []
        with self._lock:
            for u in in_service:
                w = self._workers.get(u.rstrip("/"))
                if w is not None and not w.alive and not w.probing:
                    w.alive, w.backoff_s = True, 0.0
                    self.stats["engine_rejoined"] += 1
                    back.append(w.url)
        for u in back:
            log.warning("rollout engine %s rejoins with weight_version %s", u, version)

    def _pick(self) -> str | None:
        """The next /generate target round-robin over the healthy ones (probing those due)."""
        now = time.monotonic()
        with self._lock:
            due = [self._workers[u] for u in self._targets
                   if not self._workers[u].alive and not self._workers[u].probing and self._workers[u].next_probe <= now]
            for w in due:
                w.probing = True
        for w in due:
            self._probe(w)
        with self._lock:
            alive = [u for u in self._targets if self._workers[u].alive]
            if not alive:
                return None
            self._rr_next += 1
            return alive[self._rr_next % len(alive)]

    # ---- generation ------------------------------------------------------------------------
    def _generate_sync(self, body: dict) -> GenerateOutput:
        url, deadline = self._pick(), time.monotonic() + self.wait_for_engine_s
        while url is None:  # every engine is down: wait for the next probe rather than spend attempts
            with self._lock:
                due = min(self._workers[u].next_probe for u in self._targets)
            if time.monotonic() >= deadline:
                raise EngineDown(f"no rollout engine answered for {self.wait_for_engine_s:.0f} s: "
                                 + ", ".join(self._targets))
            time.sleep(min(max(due - time.monotonic(), 0.05), max(deadline - time.monotonic(), 0.0), 5.0))
            url = self._pick()
        key = self.api_key
        try:
            status, resp = http_json(url + "/generate", body, timeout_s=self.timeout_s, api_key=key)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off
            self._mark_down(url, repr(e))
            raise EngineDown(f"{url}/generate: {e!r}") from e
        if status in (502, 503, 504):
            self._mark_down(url, f"HTTP {status}")
            raise EngineDown(f"{url}/generate returned {status}: {resp}")
        if 400 <= status < 500:
            raise SGLangRequestError(f"{url}/generate returned {status}: {resp}")
        if status != 200:
            raise SGLangError(f"{url}/generate returned {status}: {resp}")
        return parse_generate_item(resp)

    async def generate_one(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int | None = None,
                           rid: str | None = None) -> GenerateOutput:
        """One /generate call (no retry); raises SGLangError (EngineDown, SGLangRequestError) on failure."""
        body = {"input_ids": list(prompt_ids), "sampling_params": to_sglang_sampling_params(params, seed),
                "return_logprob": True}
        if rid is not None:
            body["rid"] = rid
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._generate_sync, body)  # the pool bounds concurrency

    async def sample(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int | None = None,
                     rid: str | None = None) -> GenerateOutput | None:
        """One finished sample, or None once `max_attempts` attempts were aborted or failed (counted
        in `stats`). A refused request (4xx) is not retried: the same body would be refused again."""
        why = ""
        for attempt in range(self.max_attempts):
            if attempt:
                self.stats["retried"] += 1
                await asyncio.sleep(min(self.retry_backoff_s * 2 ** (attempt - 1), 10.0))
            try:
                out = await self.generate_one(prompt_ids, params, seed, rid)
            except SGLangRequestError as e:
                self.stats["failed"] += 1
                why = str(e)
                break
            except SGLangError as e:
                self.stats["failed"] += 1
                why = str(e)
                continue
            if out.finish_reason != "abort":
                return out
            self.stats["aborted"] += 1
            why = f"aborted after {len(out.output_ids)} tokens: {out.abort_message}"
        self.stats["dropped"] += 1
        self.last_error = why
        log.warning("a rollout was dropped after %d attempt(s): %s", attempt + 1, why)
        return None

    async def generate(self, prompt_ids_list, params: SamplingParams, *, group_ids=None, metadata=None):
        """Finished samples as they complete. Aborted or failed ones are retried, then left out
        (see `stats`): a caller that needs whole groups checks which samples came."""
        async def one(i, j):
            out = await self.sample(prompt_ids_list[i], params, params.sample_seed(i, j))
            return i, j, out
        tasks = [asyncio.ensure_future(one(i, j)) for i in range(len(prompt_ids_list)) for j in range(params.n)]
        try:
            for fut in asyncio.as_completed(tasks):
                i, j, out = await fut
                if out is None:
                    continue
                version = self._policy_version
                if out.weight_version is not None and str(out.weight_version).lstrip("-").isdigit():
                    version = int(out.weight_version)
                elif self._trainer_pushes:  # an engine that does not say which weights it has (a restart's
                    version = -1            # "default") is older than any push: never current

                yield Rollout(prompt_ids=list(prompt_ids_list[i]), response_ids=out.output_ids, logprobs=out.logprobs,
                              response_mask=[1] * len(out.output_ids), finish_reason=out.finish_reason,
                              policy_version=version, group_id=group_ids[i] if group_ids is not None else i,
                              prompt_index=i, sample_index=j,
                              metadata=dict(metadata[i]) if metadata is not None else {})
        finally:
            for t in tasks:
                t.cancel()

    # ---- control: each call goes to every worker ------------------------------------------
    async def _all(self, path: str, body: dict | None = None, ok=(200,), skip_down: bool = False) -> list:
        """`path` on every worker. skip_down: workers that are down are left out, and one that does
        not answer is marked down instead of failing the call (it catches up when it rejoins)."""
        urls = self.alive_urls() if skip_down else self.urls
        if not urls:
            raise EngineDown(f"{path}: no rollout engine is reachable: " + ", ".join(self.urls))

        async def one(u):
            try:
                return await self._post(u + path, body or {}, admin=True)
            except OSError as e:
                if not skip_down:
                    raise
                self._mark_down(u, repr(e))
                return None
        replies = await asyncio.gather(*(one(u) for u in urls))
        bad = [(u, s, r) for u, rep in zip(urls, replies) if rep is not None for s, r in [rep]
               if s not in ok or (isinstance(r, dict) and r.get("success") is False)]
        if bad:
            raise SGLangError(f"{path} failed: " + "; ".join(f"{u}: {s} {r}" for u, s, r in bad))
        if all(r is None for r in replies):
            raise EngineDown(f"{path}: no rollout engine answered: " + ", ".join(urls))
        return [rep[1] for rep in replies if rep is not None]

    async def health(self) -> bool:
        """Every worker's /health (SGLang leaves it open; the key is sent anyway)."""
        async def one(u):
            try:
                return (await self._post(u + "/health", None, method="GET", timeout_s=30))[0]
            except OSError:
                return None
        return all(s == 200 for s in await asyncio.gather(*(one(u) for u in self.urls)))

    async def model_info(self) -> dict:
        url = (self.alive_urls() or self.urls)[0]
        s, r = await self._post(url + "/model_info", None, method="GET", timeout_s=60)
        if 400 <= s < 500:
            raise SGLangRequestError(f"{url}/model_info returned {s}: {r}")
        if s != 200:
            raise SGLangError(f"{url}/model_info returned {s}: {r}")
        return r

    async def update_weights_from_disk(self, path: str, version: int, flush_cache: bool = True) -> None:
        """Every live worker reloads `path`; one that is down gets it when it rejoins."""
        self._last_disk = (path, int(version))
        await self._all("/update_weights_from_disk", {"model_path": path, "weight_version": str(version),
                                                      "flush_cache": flush_cache}, skip_down=True)
        self._policy_version = int(version)

    async def update_weights_from_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Portable path: safetensors into sync_dir/v{version}, then /update_weights_from_disk.
        On GPUs prefer rollout.weight_sync (NCCL broadcast or CUDA-IPC handles)."""
        if self.sync_dir is None:
            raise ValueError("SGLangEngine(sync_dir=...) is required for update_weights_from_state_dict")
        from safetensors.torch import save_file

        out = os.path.join(self.sync_dir, f"v{version}")
        os.makedirs(out, exist_ok=True)
        if self.base_model_dir:
            for f in os.listdir(self.base_model_dir):
                if not f.endswith((".safetensors", ".bin", ".pt")) and os.path.isfile(os.path.join(self.base_model_dir, f)):
                    shutil.copy(os.path.join(self.base_model_dir, f), out)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        await asyncio.to_thread(save_file, tensors, os.path.join(out, "model.safetensors"))
        await self.update_weights_from_disk(out, version)

    async def flush_cache(self) -> None:
        await self._all("/flush_cache")

    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        await self._all("/release_memory_occupation", {"tags": list(tags) if tags else None})

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        await self._all("/resume_memory_occupation", {"tags": list(tags) if tags else None})

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._all("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self._all("/continue_generation", {})

    async def begin_weight_update(self) -> None:
        await self._all("/begin_weight_update", {"selector": "all"})

    async def end_weight_update(self) -> None:
        await self._all("/end_weight_update", {})

    async def init_weights_update_group(self, master_address: str, master_port: int, gpus_per_engine: Sequence[int],
                                        group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        """Engine i joins as ranks rank_offset_i + tp_rank; the trainer is rank 0 (weight_sync.py)."""
        world_size = 1 + sum(gpus_per_engine)
        offsets = [1 + sum(gpus_per_engine[:i]) for i in range(len(self.urls))]
        replies = await asyncio.gather(*(self._post(u + "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": off,
            "world_size": world_size, "group_name": group_name, "backend": backend}, admin=True)
            for u, off in zip(self.urls, offsets)))
        for u, (s, r) in zip(self.urls, replies):
            if s != 200 or not (isinstance(r, dict) and r.get("success")):
                raise SGLangError(f"{u}/init_weights_update_group failed: {s} {r}")

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], version: int | None,
                                              group_name: str = "weight_update_group",
                                              load_format: str | None = None) -> None:
        """The metadata half of one NCCL bucket; the trainer broadcasts the tensors meanwhile."""
        body = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                "group_name": group_name, "flush_cache": False, "load_format": load_format,
                "weight_version": None if version is None else str(version)}
        await self._all("/update_weights_from_distributed", body)
        if version is not None:
            self._policy_version = int(version)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        await self._all("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_tensor(self, serialized_named_tensors: Sequence[str], version: int | None,
                                         load_format: str | None = None) -> None:
        """CUDA-IPC path; one serialized entry per TP rank (see weight_sync.serialize_named_tensors)."""
        await self._all("/update_weights_from_tensor", {
            "serialized_named_tensors": list(serialized_named_tensors), "load_format": load_format,
            "flush_cache": False, "weight_version": None if version is None else str(version)})
        if version is not None:
            self._policy_version = int(version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
