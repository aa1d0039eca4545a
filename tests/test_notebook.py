"""``layrot.Client`` (client/notebook.py): the notebook's reader, over the HTTP API and over gRPC.

A real collector fed by simulated jobs over real gRPC sessions; the DataFrame is
checked against the job's float64 truth and against the gRPC client's arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import layrot
from layrot.client.query import QueryClient


@pytest.fixture
def fed(collector, ingest, sim_job):
    job = sim_job(run="nb", layer_sizes=(20, 30, 40))  # no Layca: its commanded angles would be exempt
    s = ingest(collector)
    s.send(job.hello(total_steps=30))
    s.send(job.batch(25, angle=0.01, loss=False))
    s.send(job.batch(1, angle=1.2, loss=False))  # step 26: an abrupt rotation, so there is an alert to list
    s.wait_ack(job.seq)
    return collector, job


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_runs_history_alerts_and_curves(fed, transport):
    collector, job = fed
    address = collector.http_url if transport == "http" else collector.grpc_address
    with layrot.Client(address) as c:
        runs = c.runs()
        assert [r["run"] for r in runs] == ["nb"] and runs[0]["step"] == 26
        html = runs._repr_html_()
        assert html.startswith("<table>") and "<td>nb</td>" in html and "layers_at_target_ratio" in html
        detail = c.run("nb")
        assert [lay["name"] for lay in detail["layers"]] == job.names
        assert "<th>rotation</th>" in detail["layers"]._repr_html_()

        df = c.history("nb")
        steps, L = sorted(job.truth), len(job.names)
        assert len(df) == len(steps) * L
        assert list(df.columns) == [
            "step",
            "time",
            "loss",
            "layer",
            "layer_index",
            "rotation",
            "step_angle",
            "weight_norm",
            "rho",
        ]
        rot = df.pivot(index="step", columns="layer_index", values="rotation").to_numpy()
        np.testing.assert_allclose(rot, job.truth_array("rotation"), rtol=1e-7)
        arrays = QueryClient(collector.grpc_address).history("nb")
        np.testing.assert_array_equal(df["step_angle"].to_numpy(), arrays.step_angle.ravel())
        assert list(df["layer"].cat.categories) == job.names

        alerts = c.alerts("nb")
        assert [a["step"] for a in alerts] == [26] and alerts[0]["kind"] == "abrupt_rotation"
        assert "abrupt_rotation" in alerts._repr_html_()
        assert alerts.to_pandas()["step"].tolist() == [26]

        fig = c.curves("nb", overlay_loss=True)
        lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in job.names]
        np.testing.assert_allclose(lines[0].get_data()[1][1:], job.truth_array("rotation")[:, 0], rtol=1e-7)


def test_without_pandas_the_history_is_arrays(fed, monkeypatch):
    import builtins

    collector, job = fed
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("no pandas here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    h = layrot.Client(collector.http_url).history("nb")
    assert h.rotation.shape == (26, 3)
    np.testing.assert_allclose(h.rotation, job.truth_array("rotation"), rtol=1e-7)
