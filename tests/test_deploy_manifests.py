"""Everything under deploy/, checked offline: YAML lint, Kubernetes manifests against the bundled
Kubernetes OpenAPI schemas (kubernetes-validate, strict), the compose file against the compose-spec
schema (check-jsonschema's vendored copy), Dockerfile structure (dockerfile-parse), `bash -n` of
the Slurm script, the trainer configs through the trainer's own loader, and the health-check script
against a live server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")
K8S_FILES = sorted((DEPLOY / "k8s").rglob("*.yaml"))
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SBATCH = DEPLOY / "slurm" / "opd.sbatch"


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else (shutil.which(name) or pytest.skip(f"{name} is not installed"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s() -> dict[tuple[str, str], dict]:
    """The resources `kubectl apply -f deploy/k8s/` creates, plus the example secrets they read."""
    out = {}
    for f in [*sorted((DEPLOY / "k8s").glob("*.yaml")), DEPLOY / "k8s" / "examples" / "secrets.yaml"]:
        for d in _docs(f):
            out.setdefault((d["kind"], d["metadata"]["name"]), d)
    return out


def test_the_deploy_tree_is_complete():
    for rel in ("docker/Dockerfile", "docker/Dockerfile.dockerignore", "docker/constraints.txt", "docker/healthcheck.py",
                "compose/compose.yaml", "compose/train.yaml", "compose/env.example", "k8s/teacher-deployment.yaml",
                "k8s/teacher-service.yaml", "k8s/trainer-job.yaml", "k8s/config.yaml", "k8s/storage.yaml",
                "k8s/namespace.yaml", "k8s/examples/secrets.yaml", "k8s/examples/teacher-tls.yaml", "slurm/opd.sbatch"):
        assert (DEPLOY / rel).is_file(), rel
    assert (ROOT / "docs" / "deploy.md").is_file()


def test_yamllint_passes_on_every_yaml_file():
    r = subprocess.run([_bin("yamllint"), "-f", "parsable", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(YAML_FILES) >= 10


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kubernetes_manifest_validates_against_the_openapi_schema(path):
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    docs = _docs(path)
    assert docs
    for d in docs:
        assert kv.validate(d, latest_version(), strict=True)  # raises ValidationError with the path
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "opd", d["metadata"]["name"]


def test_the_schema_validator_really_rejects_mistakes():
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    d = _docs(DEPLOY / "k8s" / "teacher-deployment.yaml")[0]
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051  # typo'd key
    with pytest.raises(kv.ValidationError):
        kv.validate(d, latest_version(), strict=True)


def test_kubernetes_resources_fit_together():
    res = _k8s()
    dep = res[("Deployment", "opd-teacher")]
    pod = dep["spec"]["template"]["spec"]
    (teacher,) = pod["containers"]
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == teacher["resources"]["requests"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert teacher[probe]["grpc"]["port"] == 50051, probe  # native gRPC health probes
    assert "--host=0.0.0.0" in teacher["args"] and "--port=50051" in teacher["args"]
    svc = res[("Service", "teacher-headless")]
    assert svc["spec"]["clusterIP"] == "None"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    assert {p["port"] for p in svc["spec"]["ports"]} == {50051, 9400}
    grace = int(res[("ConfigMap", "opd-teacher-config")]["data"]["OPD_TEACHER_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace
    # every $(VAR) in the args comes from the ConfigMap or env
    cm = res[("ConfigMap", "opd-teacher-config")]["data"]
    for arg in teacher["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in cm or var in {e["name"] for e in teacher.get("env", [])}, var
    # the trainer reaches the teacher through the headless Service, via gRPC's DNS resolver
    tcm = res[("ConfigMap", "opd-trainer-config")]["data"]
    ns = svc["metadata"]["namespace"]
    assert tcm["OPD_TEACHER_URL"] == f"dns:///{svc['metadata']['name']}.{ns}.svc.cluster.local:50051"
    from teacher_server.client import parse_endpoints

    assert parse_endpoints(tcm["OPD_TEACHER_URL"]) == [tcm["OPD_TEACHER_URL"]]
    job = res[("Job", "opd-trainer")]
    jpod = job["spec"]["template"]["spec"]
    (sidecar,) = jpod["initContainers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["command"][:3] == ["python3", "-m", "sglang.launch_server"]
    assert re.fullmatch(r"lmsysorg/sglang:v\d+\.\d+\.\d+[\w.-]*", sidecar["image"])
    # everything the pods reference exists
    claims = {v["persistentVolumeClaim"]["claimName"] for p in (pod, jpod) for v in p["volumes"]
              if "persistentVolumeClaim" in v}
    assert all(("PersistentVolumeClaim", c) in res for c in claims)
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for c in (teacher, *jpod["containers"]) for e in c.get("env", [])
               if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets and all(("Secret", s) in res for s in secrets)
    maps = {r["configMapRef"]["name"] for c in (teacher, *jpod["containers"]) for r in c.get("envFrom", [])}
    assert all(("ConfigMap", m) in res for m in maps)
    # the TLS variant differs only in TLS: exec probes with the health-check script, the secret mounted
    tls = _docs(DEPLOY / "k8s" / "examples" / "teacher-tls.yaml")[0]
    (tc,) = tls["spec"]["template"]["spec"]["containers"]
    assert {"--tls-cert=/etc/opd/tls/tls.crt", "--tls-key=/etc/opd/tls/tls.key",
            "--tls-client-ca=/etc/opd/tls/ca.crt"} <= set(tc["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tc[probe]["exec"]["command"][0] == "opd-healthcheck" and "grpc" not in tc[probe]


def test_compose_validates_against_the_compose_spec():
    r = subprocess.run([_bin("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_assigns_distinct_gpus_and_wires_the_services():
    c = yaml.safe_load(COMPOSE.read_text())
    svcs = c["services"]
    assert set(svcs) == {"teacher", "sglang", "trainer"}
    gpus = {}
    for name, s in svcs.items():
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        gpus[name] = tuple(dev["device_ids"])
    defaults = {n: tuple(re.sub(r"\$\{\w+:-(\w+)\}", r"\1", g) for g in ids) for n, ids in gpus.items()}
    flat = [g for ids in defaults.values() for g in ids]
    assert len(flat) == len(set(flat)), defaults  # no GPU shared by default
    assert re.fullmatch(r"\$\{OPD_SGLANG_IMAGE:-lmsysorg/sglang:v\d+\.\d+\.\d+[\w.-]*\}", svcs["sglang"]["image"])
    assert svcs["sglang"]["command"][:3] == ["python3", "-m", "sglang.launch_server"]
    assert "--port" in svcs["sglang"]["command"] and "30000" in svcs["sglang"]["command"]
    assert svcs["trainer"]["depends_on"] == {"teacher": {"condition": "service_healthy"},
                                             "sglang": {"condition": "service_healthy"}}
    assert svcs["trainer"]["environment"]["OPD_TEACHER_URL"] == "teacher:50051"
    assert "--host=0.0.0.0" in svcs["teacher"]["command"]
    stages = {s["build"]["target"] for s in svcs.values() if "build" in s}
    assert stages == {"teacher", "trainer"}


@pytest.mark.parametrize("path", [DEPLOY / "compose" / "train.yaml", "configmap"])
def test_trainer_configs_load_with_the_trainer_loader(path):
    config = pytest.importorskip("student_trainer.config")
    if path == "configmap":
        text = _k8s()[("ConfigMap", "opd-trainer-config")]["data"]["train.yaml"]
        overrides = ["teacher.url=dns:///teacher-headless.opd.svc.cluster.local:50051", "rollout.urls=http://127.0.0.1:30000"]
    else:
        text, overrides = path.read_text(), ["teacher.url=teacher:50051"]
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        cfg = config.load_config(f.name, overrides)
    assert cfg.rollout.engine == "sglang" and cfg.rollout.weight_sync == "disk" and cfg.run.device == "cuda"


def _stages():
    dfp = pytest.importorskip("dockerfile_parse")
    parser = dfp.DockerfileParser(path=str(DOCKERFILE))
    stages, current = {}, None
    for ins in parser.structure:
        if ins["instruction"] == "COMMENT" or (current is None and ins["instruction"] != "FROM"):
            continue  # comments, and the global ARGs before the first FROM
        if ins["instruction"] == "FROM":
            parts = ins["value"].split()
            current = parts[-1] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages[current] = {"from": parts[0], "ins": []}
        stages[current]["ins"].append((ins["instruction"], ins["value"]))
    return parser, stages


def test_dockerfile_is_multi_stage_pinned_and_lean():
    parser, stages = _stages()
    args = {}
    for ins in parser.structure:  # global ARG defaults, for resolving FROM lines
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG" and "=" in ins["value"]:  # noqa: SIM102
            k, v = ins["value"].split("=", 1)
            args[k] = v.strip('"')
    assert {"teacher", "trainer"} <= set(stages) and len(stages) >= 4
    for name, st in stages.items():
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], st["from"])
        if image in stages:
            continue
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    for final in ("teacher", "trainer"):
        st = stages[final]
        text = "\n".join(v for _, v in st["ins"])
        assert "devel" not in st["from"], f"{final} must not start from a devel image"
        for tool in ("build-essential", "gcc", "g++", "ninja-build", "python3-dev", "cmake", "-devel"):
            assert tool not in text, f"{final} installs build tool {tool}"
        assert any(i == "COPY" and v.startswith("--from=build-") for i, v in st["ins"]), final
        user = [v for i, v in st["ins"] if i == "USER"]
        assert user and user[-1] not in ("root", "0"), final
        assert any(i == "ENTRYPOINT" for i, _ in st["ins"])
    assert "--host" in dict(stages["teacher"]["ins"])["CMD"]  # binds beyond loopback inside the container
    # every COPY from the build context exists, and the ignore file lets it through
    for st in stages.values():
        for i, v in st["ins"]:
            if i != "COPY" or v.startswith("--from="):
                continue
            srcs = [w for w in v.split() if not w.startswith("--")][:-1]
            for s in srcs:
                assert (ROOT / s).exists() or s == "README.md", s
    pins = dict(line.split("==") for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"torch", "transformers", "grpcio", "protobuf", "deepspeed"} <= set(pins)


def test_slurm_script_parses_and_passes_the_teacher_url():
    bash = shutil.which("bash") or pytest.skip("no bash")
    r = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SBATCH.read_text()
    assert "#SBATCH hetjob" in text and "--het-group=0" in text and "--het-group=1" in text
    assert "export OPD_TEACHER_URL=" in text and "--host 0.0.0.0" in text
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "error", str(SBATCH)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_healthcheck_script_against_a_live_server(tiny_model_dir):
    from tests.teacher_helpers import running_server

    script = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
    with running_server(tiny_model_dir, auth_token="x") as (_, url):  # health is exempt from the token
        assert subprocess.run([*script, "--addr", url], timeout=60).returncode == 0
        assert subprocess.run([*script, "--addr", url, "--service", "opd.teacher.v1.Teacher"], timeout=60).returncode == 0
    r = subprocess.run([*script, "--addr", url, "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not SERVING" in r.stderr
