"""Regenerate the Python gRPC code from ``layrot.proto``.

Run ``python -m layrot.proto.generate`` after editing the .proto file; pass
``--check`` to exit non-zero when the committed code is stale (the test suite
does this).

The generator is pinned (``GENERATOR``) and runs from its own folder, not from
the environment: grpcio-tools 1.62 emits protobuf 4.25 gencode, which carries no
runtime version check, so the committed code works with every protobuf from
4.25.1 to 7.x and every grpcio from 1.62.3 (the floors in pyproject.toml; newer
grpcio-tools would raise both floors to their own version and rule out
TensorFlow 2.16-2.19, which need protobuf < 5 or < 6). That grpcio-tools
requires protobuf < 5, which would clash with the environment's, so it is
installed with ``pip install --no-deps --target`` into a cache folder
(``$LAYROT_GENERATOR_CACHE``, default ``~/.cache/layrot``) on first use; its
protoc needs neither grpcio nor protobuf to run.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PROTO = "layrot.proto"
GENERATED = ("layrot_pb2.py", "layrot_pb2_grpc.py", "layrot_pb2.pyi")
GENERATOR = "grpcio-tools==1.62.3"


def generator_dir() -> Path:
    """Folder holding the pinned grpcio-tools (installed there on first use)."""
    base = Path(os.environ.get("LAYROT_GENERATOR_CACHE") or Path.home() / ".cache" / "layrot")
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"  # it has a C extension
    target = base / f"{GENERATOR.replace('==', '-')}-{tag}"
    if not (target / "grpc_tools" / "protoc.py").exists():
        log.info("installing %s into %s", GENERATOR, target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=base if base.exists() else None))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), GENERATOR]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"cannot install the proto generator {GENERATOR}: {done.stderr.strip()[-2000:]}")
        base.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            if not (target / "grpc_tools" / "protoc.py").exists():
                raise
    return target


def generate(out_dir: Path) -> None:
    """Write the generated modules into ``out_dir``."""
    tools = generator_dir()
    include = tools / "grpc_tools" / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # Map this folder to the virtual path layrot/proto so the generated
        # imports read "from layrot.proto import layrot_pb2".
        # protoc runs in its own process, with only the pinned generator on its
        # path (-I: no site-packages, so no other grpc_tools can be picked up).
        args = [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path.insert(0, sys.argv.pop(1)); from grpc_tools import protoc; "
            "sys.exit(protoc.main(sys.argv))",
            str(tools),
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
