"""layrot.watch on an FSDP2-sharded model: every rank reports whole-layer rotations.

A real 2-process job (torch.distributed, gloo on 127.0.0.1, ``fully_shard`` on
every Linear and on the root, SGD with momentum and weight decay, each rank
drawing its own batches) trains under ``layrot.watch`` against a real collector.
Each rank saves its local shards after every step; the test concatenates the
shards along dim 0 in rank order into the full weights and checks both ranks'
rotations and step angles, as the collector computed them, against float64
numpy from those full weights. A rank's own shard gives different numbers
(checked too), so a missing or wrong all-reduce fails the test.

The layer sizes make the shards uneven (33 rows -> 17 + 16) and give rank 1 an
empty shard (a 1-row layer), and the head is registered before the layers it
follows, so forward order is exercised too.

Run as a script, this file is the worker: ``python test_torch_shards.py worker ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

IN, H1, H2, H3 = 12, 33, 24, 5
STEPS = 30
TOL = 1e-4
WORKER_TIMEOUT = 300.0  # generous: two ranks plus the collector share 2 loaded cores
NAMES = ["l1.weight", "l2.weight", "l3.weight", "head.weight"]  # forward order


def build_model() -> Any:
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(H3, 1)  # registered first, runs last
            self.l1 = nn.Linear(IN, H1)
            self.l2 = nn.Linear(H1, H2)
            self.l3 = nn.Linear(H2, H3)

        def forward(self, x: Any) -> Any:
            import torch

            return self.head(torch.tanh(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))

    return Net()


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--collector", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--hsdp", action="store_true", help="2-D mesh (replicate=1, shard=world): HSDP placements")
    ap.add_argument("--dtype", default="float32", help="the parameters' dtype (torch attribute name)")
    a = ap.parse_args(argv)

    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import layrot

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{a.port}",
        rank=a.rank,
        world_size=a.world,
        timeout=timedelta(seconds=WORKER_TIMEOUT),
    )
    mesh = (
        init_device_mesh("cpu", (1, a.world), mesh_dim_names=("replicate", "shard"))
        if a.hsdp
        else init_device_mesh("cpu", (a.world,))
    )
    torch.manual_seed(0)  # same full init on every rank; each keeps its shard
    dtype = getattr(torch, a.dtype)
    model = build_model().to(dtype)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report: dict[str, Any] = {}

    # Layca needs whole-layer dot products: refused at construction, naming the
    # parameters by their place in the optimizer (param0 = l1.weight).
    try:
        layca = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1))
        layrot.watch(model, layca, run=a.run + "-layca", collector=a.collector)
        report["layca_error"] = ""
    except ValueError as exc:
        report["layca_error"] = str(exc)

    # Ranks watching with different every would pair their all-reduces wrongly: refused on every rank.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    try:
        layrot.watch(model, opt, run=a.run + "-every", collector=a.collector, every=1 + a.rank)
        report["every_error"] = ""
    except ValueError as exc:
        report["every_error"] = str(exc)

    handle = layrot.watch(
        model,
        opt,
        run=a.run,
        collector=a.collector,
        every=a.every,
        reporter_options={"backoff_initial": 0.05, "backoff_max": 0.5},
    )
    params = dict(model.named_parameters())

    def shards() -> list[np.ndarray]:
        return [params[n].to_local().detach().double().numpy().copy() for n in NAMES]

    saved = [shards()]
    g = torch.Generator().manual_seed(100 + a.rank)  # each rank its own data; FSDP averages gradients
    x = torch.randn(64, IN, generator=g).to(dtype)
    y = torch.randn(64, 1, generator=g).to(dtype)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        handle.observe_loss(loss)
        opt.step()
        saved.append(shards())
    report["layer_names"] = handle.layer_names
    report["placements"] = [str(params[n].placements) for n in NAMES]
    report["flushed"] = handle.flush(60.0)

    # Resume: the state carries this rank's shards; another rank's state or sharding is refused.
    state = handle.state_dict()
    report["state_shapes"] = [list(w.shape) for w in state["w0"]]
    for key, bad in (
        ("resume_rank_error", dict(state, rank=1 - a.rank)),
        ("resume_shape_error", dict(state, w0=[w[:1] for w in state["w0"]])),
    ):
        try:
            handle.load_state_dict(bad)
            report[key] = ""
        except ValueError as exc:
            report[key] = str(exc)
    handle.load_state_dict(state)
    handle.close()
    np.savez(Path(a.out) / f"rank{a.rank}.npz", **{f"w{i}": np.stack([s[i] for s in saved]) for i in range(len(NAMES))})
    (Path(a.out) / f"rank{a.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker_main(sys.argv[2:])
    sys.exit(0)


# ---------------------------------------------------------------- tests
import pytest  # noqa: E402
import torch  # noqa: E402
from reference import angle, cosine_distance, rel_err  # noqa: E402

from layrot.client.query import QueryClient  # noqa: E402
from layrot.hooks.torch_shards import ShardGroups  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(
    collector: Any, out: Path, run: str, every: int = 1, hsdp: bool = False, dtype: str = "float32"
) -> list[dict[str, Any]]:
    """Start both ranks, wait for them, return each rank's report (with its shards under "w")."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    logs = [open(out / f"rank{r}.log", "w") for r in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "worker",
                "--rank",
                str(r),
                "--port",
                str(port),
                "--collector",
                collector.grpc_address,
                "--run",
                run,
                "--out",
                str(out),
                "--every",
                str(every),
                "--dtype",
                dtype,
            ]
            + (["--hsdp"] if hsdp else []),
            env=env,
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    deadline = time.monotonic() + WORKER_TIMEOUT + 60
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{(out / f'rank{r}.log').read_text()[-4000:]}"
    reports = []
    for r in range(2):
        rep = json.loads((out / f"rank{r}.json").read_text())
        with np.load(out / f"rank{r}.npz") as z:
            rep["w"] = [z[f"w{i}"] for i in range(len(NAMES))]
        reports.append(rep)
    return reports


def full_weights(reports: list[dict[str, Any]]) -> list[np.ndarray]:
    """Per layer, (steps + 1, *shape): rank shards concatenated along dim 0 in rank order."""
    return [np.concatenate([rep["w"][i] for rep in reports], axis=1) for i in range(len(NAMES))]


def reference(w: list[np.ndarray], steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rot = [[cosine_distance(w[l][0], w[l][t]) for l in range(len(w))] for t in steps]
    ang = [[angle(w[l][t - 1], w[l][t]) for l in range(len(w))] for t in steps]
    return np.array(rot), np.array(ang)


@pytest.mark.parametrize("every,hsdp", [(1, False), (3, False), (1, True)], ids=["every1", "every3", "hsdp"])
def test_fsdp_ranks_report_whole_layer_rotations(collector: Any, tmp_path: Path, every: int, hsdp: bool) -> None:
    """FSDP on a 1-D mesh; HSDP placements (Replicate(), Shard(0)) reduce over the mesh's shard dimension."""
    run = f"fsdp-every{every}" + ("-hsdp" if hsdp else "")
    reports = run_job(collector, tmp_path, run, every=every, hsdp=hsdp)
    placement = "(Replicate(), Shard(dim=0))" if hsdp else "(Shard(dim=0),)"
    assert all(r["placements"] == [placement] * len(NAMES) for r in reports), reports[0]["placements"]
    w = full_weights(reports)
    assert [x.shape[1:] for x in w] == [(H1, IN), (H2, H1), (H3, H2), (1, H3)]
    # The shards really are uneven / empty: rank 1 holds no row of the head.
    assert [r["w"][0].shape[1] for r in reports] == [17, 16]
    assert [r["w"][3].shape[1] for r in reports] == [1, 0]

    for rank, rep in enumerate(reports):
        assert rep["flushed"], f"rank {rank} did not flush"
        assert rep["layer_names"] == NAMES
        assert "Layca" in rep["layca_error"] and "FSDP-sharded" in rep["layca_error"]
        assert "param0" in rep["layca_error"]
        assert "every" in rep["every_error"]
        assert rep["state_shapes"] == [list(x.shape[1:]) for x in rep["w"]]
        assert "rank" in rep["resume_rank_error"]
        assert "same sharding" in rep["resume_shape_error"]

    steps = list(range(every, STEPS + 1, every))
    rot_ref, ang_ref = reference(w, steps)
    q = QueryClient(collector.grpc_address)
    for rank in range(2):
        hist = q.history(run, rank=rank)
        assert list(hist.steps) == steps, f"rank {rank}"
        assert rel_err(hist.rotation, rot_ref).max() <= TOL, f"rank {rank}"
        assert rel_err(hist.step_angle, ang_ref).max() <= TOL, f"rank {rank}"
        norms = np.array([[np.linalg.norm(w[l][t]) for l in range(len(w))] for t in steps])
        assert rel_err(hist.weight_norm, norms).max() <= 1e-5
        assert np.isfinite(hist.loss).all()
    # A rank's own shard would give other numbers: the check above has teeth.
    own = np.array(
        [[cosine_distance(reports[0]["w"][l][0], reports[0]["w"][l][t]) for l in range(len(w))] for t in steps]
    )
    assert rel_err(own, rot_ref).max() > 10 * TOL

    # The layer table is the whole layers'.
    info = q.get_run(run)
    assert info["world_size"] == 2
    assert [lay["name"] for lay in info["layers"]] == NAMES
    assert [lay["shape"] for lay in info["layers"]] == [list(x.shape[1:]) for x in w]
    init = np.array([lay["init_norm"] for lay in info["layers"]])
    assert rel_err(init, np.array([np.linalg.norm(x[0]) for x in w])).max() <= 1e-12
    stored = {r.run: r for r in collector.store.load_runs()}[run]
    assert [lay.sharded for lay in stored.layers] == [True] * 4
    assert [lay.numel for lay in stored.layers] == [x[0].size for x in w]
    assert [lay.module_type for lay in stored.layers] == ["Linear"] * 4
    # The refused watch calls never opened a session.
    assert {r["run"] for r in q.list_runs()} == {run}


def test_unsharded_layers_take_no_collective() -> None:
    """Plain tensors: no group, no all-reduce (no process group exists here, so any would raise)."""
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    params = [torch.randn(4, 3), torch.randn(5, 4)]
    shards = ShardGroups(params, ["a", "b"])
    assert not shards.any and shards.sharded == [False, False]
    assert shards.reduce_async(torch.zeros(4, 2, dtype=torch.float64)) is None
    assert all(v.data_ptr() == p.data_ptr() for v, p in zip(shards.local_views(), params))
