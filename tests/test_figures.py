"""client/figures.py: the layer rotation figures, and the streamed, thinned history behind them."""

from __future__ import annotations

import numpy as np
import pytest

from layrot.client.figures import decimated_rotation
from layrot.client.history import History


def chunks(rotation: np.ndarray, size: int):
    S, L = rotation.shape
    for a in range(0, S, size):
        b = min(S, a + size)
        yield History(
            run="r",
            layer_names=[f"l{i}" for i in range(L)],
            steps=np.arange(a + 1, b + 1, dtype=np.int64),
            times=np.zeros(b - a),
            loss=np.zeros(b - a),
            rotation=rotation[a:b],
            step_angle=rotation[a:b],
            weight_norm=rotation[a:b],
            rho=rotation[a:b],
        )


@pytest.mark.parametrize(("total", "size", "max_points"), [(10, 3, 100), (50_001, 2000, 1000), (7_777, 333, 64)])
def test_thinned_rows_are_the_full_rows_at_a_regular_stride_and_end_at_the_newest(total, size, max_points):
    rng = np.random.default_rng(total)
    full = np.cumsum(rng.random((total, 3)), axis=0)
    steps, rot, names = decimated_rotation(chunks(full, size), max_points=max_points)
    assert names == ["l0", "l1", "l2"]
    assert steps.size <= 2 * max_points + 1 and steps[-1] == total and steps[0] == 1
    body = steps[:-1] if steps.size > 1 and (steps[-1] - steps[-2]) != (steps[1] - steps[0]) else steps
    stride = int(steps[1] - steps[0]) if steps.size > 1 else 1
    assert np.array_equal(body, np.arange(1, total + 1, stride)[: body.size])  # every stride-th step, from the first
    if total <= 2 * max_points:
        assert stride == 1 and steps.size == total
    assert np.array_equal(rot, full[steps - 1])  # the rows are the history's rows at those steps


def test_no_rows():
    steps, rot, names = decimated_rotation(iter([]))
    assert steps.size == 0 and rot.shape == (0, 0) and names == []


def test_epoch_axis_and_loss_overlay_carry_the_history(collector, ingest, sim_job, tmp_path):
    """curves --x epoch --overlay loss and compare, through a real collector: the figure's lines are
    the history's numbers (checked on the matplotlib objects), and the files are written."""
    from click.testing import CliRunner

    from layrot.cli.main import cli
    from layrot.client.figures import compare_figure, decimated_curves, layer_rotation_figure
    from layrot.client.query import QueryClient

    for run, angle in (("fast", 0.05), ("slow", 0.005)):
        job = sim_job(run=run, layer_sizes=(20, 30), step_angle=angle)
        s = ingest(collector)
        s.send(job.hello())
        s.send(job.batch(40))  # loss 1/step
        s.wait_ack(job.seq)
    h = QueryClient(collector.grpc_address).history("fast")
    c = decimated_curves(QueryClient(collector.grpc_address).iter_history("fast"))
    assert np.array_equal(c.loss, h.loss) and np.array_equal(c.rotation, h.rotation)
    fig = layer_rotation_figure(c.steps, c.rotation, c.layer_names, loss=c.loss, steps_per_epoch=8)
    ax, loss_ax = fig.axes[0], fig.axes[1]
    assert ax.get_xlabel() == "epoch" and loss_ax.get_ylabel() == "training loss"
    x, y = loss_ax.get_lines()[0].get_data()
    np.testing.assert_allclose(x, h.steps / 8)
    np.testing.assert_allclose(y, 1.0 / h.steps)
    layer0 = next(ln for ln in ax.get_lines() if ln.get_label() == h.layer_names[0])
    np.testing.assert_allclose(layer0.get_data()[0][1:], h.steps / 8)
    both = compare_figure([c, decimated_curves(QueryClient(collector.grpc_address).iter_history("slow"))])
    panels = [a for a in both.axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["fast", "slow"]
    assert panels[0].get_ylim() == panels[1].get_ylim()  # shared axes: the runs compare at a glance

    runner = CliRunner()
    out = tmp_path / "fast.png"
    args = ["curves", "fast", "-o", str(out), "--x", "epoch", "--steps-per-epoch", "8", "--overlay", "loss"]
    r = runner.invoke(cli, [*args, "--collector", collector.http_url])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(cli, ["curves", "fast", "-o", str(out), "--x", "epoch", "--collector", collector.grpc_address])
    assert r.exit_code == 2 and "--steps-per-epoch" in r.output
    cmp = tmp_path / "cmp.png"
    r = runner.invoke(cli, ["compare", "fast", "slow", "-o", str(cmp), "--collector", collector.grpc_address])
    assert r.exit_code == 0 and cmp.stat().st_size > 10_000, r.output
    r = runner.invoke(cli, ["compare", "fast", "nope", "-o", str(cmp), "--collector", collector.grpc_address])
    assert r.exit_code == 1 and "unknown run 'nope'" in r.output
