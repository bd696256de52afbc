"""The on-policy distillation loop.

    prompts -> rollout engine -> each finished rollout goes straight to the teacher server
            -> loss (chunked, from the student's hidden states) -> optimizer step -> weights
            back to the rollout engine

A producer thread generates step s's rollouts and scores them with the teacher while the trainer
thread trains step s-1 (staleness 1) or waits for it (staleness 0, strictly on-policy: the
producer starts step s only once the weights of step s-1 reached the rollout engine). Each phase
records how long it waited on the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import math
import os
import queue
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from student_trainer import losses as L
from student_trainer.batching import Sample, attention_mask_for, build_micro_batch, pack, teacher_arrays
from student_trainer.config import ConfigError, LossCfg, TrainConfig
from student_trainer.observe import RunLog

log = logging.getLogger("opd.train")


class StudentWithLoss(torch.nn.Module):
    """The student plus the fused loss, so ZeRO sees one forward per micro-batch."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def hidden_states(self, mb) -> torch.Tensor:
        """The body's last hidden states of a packed micro-batch, [L, H] (the block mask in the
        form the model's attention implementation honours)."""
        body = self.student.get_decoder()
        impl = getattr(self.student.config, "_attn_implementation", None) or "sdpa"
        mask = attention_mask_for(mb.attention_mask, impl, body.get_input_embeddings().weight.dtype)
        return body(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mask,
                    use_cache=False).last_hidden_state[0]

    @torch.no_grad()
    def top_ids(self, samples: list, k: int, temperature: float, budget: int, device) -> list:
        """The student's own top-k ids at every response position of each sample, [n_resp, k] int64
        arrays (sorted ascending): what ``teacher.student_top_k`` sends to the teacher."""
        out = []
        for group in pack(samples, budget):
            mb = _to(build_micro_batch(group), torch.device(device))
            h = self.hidden_states(mb).index_select(0, mb.rows)
            ids = L.student_topk_ids(h, self.student.get_output_embeddings().weight, k, temperature).cpu().numpy()
            off = 0
            for s in group:
                out.append(ids[off:off + s.num_response])
                off += s.num_response
        return out

    def forward(self, mb, loss_cfg: L.DistillLossConfig, global_tokens, global_seqs, keep_ratio: float = 1.0,
                token_score: str = "product"):
        hidden = self.hidden_states(mb)
        weight = self.student.get_output_embeddings().weight
        h = hidden.index_select(0, mb.rows)
        mask = mb.mask
        if keep_ratio < 1.0 and mb.stats is not None:
            # TIP: pick tokens before the head, from a cheap no-grad scoring pass
            scores = L.score_tokens(h.detach(), weight.detach(), mb.stats, temperature=loss_cfg.temperature,
                                    chunk_size=loss_cfg.chunk_size, form=token_score)
            scores = torch.where(mask > 0, scores, torch.full_like(scores, -float("inf")))
            keep = L.select_tokens(scores, ratio=keep_ratio, mode="top")
            sel = torch.zeros_like(mask)
            sel[keep] = 1.0
            mask = mask * sel
        return L.distill_loss(h, weight, mb.targets, mb.stats, mask, loss_cfg, global_tokens,
                              seq_ids_N=mb.seq_ids, global_seqs=global_seqs,
                              rollout_logprobs_N=mb.rollout_logprobs, advantages_N=mb.advantages)


@dataclass
class StepData:
    step: int
    samples: list[Sample]
    timings: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)


def _loss_terms(cfg: TrainConfig, step: int, warm: bool) -> tuple:
    lc = cfg.loss
    if warm:  # teacher-generated rollouts: forward KL, or plain NLL of the teacher's samples for sft
        return (("sft", 1.0),) if lc.objective == "sft" else (("forward_kl", 1.0),)
    if lc.objective == "grpo":
        return (("ppo", 1.0),)
    if lc.objective == "sft":
        return (("sft", 1.0),)
    distill = (L.ForwardToReverseKL(lc.fkl_to_rkl_switch_step, lc.fkl_to_rkl_window)
               if lc.fkl_to_rkl_switch_step >= 0 else lc.divergence)
    rl = lc.rl_weight if lc.objective == "opd+grpo" else 0.0
    return L.ObjectiveMix(distill=distill, rl_weight=rl, sft_weight=lc.sft_weight).terms(step)


def _zero_signal_reason(samples: list[Sample], terms: tuple) -> str | None:
    """Why the loss of every sample of a step is exactly 0 (the step trains nothing), or None."""
    if not samples:
        return None
    if all(s.weight == 0 for s in samples):
        return ("every sample weight is 0 (PACED, loss.sample_weighting=paced: each prompt group's pass rate is "
                "0 or 1, e.g. a student at 0% accuracy)")
    if all(sum(s.response_mask) == 0 for s in samples):
        return "no model-generated token to score (every response token is a tool/environment token)"
    if {n for n, w in terms if w} <= {"ppo"} and all(s.advantage == 0 for s in samples):
        return ("every GRPO advantage is 0: every prompt group has equal rewards (e.g. a student at 0% "
                "accuracy); raise rollout.n, change the task or warm the student up first")
    return None


def _loss_config(lc: LossCfg, terms: tuple) -> L.DistillLossConfig:
    return L.DistillLossConfig(terms=terms, support=lc.support, temperature=lc.temperature, beta=lc.beta,
                               gamma=lc.gamma, clip_eps=lc.clip_eps, chunk_size=lc.chunk_size,
                               reduction=lc.reduction, fp32_weight_grad=lc.fp32_weight_grad, metrics=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, on_step=None):
        self.cfg, self.on_step = cfg, on_step
        self.device = resolve_train_device(cfg.run.device)
        self.out = Path(cfg.run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.student)
        dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        student = _load_causal_lm(cfg.model.student, dtype, cfg.model.random_init, self.device,
                                  attn_implementation=cfg.model.attn_implementation)
        if cfg.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        # from_pretrained returns the model in eval mode, where HF skips gradient checkpointing
        # (and dropout): the trained copy is in train mode
        student.train()
        student.config.use_cache = False
        self.vocab = int(student.get_output_embeddings().weight.shape[0])
        self.data = self._data_source()  # bad data settings fail before any network wait
        self.teacher = self._connect_teacher() if cfg.teacher.url and cfg.loss.objective not in ("grpo", "sft") else None
        from student_trainer.ds_engine import Engine

        log.info("student %s loaded (vocab %d); starting DeepSpeed", cfg.model.student, self.vocab)

        self.engine = Engine(StudentWithLoss(student), cfg.optim, cfg.model.dtype, cfg.run.steps, self.device)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.start_step = 0
        self.zero_signal_steps = 0  # steps whose loss was exactly 0 for every sample (this process)
        if resume:
            self.start_step = self._load_latest()
        self.rollout = self._rollout_engine(cfg.model.student)
        self.warm_rollout = None
        if cfg.warmup.steps > 0:  # teacher rollouts: never the student's engines
            self.warm_rollout = (self._rollout_engine("", cfg.warmup.rollout_url) if cfg.rollout.engine == "sglang"
                                 else self._rollout_engine(cfg.warmup.teacher_model))
        self.version = self.start_step
        self.wsync = self._weight_sync()
        self._sync_weights(self.start_step)
        log.info("DeepSpeed ZeRO-%d and the %s rollout engine ready", cfg.optim.zero_stage, cfg.rollout.engine)
        self.log = RunLog(self.out, cfg, resume=resume, enabled=self.rank == 0)
        self._version_cv = threading.Condition()

    # ---- set-up ----------------------------------------------------------------------------------
    def _connect_teacher(self):
        from teacher_server.client import ScoreSettings, TeacherClient, TokenizerMismatchError

        t = self.cfg.teacher
        stats = ["sampled", "topk", "tail"] + (["extra"] if t.student_top_k else []) + (
            ["full"] if self.cfg.loss.support == "full" else [])
        client = TeacherClient(t.url, settings=ScoreSettings(top_k=t.top_k, statistics=tuple(stats),
                                                             temperature=self.cfg.loss.temperature,
                                                             value_encoding=t.value_encoding, compression=t.compression),
                               timeout_s=t.timeout_s, max_retries=t.max_retries, max_backoff_s=t.max_backoff_s,
                               token=t.token or None)
        info = client.info()
        # the chat template first (the tokenizer fingerprint covers it too, but says less)
        if (self.tokenizer.chat_template or "") != info.chat_template and not t.allow_tokenizer_mismatch:
            raise ConfigError("teacher.url: the teacher's chat template differs from the student's; prompts would be "
                              "formatted differently on the two sides (teacher.allow_tokenizer_mismatch=true overrides)")
        try:
            client.check_tokenizer(self.tokenizer, t.allow_tokenizer_mismatch)
        except TokenizerMismatchError as exc:
            raise ConfigError(f"teacher.url: {exc} (config key: teacher.allow_tokenizer_mismatch=true)") from None
        if info.vocab_size < self.vocab:
            raise ConfigError(f"teacher.url: the teacher's logit width {info.vocab_size} is smaller than the "
                              f"student's {self.vocab}; they cannot share token ids")
        if info.vocab_size > self.vocab:
            log.info("teacher logit width %d > student %d: padded teacher rows are folded into the tail",
                     info.vocab_size, self.vocab)
        if t.top_k > info.max_top_k:
            raise ConfigError(f"teacher.top_k: {t.top_k} exceeds the server's max_top_k {info.max_top_k}")
        if t.student_top_k and self.cfg.rollout.staleness:
            raise ConfigError("teacher.student_top_k needs rollout.staleness=0 (the student's top ids come from the "
                              "current weights)")
        log.info("teacher %s (%s, vocab %d) at %s", info.model_name, info.dtype, info.vocab_size, t.url)
        return client

    def _data_source(self):
        from student_trainer.data import BUILTIN_TASKS, arithmetic_source, file_source, task_source

        d = self.cfg.data
        if d.task:
            if d.task not in BUILTIN_TASKS:
                raise ConfigError(f"data.task: {d.task!r} is not a built-in task (built in: {', '.join(BUILTIN_TASKS)})")
            if d.task != "arithmetic":
                return task_source(self.tokenizer, d.task, seed=d.seed)
            return arithmetic_source(self.tokenizer, seed=d.seed)
        return file_source(d, self.tokenizer, self.cfg.loss.reward_fn or "math")

    def _rollout_engine(self, model_dir: str, urls: str = ""):
        """The configured engine; for a built-in task that needs tools (``calc``) wrapped in the
        multi-turn tool loop (model turn -> tool call -> tool output as mask-0 tokens -> ...).
        sglang: `urls` names other engines than rollout.urls (the warm-up's teacher engines)."""
        eng = self._plain_rollout_engine(model_dir, urls)
        tools = task_tools(self.cfg.data.task)
        if tools:
            from rollout.tasks.tool_engine import ToolEngine

            eng = ToolEngine(eng, self.tokenizer, tools)
        return eng

    def _plain_rollout_engine(self, model_dir: str, urls: str = ""):
        r = self.cfg.rollout
        if r.engine == "sglang":
            from rollout.sglang_client import SGLangEngine

            eng = SGLangEngine([u.strip() for u in (urls or r.urls).split(",") if u.strip()],
                               router_url=None if urls else (r.router_url or None), api_key=r.api_key or None,
                               admin_api_key=r.admin_api_key or None, max_attempts=r.max_attempts)
            info = engine_info(eng, "warmup.rollout_url" if urls else "rollout.urls")
            log.info("%s rollouts from SGLang at %s (model %s, weight_version %s)", "warm-up" if urls else "student",
                     ", ".join(eng.urls), info.get("model_path"), info.get("weight_version"))
            return eng
        from transformers import AutoTokenizer

        from rollout.local_engine import LocalEngine

        dev = self.device
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
        random_init = self.cfg.model.random_init and model_dir == self.cfg.model.student  # weights come by sync
        model = _load_causal_lm(model_dir, dtype, random_init, dev).to(dev)
        return LocalEngine(model, AutoTokenizer.from_pretrained(model_dir), max_batch_size=r.max_batch_size)

    # ---- weights to the rollout engine ----------------------------------------------------------
    def _weight_sync_mode(self) -> str:
        from student_trainer.config import default_weight_sync

        r = self.cfg.rollout
        return default_weight_sync(r.engine) if r.weight_sync == "auto" else r.weight_sync

    def _weight_sync(self):
        """SGLang engines: the pusher for this rank's engines (engine i belongs to rank i % world, so
        each engine gets one update per step); None for the local engine."""
        r = self.cfg.rollout
        if r.engine != "sglang":
            return None
        from rollout import weight_sync as ws

        mode = self._weight_sync_mode()
        own = ws.engines_of_rank([u.strip() for u in r.urls.split(",") if u.strip()], self.rank, self.world)
        client = getattr(self.rollout, "inner", self.rollout)  # the key the generation client resolved
        key = getattr(client, "admin_api_key", None) or getattr(client, "api_key", None)
        kw = {"api_key": key, "retries": r.sync_retries, "timeout_s": r.sync_timeout_s}
        if mode == "disk":
            sync = ws.DiskSync(own, **kw)
        elif mode == "distributed":
            sync = ws.DistributedSync(own, address=r.sync_address, port=r.sync_port + self.rank if r.sync_port else 0,
                                      group_name=f"opd-weights-r{self.rank}",
                                      backend="nccl" if self.device.startswith("cuda") else "gloo", **kw)
        else:
            if not torch.cuda.is_available():
                raise ConfigError("rollout.weight_sync=tensor: CUDA-IPC handles need CUDA, which is not available "
                                  "here (allowed without CUDA: distributed, disk)")
            sync = ws.TensorSync(own, **kw)
        if own:
            sync.connect()
        log.info("weight sync %s: rank %d pushes to %s", mode, self.rank, ", ".join(own) or "no engine")
        return sync

    def _sync_weights(self, version: int) -> float:
        t0 = time.perf_counter()
        r = self.cfg.rollout
        mode = self._weight_sync_mode()
        stats0 = dict(self.wsync.stats) if self.wsync is not None else {}
        if r.engine == "local" and mode == "memory":
            self.rollout.load_state_dict_(self.engine.full_state_dict(), version)
        elif r.engine == "local":  # disk: each rank's own local engine reloads
            path = Path(r.sync_dir or self.out / "weights_sync")
            self.export_hf(path)
            if self.world > 1:
                torch.distributed.barrier()  # written by rank 0 before any engine reads it
            asyncio.run(self.rollout.update_weights_from_disk(str(path), version))
        elif mode == "disk":
            path = Path(r.sync_dir or self.out / "weights_sync")
            self.export_hf(path)  # every rank gathers (ZeRO-3), rank 0 writes
            if self.world > 1:
                torch.distributed.barrier()  # written before any engine reads it
            if r.release_memory:
                self.wsync.resume_memory(["weights"])
            if self.wsync.urls:
                self.wsync.push(str(path), version)
        else:  # distributed / tensor: bucket by bucket from the live parameters
            if r.release_memory:
                self.wsync.resume_memory(["weights"])  # (their contents are gone until the push)
            n, buckets = self.engine.weight_buckets(int(r.sync_bucket_mb * 2**20))
            if self.wsync.urls and mode == "distributed":
                # an engine lost mid-broadcast: the weights again, unless the gathers are collective
                rebuild = None if self.world > 1 and self.engine.zero_stage == 3 else (
                    lambda: self.engine.weight_buckets(int(r.sync_bucket_mb * 2**20)))
                self.wsync.push(buckets, n, version, rebuild=rebuild)
            elif self.wsync.urls:
                self.wsync.push(buckets, n, version)
            else:
                for _ in buckets:  # ZeRO-3: the gathers are collective, every rank takes part
                    pass
        if r.release_memory:
            self.wsync.resume_memory(["kv_cache"])
        if self.wsync is not None:  # engines out of service / back / group re-opens in this push
            d = {k: v - stats0.get(k, 0) for k, v in self.wsync.stats.items()}
            self.sync_counters = {"sync_engines_down": d.get("engine_down", 0),
                                  "sync_engines_rejoined": d.get("engine_rejoined", 0),
                                  "sync_group_reopens": d.get("group_reopened", 0)}
            client = getattr(self.rollout, "inner", self.rollout)
            if hasattr(client, "weights_pushed"):  # rejoining engines: catch-up source, probed at once
                client.weights_pushed(version, str(path) if mode == "disk" else None, self.wsync.live)
        if r.engine == "sglang" and self.world > 1:
            torch.distributed.barrier()  # every engine has the new weights before any rank samples again
        self.version = version
        return time.perf_counter() - t0

    # ---- producer: rollouts + teacher scoring ---------------------------------------------------------
    def _sampling(self, step: int, warm: bool):
        from rollout.types import SamplingParams

        r = self.cfg.rollout
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, seed=self.cfg.run.seed * 100_003 + step)

    def _produce(self, step: int) -> StepData:
        cfg = self.cfg
        warm = step < cfg.warmup.steps and self.warm_rollout is not None
        engine = self.warm_rollout if warm else self.rollout
        prompts = self.data.batch(step * self.world + self.rank, cfg.data.prompts_per_step)
        params = self._sampling(step, warm)
        t0 = time.perf_counter()
        samples: list[Sample] = []
        futures: list[cf.Future] = []
        pool = cf.ThreadPoolExecutor(max_workers=max(1, cfg.teacher.concurrency))
        gen_done = [0.0]

        def score(batch: list[Sample]):
            ids = [s.token_ids for s in batch]
            starts = [s.prompt_len for s in batch]
            s_top = None
            if cfg.teacher.student_top_k:  # the student's own top ids, from the current weights
                s_top = self.engine.module.top_ids(batch, cfg.teacher.student_top_k, cfg.loss.temperature,
                                                   cfg.optim.micro_batch_tokens, self.device)
            res = self.teacher.score(ids, starts, extra_ids=s_top)
            for i, (s, st) in enumerate(zip(batch, res)):
                s.teacher = teacher_arrays(st, self.vocab, None if s_top is None else s_top[i])
            return sum(st.wire_bytes for st in res), time.perf_counter()

        stats = getattr(getattr(engine, "inner", engine), "stats", None)
        stats0 = dict(stats) if stats is not None else {}
        received: dict[int, int] = {}  # finished (not aborted) rollouts per prompt group
        aborted, stale = [0], [0]

        async def collect():
            pending: list[Sample] = []
            async for ro in engine.generate([p.prompt_ids for p in prompts], params):
                if ro.finish_reason == "abort":  # partial output: never reaches the loss
                    aborted[0] += 1
                    continue
                if not warm and ro.policy_version < step - cfg.rollout.staleness:
                    stale[0] += 1  # the engine says it sampled with older weights than allowed
                    continue
                received[ro.prompt_index] = received.get(ro.prompt_index, 0) + 1
                text = self.tokenizer.decode(ro.response_ids, skip_special_tokens=True)
                s = Sample(token_ids=list(ro.prompt_ids) + list(ro.response_ids), prompt_len=len(ro.prompt_ids),
                           response_mask=list(ro.response_mask), rollout_logprobs=list(ro.logprobs),
                           group=ro.prompt_index, reward=self.data.reward(text, prompts[ro.prompt_index]),
                           policy_version=ro.policy_version, num_turns=ro.num_turns, finish_reason=ro.finish_reason)
                if s.num_response == 0:
                    continue
                samples.append(s)
                if self.teacher is not None:
                    pending.append(s)
                    if len(pending) >= max(cfg.rollout.n, cfg.teacher.batch_sequences):
                        futures.append(pool.submit(score, pending))
                        pending = []
            if self.teacher is not None and pending:
                futures.append(pool.submit(score, pending))
            gen_done[0] = time.perf_counter()

        asyncio.run(collect())
        t_gen = gen_done[0]
        # A group with a member missing (aborted past its retries, or its request failed) is
        # dropped whole: group-relative advantages and weights need every member.
        short = {g for g in range(len(prompts)) if received.get(g, 0) < params.n}
        if short:
            samples[:] = [s for s in samples if s.group not in short]
        delta = {k: v - stats0.get(k, 0) for k, v in (stats or {}).items()}
        if short or delta.get("aborted") or delta.get("failed") or aborted[0]:
            log.warning("step %d: %d rollout(s) aborted, %d request(s) failed, %d dropped after retries: "
                        "%d of %d prompt groups dropped", step, delta.get("aborted", 0) if stats is not None else aborted[0],
                        delta.get("failed", 0), delta.get("dropped", 0), len(short), len(prompts))
        if not samples:
            raise RuntimeError(f"step {step}: no complete rollout group ({len(prompts)} prompts x {params.n}); last "
                               f"engine error: {getattr(getattr(engine, 'inner', engine), 'last_error', None)}")
        log.debug("step %d: %d rollouts in %.1fs", step, len(samples), t_gen - t0)
        wire, last = 0, t_gen
        for f in futures:
            b, t_end = f.result()
            wire += b
            last = max(last, t_end)
        pool.shutdown()
        t1 = time.perf_counter()
        samples.sort(key=lambda s: (s.group, s.token_ids))
        self._weights_and_advantages(samples)
        n_resp = sum(s.num_response for s in samples)
        return StepData(step, samples, timings={
            "rollout_s": t_gen - t0, "teacher_tail_s": t1 - t_gen, "produce_s": t1 - t0},
            counters={"wire_bytes": wire, "response_tokens": n_resp, "warmup": warm, "rollouts_stale": stale[0],
                      # aborted attempts the engine saw (an engine without counters: aborted rollouts)
                      "rollout_aborted": delta.get("aborted", 0) if stats is not None else aborted[0],
                      "rollout_failed": delta.get("failed", 0),
                      "rollout_retried": delta.get("retried", 0), "rollout_dropped": delta.get("dropped", 0),
                      "groups_dropped": len(short), "engines_down": delta.get("engine_down", 0),
                      "tool_tokens": sum(len(s.response_mask) - sum(s.response_mask) for s in samples),
                      "turns": float(np.mean([s.num_turns for s in samples])) if samples else 0.0})

    def _weights_and_advantages(self, samples: list[Sample]) -> None:
        if not samples:
            return
        lc = self.cfg.loss
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        groups = torch.tensor([s.group for s in samples])
        if lc.objective in ("grpo", "opd+grpo"):
            adv = L.grpo_advantages(rewards, group_ids_B=groups)
            for s, a in zip(samples, adv.tolist()):
                s.advantage = a
        if lc.sample_weighting == "reward":
            w = L.reward_weights(rewards, beta=lc.reward_beta, group_ids_B=groups)
        elif lc.sample_weighting == "paced":
            w = L.paced_weights(rewards, group_ids_B=groups, a=lc.paced_a, b=lc.paced_b)
        else:
            return
        for s, x in zip(samples, w.tolist()):
            s.weight = float(x)

    def _producer(self, q: queue.Queue, stop: threading.Event):
        staleness = self.cfg.rollout.staleness
        try:
            for step in range(self.start_step, self.cfg.run.steps):
                with self._version_cv:  # on-policy: wait until weights of step - staleness are in the engine
                    while self.version < step - staleness and not stop.is_set():
                        self._version_cv.wait(0.5)
                if stop.is_set():
                    return
                q.put(self._produce(step))
        except BaseException as exc:  # surfaced on the trainer thread
            q.put(exc)

    # ---- training ------------------------------------------------------------------------------
    def _train_step(self, data: StepData) -> dict:
        cfg, lc = self.cfg, self.cfg.loss
        terms = _loss_terms(cfg, data.step, data.counters.get("warmup", False))
        loss_cfg = _loss_config(lc, terms)
        mbs = pack(data.samples, cfg.optim.micro_batch_tokens)
        dev = torch.device(self.device)
        kept = [sum(m for s in mb for m in s.response_mask) for mb in mbs]
        if lc.token_keep_ratio < 1.0:
            kept = [math.ceil(k * lc.token_keep_ratio) for k in kept]
        global_tokens = torch.tensor(float(max(1, sum(kept))))
        global_seqs = torch.tensor(float(max(1, len(data.samples))))
        if self.world > 1:
            both = torch.stack([global_tokens, global_seqs]).to(dev)
            torch.distributed.all_reduce(both)
            global_tokens, global_seqs = both[0].cpu(), both[1].cpu()
        metrics_sum: dict[str, float] = {}
        t0 = time.perf_counter()
        total = 0.0
        offset = 0
        for i, group in enumerate(mbs):
            mb = build_micro_batch(group, offset)
            offset += len(group)
            mb = _to(mb, dev)
            self.engine.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            loss, met = self.engine.engine(mb, loss_cfg, global_tokens.to(dev), global_seqs.to(dev),
                                           lc.token_keep_ratio, lc.token_score)
            self.engine.backward(loss * self.world)  # DeepSpeed averages over ranks; undo it
            total += float(loss.detach())
            ntok = float(met["tokens"])
            for k, v in met.items():
                if k != "tokens":
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) * ntok
            metrics_sum["tokens"] = metrics_sum.get("tokens", 0.0) + ntok
        grad_norm = self.engine.step()
        t_train = time.perf_counter() - t0
        loss_tokens = metrics_sum.pop("tokens", 0.0)  # rows with weight > 0 (after TIP's selection)
        ntok = max(1.0, loss_tokens)
        out = {f"loss/{k}": v / ntok for k, v in metrics_sum.items()}
        reason = _zero_signal_reason(data.samples, terms)
        if reason:
            self.zero_signal_steps += 1
            log.warning("step %d trains nothing: %s (%d such step(s) so far)", data.step + 1, reason,
                        self.zero_signal_steps)
        out.update({"zero_signal": int(reason is not None), "zero_signal_steps": self.zero_signal_steps})
        out.update({"loss": total, "grad_norm": grad_norm, "lr": self.engine.lr, "train_s": t_train,
                    "loss_tokens": int(loss_tokens),
                    "micro_batches": len(mbs), "loss_terms": "+".join(f"{w:g}*{n}" for n, w in terms)})
        return out

    def run(self) -> dict:
        cfg = self.cfg
        q: queue.Queue = queue.Queue(maxsize=max(1, cfg.rollout.staleness))
        stop = threading.Event()
        producer = threading.Thread(target=self._producer, args=(q, stop), name="opd-producer", daemon=True)
        producer.start()
        last = {}
        try:
            for step in range(self.start_step, cfg.run.steps):
                t_wait = time.perf_counter()
                data = q.get()
                if isinstance(data, BaseException):
                    raise data
                wait_s = time.perf_counter() - t_wait
                t_step = time.perf_counter()
                if cfg.rollout.release_memory:  # the engines are idle (staleness 0): their GPU memory to training
                    if self.world > 1:
                        torch.distributed.barrier()  # every rank's rollouts are in
                    self.wsync.release_memory()
                m = self._train_step(data)
                sync_s = self._sync_weights(step + 1)
                with self._version_cv:
                    self._version_cv.notify_all()
                step_s = time.perf_counter() - t_step + wait_s
                rew = [s.reward for s in data.samples]
                m.update(data.timings)
                versions = [s.policy_version for s in data.samples]  # as the engines reported them
                m.update({"rollouts_stale": data.counters["rollouts_stale"], "weight_version": self.version,
                          "policy_version_min": min(versions, default=-1), "policy_version_max": max(versions, default=-1)})
                m.update({"step": step + 1, "wait_rollout_teacher_s": wait_s, "weight_sync_s": sync_s, "step_s": step_s,
                          # the trainer waits on the teacher for the part of its wait that came after
                          # generation ended (with staleness 1 most of it hides behind training)
                          "teacher_wait_s": min(wait_s, data.timings["teacher_tail_s"]),
                          "teacher_wait_frac": min(wait_s, data.timings["teacher_tail_s"]) / step_s if step_s else 0.0,
                          "reward": float(np.mean(rew)) if rew else 0.0,
                          "tokens": data.counters["response_tokens"],
                          "tokens_per_s": data.counters["response_tokens"] / step_s if step_s else 0.0,
                          "wire_bytes_per_token": data.counters["wire_bytes"] / max(1, data.counters["response_tokens"]),
                          "tool_token_ratio": data.counters["tool_tokens"] / max(1, data.counters["response_tokens"]),
                          "turns": data.counters["turns"],
                          **{k: data.counters[k] for k in ("rollout_aborted", "rollout_failed", "rollout_retried",
                                                           "rollout_dropped", "groups_dropped", "engines_down")},
                          **getattr(self, "sync_counters", {}),
                          "policy_lag": step - min(
                              (s.policy_version for s in data.samples), default=step)})
                if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                    m["eval_accuracy"] = self.evaluate()
                self.log.step(m)
                last = m
                if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.run.steps:
                    self.save_checkpoint(step + 1)
                if self.on_step:
                    self.on_step(step + 1, m)
        finally:
            stop.set()
            with self._version_cv:
                self._version_cv.notify_all()
        if cfg.run.steps > self.start_step:
            self.save_checkpoint(cfg.run.steps)
        if cfg.run.export_hf:
            self.export_hf(self.out / "hf")  # every rank gathers (ZeRO-3); rank 0 writes
        self.log.close()
        return last

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, n: int | None = None) -> float:
        """Greedy accuracy of the current weights on held-out prompts, through the rollout engine."""
        from rollout.evaluate import greedy_accuracy

        prompts = self.data.eval[: n or self.cfg.run.eval_prompts]
        return greedy_accuracy(self.rollout, self.tokenizer, [p.prompt_ids for p in prompts], prompts,
                               self.data.reward, self.cfg.rollout.max_new_tokens)

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Atomic: written to a temporary directory, renamed into place, then `latest` updated."""
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        tmp, final = root / f".tmp-step{step}", root / f"step{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.world > 1:
            torch.distributed.barrier()
        self.engine.save(str(tmp), "ckpt", {"opd_step": step})
        if self.world > 1:
            torch.distributed.barrier()  # every rank's shards are written before the rename
        if self.rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": self.cfg.to_dict()}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = root / ".latest.tmp"
            latest_tmp.write_text(final.name)
            os.replace(latest_tmp, root / "latest")
            keep = sorted((p for p in root.glob("step*")), key=lambda p: int(p.name[4:]))
            for old in keep[: -max(1, self.cfg.run.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_latest(self) -> int:
        root = self.out / "checkpoints"
        latest = root / "latest"
        if not latest.exists():
            log.info("--resume: no checkpoint under %s; starting from step 0", root)
            return 0
        ck = root / latest.read_text().strip()
        client = self.engine.load(str(ck), "ckpt")
        step = int(client.get("opd_step", json.loads((ck / "trainer_state.json").read_text())["step"]))
        log.info("resumed from %s at step %d", ck, step)
        return step

    def export_hf(self, path: Path) -> Path:
        """A Hugging Face directory (safetensors + tokenizer) that transformers and SGLang load."""
        sd = self.engine.full_state_dict()
        if self.rank != 0:
            return Path(path)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student = self.engine.module.student
        student.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if getattr(self, "wsync", None) is not None:
            self.wsync.close()
        for eng in (self.rollout, self.warm_rollout):
            if eng is not None and hasattr(eng, "close"):
                eng.close()
        if self.teacher is not None:
            self.teacher.close()


def task_tools(task: str | None) -> tuple:
    """The tools a built-in task's rollouts must offer (empty for single-turn tasks and files)."""
    from student_trainer.data import BUILTIN_TASKS

    if task not in BUILTIN_TASKS:
        return ()
    from rollout.tasks import get_task

    return tuple(getattr(get_task(task), "tools", ()) or ())


def engine_info(eng, key: str, poll_s: float = 5.0) -> dict:
    """The first SGLang engine's /model_info, waiting (up to the client's wait_for_engine_s) for an
    engine that is still starting; a refused key is a configuration error at once."""
    from rollout.sglang_client import SGLangError, SGLangRequestError

    deadline = time.monotonic() + eng.wait_for_engine_s
    while True:
        try:
            return asyncio.run(eng.model_info())
        except SGLangRequestError as e:
            raise ConfigError(f"{key}: {e} (the engines' key: rollout.api_key or OPD_ROLLOUT_API_KEY)") from None
        except (SGLangError, OSError) as e:
            err = e
        if time.monotonic() >= deadline:
            raise ConfigError(f"{key}: no SGLang engine answered /model_info for {eng.wait_for_engine_s:.0f} s "
                              f"({', '.join(eng.urls)}): {err}")
        log.warning("waiting for the SGLang engine at %s: %s", ", ".join(eng.urls), err)
        time.sleep(poll_s)


def resolve_train_device(device: str) -> str:
    """A concrete device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (each process of a torchrun launch
    takes its own GPU); an explicit ``cuda:N`` is kept (one process on a GPU of your choice)."""
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={device}: CUDA is not available on this machine (allowed here: cpu)")
    index = torch.device(device).index
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if index is None:
        index = local
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and index != local:
        raise ConfigError(f"run.device={device} under a multi-process launch: each process trains on "
                          f"cuda:LOCAL_RANK (here cuda:{local}); use run.device=cuda")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"run.device={device}: this machine has {torch.cuda.device_count()} GPU(s) "
                          f"(allowed: cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return f"cuda:{index}"


def _load_causal_lm(path: str, dtype, random_init: bool = False, device: str = "cpu",
                    attn_implementation: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if random_init:
        # random weights are drawn on the target device: drawing billions of them on the CPU
        # takes minutes, on a GPU a second
        with torch.device(device):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype, **kw)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)


def _to(mb, dev):
    if dev.type == "cpu":
        return mb
    import dataclasses

    kw = {}
    for f in dataclasses.fields(mb):
        v = getattr(mb, f.name)
        kw[f.name] = v.to(dev) if torch.is_tensor(v) else (v.to(dev) if v is not None and f.name == "stats" else v)
    return type(mb)(**kw)
