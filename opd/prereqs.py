"""Checks what `make` needs from the machine before it builds anything (stdlib only: it runs with
the system Python, before the virtual environment exists).

DeepSpeed compiles its CPU Adam optimizer the first time a trainer starts. That needs a C++
compiler, OpenMP and the Python headers; without them the failure surfaces deep inside the first
trainer test. This check compiles the same kind of translation unit up front and, on failure,
prints one line naming what to install.

    python3 -m opd.prereqs        # exit 0, or 1 with one line on stderr
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

# Debian/Ubuntu packages: g++ brings GCC's OpenMP (omp.h and libgomp); clang users want libomp-dev.
DEBIAN = {"compiler": "g++", "openmp": "g++", "headers": "python3-dev"}

_PROBE = """
#include <Python.h>
#include <omp.h>
int main() { return omp_get_max_threads() > 0 ? 0 : 1; }
"""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiles(cxx: str, source: str, flags: list[str]) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        r = subprocess.run([cxx, src, "-o", os.path.join(d, "probe"), *flags], capture_output=True, text=True)
        return r.returncode == 0, (r.stderr or r.stdout).strip()


def missing() -> list[str]:
    """What is missing, as a list of keys of DEBIAN (empty when everything is there)."""
    cxx = _compiler()
    if cxx is None:
        return ["compiler"]
    include = sysconfig.get_paths()["include"]
    out = []
    if not os.path.exists(os.path.join(include, "Python.h")):
        out.append("headers")
    ok, _ = _compiles(cxx, "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n",
                      ["-fopenmp"])
    if not ok:
        out.append("openmp")
    if not out:
        ok, err = _compiles(cxx, _PROBE, ["-fopenmp", f"-I{include}"])
        if not ok:  # both alone work but not together: report the compiler's own words
            raise RuntimeError(err.splitlines()[-1] if err else "the probe did not compile")
    return out


def main() -> int:
    try:
        lacking = missing()
    except RuntimeError as e:
        print(f"opd set-up: cannot compile DeepSpeed's CPU Adam here: {e}", file=sys.stderr)
        return 1
    if not lacking:
        return 0
    what = {"compiler": "a C++ compiler", "openmp": "OpenMP", "headers": f"the Python {sys.version_info.major}."
            f"{sys.version_info.minor} headers (Python.h)"}
    print(f"opd set-up: missing {', '.join(what[k] for k in lacking)} (DeepSpeed compiles its CPU Adam); "
          f"on Debian/Ubuntu: apt-get install {' '.join(dict.fromkeys(DEBIAN[k] for k in lacking))}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
