"""SGLang 0.5.23's own request/response definitions, for checking `opd rollout-server` and the
client against them on a CPU machine.

SGLang cannot be installed here (CUDA-only pins), so the pure-Python wheel is fetched once with
`pip download --no-deps sglang==0.5.23` (PyPI) into a cache directory ($OPD_SGLANG_CACHE, default
~/.cache/opd/sglang-0.5.23; `make sglang-reference` does the same) and only the files used here are
unpacked. Light modules are imported with `sglang/__init__.py` bypassed (empty package stubs):
`sglang.api.v1.api_types` (the /generate JSON contract and response structs), `sglang.srt.sampling
.sampling_params` (SamplingParams and verify()), `sglang.srt.utils.auth` (the API-key middleware's
decision). They need msgspec (in the `test` extra) and torch. `http_server.py` and `io_struct.py`
import the GPU stack, so their route table, auth levels, request classes' fields and the
/model_info keys are read from the source with `ast`.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

VERSION = "0.5.23"
MEMBERS = ("sglang/api/v1/api_types.py", "sglang/srt/utils/auth.py", "sglang/srt/sampling/sampling_params.py",
           "sglang/srt/sampling/watermarking/", "sglang/srt/entrypoints/http_server.py",
           "sglang/srt/managers/io_struct.py")


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_SGLANG_CACHE") or Path.home() / ".cache" / "opd" / f"sglang-{VERSION}")


def ensure_source() -> Path:
    """The unpacked files (downloaded on first use). Raises RuntimeError saying how to get them."""
    root = cache_dir()
    if (root / "COMPLETE").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"sglang=={VERSION}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("sglang-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch SGLang {VERSION}'s wheel ({' '.join(cmd)}): {r.stderr[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith(MEMBERS) and name.endswith(".py"):
                    z.extract(name, root)
    (root / "COMPLETE").write_text(VERSION)
    return root


_PACKAGES = ("sglang", "sglang.api", "sglang.api.v1", "sglang.srt", "sglang.srt.utils", "sglang.srt.sampling")


def load_modules(root: Path) -> types.SimpleNamespace:
    """Import the light modules from `root` with the package __init__ files bypassed; the stubs are
    taken out of sys.modules afterwards so nothing else sees a half `sglang`."""
    saved = {k: v for k, v in sys.modules.items() if k == "sglang" or k.startswith("sglang.")}
    for k in saved:
        del sys.modules[k]
    try:
        for name in _PACKAGES:
            m = types.ModuleType(name)
            m.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = m
        ns = types.SimpleNamespace(
            api_types=importlib.import_module("sglang.api.v1.api_types"),
            sampling_params=importlib.import_module("sglang.srt.sampling.sampling_params"),
            auth=importlib.import_module("sglang.srt.utils.auth"))
    finally:
        for k in [k for k in sys.modules if k == "sglang" or k.startswith("sglang.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    ns.routes = routes(root)
    ns.request_fields = request_fields(root)
    ns.model_info_keys = model_info_keys(root)
    return ns


def _tree(root: Path, rel: str) -> ast.Module:
    return ast.parse((root / rel).read_text())


def routes(root: Path) -> dict[str, dict]:
    """path -> {"auth": "NORMAL" | "ADMIN_OPTIONAL" | ..., "body": request class name or None}."""
    out = {}
    for fn in ast.walk(_tree(root, "sglang/srt/entrypoints/http_server.py")):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        paths, level = [], "NORMAL"
        for d in fn.decorator_list:
            if not isinstance(d, ast.Call):
                continue
            f = d.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "app" and d.args \
                    and isinstance(d.args[0], ast.Constant):
                paths.append(d.args[0].value)
            elif isinstance(f, ast.Name) and f.id == "auth_level":
                level = d.args[0].attr
        body = None
        if fn.args.args:
            ann = fn.args.args[0].annotation
            if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Annotated":
                ann = ann.slice.elts[0]
            if isinstance(ann, ast.Name) and ann.id != "Request":
                body = ann.id
        for p in paths:
            out[p] = {"auth": level, "body": body}
    return out


def request_fields(root: Path) -> dict[str, set[str]]:
    """io_struct class name -> its field names (own and inherited within the module)."""
    classes = {c.name: c for c in _tree(root, "sglang/srt/managers/io_struct.py").body if isinstance(c, ast.ClassDef)}

    def fields(name: str) -> set[str]:
        c = classes.get(name)
        if c is None:
            return set()
        own = {s.target.id for s in c.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        for b in c.bases:
            if isinstance(b, ast.Name):
                own |= fields(b.id)
        return own
    return {name: fields(name) for name in classes}


def model_info_keys(root: Path) -> set[str]:
    for fn in ast.walk(_tree(root, "sglang/srt/entrypoints/http_server.py")):
        if isinstance(fn, ast.AsyncFunctionDef) and fn.name == "model_info":
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                        getattr(node.targets[0], "id", "") == "result":
                    return {k.value for k in node.value.keys}
    raise AssertionError("model_info() not found in SGLang's http_server.py")
