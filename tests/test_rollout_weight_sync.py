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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from opd.tiny import build_model

    root = tmp_path_factory.mktemp("wsync")
    teacher = build_model(root / "teacher", "test", seed=1)
    student = build_model(root / "student", "test", seed=2, tokenizer_dir=teacher)
    return str(teacher), str(student)


class Servers:
    """In-process `opd rollout-server`s (the same RolloutService + HTTP server the CLI runs)."""

    def __init__(self, model_dir, n):
        from rollout.local_engine import LocalEngine
        from rollout.server import RolloutService, ServerThread

        self.svcs = [RolloutService(LocalEngine.from_pretrained(model_dir), model_dir) for _ in range(n)]
        self.threads = [ServerThread(s) for s in self.svcs]
        self.urls = [t.__enter__() for t in self.threads]

    def close(self):
        for t, s in zip(self.threads, self.svcs):
            t.__exit__(None, None, None)
            s.engine.close()


def checksums(sd):
    return {k: hashlib.sha256(v.detach().contiguous().cpu().numpy().tobytes()).hexdigest() for k, v in sd.items()}


def _cfg(student, url, out, *extra):
    return load_config(None, [f"model.student={student}", "model.dtype=fp32", "data.task=arithmetic",
                              f"teacher.url={url}", f"run.out_dir={out}", "rollout.max_new_tokens=6",
                              "data.prompts_per_step=2", "rollout.n=2", "optim.lr=3e-3", "run.plot=false",
                              "run.export_hf=false", "run.progress=false", "run.tensorboard=false",
                              "teacher.max_backoff_s=0.5", "rollout.engine=sglang", *extra])


def _run_and_check(tr, servers, steps, after_step=None):
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
    assert [(s, lo, hi, st) for s, lo, hi, st, _ in seen] == [(k + 1, k, k, 0) for k in range(steps)]
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
                      (sg + ["rollout.sync_bucket_mb=0"], "rollout.sync_bucket_mb: 0.0 must be > 0")]:
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
        assert http_json(url + "/begin_weight_update", {"selector": "all"}) == (200, {"success": True, "message": "Success"})
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
    finally:
        servers.close()


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
