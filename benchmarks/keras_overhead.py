"""Overhead of ``layrot.keras.RotationCallback`` on ``model.fit``, side by side in one run.

Two small CNNs on MNIST-shaped random data: the Keras MNIST convnet example
with BatchNormalization (Conv-BN-Conv-BN-Dense, batch 128), and a worst case
with most of its weights in one Dense layer (few FLOPs per weight, batch 64).
Each runs one long ``fit`` that switches every few steps between no callback
("off") and RotationCallbacks at every=1 and every=10 with the collector up (a
real ``layrot-agent serve`` in another process) or down (nothing listening).
The step time is the interval between consecutive batch starts, so it includes
Keras' own per-batch work and the hook's; medians per configuration. Switching
within one fit keeps drift in machine load (other jobs on the host) out of the
ratios. "measure" is the device measurement alone (one compiled call plus the
host copy the reporter thread makes).

    python benchmarks/keras_overhead.py            # about 5 minutes on 2 cores
    python benchmarks/keras_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import layrot.keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collector_proc import free_port, running_collector  # noqa: E402


def mnist_convnet() -> keras.Model:
    """The Keras MNIST convnet example (Conv32-Pool-Conv64-Pool-Dense10), with BatchNormalization."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ],
        name="mnist_convnet",
    )
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def dense_heavy_cnn() -> keras.Model:
    """A worst case for the hook: few FLOPs per parameter (most weights in one Dense layer)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="dense_heavy",
    )
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


MODELS = {"mnist-convnet": (mnist_convnet, 128), "dense-heavy": (dense_heavy_cnn, 64)}


class Interleaved(keras.callbacks.Callback):
    """Runs one long ``fit`` and switches between configurations every ``block`` steps.

    ``configs`` maps a label to a callback (or None for "off"). Only the active
    callback sees ``on_train_batch_begin``; the interval from one batch start to
    the next (the train step plus the hook work done at the next batch start) is
    credited to the configuration active at that next batch start, skipping the
    first interval of each block. Machine-load drift thus hits every
    configuration alike, block by block. Only ``on_train_batch_begin`` is
    overridden, so Keras keeps its asynchronous batch-end dispatch, as it would
    for the RotationCallback alone.
    """

    def __init__(self, configs: dict[str, keras.callbacks.Callback | None], block: int = 10) -> None:
        super().__init__()
        self.configs = configs
        self.labels = list(configs)
        self.block = block
        self.samples: dict[str, list[float]] = {k: [] for k in configs}
        self._i = 0
        self._last: float | None = None

    def set_model(self, model) -> None:
        super().set_model(model)
        for cb in self.configs.values():
            if cb is not None:
                cb.set_model(model)

    def on_train_begin(self, logs=None) -> None:
        for cb in self.configs.values():
            if cb is not None:
                cb.on_train_begin(logs)

    def on_train_end(self, logs=None) -> None:
        for cb in self.configs.values():
            if cb is not None:
                cb.on_train_end(logs)

    def on_train_batch_begin(self, batch, logs=None) -> None:
        label = self.labels[(self._i // self.block) % len(self.labels)]
        cb = self.configs[label]
        if cb is not None:
            cb.on_train_batch_begin(batch, logs)
        now = time.perf_counter()
        if self._last is not None and self._i % self.block != 0:
            self.samples[label].append(now - self._last)
        self._last = now
        self._i += 1


def bench_model(name: str, args: argparse.Namespace, up_addr: str, down_addr: str) -> dict[str, dict]:
    build, batch = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * 8, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, batch * 8)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat().prefetch(2)
    model = build()
    model.fit(data, epochs=1, steps_per_epoch=5, verbose=0)  # trace the train function once
    configs: dict[str, keras.callbacks.Callback | None] = {"off": None}
    for label, addr in (("up", up_addr), ("down", down_addr)):
        for every in (1, 10):
            configs[f"{label} every={every}"] = layrot.keras.RotationCallback(
                run=f"bench-{name}-{label}-every{every}", every=every, collector=addr
            )
    inter = Interleaved(configs, block=args.block)
    steps = args.block * len(configs) * args.cycles
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[inter])
    for cb in configs.values():
        if cb is not None:
            cb.close(timeout=2.0)
    base = statistics.median(inter.samples["off"])
    out: dict[str, dict] = {
        "model": {
            "params": model.count_params(),
            "batch": batch,
            "step_s_off": base,
            "samples_per_config": len(inter.samples["off"]),
        }
    }
    out["ratios"] = {k: statistics.median(v) / base for k, v in inter.samples.items() if k != "off"}
    # The device measurement alone (the work a reported step adds): one compiled call + host copy.
    cb = configs["down every=1"]
    dist = cb.handle._dist  # type: ignore[union-attr]
    meas = []
    for _ in range(50):
        t0 = time.perf_counter()
        dist.measure(refresh_prev=True).numpy()
        meas.append(time.perf_counter() - t0)
    out["model"]["measure_s"] = statistics.median(meas)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=24, help="times every configuration gets a block")
    ap.add_argument("--block", type=int, default=10, help="consecutive steps per configuration")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.block = 2, 5
    logging.getLogger("layrot").setLevel(logging.ERROR)  # the collector-down warning is expected

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, running_collector(tmp) as up_addr:
        down_addr = f"127.0.0.1:{free_port()}"
        for name in args.models.split(","):
            results[name] = bench_model(name, args, up_addr, down_addr)

    if args.json:
        print(json.dumps({"tf": tf.__version__, "keras": keras.__version__, "results": results}, indent=2))
        return
    print(
        f"model.fit step time with RotationCallback over without: medians, configurations interleaved "
        f"every {args.block} steps in one fit, CPU, TF {tf.__version__} / Keras {keras.__version__}"
    )
    print(
        f"{'':32} {'step (off)':>10} {'up every=1':>11} {'up every=10':>12} {'down every=1':>13} "
        f"{'down every=10':>14} {'measure':>8}"
    )
    for name, res in results.items():
        info, r = res["model"], res["ratios"]
        title = f"{name} ({info['params'] / 1e3:.0f}k, batch {info['batch']})"
        print(
            f"{title:32} {info['step_s_off'] * 1e3:8.2f}ms {r['up every=1']:11.3f} {r['up every=10']:12.3f} "
            f"{r['down every=1']:13.3f} {r['down every=10']:14.3f} {info['measure_s'] * 1e6:6.0f}us"
        )
    print("target: every=1 <= 1.05; dense-heavy is a worst case (most weights, fewest FLOPs per weight)")


if __name__ == "__main__":
    main()
