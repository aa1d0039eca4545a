"""SGD_AMom for PyTorch (the paper's Appendix B.4), against the formula written out in
``reference.py`` in float64, on tensors and on a real small model; its two kernel paths,
its checkpoints, Layca on top of it, and how it differs from torch's dampened SGD."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from reference import angle, sgd_amom, sgd_amom_step
from torch import nn

import layrot
from layrot.controllers.adaptcopy import base_advice
from layrot.core.amom import base_for
from layrot.hooks.sgd_amom import SGD_AMom

IN, WIDTH, CLASSES, BATCH = 12, 24, 4, 32
M = 0.9


# ---------------------------------------------------------------- helpers


def mlp(seed: int, depth: int = 4, bias: bool = True, bn: bool = True) -> nn.Sequential:
    """depth Linear layers (the Layca layers), with BatchNorm between them when ``bn``."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    d = IN
    for _ in range(depth - 1):
        mods += [nn.Linear(d, WIDTH, bias=bias)] + ([nn.BatchNorm1d(WIDTH)] if bn else []) + [nn.ReLU()]
        d = WIDTH
    mods.append(nn.Linear(d, CLASSES, bias=bias))
    return nn.Sequential(*mods)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN, CLASSES, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, IN, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def weights(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().double().numpy().copy() for p in model.parameters()]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, record_grads: bool = False):
    """Train on ``data``; returns (weights before step 1, after step 1, ...; grads of each step)."""
    snaps = [weights(model)]
    grads = []
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
        if record_grads:
            grads.append([p.grad.detach().double().numpy().copy() for p in model.parameters()])
        opt.step()
        snaps.append(weights(model))
    return snaps, grads


def random_grads(shape: tuple[int, ...], steps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


def run_on_tensor(w0: np.ndarray, grads, dtype: torch.dtype, lr=0.1, **kw) -> list[np.ndarray]:
    """Drive SGD_AMom on one tensor with given gradients; returns [w_0, ..., w_T] in float64."""
    w = torch.tensor(w0, dtype=dtype, requires_grad=True)
    opt = SGD_AMom([w], lr=lr, **kw)
    out = [w.detach().double().numpy().copy()]
    for g in grads:
        w.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        out.append(w.detach().double().numpy().copy())
    return out


def rel_norm(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- the formula


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_trajectory_on_tensors_is_the_papers_formula(foreach, bias_correction):
    """50 steps on a tensor with given gradients and weight decay: float64 agrees to rounding,
    float32 to float32 precision, with the float64 numpy formula."""
    w0 = np.random.default_rng(0).standard_normal((7, 5))
    grads = random_grads((7, 5), 50, seed=1)
    kw = dict(momentum=M, weight_decay=0.01, bias_correction=bias_correction, foreach=foreach)
    want = sgd_amom(w0, grads, 0.1, M, weight_decay=0.01, bias_correction=bias_correction)
    got64 = run_on_tensor(w0, grads, torch.float64, **kw)
    got32 = run_on_tensor(w0.astype(np.float32), grads, torch.float32, **kw)
    err64 = max(rel_norm(g, w) for g, w in zip(got64[1:], want[1:]))
    # float32 rounds w_0 and the gradients first: compare with the formula on those rounded inputs.
    want32 = sgd_amom(
        w0.astype(np.float32), [g.astype(np.float32) for g in grads], 0.1, M, 0.01, bias_correction=bias_correction
    )
    err32 = max(rel_norm(g, w) for g, w in zip(got32[1:], want32[1:]))
    print(
        f"\nSGD_AMom on a tensor, 50 steps (foreach={foreach}, bc={bias_correction}): "
        f"float64 {err64:.1e}, float32 {err32:.1e} max relative vs numpy"
    )
    assert err64 <= 1e-14
    assert err32 <= 1e-6


def test_learning_rate_changes_and_groups_follow_the_formula():
    """Two param groups with their own lr and weight decay; lr changed mid-run (as a scheduler does)."""
    rng = np.random.default_rng(3)
    a0, b0 = rng.standard_normal(6), rng.standard_normal((2, 3))
    ga, gb = random_grads((6,), 20, 4), random_grads((2, 3), 20, 5)
    a = torch.tensor(a0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    opt = SGD_AMom([{"params": [a]}, {"params": [b], "lr": 0.03, "weight_decay": 0.1}], lr=0.2, momentum=0.8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for t in range(20):
        a.grad, b.grad = torch.tensor(ga[t]), torch.tensor(gb[t])
        opt.step()
        sched.step()
    want_a = sgd_amom(a0, ga, [0.2] * 10 + [0.1] * 10, 0.8)
    want_b = sgd_amom(b0, gb, [0.03] * 10 + [0.015] * 10, 0.8, weight_decay=0.1)
    np.testing.assert_allclose(a.detach().numpy(), want_a[-1], rtol=1e-13)
    np.testing.assert_allclose(b.detach().numpy(), want_b[-1], rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_step_on_a_real_model_is_the_papers_formula(dtype):
    """A BatchNorm MLP trained 50 steps with weight decay: every step of every parameter equals
    the float64 formula applied to the saved weights and gradients (velocity carried in numpy)."""
    model = mlp(0).to(dtype)
    opt = SGD_AMom(model.parameters(), lr=0.1, momentum=M, weight_decay=5e-4)
    snaps, grads = train(model, opt, batches(50), record_grads=True)
    eps = float(torch.finfo(dtype).eps)
    vel = [np.zeros_like(w) for w in snaps[0]]
    worst = 0.0
    for t in range(1, len(snaps)):
        for i, (w_prev, g) in enumerate(zip(snaps[t - 1], grads[t - 1])):
            want, vel[i] = sgd_amom_step(w_prev, vel[i], g, t, 0.1, M, weight_decay=5e-4)
            # Storing w_t in the parameter dtype rounds it by up to eps/2 * |w_t| whatever the
            # optimizer does; what is left beyond that, relative to the step, is the optimizer's error.
            excess = np.maximum(np.abs(snaps[t][i] - want) - 0.5 * eps * np.abs(want), 0.0)
            worst = max(worst, float(np.linalg.norm(excess) / np.linalg.norm(want - w_prev)))
    print(
        f"\nSGD_AMom on a BatchNorm MLP ({dtype}), 50 steps: max step error vs numpy {worst:.1e} "
        "(relative to the step, beyond the rounding of w)"
    )
    assert worst <= (1e-12 if dtype == torch.float64 else 1e-5)
    state = opt.state[next(model.parameters())]
    assert float(state["step"]) == 50.0


# ---------------------------------------------------------------- the two paths


@pytest.mark.parametrize("bias_correction", [False, True])
def test_foreach_and_single_tensor_paths_agree(bias_correction):
    runs = []
    for foreach in (False, True):
        model = mlp(1)
        opt = SGD_AMom(
            model.parameters(), lr=0.05, momentum=M, weight_decay=1e-3, bias_correction=bias_correction, foreach=foreach
        )
        runs.append(train(model, opt, batches(30))[0])
    worst = max(float(np.abs(a - b).max()) for sa, sb in zip(*runs) for a, b in zip(sa, sb))
    print(f"\nSGD_AMom foreach vs single-tensor, 30 steps (bc={bias_correction}): max abs difference {worst:.1e}")
    assert worst <= 1e-6


def test_maximize_and_parameters_without_grad():
    """maximize ascends (the formula with -grad); a parameter without a grad keeps its state and count."""
    w0 = np.random.default_rng(6).standard_normal(4)
    grads = random_grads((4,), 10, 7)
    for foreach in (False, True):
        got = run_on_tensor(w0, grads, torch.float64, momentum=M, weight_decay=0.01, maximize=True, foreach=foreach)
        want = sgd_amom(w0, [-g for g in grads], 0.1, M, weight_decay=0.01)
        np.testing.assert_allclose(got[-1], want[-1], rtol=1e-13)
        a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = SGD_AMom([a, b], lr=0.1, momentum=M, bias_correction=True, foreach=foreach)
        for t in range(4):
            a.grad = torch.ones(3, dtype=torch.float64)
            b.grad = torch.ones(3, dtype=torch.float64) if t % 2 else None
            opt.step()
        assert float(opt.state[a]["step"]) == 4 and float(opt.state[b]["step"]) == 2
        # Constant gradients with bias correction: v_hat = g exactly, so each step moves by lr.
        np.testing.assert_allclose(a.detach().numpy(), -0.4, rtol=1e-14)
        np.testing.assert_allclose(b.detach().numpy(), -0.2, rtol=1e-14)


def test_invalid_hyperparameters_and_sparse_grads_are_refused():
    p = [torch.zeros(2, requires_grad=True)]
    for kw in ({"lr": -1.0}, {"momentum": 1.0}, {"momentum": -0.1}, {"weight_decay": -1e-3}):
        with pytest.raises(ValueError):
            SGD_AMom(p, **kw)
    emb = nn.Embedding(5, 3, sparse=True)
    opt = SGD_AMom(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_resumes_the_same_trajectory(foreach):
    data = batches(50)
    model = mlp(2)
    opt = SGD_AMom(model.parameters(), lr=0.1, momentum=M, weight_decay=1e-3, bias_correction=True, foreach=foreach)
    full, _ = train(model, opt, data)

    model = mlp(2)
    opt = SGD_AMom(model.parameters(), lr=0.1, momentum=M, weight_decay=1e-3, bias_correction=True, foreach=foreach)
    train(model, opt, data[:20])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = mlp(99)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = SGD_AMom(resumed.parameters(), lr=1.0, momentum=0.5, foreach=foreach)  # overwritten by the load
    opt2.load_state_dict(ckpt["opt"])
    g = opt2.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["bias_correction"]) == (0.1, M, 1e-3, True)
    st = opt2.state[next(resumed.parameters())]
    assert st["step"].dtype == torch.float64 and float(st["step"]) == 20.0
    rest, _ = train(resumed, opt2, data[20:])
    for a, b in zip(rest[-1], full[-1]):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- under Layca


def test_layca_on_sgd_amom_rotates_by_arctan_rho():
    """layrot.Layca(layrot.SGD_AMom(...)): every layer turns by arctan(rho) per step, ||w|| stays."""
    model = mlp(4)
    opt = layrot.Layca(layrot.SGD_AMom(model.parameters(), lr=0.1, momentum=M, weight_decay=5e-4), rho=0.05)
    keys = [i for i, p in enumerate(model.parameters()) if p.ndim >= 2]
    snaps, _ = train(model, opt, batches(25))
    worst = drift = 0.0
    for t in range(1, len(snaps)):
        for i in keys:
            worst = max(worst, abs(angle(snaps[t - 1][i], snaps[t][i]) - math.atan(0.05)) / math.atan(0.05))
            drift = max(drift, abs(np.linalg.norm(snaps[t][i]) / np.linalg.norm(snaps[0][i]) - 1))
    print(
        f"\nLayca(SGD_AMom) 4 layers, 25 steps: angle vs arctan(rho) max relative {worst:.1e}, norm drift {drift:.1e}"
    )
    assert worst <= 1e-4 and drift <= 1e-5
    # The non-layer parameters (biases, BatchNorm) train with SGD_AMom itself.
    assert all(not np.array_equal(snaps[0][i], snaps[-1][i]) for i in range(len(snaps[0])) if i not in keys)


def test_under_layca_the_bias_correction_cancels():
    """Layca rescales each layer's step to ||w||, so SGD_AMom's per-tensor factor 1/(1 - m^t) drops out:
    a network made only of Layca layers follows the same trajectory with and without it."""
    runs = []
    for bc in (False, True):
        # float64: the claim is exact math; in float32 rounding differences grow along 20 steps.
        model = mlp(5, bias=False, bn=False).double()
        opt = layrot.Layca(SGD_AMom(model.parameters(), lr=0.1, momentum=M, bias_correction=bc), rho=0.05)
        runs.append(train(model, opt, batches(20))[0])
    worst = max(rel_norm(a, b) for sa, sb in zip(*runs) for a, b in zip(sa, sb))
    print(f"\nLayca(SGD_AMom) with vs without bias correction, float64, 20 steps: max relative difference {worst:.1e}")
    assert worst <= 1e-10


# ---------------------------------------------------------------- not torch's dampened SGD


def test_torch_sgd_with_dampening_is_a_different_rule():
    """torch's SGD(momentum=0.9, dampening=0.9) starts its buffer at g_1, not (1 - m) g_1: with given
    gradients its weights differ from SGD_AMom's by exactly lr * g_1 * (m + m^2 + ... + m^T)."""
    T, lr = 50, 0.1
    w0 = np.random.default_rng(8).standard_normal((6, 4))
    grads = random_grads((6, 4), T, 9)
    amom = run_on_tensor(w0, grads, torch.float64, lr=lr, momentum=M)
    w = torch.tensor(w0, requires_grad=True)
    sgd = torch.optim.SGD([w], lr=lr, momentum=M, dampening=M)
    for g in grads:
        w.grad = torch.tensor(g)
        sgd.step()
    diff = w.detach().numpy() - amom[-1]
    want = -lr * grads[0] * sum(M**t for t in range(1, T + 1))
    np.testing.assert_allclose(diff, want, rtol=1e-9, atol=1e-13)
    # Same data, a real model: SGD_AMom follows the formula to ~1e-7 while torch's rule drifts away.
    data = batches(T)
    model = mlp(6, bn=False)
    ref_model = mlp(6, bn=False)
    train(model, SGD_AMom(model.parameters(), lr=0.01, momentum=M), data)
    train(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=M, dampening=M), data)
    a, b = weights(model), weights(ref_model)
    max_abs = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    rel = max(rel_norm(y, x) for x, y in zip(a, b))
    print(
        f"\nSGD_AMom vs torch SGD(momentum=0.9, dampening=0.9), {T} steps: on given gradients "
        f"max |dw| {np.abs(diff).max():.2e}; MLP lr 0.01: max |dw| {max_abs:.2e}, max per-tensor relative {rel:.2e}"
    )
    assert max_abs >= 1e-2


# ---------------------------------------------------------------- AdaptCopy's advice


def test_base_optimizer_advice_for_adaptcopy():
    assert base_for("Adam") == base_for("torch.optim.AdamW") == "SGD_AMom"
    assert base_for("RMSprop") == base_for("SGD") == "SGD"
    assert base_for("MyOptimizer") is None
    ok = base_advice({"optimizer": "Adam"}, {"optimizer": "Layca(SGD_AMom)"})
    assert ok.recommended == "SGD_AMom" and ok.matches is True
    bad = base_advice({"optimizer": "AdamW"}, {"optimizer": "Layca(SGD)"})
    assert bad.matches is False and "layrot.SGD_AMom" in bad.message
    unknown_target = base_advice({"optimizer": "Adam"}, {})
    assert unknown_target.matches is None and "SGD_AMom" in unknown_target.message
    undeclared = base_advice({}, {})
    assert undeclared.recommended is None and "meta" in undeclared.message
    rms = base_advice({"optimizer": "RMSprop"}, {"optimizer": "Layca(SGD)"})
    assert rms.recommended == "SGD" and rms.matches is True


def test_control_copy_tells_an_adam_copy_to_use_sgd_amom(collector):
    """Real runs on a real collector: an Adam source and a Layca(SGD) target that declared their
    optimizers; ``layrot-agent control copy`` replays the rates and warns that the base should be SGD_AMom."""
    from click.testing import CliRunner

    from layrot.cli.main import cli
    from layrot.client.query import QueryClient
    from layrot.controllers.adaptcopy import AdaptCopy

    data = batches(6)
    src = mlp(7)
    opt = torch.optim.Adam(src.parameters(), lr=1e-3)
    h = layrot.watch(src, opt, run="adam-src", collector=collector.grpc_address, meta={"optimizer": "Adam"})
    train(src, opt, data)
    assert h.flush(10)
    h.close()
    dst = mlp(7)
    dopt = layrot.Layca(torch.optim.SGD(dst.parameters(), lr=0.1, momentum=M), rho=0.05, rho_max=1.0)
    h = layrot.watch(
        dst, dopt, run="sgd-dst", collector=collector.grpc_address, control=True, meta={"optimizer": "Layca(SGD)"}
    )
    try:
        train(dst, dopt, data[:2])
        assert h.flush(10)
        with QueryClient(collector.grpc_address) as q:
            advice = AdaptCopy(q, "adam-src", "sgd-dst").advise(q.get_run("sgd-dst")["meta"])
        assert advice.source_optimizer == "Adam" and advice.recommended == "SGD_AMom" and advice.matches is False
        out = CliRunner().invoke(
            cli,
            [
                "control",
                "copy",
                "--from",
                "adam-src",
                "sgd-dst",
                "--interval",
                "0.05",
                "--json",
                "--collector",
                collector.grpc_address,
            ],
        )
        assert out.exit_code == 0, out.output
        assert '"base_optimizer": "SGD_AMom"' in out.output and '"base_optimizer_ok": false' in out.output
        out = CliRunner().invoke(
            cli,
            [
                "control",
                "copy",
                "--from",
                "adam-src",
                "sgd-dst",
                "--interval",
                "0.05",
                "--collector",
                collector.grpc_address,
            ],
        )
        assert out.exit_code == 0, out.output
        assert "base optimizer: source ran Adam" in out.output and "warning:" in out.output
    finally:
        h.close()
