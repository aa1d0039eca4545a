"""SGD_AMom for Keras 3: the paper's Appendix B.4 formula (``reference.py``), agreement with the
PyTorch SGD_AMom on the same data, saving and loading, Layca on top, and the torch backend."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from reference import angle, sgd_amom  # noqa: E402

import layrot.keras  # noqa: E402
from layrot.hooks.sgd_amom import SGD_AMom as TorchSGD_AMom  # noqa: E402

pytestmark = pytest.mark.tf

M = 0.9
IN, WIDTH, CLASSES, BATCH = 12, 24, 4, 32


def given_grads(shape: tuple[int, ...], steps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def keras_on_variable(w0: np.ndarray, grads, **kw) -> list[np.ndarray]:
    var = keras.Variable(w0.copy(), name="kernel")
    opt = layrot.keras.SGD_AMom(**kw)
    out = [np.array(keras.ops.convert_to_numpy(var), dtype=np.float64)]
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(g)], [var])
        out.append(np.array(keras.ops.convert_to_numpy(var), dtype=np.float64))
    return out


def torch_on_tensor(w0: np.ndarray, grads, lr: float, **kw) -> list[np.ndarray]:
    w = torch.tensor(w0.copy(), requires_grad=True)
    opt = TorchSGD_AMom([w], lr=lr, **kw)
    out = [w.detach().double().numpy().copy()]
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
        out.append(w.detach().double().numpy().copy())
    return out


def rel_norm(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bias_correction", [False, True])
def test_keras_update_is_the_papers_formula_and_the_torch_optimizers(bias_correction):
    """50 steps with weight decay on given gradients: Keras vs float64 numpy, and Keras vs torch."""
    w0 = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    grads = given_grads((7, 5), 50, 1)
    got = keras_on_variable(
        w0, grads, learning_rate=0.1, momentum=M, weight_decay=0.01, bias_correction=bias_correction
    )
    want = sgd_amom(w0, grads, 0.1, M, weight_decay=0.01, bias_correction=bias_correction)
    th = torch_on_tensor(w0, grads, 0.1, momentum=M, weight_decay=0.01, bias_correction=bias_correction)
    err_ref = max(rel_norm(g, w) for g, w in zip(got[1:], want[1:]))
    err_torch = max(rel_norm(g, w) for g, w in zip(got[1:], th[1:]))
    print(
        f"\nKeras SGD_AMom, 50 steps (bc={bias_correction}): vs numpy {err_ref:.1e}, vs torch {err_torch:.1e} "
        "max relative"
    )
    assert err_ref <= 1e-6
    assert err_torch <= 1e-6


def _models(seed: int):
    """The same 3-layer MLP in Keras and in torch, with equal initial weights."""
    keras.utils.set_random_seed(seed)
    km = keras.Sequential(
        [
            keras.Input((IN,)),
            keras.layers.Dense(WIDTH, activation="relu", name="dense"),
            keras.layers.Dense(WIDTH, activation="relu", name="dense_1"),
            keras.layers.Dense(CLASSES, name="dense_2"),
        ]
    )
    tm = torch.nn.Sequential(
        torch.nn.Linear(IN, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, CLASSES),
    )
    with torch.no_grad():
        for layer, lin in zip(km.layers, [tm[0], tm[2], tm[4]]):
            kernel, bias = layer.get_weights()
            lin.weight.copy_(torch.tensor(kernel.T))
            lin.bias.copy_(torch.tensor(bias))
    return km, tm


def _batches(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((IN, CLASSES))
    out = []
    for _ in range(n):
        x = rng.standard_normal((BATCH, IN)).astype(np.float32)
        out.append((x, (x @ teacher).argmax(1).astype(np.int64)))
    return out


def test_keras_and_torch_train_the_same_model_alike():
    """Same MLP, same 50 batches, SGD_AMom with weight decay in both frameworks: the weights agree
    (the frameworks' float32 gradients differ by rounding, which 50 steps carry along)."""
    km, tm = _models(3)
    km.compile(
        optimizer=layrot.keras.SGD_AMom(learning_rate=0.05, momentum=M, weight_decay=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    opt = TorchSGD_AMom(tm.parameters(), lr=0.05, momentum=M, weight_decay=1e-3)
    for x, y in _batches(50):
        km.train_on_batch(x, y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(y)).backward()
        opt.step()
    worst = 0.0
    for layer, lin in zip(km.layers, [tm[0], tm[2], tm[4]]):
        kernel, bias = layer.get_weights()
        worst = max(worst, rel_norm(kernel.T, lin.weight.detach().numpy()), rel_norm(bias, lin.bias.detach().numpy()))
    print(f"\nKeras vs torch SGD_AMom, MLP, 50 steps: max relative weight difference {worst:.1e}")
    assert worst <= 1e-6


def test_save_and_load_resume_the_same_trajectory(tmp_path):
    data = _batches(30)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def compiled(seed: int) -> keras.Model:
        km, _ = _models(seed)
        km.compile(
            optimizer=layrot.keras.SGD_AMom(learning_rate=0.05, momentum=M, weight_decay=1e-3, bias_correction=True),
            loss=loss,
        )
        return km

    full = compiled(4)
    for x, y in data:
        full.train_on_batch(x, y)
    part = compiled(4)
    for x, y in data[:12]:
        part.train_on_batch(x, y)
    path = tmp_path / "m.keras"
    part.save(path)
    resumed = keras.models.load_model(path)
    opt = resumed.optimizer
    assert type(opt) is layrot.keras.SGD_AMom
    assert (opt.momentum, opt.l2_weight_decay, opt.bias_correction) == (M, 1e-3, True)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 12
    for x, y in data[12:]:
        resumed.train_on_batch(x, y)
    for a, b in zip(resumed.get_weights(), full.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    cfg = opt.get_config()
    again = layrot.keras.SGD_AMom.from_config(cfg)
    assert again.get_config() == cfg


def test_keras_layca_on_sgd_amom_rotates_by_arctan_rho():
    km, _ = _models(5)
    km.compile(
        optimizer=layrot.keras.Layca(layrot.keras.SGD_AMom(learning_rate=0.1, momentum=M), rho=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    snaps = [[layer.get_weights()[0].astype(np.float64) for layer in km.layers]]
    for x, y in _batches(15):
        km.train_on_batch(x, y)
        snaps.append([layer.get_weights()[0].astype(np.float64) for layer in km.layers])
    want = math.atan(0.05)
    worst = max(abs(angle(a, b) - want) / want for s0, s1 in zip(snaps, snaps[1:]) for a, b in zip(s0, s1))
    print(f"\nKeras Layca(SGD_AMom), 3 kernels, 15 steps: angle vs arctan(rho) max relative {worst:.1e}")
    assert worst <= 1e-4


def test_invalid_hyperparameters_are_refused():
    for kw in ({"momentum": 1.0}, {"momentum": -0.5}, {"weight_decay": -1.0}, {"learning_rate": -0.1}):
        with pytest.raises(ValueError):
            layrot.keras.SGD_AMom(**kw)


TORCH_BACKEND_JOB = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    assert keras.backend.backend() == "torch"
    import layrot.keras
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((7, 5)).astype(np.float32)
    grads = [rng.standard_normal((7, 5)).astype(np.float32) for _ in range(50)]
    var = keras.Variable(w0.copy())
    opt = layrot.keras.SGD_AMom(learning_rate=0.1, momentum=0.9, weight_decay=0.01, bias_correction=True)
    out = []
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(g)], [var])
        out.append(keras.ops.convert_to_numpy(var))
    np.savez(sys.argv[1], w0=w0, grads=np.array(grads), out=np.array(out), tf_loaded="tensorflow" in sys.modules)
    """
)


def test_torch_backend_follows_the_formula(tmp_path):
    """KERAS_BACKEND=torch (read at ``import keras``, so in a subprocess): the same formula, no TensorFlow."""
    script = tmp_path / "job.py"
    script.write_text(TORCH_BACKEND_JOB)
    out = tmp_path / "out.npz"
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    want = sgd_amom(got["w0"], list(got["grads"]), 0.1, M, weight_decay=0.01, bias_correction=True)
    err = max(rel_norm(g, w) for g, w in zip(got["out"], want[1:]))
    print(f"\nKeras SGD_AMom on the torch backend, 50 steps: vs numpy max relative {err:.1e}")
    assert err <= 1e-6
