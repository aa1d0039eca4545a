"""Bridges (agent/bridges.py): ``watch(..., log_to=...)`` against the real wandb, MLflow and TensorBoard.

A small real torch model trains under a real collector; each target's stored values are
read back with the package's own reader and compared with the collector's history at
the same steps. The collector stores float32 (store schema 3) and the job rounds its own
view the same way (``core.stored``), so in every target the per-layer values are exactly
the collector's export (no tolerance), and equal ``on_report``'s. The indicator is
checked against float64 numpy of the reported rotations.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

import layrot
from layrot.agent.bridges import metric_name
from layrot.client.query import QueryClient

torch.set_num_threads(1)
STEPS = 8


def train(collector: str, run: str, log_to):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    reports = []  # the job's own float64 numbers (on_report), beside the bridges
    handle = layrot.watch(model, opt, run=run, collector=collector, log_to=log_to, on_report=reports.append)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert handle.flush(10)
    names, bridges = handle.layer_names, handle.bridges
    handle.close()
    assert all(b.failures == 0 for b in bridges)
    h = QueryClient(collector).history(run)
    # The collector's export is the job's float64 numbers stored as float32 (store schema 3).
    rot = np.stack([r.rotation for r in reports])
    ang = np.stack([r.step_angle for r in reports])
    assert [r.step for r in reports] == h.steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(rot.astype(np.float32).astype(np.float64), h.rotation)
    np.testing.assert_array_equal(ang.astype(np.float32).astype(np.float64), h.step_angle)
    return names, reports, h


def expected(names, reports) -> dict[str, dict[int, float]]:
    """Every metric's float64 value by step, from the job's reports (the indicator in numpy)."""
    out: dict[str, dict[int, float]] = {}
    steps = [r.step for r in reports]
    rot = np.stack([r.rotation for r in reports]).astype(np.float64)
    ang = np.stack([r.step_angle for r in reports]).astype(np.float64)
    for i, n in enumerate(names):
        out[metric_name("rotation", n)] = dict(zip(steps, rot[:, i].tolist()))
        out[metric_name("step_angle", n)] = dict(zip(steps, ang[:, i].tolist()))
    out[metric_name("indicator", "layers_at_target")] = dict(zip(steps, (rot >= 0.9).mean(axis=1).tolist()))
    out[metric_name("indicator", "min_rotation")] = dict(zip(steps, rot.min(axis=1).tolist()))
    return out


def check_export(got: dict[str, dict[int, float]], names, h) -> None:
    """The per-layer values are exactly the collector's export at the same steps."""
    for i, n in enumerate(names):
        for key, col in (("rotation", h.rotation[:, i]), ("step_angle", h.step_angle[:, i])):
            by_step = got[metric_name(key, n)]
            assert [by_step[s] for s in h.steps.tolist()] == col.tolist(), (key, n)


def check(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], tol: float, f32: bool = False):
    assert set(got) == set(want)
    for key, by_step in want.items():
        assert sorted(got[key]) == sorted(by_step) == list(range(1, STEPS + 1)), key
        for step, v in by_step.items():
            ref = float(np.float32(v)) if f32 else v
            assert abs(got[key][step] - ref) <= tol * max(1.0, abs(ref)), (key, step, got[key][step], ref)


def test_mlflow_file_store(collector, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    mlflow.set_tracking_uri(f"file://{tmp_path}/mlruns")
    with mlflow.start_run() as run:
        names, reports, h = train(collector.grpc_address, "bridge-mlflow", "mlflow")
    client = mlflow.MlflowClient()
    keys = set(client.get_run(run.info.run_id).data.metrics)
    got = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in keys}
    check(got, expected(names, reports), 1e-12)
    check_export(got, names, h)


def test_tensorboard_event_files(collector, tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    names, reports, h = train(collector.grpc_address, "bridge-tb", f"tensorboard:{tmp_path}/tb")
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    got = {k: {e.step: e.value for e in acc.Scalars(k)} for k in acc.Tags()["scalars"]}
    check(got, expected(names, reports), 0.0, f32=True)  # float32 storage: exactly the float32-rounded values
    check_export(got, names, h)


def _wandb_records(path) -> list[bytes]:
    """The records of a ``.wandb`` file: wandb 0.31 ships no Python reader (its Go core writes the
    file), so this follows the file's LevelDB-log framing (the format of wandb's former
    ``sdk/internal/datastore.py``): a 7-byte ``:W&B`` header, 32 KiB blocks, 7-byte chunk headers
    (crc32c, little-endian length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            out.append(parts)
    return out


def _wandb_history(path) -> dict[str, dict[int, float]]:
    """The offline run's history records, decoded with wandb's own protobuf Record."""
    import json

    from wandb.proto import wandb_internal_pb2

    out: dict[str, dict[int, float]] = {}
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
        step = int(items.pop("_step"))
        for k, v in items.items():
            if k.startswith("layrot/"):
                out.setdefault(k, {})[step] = float(v)
    return out


def test_wandb_offline(collector, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="layrot-test", dir=str(tmp_path))
    try:
        names, reports, h = train(collector.grpc_address, "bridge-wandb", run)
    finally:
        run.finish()
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # wandb's core process may still be writing the file after finish() returns on a busy machine.
    deadline = time.monotonic() + 30
    while not (got := _wandb_history(files[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    check(got, expected(names, reports), 1e-12)
    check_export(got, names, h)


def test_a_failing_target_is_counted_and_training_goes_on(collector):
    class Broken:
        id = "x"

        def log(self, metrics, step):
            raise OSError("disk full")

    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = layrot.watch(model, opt, run="bridge-broken", collector=collector.grpc_address, log_to=[Broken()])
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert handle.flush(10)
    handle.close()
    assert handle.bridges[0].failures == 3 and handle.bridges[0].sent == 0
    assert handle.stats.report_callback_errors == 0  # swallowed by the bridge, not the callback guard


def test_unknown_targets_are_refused_before_training():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError):
        layrot.watch(model, opt, run="bridge-bad", collector="offline", log_to="comet")
    with pytest.raises(TypeError):
        layrot.watch(model, opt, run="bridge-bad", collector="offline", log_to=3)
