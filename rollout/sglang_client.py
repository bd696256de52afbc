"""Rollouts from SGLang servers through the native HTTP API, token ids in and out.

Checked against SGLang 0.5.23 (http_server.py / io_struct.py; fields in docs/rollout.md). Each
sample is its own /generate request (n=1, `sampling_seed` derived per sample), so every rollout
comes back as soon as it finishes and samples spread over the servers round-robin (or through one
sglang-router URL). Nothing is re-tokenised: `input_ids` go in, `output_ids` and
`meta_info.output_token_logprobs` ([logprob, token_id, text|null] triples) come out.

Control calls (weights, cache, memory, pause) go to every worker's own URL, never the router,
which has no routes for them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rollout.types import Rollout, SamplingParams

SGLANG_VERSION_CHECKED = "0.5.23"


class SGLangError(RuntimeError):
    pass


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
                 sync_dir: str | None = None, base_model_dir: str | None = None, policy_version: int = 0):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self._rr = itertools.cycle([self.router_url] if self.router_url else self.urls)
        self.timeout_s, self.api_key, self.admin_api_key = timeout_s, api_key, admin_api_key
        self.sync_dir, self.base_model_dir = sync_dir, base_model_dir
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="sglang-http")
        self._policy_version = policy_version

    @property
    def policy_version(self) -> int:
        return self._policy_version

    # ---- generation ------------------------------------------------------------------------
    async def _post(self, url: str, body: dict, admin: bool = False):
        loop = asyncio.get_running_loop()
        key = self.admin_api_key if (admin and self.admin_api_key) else self.api_key
        return await loop.run_in_executor(
            self._pool, lambda: http_json(url, body, timeout_s=self.timeout_s, api_key=key))

    async def generate_one(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int | None = None,
                           rid: str | None = None) -> GenerateOutput:
        body = {"input_ids": list(prompt_ids), "sampling_params": to_sglang_sampling_params(params, seed),
                "return_logprob": True}
        if rid is not None:
            body["rid"] = rid
        url = next(self._rr)
        status, resp = await self._post(url + "/generate", body)  # the pool bounds concurrency
        if status != 200:
            raise SGLangError(f"{url}/generate returned {status}: {resp}")
        return parse_generate_item(resp)

    async def generate(self, prompt_ids_list, params: SamplingParams, *, group_ids=None, metadata=None):
        async def one(i, j):
            out = await self.generate_one(prompt_ids_list[i], params, params.sample_seed(i, j))
            return i, j, out
        tasks = [asyncio.ensure_future(one(i, j)) for i in range(len(prompt_ids_list)) for j in range(params.n)]
        try:
            for fut in asyncio.as_completed(tasks):
                i, j, out = await fut
                version = self._policy_version
                if out.weight_version is not None and str(out.weight_version).lstrip("-").isdigit():
                    version = int(out.weight_version)
                yield Rollout(prompt_ids=list(prompt_ids_list[i]), response_ids=out.output_ids, logprobs=out.logprobs,
                              response_mask=[1] * len(out.output_ids), finish_reason=out.finish_reason,
                              policy_version=version, group_id=group_ids[i] if group_ids is not None else i,
                              prompt_index=i, sample_index=j,
                              metadata=dict(metadata[i]) if metadata is not None else {})
        finally:
            for t in tasks:
                t.cancel()

    # ---- control: each call goes to every worker ------------------------------------------
    async def _all(self, path: str, body: dict | None = None, ok=(200,)) -> list:
        replies = await asyncio.gather(*(self._post(u + path, body or {}, admin=True) for u in self.urls))
        bad = [(u, s, r) for u, (s, r) in zip(self.urls, replies) if s not in ok or
               (isinstance(r, dict) and r.get("success") is False)]
        if bad:
            raise SGLangError(f"{path} failed: " + "; ".join(f"{u}: {s} {r}" for u, s, r in bad))
        return [r for _, r in replies]

    async def health(self) -> bool:
        replies = await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(
            self._pool, lambda u=u: http_json(u + "/health", method="GET", timeout_s=30)) for u in self.urls))
        return all(s == 200 for s, _ in replies)

    async def model_info(self) -> dict:
        loop = asyncio.get_running_loop()
        s, r = await loop.run_in_executor(self._pool, lambda: http_json(self.urls[0] + "/model_info", method="GET"))
        if s != 200:
            raise SGLangError(f"/model_info returned {s}: {r}")
        return r

    async def update_weights_from_disk(self, path: str, version: int, flush_cache: bool = True) -> None:
        await self._all("/update_weights_from_disk", {"model_path": path, "weight_version": str(version),
                                                      "flush_cache": flush_cache})
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
        """CUDA-IPC path; one serialized entry per TP rank (see weight_sync.serialize_for_sglang)."""
        await self._all("/update_weights_from_tensor", {
            "serialized_named_tensors": list(serialized_named_tensors), "load_format": load_format,
            "flush_cache": False, "weight_version": None if version is None else str(version)})
        if version is not None:
            self._policy_version = int(version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
