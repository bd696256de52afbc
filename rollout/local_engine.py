"""A rollout engine on Hugging Face transformers: CPU for tests and the demo, or one GPU.

Requests from any thread (async `generate`, the HTTP server's handler threads) go into one queue;
a worker thread takes whatever is pending (up to `max_batch_size` sequences), left-pads it and runs
a batched decode loop with a KV cache. A sequence that finishes is reported at once and dropped
from the batch (its KV rows are removed), so short answers come back before long ones.
Weight updates take the same lock as a batch, so they land between batches, never inside one.

    python -c "from opd.tiny import build_model; build_model('/tmp/tiny')"
    python -c "from rollout.local_engine import LocalEngine; from rollout import SamplingParams, SyncEngine; \
print(SyncEngine(LocalEngine.from_pretrained('/tmp/tiny')).generate([[1, 2, 3]], SamplingParams(n=2)))"
"""

from __future__ import annotations

import asyncio
import glob
import inspect
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rollout.sampling import sample_tokens
from rollout.types import Rollout, SamplingParams


@dataclass
class SeqResult:
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | abort
    matched: int | str | None  # the stop token id / stop string, None for length
    policy_version: int
    prompt_len: int
    error: str | None = None


@dataclass
class _Seq:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None
    done: Callable[[SeqResult], None]
    out_ids: list[int] = field(default_factory=list)
    out_lp: list[float] = field(default_factory=list)
    rid: str | None = None
    abort_at: int | None = None  # finish with "abort" once this many tokens exist (0: before any)
    abort_message: str = "Aborted"


class LocalEngine:
    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 32, eos_token_ids: Sequence[int] | None = None,
                 policy_version: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        if eos_token_ids is None:
            eos = model.generation_config.eos_token_id if model.generation_config is not None else None
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos.append(tokenizer.eos_token_id)
            eos_token_ids = eos
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        pad = model.config.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        self._policy_version = policy_version
        # transformers 5.x renamed `past_key_values` to `cache`; use whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._lock = threading.Lock()  # held by a running batch or a weight update
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._queue: queue.Queue[_Seq | None] = queue.Queue()
        self._live: dict[int, _Seq] = {}  # submitted and not finished (for abort)
        self._live_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, daemon=True, name="local-engine")
        self._worker.start()

    @classmethod
    def from_pretrained(cls, model_dir: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        tok = AutoTokenizer.from_pretrained(model_dir)
        engine = cls(model, tok, **kw)
        engine.model_path = model_dir
        return engine

    # ---- interface -------------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self._policy_version

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int | None,
               done: Callable[[SeqResult], None], rid: str | None = None, abort_at: int | None = None) -> None:
        """Queue one sequence (n is ignored here); `done` is called from the worker thread.
        `rid` names it for `abort`; `abort_at` aborts it once it has that many tokens (a test hook)."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: a prompt needs at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass stop token ids instead")
        seq = _Seq(prompt_ids, params, seed, done, rid=rid, abort_at=abort_at)
        with self._live_lock:
            self._live[id(seq)] = seq
        self._queue.put(seq)

    def abort(self, rid: str | None = None, message: str = "Aborted") -> int:
        """Abort the unfinished sequence named `rid` (every one if None), as SGLang's /abort_request:
        each finishes with finish_reason "abort" and the tokens it has so far. Returns how many."""
        with self._live_lock:
            hit = [s for s in self._live.values() if rid is None or s.rid == rid]
            for s in hit:
                s.abort_at, s.abort_message = len(s.out_ids), message
        return len(hit)

    def num_unfinished(self) -> int:
        with self._live_lock:
            return len(self._live)

    def generate_blocking(self, requests: Sequence[tuple[Sequence[int], SamplingParams, int | None]],
                          rids: Sequence[str | None] | None = None,
                          abort_at: Sequence[int | None] | None = None) -> list[SeqResult]:
        """Run (prompt_ids, params, seed) requests and wait; results in request order."""
        results: list[SeqResult | None] = [None] * len(requests)
        left = threading.Semaphore(0)

        def make_done(i):
            def done(res):
                results[i] = res
                left.release()
            return done
        for i, (ids, params, seed) in enumerate(requests):
            self.submit(ids, params, seed, make_done(i), rid=rids[i] if rids else None,
                        abort_at=abort_at[i] if abort_at else None)
        for _ in requests:
            left.acquire()
        return results  # type: ignore[return-value]

    async def generate(self, prompt_ids_list, params: SamplingParams, *, group_ids=None, metadata=None):
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        total = 0
        for i, ids in enumerate(prompt_ids_list):
            for j in range(params.n):
                self.submit(ids, params, params.sample_seed(i, j),
                            lambda res, i=i, j=j: loop.call_soon_threadsafe(results.put_nowait, (i, j, res)))
                total += 1
        for _ in range(total):
            i, j, res = await results.get()
            if res.error is not None:
                raise RuntimeError(f"local engine failed: {res.error}")
            yield Rollout(
                prompt_ids=list(prompt_ids_list[i]), response_ids=res.output_ids, logprobs=res.logprobs,
                response_mask=[1] * len(res.output_ids), finish_reason=res.finish_reason,
                policy_version=res.policy_version, group_id=group_ids[i] if group_ids is not None else i,
                prompt_index=i, sample_index=j, metadata=dict(metadata[i]) if metadata is not None else {})

    async def update_weights_from_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        await asyncio.to_thread(self.load_state_dict_, state_dict, version)

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        await asyncio.to_thread(self.load_from_disk_, path, version)

    # ---- weights ---------------------------------------------------------------------------
    def load_state_dict_(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> None:
        """Copy tensors (HF names; a subset is fine) into the live model, then bump the version."""
        own = self.model.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            raise ValueError(f"unknown parameter names {unknown[:5]} (expected Hugging Face names such as "
                             f"{next(iter(own))!r})")
        for name, t in state_dict.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ValueError(f"shape of {name!r} is {tuple(t.shape)}, the model has {tuple(own[name].shape)}")
        with self._lock, torch.no_grad():
            for name, t in state_dict.items():
                own[name].copy_(t.to(device=own[name].device, dtype=own[name].dtype))
            if version is not None:
                self._policy_version = int(version)

    def load_from_disk_(self, path: str, version: int | None = None) -> None:
        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"no *.safetensors files in {path!r}")
        sd = {}
        for f in files:
            sd.update(load_file(f))
        self.load_state_dict_(sd, version)

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """float32 log_softmax of the logits at every prompt position ([L, vocab] on the CPU; row j
        is the distribution of the token after position j), between batches (waits out a pause),
        as SGLang's prefill-only scoring computes them: unscaled logits, no temperature."""
        self._unpaused.wait()
        with self._lock:
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def set_policy_version(self, version: int) -> None:
        self._policy_version = int(version)

    def pause(self) -> None:
        """Hold new batches (the running one finishes)."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the worker after the work already queued, and wait for it (unless paused): a daemon
        thread still inside a torch op when the interpreter exits can abort the process
        ("terminate called without an active exception", seen once at the end of `opd eval`)."""
        self._queue.put(None)
        if (self._unpaused.is_set() and self._worker.is_alive()
                and self._worker is not threading.current_thread()):
            self._worker.join(timeout_s)

    # ---- worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._unpaused.wait()
            with self._lock:
                try:
                    self._run_batch(batch)
                except Exception as e:  # report to every waiter instead of killing the worker
                    for s in batch:
                        if s.done is not None:
                            self._finish(s, "abort", None, self._policy_version, error=repr(e))

    def _finish(self, s: _Seq, reason: str, matched, version: int, error: str | None = None) -> None:
        with self._live_lock:
            self._live.pop(id(s), None)
        if reason == "abort" and error is None:
            error = s.abort_message
        s.done(SeqResult(s.out_ids, s.out_lp, reason, matched, version, len(s.prompt_ids), error=error))
        s.done = None

    def _stop_reason(self, s: _Seq, tok: int):
        p = s.params
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            return "stop", tok
        if p.stop_strings:
            longest = max(len(x) for x in p.stop_strings)
            tail = self.tokenizer.decode(s.out_ids[-(longest + 4):], skip_special_tokens=False)
            for x in p.stop_strings:
                if x in tail:
                    return "stop", x
        if len(s.out_ids) >= p.max_new_tokens:
            return "length", None
        return None, None

    @torch.no_grad()
    def _run_batch(self, seqs: list[_Seq]) -> None:
        from transformers import DynamicCache

        version = self._policy_version
        for s in seqs:
            if s.abort_at == 0:
                self._finish(s, "abort", None, version)
            elif s.params.max_new_tokens == 0:
                self._finish(s, "length", None, version)
        seqs = [s for s in seqs if s.done is not None]
        if not seqs:
            return
        dev = self.device
        B, L = len(seqs), max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long, device=dev)
        attn = torch.zeros((B, L), dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):  # left padding: every row's next token sits at column L
            input_ids[i, L - len(s.prompt_ids):] = torch.tensor(s.prompt_ids, device=dev)
            attn[i, L - len(s.prompt_ids):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        temp = torch.tensor([s.params.temperature for s in seqs], device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], device=dev)
        gens = []
        for s in seqs:
            g = None
            if s.seed is not None:
                g = torch.Generator(device=dev)
                g.manual_seed(s.seed)
            gens.append(g)
        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                            use_cache=True, **{self._cache_kw: cache}).logits[:, -1, :]
        next_pos = pos[:, -1:] + 1
        while True:
            ids_B, lp_B = sample_tokens(logits, temp, top_p, top_k, gens)
            ids, lps = ids_B.tolist(), lp_B.tolist()
            keep = []
            for i, s in enumerate(seqs):
                s.out_ids.append(ids[i])
                s.out_lp.append(lps[i])
                reason, matched = self._stop_reason(s, ids[i])
                if reason is None and s.abort_at is not None and len(s.out_ids) >= s.abort_at:
                    reason, matched = "abort", None
                if reason is None:
                    keep.append(i)
                else:
                    self._finish(s, reason, matched, version)
            if not keep:
                return
            if len(keep) < len(seqs):  # drop finished rows from the batch and the KV cache
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                seqs = [seqs[i] for i in keep]
                attn, next_pos, ids_B = attn[idx], next_pos[idx], ids_B[idx]
                temp, top_p, top_k = temp[idx], top_p[idx], top_k[idx]
                gens = [gens[i] for i in keep]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            logits = self.model(input_ids=ids_B[:, None], attention_mask=attn, position_ids=next_pos,
                                use_cache=True, **{self._cache_kw: cache}).logits[:, -1, :]
            next_pos = next_pos + 1
