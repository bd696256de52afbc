"""`make`'s first step: the machine check for what DeepSpeed's CPU Adam build needs (stdlib only)."""

import os
import subprocess
import sys
import sysconfig

import pytest

from opd import prereqs


def _run(path: str):
    return subprocess.run([sys.executable, "-m", "opd.prereqs"], capture_output=True, text=True,
                          env={"PATH": path}, cwd=os.path.dirname(os.path.dirname(prereqs.__file__)))


def test_this_machine_has_what_the_build_needs():
    assert prereqs.missing() == []
    assert _run(os.environ["PATH"]).returncode == 0


def test_no_compiler_is_one_line_naming_the_package(tmp_path):
    r = _run(str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "opd set-up: missing a C++ compiler (DeepSpeed compiles its CPU Adam); on Debian/Ubuntu: apt-get install g++"]


def test_no_openmp_is_named(tmp_path):
    fake = tmp_path / "c++"   # a compiler that has no omp.h
    fake.write_text('#!/bin/sh\ngrep -q omp.h "$1" && { echo "fatal error: omp.h: No such file"; exit 1; }\n'
                    'exec /usr/bin/c++ "$@"\n')
    fake.chmod(0o755)
    if not os.path.exists("/usr/bin/c++"):
        pytest.skip("needs /usr/bin/c++")
    r = _run(f"{tmp_path}:/usr/bin")
    assert r.returncode == 1 and "missing OpenMP" in r.stderr and "apt-get install g++" in r.stderr


def test_no_python_headers_is_named(monkeypatch, tmp_path):
    paths = dict(sysconfig.get_paths(), include=str(tmp_path))
    monkeypatch.setattr(prereqs.sysconfig, "get_paths", lambda: paths)
    assert prereqs.missing() == ["headers"]
