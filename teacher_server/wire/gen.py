"""Regenerate teacher_pb2.py from proto/ (`make proto`). Needs grpcio-tools (the `dev` extra)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "opd/teacher/v1/teacher.proto"


def generate(out_dir: Path) -> Path:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out_dir}", str(ROOT / "proto" / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return out_dir / "opd" / "teacher" / "v1" / "teacher_pb2.py"


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = generate(Path(tmp))
        dst = Path(__file__).with_name("teacher_pb2.py")
        dst.write_text(src.read_text())
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
