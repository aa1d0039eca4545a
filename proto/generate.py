"""Regenerate the Python gRPC code from ``layrot.proto``.

Run ``python -m layrot.proto.generate`` after editing the .proto file; pass
``--check`` to exit non-zero when the committed code is stale (the test suite
does this). Needs ``grpcio-tools`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "layrot.proto"
GENERATED = ("layrot_pb2.py", "layrot_pb2_grpc.py", "layrot_pb2.pyi")


def generate(out_dir: Path) -> None:
    """Write the generated modules into ``out_dir``."""
    import importlib.resources
    import subprocess

    include = str(importlib.resources.files("grpc_tools") / "_proto")  # dev-only dependency
    with tempfile.TemporaryDirectory() as tmp:
        # Map this folder to the virtual path layrot/proto so the generated
        # imports read "from layrot.proto import layrot_pb2".
        # protoc runs in its own process: its bundled C++ protobuf must not meet
        # whatever extension modules the calling process has loaded.
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{include}",
            f"-Ilayrot/proto={HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"layrot/proto/{PROTO}",
        ]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"protoc failed: {done.stderr.strip()}")
        for name in GENERATED:
            (out_dir / name).write_text((Path(tmp) / "layrot" / "proto" / name).read_text())


def stale_files() -> list[str]:
    """Names of generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            n for n in GENERATED if not (HERE / n).exists() or (HERE / n).read_text() != (Path(tmp) / n).read_text()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale) + "; run python -m layrot.proto.generate")
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
