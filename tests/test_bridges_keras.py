"""Bridges through Keras: ``RotationCallback(log_to=...)`` in ``model.fit`` logs into a real MLflow run.

The values read back from MLflow's file store, rounded to float32, are exactly the
collector's export (float32, store schema 3) at the same steps.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
mlflow = pytest.importorskip("mlflow")

import layrot.keras  # noqa: E402
from layrot.agent.bridges import metric_name  # noqa: E402
from layrot.client.query import QueryClient  # noqa: E402


def test_keras_fit_logs_to_mlflow(collector, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(f"file://{tmp_path}/mlruns")
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    x, y = np.random.rand(24, 5).astype("float32"), np.random.rand(24, 2).astype("float32")
    cb = layrot.keras.RotationCallback("bridge-keras", collector=collector.grpc_address, log_to="mlflow")
    with mlflow.start_run() as run:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    handle = cb.handle
    assert handle is not None
    cb.close(10.0)  # fit's end keeps the handle open (a next fit goes on): close it, delivering every step
    assert handle.stats.acked_steps == 3 and handle.bridges[0].failures == 0
    h = QueryClient(collector.grpc_address).history("bridge-keras")
    assert h.steps.tolist() == [1, 2, 3]  # 24 samples / batch 8
    client = mlflow.MlflowClient()
    for i, n in enumerate(handle.layer_names):
        hist = client.get_metric_history(run.info.run_id, metric_name("rotation", n))
        by_step = {m.step: m.value for m in hist}
        assert sorted(by_step) == h.steps.tolist()
        assert [float(np.float32(by_step[s])) for s in h.steps.tolist()] == h.rotation[:, i].tolist()
