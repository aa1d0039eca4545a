"""The committed generated gRPC code matches a fresh generation from layrot.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from layrot.proto import generate


def test_generated_code_is_not_stale():
    stale = generate.stale_files()
    assert not stale, f"stale generated code {stale}: run python -m layrot.proto.generate"


def test_stale_check_detects_an_edit(tmp_path, monkeypatch):
    # The check must be able to fail: edit a copy of the proto and compare.
    src = Path(generate.__file__).resolve().parent
    for name in ("layrot.proto", *generate.GENERATED):
        shutil.copy(src / name, tmp_path / name)
    text = (tmp_path / "layrot.proto").read_text()
    (tmp_path / "layrot.proto").write_text(text.replace("message Goodbye {", "message Goodbye {\n  string extra = 9;"))
    monkeypatch.setattr(generate, "HERE", tmp_path)
    assert "layrot_pb2.py" in generate.stale_files()


def test_wire_unpack_rejects_wrong_length():
    import numpy as np

    from layrot.proto.wire import pack, unpack

    a = np.arange(6, dtype=float).reshape(2, 3)
    assert (unpack(pack(a), 2, 3) == a).all()
    with pytest.raises(ValueError, match="expected 48 bytes"):
        unpack(pack(a)[:-1], 2, 3)


def test_generated_code_does_not_pin_its_runtime():
    """The floors in pyproject.toml (protobuf 4.25.1, grpcio 1.62.3) hold while the gencode checks no runtime."""
    src = Path(generate.__file__).resolve().parent
    pb2 = (src / "layrot_pb2.py").read_text()
    grpc_code = (src / "layrot_pb2_grpc.py").read_text()
    assert "ValidateProtobufRuntimeVersion" not in pb2 and "runtime_version" not in pb2
    assert "GRPC_GENERATED_VERSION" not in grpc_code
    assert "# Protobuf Python Version: 4.25.1" in pb2
    assert generate.GENERATOR == "grpcio-tools==1.62.3"
    pyproject = (src.parent / "pyproject.toml").read_text()
    assert '"protobuf>=4.25.1,<8"' in pyproject and '"grpcio>=1.62.3"' in pyproject
