"""The producer: prompts -> rollouts -> teacher statistics, and the trainer's weights back to the
rollout engines.

    Producer(cfg, tokenizer, vocab, device)   data source + teacher handshake (before DeepSpeed)
    .attach(engine, rank=, world=, start_step=, out=, export_hf=)
                                              rollout engines, weight sync, the first weights
    .produce(step) -> StepData                one step's scored rollouts
    .loop(q, stop, start_step)                the producer thread: produce() for every step,
                                              waiting for the weights `rollout.staleness` allows
    .sync_weights(version) -> seconds         after an optimizer step: the weights to the engines
    .close()

The trainer (student_trainer/trainer.py) owns the optimizer loop, checkpoints and export; it talks
to the producer only through these methods and the attributes `data`, `teacher`, `rollout`,
`warm_rollout`, `wsync`, `version` and `sync_counters`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from student_trainer import losses as L
from student_trainer.batching import Sample, teacher_arrays
from student_trainer.config import DEFAULT_TEACHER, ConfigError, TeacherSpec, TrainConfig, teacher_specs

log = logging.getLogger("opd.train")


@dataclass
class StepData:
    step: int
    samples: list[Sample]
    timings: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)


@dataclass
class Teacher:
    """A configured teacher (the default one or a route) with its connection; routes that name the
    same server (url and model) share one client."""
    spec: TeacherSpec
    client: object                    # teacher_server.client.TeacherClient
    settings: object                  # its ScoreSettings (top_k, temperature, statistics, encoding)
    chat_template: str                # the server's, which renders prompt templates


class Producer:
    def __init__(self, cfg: TrainConfig, tokenizer, vocab: int, device: str):
        self.cfg, self.tokenizer, self.vocab, self.device = cfg, tokenizer, vocab, device
        uses_teacher = cfg.loss.objective not in ("grpo", "sft")
        self.specs = teacher_specs(cfg) if uses_teacher else {}
        self.routed = bool(self.specs) and bool(cfg.teacher.routes)  # per-teacher packing and metrics
        self.data = self._data_source()  # bad data settings fail before any network wait
        self._check_rows()
        self.teachers = self._connect_teachers() if self.specs else {}
        # the default teacher's client (else the first route's): None when no teacher is asked
        first = self.teachers.get(DEFAULT_TEACHER) or next(iter(self.teachers.values()), None)
        self.teacher = first.client if first is not None else None
        self.rollout = self.warm_rollout = self.wsync = None
        self.engine, self.rank, self.world = None, 0, 1
        self.version = 0
        self.sync_counters: dict = {}
        self._version_cv = threading.Condition()

    def attach(self, engine, *, rank: int, world: int, start_step: int, out: Path, export_hf) -> None:
        """The trainer's DeepSpeed engine is up: start the rollout engines and the weight sync, and
        give the engines the trainer's weights of `start_step`. ``export_hf(path)`` writes a
        Hugging Face directory of the current weights (disk sync)."""
        cfg = self.cfg
        self.engine, self.rank, self.world, self.out, self.export_hf = engine, rank, world, Path(out), export_hf
        self.rollout = self._rollout_engine(cfg.model.student)
        if cfg.warmup.steps > 0:  # teacher rollouts: never the student's engines
            self.warm_rollout = (self._rollout_engine("", cfg.warmup.rollout_url) if cfg.rollout.engine == "sglang"
                                 else self._rollout_engine(cfg.warmup.teacher_model))
        self.version = start_step
        self.wsync = self._weight_sync()
        self.sync_weights(start_step)

    def notify(self) -> None:
        """Wake the producer thread (new weights, or stop)."""
        with self._version_cv:
            self._version_cv.notify_all()

    def release_memory(self) -> None:
        self.wsync.release_memory()

    def close(self) -> None:
        if self.wsync is not None:
            self.wsync.close()
        for eng in (self.rollout, self.warm_rollout):
            if eng is not None and hasattr(eng, "close"):
                eng.close()
        for client in {id(x.client): x.client for x in self.teachers.values()}.values():
            client.close()

    # ---- set-up ----------------------------------------------------------------------------------
    def _data_source(self):
        from student_trainer.data import builtin_source, file_source

        d, t = self.cfg.data, self.cfg.teacher
        if d.task:
            return builtin_source(self.tokenizer, d.task, seed=d.seed)
        # routing and prompt templates read the file's records
        rows = bool(self.specs) and (bool(t.routes) or any(s.prompt_template for s in self.specs.values()))
        return file_source(d, self.tokenizer, self.cfg.loss.reward_fn or "math", rows=rows)

    # ---- teachers: routing, handshake, privileged prompts -------------------------------------
    def route_of(self, row: dict | None, label: str = "a prompt") -> str:
        """The name of the teacher that scores a prompt whose data row is `row`: the route named
        by the row's teacher.route_key value, else the default teacher; neither is a ConfigError."""
        t = self.cfg.teacher
        if not t.routes:
            return DEFAULT_TEACHER
        from rollout.data import get_key

        try:
            value = str(get_key(row or {}, t.route_key))
        except KeyError:
            value = None
        if value in t.routes:
            return value
        if DEFAULT_TEACHER in self.specs:
            return DEFAULT_TEACHER
        shown = f"{t.route_key}={value!r}" if value is not None else f"no {t.route_key!r}"
        raise ConfigError(f"teacher.routes: {label} has {shown}, which no route names (routes: "
                          f"{', '.join(t.routes)}) and there is no default teacher (teacher.url)")

    def _check_rows(self) -> None:
        """Before any network wait: every training row has a teacher and the fields its prompt
        template names."""
        from student_trainer.config import template_fields

        rows = self.data.rows
        if rows is None or not self.specs:
            return
        fields = {n: template_fields(s.prompt_template, f"{s.key}.prompt_template") for n, s in self.specs.items()}
        used: dict[str, int] = {}
        for i, row in enumerate(rows):
            name = self.route_of(row, self.data.row_label(i))
            used[name] = used.get(name, 0) + 1
            for f in fields[name]:
                if f not in row:
                    raise ConfigError(f"{self.specs[name].key}.prompt_template: {self.data.row_label(i)} has no field "
                                      f"{f!r} (its fields: {', '.join(map(str, row))})")
        if self.cfg.teacher.routes:
            log.info("teacher routes (%s): %s", self.cfg.teacher.route_key,
                     ", ".join(f"{n} {used.get(n, 0)} prompts" for n in self.specs))

    def _connect_teachers(self) -> dict:
        """One client per distinct (url, model); the handshake (chat template, tokenizer
        fingerprint, vocabulary, max_top_k) per client, its errors naming the teachers that use it."""
        from teacher_server.client import ScoreSettings, TeacherClient, TokenizerMismatchError

        t = self.cfg.teacher
        stats = ["sampled", "topk", "tail"] + (["extra"] if t.student_top_k else []) + (
            ["full"] if self.cfg.loss.support == "full" else [])
        users: dict[tuple, list] = {}
        for spec in self.specs.values():
            users.setdefault((spec.url, spec.model), []).append(spec)
        out = {}
        for (url, model), specs in users.items():
            keys = " / ".join(f"{s.key}.url" for s in specs)
            who = f"{keys} ({', '.join(repr(s.name) for s in specs)} teacher at {url})" if t.routes else keys
            client = TeacherClient(url, timeout_s=t.timeout_s, max_retries=t.max_retries, max_backoff_s=t.max_backoff_s,
                                   token=t.token or None, **_model_kwargs(specs[0].key, model))
            info = client.info()
            # the chat template first (the tokenizer fingerprint covers it too, but says less)
            if (self.tokenizer.chat_template or "") != info.chat_template and not t.allow_tokenizer_mismatch:
                raise ConfigError(f"{who}: the teacher's chat template differs from the student's; prompts would be "
                                  "formatted differently on the two sides (teacher.allow_tokenizer_mismatch=true "
                                  "overrides)")
            try:
                client.check_tokenizer(self.tokenizer, t.allow_tokenizer_mismatch)
            except TokenizerMismatchError as exc:
                raise ConfigError(f"{who}: {exc} (config key: teacher.allow_tokenizer_mismatch=true)") from None
            if info.vocab_size < self.vocab:
                raise ConfigError(f"{who}: the teacher's logit width {info.vocab_size} is smaller than the "
                                  f"student's {self.vocab}; they cannot share token ids")
            if info.vocab_size > self.vocab:
                log.info("teacher logit width %d > student %d: padded teacher rows are folded into the tail",
                         info.vocab_size, self.vocab)
            for s in specs:
                if s.top_k > info.max_top_k:
                    key = "teacher.top_k" if s.key == "teacher" or t.routes[s.name].top_k < 0 else f"{s.key}.top_k"
                    raise ConfigError(f"{key}: {s.top_k} exceeds the server's max_top_k {info.max_top_k} "
                                      f"(teacher {s.name!r} at {url})")
                settings = ScoreSettings(top_k=s.top_k, statistics=tuple(stats), temperature=s.temperature,
                                         value_encoding=t.value_encoding, compression=t.compression)
                out[s.name] = Teacher(s, client, settings, info.chat_template)
            log.info("teacher %s (%s, vocab %d) at %s for %s", info.model_name, info.dtype, info.vocab_size, url,
                     ", ".join(s.name for s in specs))
        return out

    def teacher_prompt_ids(self, name: str, prompt) -> list[int] | None:
        """Privileged context: the prompt teacher `name` scores the response after, built from its
        prompt template over the prompt's data row as one user message through the teacher's chat
        template (with the generation prompt); None without a template (the student's prompt)."""
        tch = self.teachers[name]
        template = tch.spec.prompt_template
        if not template:
            return None
        row = prompt.metadata.get("row") or {}
        try:
            text = template.format_map(row)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
            label = f"record {prompt.metadata['index']}" if "index" in prompt.metadata else "a prompt"
            raise ValueError(f"{tch.spec.key}.prompt_template: {label} of {self.data.where} does not fill "
                             f"{template!r}: {type(exc).__name__}: {exc} (its fields: {', '.join(map(str, row))})") from None
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True,
                                                      chat_template=tch.chat_template or None)
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

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
        model = load_causal_lm(model_dir, dtype, random_init, dev).to(dev)
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

    def sync_weights(self, version: int) -> float:
        """The trainer's current weights to the rollout engines, as policy `version`; seconds taken."""
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

    def produce(self, step: int) -> StepData:
        """Step `step`'s prompts -> rollouts (each prompt rollout.n times) -> teacher statistics."""
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
        # each prompt's teacher (a prompt group is scored by one teacher) and, with a prompt
        # template, the teacher's own prompt the response is scored after (privileged context)
        route = [self.route_of(p.metadata.get("row"), self.data.where) for p in prompts] if self.teachers else []
        t_prompt = [self.teacher_prompt_ids(name, p) for name, p in zip(route, prompts)]

        def score(name: str, batch: list[Sample]):
            t_call = time.perf_counter()
            tch = self.teachers[name]
            ids, starts = [], []
            for s in batch:
                tp = t_prompt[s.group]
                if tp is None:
                    ids.append(s.token_ids)
                    starts.append(s.prompt_len)
                else:  # the same response tokens after the teacher's prompt: row r is response token r
                    ids.append(tp + s.token_ids[s.prompt_len:])
                    starts.append(len(tp))
            s_top = None
            if cfg.teacher.student_top_k:  # the student's own top ids, from the current weights
                s_top = self.engine.module.top_ids(batch, cfg.teacher.student_top_k, cfg.loss.temperature,
                                                   cfg.optim.micro_batch_tokens, self.device)
            res = tch.client.score(ids, starts, extra_ids=s_top, settings=tch.settings)
            for i, (s, st) in enumerate(zip(batch, res)):
                s.teacher = teacher_arrays(st, self.vocab, None if s_top is None else s_top[i])
            return name, sum(st.wire_bytes for st in res), t_call, time.perf_counter()

        stats = getattr(getattr(engine, "inner", engine), "stats", None)
        stats0 = dict(stats) if stats is not None else {}
        received: dict[int, int] = {}  # finished (not aborted) rollouts per prompt group
        aborted, stale = [0], [0]

        async def collect():
            pending: dict[str, list[Sample]] = {}
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
                if self.teachers:
                    s.route = route[s.group]
                    batch = pending.setdefault(s.route, [])
                    batch.append(s)
                    if len(batch) >= max(cfg.rollout.n, cfg.teacher.batch_sequences):
                        futures.append(pool.submit(score, s.route, batch))
                        pending[s.route] = []
            for name, batch in pending.items():
                if batch:
                    futures.append(pool.submit(score, name, batch))
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
        per: dict[str, dict] = {}  # per teacher: wire bytes, seconds in scoring calls, last answer
        for f in futures:
            name, b, t_call, t_end = f.result()
            wire += b
            last = max(last, t_end)
            d = per.setdefault(name, {"wire_bytes": 0, "score_s": 0.0, "last": t_gen})
            d["wire_bytes"] += b
            d["score_s"] += t_end - t_call
            d["last"] = max(d["last"], t_end)
        pool.shutdown()
        t1 = time.perf_counter()
        samples.sort(key=lambda s: (s.group, s.token_ids))
        self._weights_and_advantages(samples)
        for s in samples:  # a teacher's weight multiplies its samples' loss
            if s.route and self.teachers[s.route].spec.weight != 1.0:
                s.weight *= self.teachers[s.route].spec.weight
        n_resp = sum(s.num_response for s in samples)
        teachers = {}
        if self.routed:
            for name in self.teachers:
                mine = [s for s in samples if s.route == name]
                d = per.get(name, {"wire_bytes": 0, "score_s": 0.0, "last": t_gen})
                ntok = sum(s.num_response for s in mine)
                teachers[name] = {"samples": len(mine), "tokens": ntok, "score_s": d["score_s"],
                                  # the part of the step's wait on this teacher after generation ended
                                  "wait_s": max(0.0, d["last"] - t_gen),
                                  "wire_bytes_per_token": d["wire_bytes"] / max(1, ntok)}
        return StepData(step, samples, timings={
            "rollout_s": t_gen - t0, "teacher_tail_s": t1 - t_gen, "produce_s": t1 - t0},
            counters={"wire_bytes": wire, "response_tokens": n_resp, "warmup": warm, "rollouts_stale": stale[0],
                      "teachers": teachers,
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

    def loop(self, q: queue.Queue, stop: threading.Event, start_step: int) -> None:
        """The producer thread: StepData of every step from `start_step` into `q` (an exception
        instead, to be raised on the trainer thread)."""
        staleness = self.cfg.rollout.staleness
        try:
            for step in range(start_step, self.cfg.run.steps):
                with self._version_cv:  # on-policy: wait until weights of step - staleness are in the engine
                    while self.version < step - staleness and not stop.is_set():
                        self._version_cv.wait(0.5)
                if stop.is_set():
                    return
                q.put(self.produce(step))
        except BaseException as exc:  # surfaced on the trainer thread
            q.put(exc)


def task_tools(task: str | None) -> tuple:
    """The tools a built-in task's rollouts must offer (empty for single-turn tasks and files); for
    a mix ("arithmetic,calc") those of every task in it."""
    from student_trainer.data import BUILTIN_TASKS

    out: list = []
    for name in (task or "").split(","):
        if name.strip() not in BUILTIN_TASKS:
            continue
        from rollout.tasks import get_task

        out += [x for x in getattr(get_task(name.strip()), "tools", ()) or () if x not in out]
    return tuple(out)


# ---- teacher.model and teacher.refresh_every -------------------------------------------------------
def _model_kwargs(key: str, model: str) -> dict:
    """TeacherClient keyword arguments that name the model a request is for (teacher.model /
    teacher.routes.NAME.model, `key` its config prefix); {} for the server's default model."""
    return {"model": model} if model else {}


def refresh_teacher(producer: "Producer", engine, version: int, rank: int, bucket_mb: float = 64.0) -> dict:
    """teacher.refresh_every: the student's weights (HF parameter names; tied weights once) to the
    default teacher's server(s) as weight `version`, through the UpdateWeights RPC. Every rank
    walks the buckets (ZeRO-3 gathers each in step); rank 0 streams them. Returns the servers'
    answers' totals on rank 0 ({} elsewhere)."""
    tch = producer.teachers[DEFAULT_TEACHER]
    _, buckets = engine.weight_buckets(int(bucket_mb * (1 << 20)))
    if rank != 0:
        for _ in buckets:
            pass
        return {}
    several = len(tch.client.endpoints) > 1   # the client lists the tensors: copies outlive the buckets

    def tensors():
        for bucket in buckets:
            for name, t in bucket:
                yield name, (t.detach().cpu().clone() if several else t)

    t0 = time.perf_counter()
    answers = tch.client.update_weights(tensors(), version, model=tch.spec.model or None, bucket_mb=bucket_mb)
    return {"teacher_refresh_s": time.perf_counter() - t0, "teacher_refresh_mb": sum(a.bytes for a in answers) / 1e6,
            "teacher_weight_version": version}


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


def load_causal_lm(path: str, dtype, random_init: bool = False, device: str = "cpu",
                    attn_implementation: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if random_init:
        # random weights are drawn on the target device: drawing billions of them on the CPU
        # takes minutes, on a GPU a second
        with torch.device(device):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype, **kw)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
