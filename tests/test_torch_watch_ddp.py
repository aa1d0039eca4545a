"""DDP with ``run=None``: every rank reports into one run.

A real 2-process DDP job (gloo on loopback, CPU) calls ``layrot.watch(model, opt)``
with no run name on both ranks: rank 0's default name (script-time-host) reaches
rank 1 over the process group, so the collector holds one run with both ranks, each
with every step. Under torchrun with a rendezvous id, the name comes from
``TORCHELASTIC_RUN_ID`` (same on every rank without a collective).

Run as a script, this file is the DDP worker: ``python test_torch_watch_ddp.py RANK WORLD PORT ADDRESS``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 4


def worker(rank: int, world: int, port: int, address: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import layrot

    torch.set_num_threads(1)
    os.environ.pop("LAYROT_RUN", None)
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if rank == 1:
        time.sleep(1.5)  # its own default name would carry another second than rank 0's
    handle = layrot.watch(model, opt, collector=address)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ok = handle.flush(20.0)
    print(f"RUN {handle.run} {handle.layer_names} {ok}", flush=True)
    handle.close()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch: ~50 s on this machine
def test_ddp_ranks_share_one_default_run(collector, tmp_path):
    from layrot.client.query import QueryClient

    port = _free_port()
    env = {**os.environ, "LAYROT_SPOOL_DIR": str(tmp_path / "spool")}
    env.pop("LAYROT_RUN", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__)), str(r), "2", str(port), collector.grpc_address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = [next(line for line in out.splitlines() if line.startswith("RUN ")) for out, _ in outs]
    names = {line.split()[1] for line in lines}
    assert len(names) == 1, lines  # one run for both ranks
    run = names.pop()
    assert run.startswith("test_torch_watch_ddp-")
    assert all(line.endswith("True") for line in lines), lines  # every step of both ranks acknowledged
    runs = [r for r in QueryClient(collector.grpc_address).list_runs() if r["run"].startswith("test_torch_watch_ddp")]
    assert [r["run"] for r in runs] == [run]
    hist = QueryClient(collector.grpc_address).history(run)
    assert list(hist.steps) == list(range(1, STEPS + 1))
    assert list(hist.layer_names) == ["0.weight", "2.weight"]  # DDP's module. prefix dropped


def test_torchelastic_run_id_names_the_run(monkeypatch):
    import torch
    from torch import nn

    import layrot

    monkeypatch.delenv("LAYROT_RUN", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1234")
    model = nn.Linear(4, 4)
    handle = layrot.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), collector="offline")
    script = os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"
    assert handle.run == f"{script}-job-1234"
    handle.close(0.0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's value when no id was given: the default name
    handle = layrot.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), collector="offline")
    assert "job-1234" not in handle.run and handle.run != f"{script}-none"
    handle.close(0.0)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
