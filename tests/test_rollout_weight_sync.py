"""Weight sync from the DeepSpeed trainer into SGLang-protocol engines (`opd rollout-server`):
a real trainer (real DeepSpeed ZeRO-2 / ZeRO-3, real teacher server on 127.0.0.1), real HTTP, a real
gloo process group between the trainer and the servers, as SGLang's engine joins it."""

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from rollout.sglang_client import http_json
from student_trainer.config import ConfigError, load_config
from tests.teacher_helpers import running_server


class Servers:
    """In-process `opd rollout-server`s (the same RolloutService + HTTP server the CLI runs)."""

    def __init__(self, model_dir, n):
        from rollout.local_engine import LocalEngine
        from rollout.server import RolloutService, ServerThread

        self.svcs = [RolloutService(LocalEngine.from_pretrained(model_dir), model_dir) for _ in range(n)]
        self.threads = [ServerThread(s) for s in self.svcs]
        self.urls = [t.__enter__() for t in self.threads]
        self.dead = []

    def close(self):
        for t, s in zip(self.threads, self.svcs):
            if t is not None:
                t.__exit__(None, None, None)
                s.engine.close()
        for e in self.dead:
            e.close()

    def kill(self, i):
        """Server i goes away: its HTTP server stops and its process group ends with it."""
        from rollout.weight_sync import close_group

        self.threads[i].__exit__(None, None, None)
        self.threads[i] = None
        for pg in self.svcs[i]._groups.values():
            close_group(pg)
        self.svcs[i]._groups.clear()
        # its engine stays up until close(): a request accepted just before the end still gets its
        # answer (a closed LocalEngine would leave it waiting forever, which a dead process does not)
        self.dead.append(self.svcs[i].engine)

    def restart(self, i, model_dir):
        """A fresh server (the model from disk, weight_version "default") on server i's port."""
        from rollout.local_engine import LocalEngine
        from rollout.server import RolloutService, ServerThread

        port = int(self.urls[i].rsplit(":", 1)[1])
        self.svcs[i] = RolloutService(LocalEngine.from_pretrained(model_dir), model_dir)
        self.threads[i] = ServerThread(self.svcs[i], port=port)
        assert self.threads[i].__enter__() == self.urls[i]


def checksums(sd):
    return {k: hashlib.sha256(v.detach().contiguous().cpu().numpy().tobytes()).hexdigest() for k, v in sd.items()}


def _cfg(student, url, out, *extra):
    return load_config(None, [f"model.student={student}", "model.dtype=fp32", "data.task=arithmetic",
                              f"teacher.url={url}", f"run.out_dir={out}", "rollout.max_new_tokens=6",
                              "data.prompts_per_step=2", "rollout.n=2", "optim.lr=3e-3", "run.plot=false",
                              "run.export_hf=false", "run.progress=false", "run.tensorboard=false",
                              "teacher.max_backoff_s=0.5", "rollout.engine=sglang", *extra])


def _run_and_check(tr, servers, steps, after_step=None, stale=None):
    """Run; after every step each server holds the trainer's weights (sha256 per tensor) and
    reports the step as its weight_version; the step's rollouts carry the version they were sampled
    with (staleness 0: exactly the step's)."""
    seen = []

    def on_step(step, m):
        want = checksums(tr.engine.full_state_dict())
        for s, url in zip(servers.svcs, servers.urls):
            assert checksums(s.engine.model.state_dict()) == want, f"{url} weights differ after step {step}"
            assert http_json(url + "/model_info", method="GET")[1]["weight_version"] == str(step)
        seen.append((step, m["policy_version_min"], m["policy_version_max"], m["rollouts_stale"], want))
        if after_step:
            after_step(step, m)
    tr.on_step = on_step
    tr.run()
    assert [(s, lo, hi, st) for s, lo, hi, st, _ in seen] == [(k + 1, k, k, (stale or [0] * steps)[k])
                                                              for k in range(steps)]
    assert seen[0][4] != seen[-1][4]  # the weights really changed


def test_weight_sync_config_is_checked_when_parsed(tmp_path):
    base = ["model.student=/x", "data.task=arithmetic", "teacher.url=127.0.0.1:1"]
    sg = base + ["rollout.engine=sglang", "rollout.urls=http://127.0.0.1:1"]
    assert load_config(None, sg).rollout.weight_sync == "distributed"  # the SGLang default
    assert load_config(None, base).rollout.weight_sync == "memory"     # the local engine's
    assert load_config(None, sg + ["rollout.weight_sync=disk"]).rollout.weight_sync == "disk"
    for args, msg in [(sg + ["rollout.weight_sync=memory"],
                       "rollout.weight_sync: 'memory' does not work with rollout.engine=sglang (allowed: auto, "
                       "distributed, disk, tensor)"),
                      (base + ["rollout.weight_sync=distributed"],
                       "rollout.weight_sync: 'distributed' does not work with rollout.engine=local (allowed: auto, "
                       "memory, disk)"),
                      (sg + ["rollout.weight_sync=tensor"], "'tensor' (CUDA-IPC handles) needs run.device=cuda"),
                      (sg + ["rollout.weight_sync=nccl"], "rollout.weight_sync: 'nccl' is not one of auto, memory"),
                      (sg + ["rollout.sync_bucket_mb=0"], "rollout.sync_bucket_mb: 0.0 must be > 0"),
                      (sg + ["rollout.release_memory=true", "rollout.staleness=1"],
                       "rollout.release_memory: true needs rollout.engine=sglang and rollout.staleness=0")]:
        with pytest.raises(ConfigError) as ei:
            load_config(None, args)
        assert msg in str(ei.value)
    r = subprocess.run([sys.executable, "-m", "opd", "train", *(f"--{a}" for a in sg), "--rollout.weight_sync=memory",
                        "--print-config"], capture_output=True, text=True)
    assert r.returncode == 2 and "rollout.weight_sync: 'memory' does not work with rollout.engine=sglang" in r.stderr


def test_stand_in_weight_update_protocol(models):
    """The engine side of SGLang's protocol, route by route (no trainer): the process group joins a
    trainer-side group opened as SGLang's helper opens one (torch's _new_process_group_helper over a
    tcp:// rendezvous with PrefixStore(group_name)), the session rules, request validation."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, rendezvous

    from rollout.weight_sync import broadcast, free_port

    _, student = models
    servers = Servers(student, 1)
    url, svc = servers.urls[0], servers.svcs[0]
    try:
        # outside a session: refused before anything is received
        body = {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[4, 4]], "group_name": "g"}
        assert http_json(url + "/update_weights_from_distributed", body) == (400, {
            "success": False, "message": "update_weights_from_distributed must run between begin_weight_update() "
                                         "and end_weight_update()"})
        assert http_json(url + "/end_weight_update", {})[1]["success"] is False
        assert http_json(url + "/begin_weight_update", {"selector": "all"}) == (200, {"success": True,
                                                                                     "message": "Success"})
        s, r = http_json(url + "/begin_weight_update", {})
        assert s == 400 and "already open" in r["message"]
        # request validation as SGLang's classes: a required field, a JSON type, a Literal
        s, r = http_json(url + "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1.5,
                                                              "rank_offset": 1, "world_size": 2})
        assert s == 400 and "master_port" in r["message"] and r["type"] == "Bad Request"
        s, r = http_json(url + "/update_weights_from_distributed", {"names": [], "dtypes": []})
        assert s == 400 and "`shapes` is required" in r["message"]
        assert "selector" in http_json(url + "/begin_weight_update", {"selector": "both"})[1]["message"]
        s, r = http_json(url + "/update_weights_from_distributed", body)  # no such group
        assert s == 400 and "Please call `init_weights_update_group` first" in r["message"]
        assert http_json(url + "/destroy_weights_update_group", {"group_name": "g"})[1] == {
            "success": False, "message": "The group to be destroyed does not exist."}

        # the group: the trainer's side exactly as SGLang's init_custom_process_group builds it
        port, name = free_port(), "proto-test"
        reply = {}
        t = threading.Thread(target=lambda: reply.update(r=http_json(url + "/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": name, "backend": "gloo"})))
        t.start()
        store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, 2))
        pg, _ = _new_process_group_helper(2, 0, [], Backend("gloo"), PrefixStore(name, store), group_name=name,
                                          timeout=__import__("datetime").timedelta(seconds=60))
        t.join()
        assert reply["r"] == (200, {"success": True, "message": "Succeeded to initialize custom process group."})
        own = svc.engine.model.state_dict()
        new = {k: torch.randn_like(own[k]) for k in ("lm_head.weight", "model.norm.weight")}
        body = {"names": list(new), "dtypes": ["float32", "float32"], "shapes": [list(v.shape) for v in new.values()],
                "group_name": name, "flush_cache": False, "weight_version": "7"}
        t = threading.Thread(target=lambda: reply.update(r=http_json(url + "/update_weights_from_distributed", body)))
        t.start()
        for v in new.values():
            broadcast(pg, v)
        t.join()
        assert reply["r"][0] == 200 and reply["r"][1]["success"] is True
        for k, v in new.items():
            assert torch.equal(svc.engine.model.state_dict()[k], v)
        assert http_json(url + "/end_weight_update", {})[1]["success"] is True
        assert http_json(url + "/model_info", method="GET")[1]["weight_version"] == "7"
        out = http_json(url + "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2},
                                            "return_logprob": True})[1]
        assert out["meta_info"]["weight_version"] == "7"
        s, r = http_json(url + "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": port,
                                                              "rank_offset": 1, "world_size": 2, "group_name": name,
                                                              "backend": "gloo"})
        assert s == 400 and "already been created" in r["message"]
        assert http_json(url + "/destroy_weights_update_group", {"group_name": name})[1]["success"] is True

        # the trainer side: an engine that cannot join (NCCL on a CPU server) fails the start at
        # once with the engine's answer, not after the rendezvous timeout
        import time

        from rollout.weight_sync import DistributedSync, WeightSyncError

        sync, t0 = DistributedSync([url], backend="nccl", group_name="never", timeout_s=20), time.time()
        with pytest.raises(WeightSyncError, match="backend nccl needs CUDA"):
            sync.connect()
        assert time.time() - t0 < 15
        sync.engines.close()
    finally:
        servers.close()


def test_weight_requests_match_sglang_classes(models):
    """The stand-in's weight-route fields (names, defaults' presence) are those of SGLang 0.5.23's
    request classes (io_struct.py, read with ast; tests/sglang_reference.py fetches the wheel once),
    and every body the trainer's pushers send names only fields those classes have (SGLang drops
    unknown fields silently, so a typo would go unnoticed there)."""
    from rollout import weight_sync as ws
    from rollout.server_weights import REQUESTS
    from tests import sglang_reference as ref

    try:
        root = ref.ensure_source()
    except RuntimeError as e:
        pytest.fail(f"{e}\n(needs PyPI once, or OPD_SGLANG_CACHE pointing at an unpacked sglang 0.5.23 wheel)")
    routes, fields = ref.routes(root), ref.request_fields(root)
    internal = {"rid", "http_worker_ipc"}
    for path, spec in REQUESTS.items():
        assert set(spec) == fields[routes[path]["body"]] - internal, path

    _, student = models
    servers = Servers(student, 1)
    sent = []
    real_call = ws._Engines.call

    def recording(self, url, path, body=None, method="POST"):
        sent.append((path, body))
        return real_call(self, url, path, body, method)
    ws._Engines.call = recording
    try:
        own = {k: v + 1 for k, v in servers.svcs[0].engine.model.state_dict().items()}
        sync = ws.DistributedSync(servers.urls, group_name="fields-test", retries=0, timeout_s=60)
        sync.connect()
        plan = ws.plan_buckets(((k, v.numel() * 4) for k, v in own.items()), 100_000)
        sync.push(([(n, own[n]) for n in names] for names in plan), len(plan), 11)
        sync.close()
        disk = ws.DiskSync(servers.urls, retries=0)
        with pytest.raises(ws.WeightSyncError, match="update_weights_from_disk"):
            disk.push("/nonexistent", 12)
        disk.close()
    finally:
        ws._Engines.call = real_call
        servers.close()
    assert checksums(own) == checksums(servers.svcs[0].engine.model.state_dict()) and len(plan) > 1
    paths = [p for p, _ in sent]
    assert paths.index("/pause_generation") < paths.index("/begin_weight_update") < \
        paths.index("/update_weights_from_distributed") < paths.index("/end_weight_update") < \
        paths.index("/continue_generation")
    for path, body in sent:
        cls = routes[path]["body"]
        if cls in fields:
            assert set(body or {}) <= fields[cls] - internal, (path, body)
        else:  # /model_info, /server_info (GET), /flush_cache (a query parameter only)
            assert not body, (path, body)


def test_distributed_sync_zero2_two_servers_with_a_failed_update(models, tmp_path):
    """ZeRO-2, one trainer rank, two servers in one gloo group (ranks 1 and 2). Step 2's update is
    answered success: false once by the second server: the trainer sends that bucket again."""
    from student_trainer.trainer import Trainer

    teacher, student = models
    servers = Servers(student, 2)
    try:
        with running_server(teacher) as (_, url):
            tr = Trainer(_cfg(student, url, tmp_path / "z2", "run.steps=3", "optim.zero_stage=2",
                              f"rollout.urls={','.join(servers.urls)}", "rollout.sync_bucket_mb=0.1"))
            try:
                assert tr.wsync.pg is not None and tr.wsync.urls == servers.urls

                def fail_once(step, m):
                    if step == 1:
                        servers.svcs[1].fail_updates = 1
                _run_and_check(tr, servers, 3, fail_once)
                assert tr.wsync.updates_retried == 1 and servers.svcs[1].fail_updates == 0
            finally:
                tr.close()
    finally:
        servers.close()


def test_distributed_sync_zero3_gathers_bucket_by_bucket(models, tmp_path):
    """ZeRO-3, one trainer rank, one server: the parameters are partitioned, each bucket is
    gathered, broadcast and released; the server still ends every step with the trainer's weights.
    With release_memory the server's KV cache and weights are released for training (the server
    loses the weights' contents, as SGLang without a CPU backup) and resumed for the push."""
    from student_trainer.trainer import Trainer

    teacher, student = models
    servers = Servers(student, 1)
    try:
        with running_server(teacher) as (_, url):
            tr = Trainer(_cfg(student, url, tmp_path / "z3", "run.steps=2", "optim.zero_stage=3",
                              f"rollout.urls={servers.urls[0]}", "rollout.sync_bucket_mb=0.1",
                              "rollout.release_memory=true"))
            try:
                n_buckets, it = tr.engine.weight_buckets(int(0.1 * 2**20))
                assert n_buckets > 2
                for bucket in it:  # whole tensors inside the gather, partitions (empty) outside
                    assert all(t.numel() > 0 for _, t in bucket)
                assert all(p.data.numel() == 0 for p in tr.engine.module.student.parameters())
                _run_and_check(tr, servers, 2)
                calls = servers.svcs[0].weight_calls
                assert calls["/begin_weight_update"] == calls["/end_weight_update"] == 3  # start + 2 steps
                assert calls["/update_weights_from_distributed"] == 3 * n_buckets
                rel, res = "/release_memory_occupation", "/resume_memory_occupation"
                assert servers.svcs[0].memory_log == 2 * [(rel, ["kv_cache", "weights"]), (res, ["weights"]),
                                                          (res, ["kv_cache"])]
                assert servers.svcs[0].released == set()
            finally:
                tr.close()
        assert servers.svcs[0].weight_calls["/destroy_weights_update_group"] == 1
    finally:
        servers.close()


def test_disk_sync_reloads_each_engine_once_per_step(models, tmp_path):
    """weight_sync=disk with two servers: one /update_weights_from_disk per server per step; one of
    them answers SGLang's under-load success: false (weights loaded, cache not flushed) once, and
    the trainer sends that update again. In step 2 one rollout comes back saying it was sampled with
    version 0: the trainer goes by what the engine says, counts it stale and does not train on it."""
    from student_trainer.trainer import Trainer

    teacher, student = models
    servers = Servers(student, 2)
    try:
        with running_server(teacher) as (_, url):
            tr = Trainer(_cfg(student, url, tmp_path / "disk", "run.steps=2", "rollout.weight_sync=disk",
                              f"rollout.urls={','.join(servers.urls)}", f"rollout.sync_dir={tmp_path / 'sync'}"))
            try:
                svc = servers.svcs[1]
                item, lie = svc._item, []

                def item_once_stale(*a, **k):  # the engine reports an old version for one rollout
                    out = item(*a, **k)
                    if lie:
                        out["meta_info"]["weight_version"] = lie.pop()
                    return out
                svc._item = item_once_stale

                def fail_once(step, m):
                    if step == 1:
                        servers.svcs[0].fail_updates = 1
                        lie.append("0")
                _run_and_check(tr, servers, 2, fail_once, stale=[0, 1])
                assert tr.wsync.updates_retried == 1 and not lie
            finally:
                tr.close()
        assert (tmp_path / "sync" / "model.safetensors").exists()
        # start + 2 steps, plus the one retried call on the first server
        assert [s.weight_calls["/update_weights_from_disk"] for s in servers.svcs] == [4, 3]
        assert all(s.weight_calls["/begin_weight_update"] == 0 for s in servers.svcs)
    finally:
        servers.close()


@pytest.mark.parametrize("mode", ["distributed", "disk"])
def test_weight_push_survives_a_dead_engine_and_its_restart(models, tmp_path, mode):
    """Two servers. After step 1 server 1 dies: step 2's push goes to server 0 alone (distributed:
    the trainer re-opens the group without it), the run goes on. After step 2 it restarts on the
    same port with the model from disk (weight_version "default"): step 3's push brings it the
    trainer's weights (distributed: in a group re-opened with both), and in step 4 it serves
    rollouts of the current version again. After every step each server in service holds the
    trainer's weights and reports the step as its version; the metrics count the events."""
    from student_trainer.trainer import Trainer

    teacher, student = models
    servers = Servers(student, 2)
    try:
        with running_server(teacher) as (_, url):
            tr = Trainer(_cfg(student, url, tmp_path / mode, "run.steps=4", f"rollout.weight_sync={mode}",
                              f"rollout.urls={','.join(servers.urls)}", "rollout.sync_bucket_mb=0.1",
                              "rollout.sync_timeout_s=60", f"rollout.sync_dir={tmp_path / mode / 'sync'}"))
            rows = []

            def on_step(step, m):
                want = checksums(tr.engine.full_state_dict())
                for i in ([0] if step == 2 else [0, 1]):
                    assert checksums(servers.svcs[i].engine.model.state_dict()) == want, (i, step)
                    assert http_json(servers.urls[i] + "/model_info", method="GET")[1]["weight_version"] == str(step)
                rows.append({k: m[k] for k in ("step", "policy_version_min", "policy_version_max", "rollouts_stale",
                                               "sync_engines_down", "sync_engines_rejoined", "sync_group_reopens")})
                if step == 1:
                    servers.kill(1)
                elif step == 2:
                    assert tr.wsync.live == servers.urls[:1] and servers.urls[1] in tr.wsync.down
                    servers.restart(1, student)
                    assert http_json(servers.urls[1] + "/model_info", method="GET")[1]["weight_version"] == "default"
            tr.on_step = on_step
            try:
                tr.run()
            finally:
                tr.close()
        reopen = int(mode == "distributed")
        assert [tuple(r.values()) for r in rows] == [(1, 0, 0, 0, 0, 0, 0), (2, 1, 1, 0, 1, 0, reopen),
                                                     (3, 2, 2, 0, 0, 1, reopen), (4, 3, 3, 0, 0, 0, 0)]
        # the restarted server served rollouts again, all of version 3 (step 4's, none stale): before
        # step 3's push it was not used (its "default" version differs from the others')
        assert servers.svcs[1].generated > 0
        if mode == "distributed":
            assert servers.svcs[1].weight_calls["/init_weights_update_group"] == 1
            assert servers.svcs[0].weight_calls["/init_weights_update_group"] == 3  # start + 2 re-opens
            assert servers.svcs[0].weight_calls["/destroy_weights_update_group"] == 3  # 2 re-opens + close
    finally:
        servers.close()


def test_engine_lost_mid_broadcast_and_every_engine_down(models):
    """The pusher alone. (1) distributed, two servers: server 1 dies in the middle of a step's
    broadcast (after its first bucket); the trainer's side of the group fails, server 0's receive
    fails at its group timeout, the trainer finds the lost engine, re-opens the group with server 0
    and pushes the weights again from rebuild(): server 0 ends with exactly the pushed weights and
    version. (2) disk, every engine down: the push waits for
    one to answer /health (here it comes back after a while) and, when none does within
    timeout_s, fails naming the engines and the setting."""
    import time

    from rollout import weight_sync as ws

    _, student = models
    servers = Servers(student, 2)
    try:
        # gloo cannot interrupt a receive: the survivor waits out its group's timeout (SGLang's
        # engine likewise), then answers "Failed to receive weights" and the push starts over
        servers.svcs[0].group_timeout_s = 3.0
        sync = ws.DistributedSync(servers.urls, group_name="mid", retries=0, timeout_s=30)
        sync.connect()
        own = {k: v + 1 for k, v in servers.svcs[0].engine.model.state_dict().items()}
        plan = ws.plan_buckets(((k, v.numel() * 4) for k, v in own.items()), 100_000)
        assert len(plan) > 2
        svc1, recv = servers.svcs[1], servers.svcs[1]._w_update_weights_from_distributed

        def die_after_first_bucket(req):
            if svc1.weight_calls["/update_weights_from_distributed"] < 2:
                return recv(req)
            servers.kill(1)  # its group closes, then its HTTP server (this last reply still goes out)
            return False, "Failed to receive weights: gone"
        svc1._w_update_weights_from_distributed = die_after_first_bucket

        def buckets():
            return len(plan), ([(n, own[n]) for n in names] for names in plan)
        n, it = buckets()
        sync.push(it, n, 5, rebuild=buckets)
        assert sync.live == servers.urls[:1] and list(sync.down) == servers.urls[1:]
        assert sync.stats == {"engine_down": 1, "group_reopened": 1} and sync.group_name == "mid-1"
        assert checksums(servers.svcs[0].engine.model.state_dict()) == checksums(own)
        assert servers.svcs[0].weight_version == "5"
        sync.close()

        disk = ws.DiskSync(servers.urls[:1], retries=0, timeout_s=30)
        path = servers.svcs[0].model_path
        servers.kill(0)
        threading.Timer(1.0, servers.restart, args=(0, student)).start()
        disk.push(path, 6)  # waits for the restart, then loads
        assert disk.stats == {"engine_down": 1, "engine_rejoined": 1} and servers.svcs[0].weight_version == "6"
        servers.kill(0)
        disk.timeout_s = 1.0
        with pytest.raises(ws.WeightSyncError, match=r"no rollout engine answered /health for 1 s "
                                                     r"\(rollout.sync_timeout_s\): http://127.0.0.1:\d+ \("):
            disk.push(path, 7)
        disk.close()
    finally:
        servers.close()


def test_rollout_without_a_version_is_never_current(models):
    """Once the trainer pushes versioned weights itself, a rollout from an engine that does not
    say which weights it serves (a restarted server's weight_version "default") carries version -1,
    so the staleness check drops it; the client's own notion of the version is not lent to it."""
    import asyncio

    from rollout.sglang_client import SGLangEngine
    from rollout.types import SamplingParams

    _, student = models
    servers = Servers(student, 1)
    eng = SGLangEngine(servers.urls)
    try:
        async def versions():
            return [r.policy_version async for r in eng.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=2))]
        assert asyncio.run(versions()) == [0, 0]  # the client's version (engines it updates itself)
        eng.weights_pushed(3, None, servers.urls)
        assert asyncio.run(versions()) == [-1, -1]
    finally:
        eng.close()
        servers.close()


def _torchrun(student, teacher_url, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "opd", "train",
         "--teacher-url", teacher_url, f"--model.student={student}", "--model.dtype=fp32", "--data.task=arithmetic",
         "--data.prompts_per_step=2", "--rollout.n=2", "--rollout.max_new_tokens=6", "--run.steps=2",
         f"--run.out_dir={out}", "--run.plot=false", "--run.progress=false", "--run.tensorboard=false",
         "--rollout.engine=sglang", "--rollout.sync_timeout_s=60", "--log-level", "WARNING", *extra],
        capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _record_sessions(svc):
    """Each server's weights (sha256 per tensor) and version at the end of every update session."""
    seen, end = [], svc._w_end_weight_update

    def recording_end(req):
        ok, msg = end(req)
        seen.append((svc.weight_version, checksums(svc.engine.model.state_dict())))
        return ok, msg
    svc._w_end_weight_update = recording_end
    return seen


@pytest.mark.slow
def test_two_trainer_ranks_each_push_to_their_own_engine(models, tmp_path):
    """torchrun, 2 ranks, 2 servers. distributed (ZeRO-3: both ranks gather every bucket, rank r
    pushes to server r), then disk (rank 0 writes, each server reloads once per step, not once per
    rank). After each run both servers hold the exported final weights."""
    from safetensors.torch import load_file

    teacher, student = models
    with running_server(teacher) as (_, url):
        for mode, stage in (("distributed", 3), ("disk", 2)):
            servers = Servers(student, 2)
            try:
                sessions = [_record_sessions(s) for s in servers.svcs]
                out = tmp_path / mode
                rows = _torchrun(student, url, out, f"--rollout.urls={','.join(servers.urls)}",
                                 f"--rollout.weight_sync={mode}", f"--optim.zero_stage={stage}",
                                 "--rollout.sync_bucket_mb=0.1")
                versions = [(r["step"], r["policy_version_min"], r["policy_version_max"]) for r in rows]
                assert versions == [(1, 0, 0), (2, 1, 1)]
                final = checksums(load_file(str(out / "hf" / "model.safetensors")))
                for svc in servers.svcs:
                    assert svc.weight_version == "2"
                    assert checksums(svc.engine.model.state_dict()) == final
                    assert svc.generated > 0  # both ranks' rollouts reach both servers
                    if mode == "disk":
                        assert svc.weight_calls["/update_weights_from_disk"] == 3  # start + one per step
                        assert svc.weight_calls["/begin_weight_update"] == 0
                    else:
                        assert svc.weight_calls["/begin_weight_update"] == 3
                        assert svc.weight_calls["/init_weights_update_group"] == 1
                for rec in sessions if mode == "distributed" else []:
                    assert [v for v, _ in rec] == ["0", "1", "2"] and rec[-1][1] == final
                    assert rec[0][1] != rec[1][1] != rec[2][1]
            finally:
                servers.close()


def test_tensor_payload_globals_are_allowed():
    """CPU part of the CUDA-IPC path: a payload refers to exactly the globals torch's CUDA reduction
    emits (built here with the same argument types, device as a UUID string); the stand-in's
    unpickler allows each of them, and nothing else gets through."""
    import base64
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    from rollout.server_weights import load_named_tensors, tensor_global_allowed

    class FakeCudaTensor:  # what reductions.reduce_tensor returns for a CUDA tensor
        def __reduce__(self):
            return (reductions.rebuild_cuda_tensor,
                    (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, torch.storage.TypedStorage, torch.bfloat16,
                     "GPU-8d2c5b5e", b"handle", 12, 0, False, b"refcount", 0, b"event", True))
    buf = io.BytesIO()
    ForkingPickler(buf).dump([("model.norm.weight", FakeCudaTensor())])
    found = set()

    class Recorder(pickle.Unpickler):  # lists the globals without building anything
        def find_class(self, module, name):
            found.add((module, name))
            return lambda *a, **k: None
    Recorder(io.BytesIO(buf.getvalue())).load()
    assert ("torch.storage", "TypedStorage") in found and ("torch", "Tensor") in found, found
    assert all(tensor_global_allowed(m, n) or (m, n) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor")
               for m, n in found), found
    assert not tensor_global_allowed("os", "system") and not tensor_global_allowed("torch", "load")
    evil = base64.b64encode(pickle.dumps([("x", __import__("os").system)])).decode()
    with pytest.raises(pickle.UnpicklingError, match="Blocked unsafe global"):
        load_named_tensors(evil)


@pytest.mark.gpu
def test_tensor_payload_opens_in_another_process():
    """serialize_named_tensors (CUDA-IPC handles, the GPU named by UUID) opens in another process
    through the stand-in's allow-listed unpickler, which takes what SGLang's SafeUnpickler takes:
    the other process sees the sender's values without a copy over the wire."""
    from rollout.weight_sync import serialize_named_tensors

    named = [("a", torch.randn(64, 32, device="cuda")), ("b", torch.arange(10.0, device="cuda").to(torch.bfloat16))]
    payload = serialize_named_tensors(named, tp_size=2)
    assert len(payload) == 2 and payload[0] == payload[1] and len(payload[0]) < 4096  # handles, not data
    code = ("import sys, json, hashlib; from rollout.server_weights import load_named_tensors; "
            "named = load_named_tensors(sys.stdin.read()); "
            "print(json.dumps({n: [str(t.dtype), list(t.shape), hashlib.sha256(t.float().cpu().numpy().tobytes())"
            ".hexdigest()] for n, t in named}))")
    r = subprocess.run([sys.executable, "-c", code], input=payload[0], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    want = {n: [str(t.dtype), list(t.shape), hashlib.sha256(t.float().cpu().numpy().tobytes()).hexdigest()]
            for n, t in named}
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want


@pytest.mark.gpu
def test_tensor_sync_into_a_rollout_server_on_the_same_gpu(models, tmp_path):
    """weight_sync=tensor: trainer on cuda:0 and `opd rollout-server --device cuda` (its own
    process) on the same GPU; after every step the server's weights (read back with
    /get_weights_by_name) are the trainer's and it reports the step's version."""
    from student_trainer.trainer import Trainer

    teacher, student = models
    proc = subprocess.Popen([sys.executable, "-m", "opd", "rollout-server", "--model-path", student, "--port", "0",
                             "--device", "cuda", "--dtype", "float32"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:
            if "serving" in line and " at http://" in line:
                url = line.rsplit(" at ", 1)[1].strip()
                break
        else:
            raise RuntimeError("rollout-server did not start")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        with running_server(teacher) as (_, turl):
            tr = Trainer(_cfg(student, turl, tmp_path / "t", "run.steps=2", "run.device=cuda",
                              "rollout.weight_sync=tensor", f"rollout.urls={url}", "rollout.sync_bucket_mb=0.1"))
            seen = []

            def on_step(step, m):
                for name, t in tr.engine.full_state_dict().items():
                    s, got = http_json(url + "/get_weights_by_name", {"name": name, "truncate_size": 1 << 20})
                    assert s == 200 and torch.equal(torch.tensor(got), t.float().cpu()), f"{name} after step {step}"
                assert http_json(url + "/model_info", method="GET")[1]["weight_version"] == str(step)
                seen.append((m["policy_version_min"], m["policy_version_max"]))
            tr.on_step = on_step
            try:
                tr.run()
            finally:
                tr.close()
        assert seen == [(0, 0), (1, 1)]
    finally:
        proc.kill()
        proc.wait()
