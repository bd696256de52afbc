"""The on-policy distillation loop.

    prompts -> rollout engine -> each finished rollout goes straight to the teacher server
            -> loss (chunked, from the student's hidden states) -> optimizer step -> weights
            back to the rollout engine

A producer thread generates step s's rollouts and scores them with the teacher while the trainer
thread trains step s-1 (staleness 1) or waits for it (staleness 0, strictly on-policy: the
producer starts step s only once the weights of step s-1 reached the rollout engine). Each phase
records how long it waited on the others.

This module holds the optimizer loop, checkpoints and export; the producer (rollouts, teacher
scoring, weights to the rollout engines) is `student_trainer.producer.Producer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import queue
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from student_trainer import losses as L
from student_trainer.batching import Sample, attention_mask_for, build_micro_batch, pack
from student_trainer.config import ConfigError, LossCfg, TrainConfig
from student_trainer.observe import RunLog
from student_trainer.producer import (Producer, StepData, engine_info, load_causal_lm,  # noqa: F401
                                      refresh_teacher, task_tools)

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
        student = load_causal_lm(cfg.model.student, dtype, cfg.model.random_init, self.device,
                                  attn_implementation=cfg.model.attn_implementation)
        if cfg.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        # from_pretrained returns the model in eval mode, where HF skips gradient checkpointing
        # (and dropout): the trained copy is in train mode
        student.train()
        student.config.use_cache = False
        self.vocab = int(student.get_output_embeddings().weight.shape[0])
        # data source and teacher handshake: bad settings fail before DeepSpeed starts
        self.producer = Producer(cfg, self.tokenizer, self.vocab, self.device)
        from student_trainer.ds_engine import Engine

        log.info("student %s loaded (vocab %d); starting DeepSpeed", cfg.model.student, self.vocab)

        self.engine = Engine(StudentWithLoss(student), cfg.optim, cfg.model.dtype, cfg.run.steps, self.device)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.start_step = 0
        self.zero_signal_steps = 0  # steps whose loss was exactly 0 for every sample (this process)
        if resume:
            self.start_step = self._load_latest()
        self.producer.attach(self.engine, rank=self.rank, world=self.world, start_step=self.start_step, out=self.out,
                             export_hf=self.export_hf)
        log.info("DeepSpeed ZeRO-%d and the %s rollout engine ready", cfg.optim.zero_stage, cfg.rollout.engine)
        self.log = RunLog(self.out, cfg, resume=resume, enabled=self.rank == 0)

    # the producer's parts, as the trainer's attributes
    @property
    def data(self):
        return self.producer.data

    @property
    def teacher(self):
        return self.producer.teacher

    @property
    def rollout(self):
        return self.producer.rollout

    @property
    def wsync(self):
        return self.producer.wsync

    @property
    def version(self) -> int:
        return self.producer.version

    # ---- training ------------------------------------------------------------------------------
    def _train_step(self, data: StepData) -> dict:
        cfg, lc = self.cfg, self.cfg.loss
        terms = _loss_terms(cfg, data.step, data.counters.get("warmup", False))
        loss_cfg = _loss_config(lc, terms)
        if self.producer.routed:
            # a micro-batch holds one teacher's samples: its statistics share a shape (top_k), its
            # loss the teacher's temperature, and its metrics are that teacher's
            by_route: dict[str, list[Sample]] = {}
            for s in data.samples:
                by_route.setdefault(s.route, []).append(s)
            routed = [(name, mb) for name in sorted(by_route) for mb in pack(by_route[name], cfg.optim.micro_batch_tokens)]
        else:
            routed = [(None, mb) for mb in pack(data.samples, cfg.optim.micro_batch_tokens)]
        mbs = [mb for _, mb in routed]
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
        per_teacher: dict[str, dict[str, float]] = {}
        for i, (route, group) in enumerate(routed):
            mb = build_micro_batch(group, offset)
            offset += len(group)
            mb = _to(mb, dev)
            self.engine.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            cfg_i = loss_cfg
            if route is not None and self.producer.teachers[route].spec.temperature != loss_cfg.temperature:
                cfg_i = dataclasses.replace(loss_cfg, temperature=self.producer.teachers[route].spec.temperature)
            loss, met = self.engine.engine(mb, cfg_i, global_tokens.to(dev), global_seqs.to(dev),
                                           lc.token_keep_ratio, lc.token_score)
            self.engine.backward(loss * self.world)  # DeepSpeed averages over ranks; undo it
            total += float(loss.detach())
            ntok = float(met["tokens"])
            sums = [metrics_sum] + ([per_teacher.setdefault(route, {})] if route is not None else [])
            for d in sums:
                for k, v in met.items():
                    if k != "tokens":
                        d[k] = d.get(k, 0.0) + float(v) * ntok
                d["tokens"] = d.get("tokens", 0.0) + ntok
        grad_norm = self.engine.step()
        t_train = time.perf_counter() - t0
        loss_tokens = metrics_sum.pop("tokens", 0.0)  # rows with weight > 0 (after TIP's selection)
        ntok = max(1.0, loss_tokens)
        out = {f"loss/{k}": v / ntok for k, v in metrics_sum.items()}
        for route, d in per_teacher.items():  # per teacher: its samples' mean row loss (before its weight), KLs, ...
            n = max(1.0, d.pop("tokens"))
            out.update({f"teacher/{route}/{'loss' if k == 'loss_row_mean' else k}": v / n for k, v in d.items()})
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
        producer = threading.Thread(target=self.producer.loop, args=(q, stop, self.start_step), name="opd-producer",
                                    daemon=True)
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
                    self.producer.release_memory()
                m = self._train_step(data)
                sync_s = self.producer.sync_weights(step + 1)
                refresh = {}
                if cfg.teacher.refresh_every and (step + 1) % cfg.teacher.refresh_every == 0:
                    # the student's weights to the default teacher (self-distillation that follows the student)
                    refresh = refresh_teacher(self.producer, self.engine, step + 1, self.rank)
                self.producer.notify()
                step_s = time.perf_counter() - t_step + wait_s
                rew = [s.reward for s in data.samples]
                m.update(data.timings)
                versions = [s.policy_version for s in data.samples]  # as the engines reported them
                m.update({"rollouts_stale": data.counters["rollouts_stale"], "weight_version": self.version,
                          "policy_version_min": min(versions, default=-1), "policy_version_max": max(versions, default=-1)})
                m.update(refresh)
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
                          **self.producer.sync_counters,
                          "policy_lag": step - min(
                              (s.policy_version for s in data.samples), default=step)})
                for name, d in data.counters.get("teachers", {}).items():
                    m.update({f"teacher/{name}/{k}": v for k, v in d.items()})
                if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                    m["eval_accuracy"], by_source = self.evaluate()
                    if len(by_source) > 1:  # a mix (data.task=a,b; a file of several data sources)
                        m.update({f"eval_accuracy/{src}": acc for src, acc in by_source.items()})
                self.log.step(m)
                last = m
                if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.run.steps:
                    self.save_checkpoint(step + 1)
                if self.on_step:
                    self.on_step(step + 1, m)
        finally:
            stop.set()
            self.producer.notify()
        if cfg.run.steps > self.start_step:
            self.save_checkpoint(cfg.run.steps)
        if cfg.run.export_hf:
            self.export_hf(self.out / "hf")  # every rank gathers (ZeRO-3); rank 0 writes
        self.log.close()
        return last

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, n: int | None = None) -> tuple[float, dict[str, float]]:
        """Greedy accuracy of the current weights on held-out prompts, through the rollout engine,
        and the accuracy on each data source among those prompts (a built-in task's name; a file
        record's data_source), in the order the sources first appear. NaN and {} without eval
        prompts."""
        from rollout.evaluate import greedy_scores

        prompts = self.data.eval[: n or self.cfg.run.eval_prompts]
        scores = greedy_scores(self.rollout, self.tokenizer, [p.prompt_ids for p in prompts], prompts,
                               self.data.reward, self.cfg.rollout.max_new_tokens)
        if not scores:
            return float("nan"), {}
        by: dict[str, list[float]] = {}
        for p, sc in zip(prompts, scores):
            by.setdefault(p.source, []).append(sc)
        return sum(scores) / len(scores), {src: sum(v) / len(v) for src, v in by.items()}

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
        if getattr(self, "producer", None) is not None:
            self.producer.close()


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


def _to(mb, dev):
    if dev.type == "cpu":
        return mb
    import dataclasses

    kw = {}
    for f in dataclasses.fields(mb):
        v = getattr(mb, f.name)
        kw[f.name] = v.to(dev) if torch.is_tensor(v) else (v.to(dev) if v is not None and f.name == "stats" else v)
    return type(mb)(**kw)
