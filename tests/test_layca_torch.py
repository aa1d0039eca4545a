"""Layca for PyTorch, checked on real training runs against float64 numpy computed from
weights saved at every step and the paper's formulas written out independently here."""

from __future__ import annotations

import io
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import eq1
from torch import nn

from layrot.core.rates import RhoSchedule
from layrot.hooks.layca_torch import Layca
from layrot.proto import layrot_pb2

IN, WIDTH, CLASSES, BATCH = 12, 24, 4, 32


# ---------------------------------------------------------------- helpers


def angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors, stable for tiny angles (float64)."""
    a = a.ravel() / np.linalg.norm(a)
    b = b.ravel() / np.linalg.norm(b)
    return 2.0 * math.atan2(np.linalg.norm(a - b), np.linalg.norm(a + b))


def mlp(seed: int, depth: int = 7) -> nn.Sequential:
    """depth Linear layers (the Layca layers) with biases, BatchNorm between them."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    d = IN
    for _ in range(depth - 1):
        mods += [nn.Linear(d, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU()]
        d = WIDTH
    mods.append(nn.Linear(d, CLASSES))
    return nn.Sequential(*mods)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN, CLASSES, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, IN, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.named_parameters()}


def layer_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.named_parameters() if v.ndim >= 2]


def train(model, opt, data, scaler=None, autocast_dtype=None, grad_hook=None, after_step=None):
    """Train on ``data``; returns [snapshot before step 1, after step 1, ...]."""
    snaps = [snapshot(model)]
    for t, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        if autocast_dtype is not None:
            with torch.autocast("cpu", dtype=autocast_dtype):
                loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if grad_hook is not None:
            grad_hook(t)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        snaps.append(snapshot(model))
        if after_step is not None:
            after_step(t)
    return snaps


def check_angles(snaps, keys, expected_rates, rtol=1e-4):
    """Every layer's single-step angle equals arctan(rho_l(t)); ``expected_rates(t)`` -> [L]."""
    worst = 0.0
    for t in range(1, len(snaps)):
        rho = expected_rates(t)
        for l, k in enumerate(keys):
            got = angle(snaps[t - 1][k], snaps[t][k])
            want = math.atan(rho[l])
            if want == 0:
                assert got == 0.0, (t, k, got)
                continue
            err = abs(got - want) / want
            worst = max(worst, err)
            assert err <= rtol, f"step {t} layer {k}: angle {got!r} vs arctan(rho)={want!r} (rel {err:.2e})"
    return worst


def check_norms(snaps, keys, rtol=1e-5):
    """||w(t)|| = ||w(0)|| at every step; returns the largest relative drift."""
    worst = 0.0
    for k in keys:
        n0 = np.linalg.norm(snaps[0][k])
        for t in range(1, len(snaps)):
            drift = abs(np.linalg.norm(snaps[t][k]) - n0) / n0
            worst = max(worst, drift)
            assert drift <= rtol, (t, k, drift)
    return worst


def check_non_layers_train(snaps, model):
    for k, v in model.named_parameters():
        if v.ndim < 2:
            assert not np.array_equal(snaps[0][k], snaps[-1][k]), f"{k} did not train"


# ---------------------------------------------------------------- the core property

BASES = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


@pytest.mark.parametrize("base", list(BASES))
def test_single_step_angle_is_arctan_rho(base):
    model = mlp(0)
    opt = Layca(BASES[base](model.parameters()), rho=0.05, alpha=0.5)
    keys = layer_keys(model)
    assert opt.layer_names == [f"param{i}" for i, (_, p) in enumerate(model.named_parameters()) if p.ndim >= 2]
    assert len(keys) == 7
    snaps = train(model, opt, batches(25))
    rho = 0.05 * eq1(0.5, 7)
    angle_err = check_angles(snaps, keys, lambda t: rho)
    norm_drift = check_norms(snaps, keys)
    print(
        f"\nLayca({base}) 7 layers, 25 steps: step angle vs arctan(rho_l) max relative {angle_err:.1e}, "
        f"||w|| drift max relative {norm_drift:.1e}"
    )
    check_non_layers_train(snaps, model)
    np.testing.assert_allclose(opt.current_rates(), rho, rtol=1e-15)
    np.testing.assert_allclose(opt.init_norms, [np.linalg.norm(snaps[0][k]) for k in keys], rtol=1e-12)


def test_norm_does_not_drift_over_a_long_run():
    model = mlp(21)
    opt = Layca(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), rho=0.05, alpha=0.5)
    snaps = train(model, opt, batches(300))
    check_norms(snaps, layer_keys(model), rtol=1e-6)
    check_angles(snaps[-20:], layer_keys(model), lambda t: 0.05 * eq1(0.5, 7))


@pytest.mark.parametrize("foreach", [None, True])
def test_large_layers_stay_exact(foreach):
    """Million-element layers: float32 reductions must not eat the precision."""
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(IN, 1200), nn.ReLU(), nn.Linear(1200, 1000), nn.ReLU(), nn.Linear(1000, CLASSES))
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, alpha=0.5, foreach=foreach)
    snaps = train(model, opt, batches(4))
    keys = layer_keys(model)
    check_norms(snaps, keys, rtol=1e-6)
    check_angles(snaps, keys, lambda t: 0.05 * eq1(0.5, 3), rtol=1e-5)


@pytest.mark.parametrize("foreach", [True, False])
def test_foreach_and_loop_paths_agree(foreach):
    model = mlp(3)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, alpha=-0.3, foreach=foreach)
    snaps = train(model, opt, batches(8))
    check_angles(snaps, layer_keys(model), lambda t: 0.05 * eq1(-0.3, 7))
    check_norms(snaps, layer_keys(model))


@pytest.mark.parametrize("alpha", [-0.6, 0.0, 1.0, -1.0])
def test_alpha_profiles_follow_eq1(alpha):
    model = mlp(1, depth=6)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.04, alpha=alpha)
    snaps = train(model, opt, batches(6))
    rho = 0.04 * eq1(alpha, 6)
    check_angles(snaps, layer_keys(model), lambda t: rho)
    if abs(alpha) == 1:  # all layers but one frozen, bitwise
        frozen = [k for k, r in zip(layer_keys(model), rho) if r == 0]
        assert len(frozen) == 5
        for k in frozen:
            assert np.array_equal(snaps[0][k], snaps[-1][k])


def test_single_layer_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, CLASSES))
    opt = Layca(torch.optim.Adam(model.parameters(), lr=1e-2), rho=0.1, alpha=0.7)
    snaps = train(model, opt, batches(5))
    check_angles(snaps, ["0.weight"], lambda t: [0.1])
    check_non_layers_train(snaps, model)


def test_set_layer_order_defines_forward_order_and_names():
    model = mlp(2, depth=6)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, alpha=0.6)
    named = [(k, p) for k, p in model.named_parameters() if p.ndim >= 2][::-1]  # reversed order
    opt.set_layer_order(named)
    assert opt.layer_names == [k for k, _ in named]
    snaps = train(model, opt, batches(5))
    rho = 0.05 * eq1(0.6, 6)
    check_angles(snaps, [k for k, _ in named], lambda t: rho)
    with pytest.raises(ValueError, match="exactly"):
        opt.set_layer_order(named[:-1])


def test_layers_argument_names_regex_and_predicate():
    # The layer rule of layrot.watch: exact names, a regex or a (name, param) predicate.
    model = mlp(4, depth=6)
    opt = Layca(torch.optim.SGD(model.named_parameters(), lr=0.1), rho=0.05, layers=["0.weight", "3.weight"])
    assert opt.layers == [model[0].weight, model[3].weight]
    assert opt.layer_names == ["0.weight", "3.weight"]
    snaps = train(model, opt, batches(3))
    check_angles(snaps, ["0.weight", "3.weight"], lambda t: [0.05, 0.05])
    other = "6.weight"  # plain SGD: its norm is not held fixed
    assert not np.isclose(np.linalg.norm(snaps[-1][other]), np.linalg.norm(snaps[0][other]), rtol=1e-7)
    by_regex = Layca(torch.optim.SGD(model.named_parameters(), lr=0.1), layers=r"^(0|3)\.")
    assert by_regex.layer_names == ["0.weight", "3.weight"]  # a regex filters the ndim >= 2 parameters
    by_fn = Layca(torch.optim.SGD(model.named_parameters(), lr=0.1), layers=lambda n, p: p.shape == (WIDTH, WIDTH))
    assert by_fn.num_layers == 4
    plain = Layca(torch.optim.SGD(model.parameters(), lr=0.1), layers=["param0"])  # no param_names: by position
    assert plain.layers == [model[0].weight]
    with pytest.raises(ValueError, match="not found"):
        Layca(torch.optim.SGD(model.named_parameters(), lr=0.1), layers=["nope.weight"])
    with pytest.raises(TypeError, match="names"):
        Layca(torch.optim.SGD(model.named_parameters(), lr=0.1), layers=[model[0].weight, "3.weight"])


def test_layers_argument_tensors_and_one_argument_predicate_are_deprecated():
    model = mlp(4, depth=6)
    first_two = [model[0].weight, model[3].weight]
    with pytest.warns(DeprecationWarning, match=r"layers=\[param"):
        opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, layers=first_two)
    assert opt.layers == first_two
    snaps = train(model, opt, batches(3))
    check_angles(snaps, ["0.weight", "3.weight"], lambda t: [0.05, 0.05])
    with pytest.warns(DeprecationWarning, match="one-argument"):
        opt2 = Layca(torch.optim.SGD(model.parameters(), lr=0.1), layers=lambda p: p.shape == (WIDTH, WIDTH))
    assert opt2.num_layers == 4
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError):
        Layca(torch.optim.SGD(model.parameters(), lr=0.1), layers=[torch.nn.Parameter(torch.ones(2, 2))])


# ---------------------------------------------------------------- schedules


def test_step_decay_schedule_over_a_run():
    T = 20
    sched = RhoSchedule(rho0=0.08, kind="step", milestones=(0.5, 0.8), factor=0.2, total_steps=T)
    model = mlp(5)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), schedule=sched, alpha=-0.2)
    snaps = train(model, opt, batches(T))

    def want(t):  # decays take effect after 10 and 16 steps
        return 0.08 * 0.2 ** ((t > 10) + (t > 16)) * eq1(-0.2, 7)

    check_angles(snaps, layer_keys(model), want)


def test_cosine_schedule_over_a_run():
    T = 15
    sched = RhoSchedule(rho0=0.1, kind="cosine", total_steps=T, rho_min=0.01)
    model = mlp(6)
    opt = Layca(torch.optim.Adam(model.parameters(), lr=1e-3), schedule=sched, alpha=0.3)
    seen = []
    snaps = train(model, opt, batches(T), after_step=lambda t: seen.append(opt.current_rates()))

    def want(t):
        return (0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (t - 1) / T))) * eq1(0.3, 7)

    check_angles(snaps, layer_keys(model), want)
    for t, r in enumerate(seen, start=1):
        np.testing.assert_allclose(r, want(t), rtol=1e-12)


# ---------------------------------------------------------------- edge cases


def test_zero_gradient_leaves_weights_unchanged():
    model = mlp(7)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    before = snapshot(model)
    for _ in range(3):
        opt.zero_grad()
        (0.0 * model(torch.randn(BATCH, IN)).sum()).backward()
        opt.step()
    after = snapshot(model)
    for k in before:
        assert np.array_equal(before[k], after[k]), k
        assert np.all(np.isfinite(after[k]))


def test_parameter_without_gradient_stays_while_others_rotate():
    model = mlp(8, depth=6)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    model[0].weight.requires_grad_(False)  # frozen after construction: still a layer, no gradient
    assert opt.num_layers == 6
    # frozen before construction: a layer too (gradual unfreezing; the monitoring hook chooses the same)
    assert Layca(torch.optim.SGD(model.parameters(), lr=0.1)).num_layers == 6
    snaps = train(model, opt, batches(4))
    rho = np.full(6, 0.05)
    rho[0] = 0.0  # no gradient -> a zero step -> angle exactly 0
    check_angles(snaps, layer_keys(model), lambda t: rho)


def test_zero_initialised_layer_keeps_base_update():
    model = mlp(9, depth=6)
    with torch.no_grad():
        model[15].weight.zero_()  # last Linear, zero-initialised like some heads
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    snaps = train(model, opt, batches(3))
    assert np.linalg.norm(snaps[-1]["15.weight"]) > 0  # trained by the base optimizer
    # step 1: a zero head passes no gradient back, so the other layers take a zero step
    check_angles(snaps[:2], layer_keys(model)[:-1], lambda t: np.zeros(5))
    check_angles(snaps[1:], layer_keys(model)[:-1], lambda t: np.full(5, 0.05))
    assert all(np.all(np.isfinite(v)) for s in snaps for v in s.values())


# ---------------------------------------------------------------- reference implementation (plain SGD)


def _sgd_reference_run(mode, rho, steps=12):
    """Layers get lr=1 (only the direction matters), the rest lr=0.05: then s = -grad."""
    model = mlp(10)
    layer_params = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    base = torch.optim.SGD([{"params": layer_params, "lr": 1.0}, {"params": others, "lr": 0.05}])
    opt = Layca(base, rho=rho, mode=mode)
    keys = layer_keys(model)
    grads = {}

    def grab(t):
        grads[t] = {k: p.grad.double().numpy().copy() for k, p in model.named_parameters() if p.ndim >= 2}

    snaps = train(model, opt, batches(steps), grad_hook=grab)
    return snaps, grads, keys, opt


def test_layca_matches_float64_reference_algorithm_1():
    rho = 0.05
    snaps, grads, keys, _ = _sgd_reference_run("layca", rho)
    for t in range(1, len(snaps)):
        for k in keys:
            w, w0 = snaps[t - 1][k], snaps[0][k]
            s = -grads[t][k]
            s = s - (s * w).sum() / (w * w).sum() * w  # 1
            s = s * np.linalg.norm(w) / np.linalg.norm(s)  # 2
            ref = w + rho * s  # 3
            ref = ref * np.linalg.norm(w0) / np.linalg.norm(ref)  # 4
            err = np.linalg.norm(snaps[t][k] - ref) / np.linalg.norm(w)
            assert err < 2e-6, (t, k, err)


def test_lars_mode_matches_appendix_a4_with_growth_cap():
    rho = 0.05
    snaps, grads, keys, opt = _sgd_reference_run("lars", rho)
    assert opt.mode == "lars"
    capped = 0
    for t in range(1, len(snaps)):
        for k in keys:
            w, w0 = snaps[t - 1][k], snaps[0][k]
            cap = 1e-4 * np.linalg.norm(w0)
            s = -grads[t][k]
            ref = w + rho * np.linalg.norm(w) * s / np.linalg.norm(s)  # 2-3, no projection
            if np.linalg.norm(ref) - np.linalg.norm(w) > cap:
                ref = ref * (np.linalg.norm(w) + cap) / np.linalg.norm(ref)
                capped += 1
            got = snaps[t][k]
            assert np.linalg.norm(got - ref) / np.linalg.norm(w) < 2e-6, (t, k)
            growth = np.linalg.norm(got) - np.linalg.norm(w)
            assert growth <= cap * (1 + 1e-3) + 1e-7 * np.linalg.norm(w), (t, k, growth, cap)
    assert capped > 0  # the cap was exercised, not vacuous


# ---------------------------------------------------------------- torch integration


def _fresh(seed_model, **kw):
    model = mlp(seed_model)
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, alpha=0.4, **kw)
    return model, opt


def test_state_dict_round_trip_continues_identically():
    data = batches(20, seed=3)
    model_a, opt_a = _fresh(11)
    train(model_a, opt_a, data[:8])
    cmd = layrot_pb2.RateCommand(
        version=4,
        alpha=-0.5,
        multipliers=[1, 2, 1, 1, 1, 1, 0.5],
        schedule=layrot_pb2.RhoSchedule(rho0=0.03, kind="step", milestones=[12], factor=0.5),
    )
    opt_a.submit_command(cmd)
    train(model_a, opt_a, data[8:10])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    end_a = train(model_a, opt_a, data[10:])[-1]

    model_b, opt_b = _fresh(99)  # different initial weights: everything must come from the checkpoint
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    assert opt_b.step_count == 10 and opt_b.command_version == 4
    end_b = train(model_b, opt_b, data[10:])[-1]
    for k in end_a:
        assert np.array_equal(end_a[k], end_b[k]), k
    # the job's own rule survived too: "off" returns to the constructor's settings
    opt_b.submit_command(layrot_pb2.RateCommand(version=5, mode="off"))
    train(model_b, opt_b, batches(1))
    np.testing.assert_allclose(opt_b.current_rates(), 0.05 * eq1(0.4, 7), rtol=1e-15)
    # the base part is a plain optimizer state dict
    plain = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(ckpt["opt"])


def test_lr_scheduler_on_base_and_on_layca():
    for target in ("base", "layca"):
        model = mlp(12)
        base = torch.optim.SGD(model.parameters(), lr=0.2)
        opt = Layca(base, rho=0.05)
        sched = torch.optim.lr_scheduler.StepLR(base if target == "base" else opt, step_size=3, gamma=0.1)
        grads = {}

        def grab(t):
            grads[t] = model[0].bias.grad.double().numpy().copy()

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            snaps = train(model, opt, batches(8), grad_hook=grab, after_step=lambda t: sched.step())
        for t in range(1, 9):
            lr = 0.2 * 0.1 ** ((t - 1) // 3)
            step = snaps[t]["0.bias"] - snaps[t - 1]["0.bias"]
            np.testing.assert_allclose(step, -lr * grads[t], rtol=1e-4, atol=1e-7)
        check_angles(snaps, layer_keys(model), lambda t: np.full(7, 0.05))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_with_cpu_autocast(dtype):
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast in this torch build")
    model, opt = _fresh(13)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def clip(t):
        return (scaler.unscale_(opt), nn.utils.clip_grad_norm_(model.parameters(), 5.0))

    snaps = train(model, opt, batches(6), scaler=scaler, autocast_dtype=dtype, grad_hook=clip)
    assert opt.step_count == 6
    check_angles(snaps, layer_keys(model), lambda t: 0.05 * eq1(0.4, 7))
    check_norms(snaps, layer_keys(model))
    # an overflowing step is skipped: no Layca step, weights untouched, scale backs off
    scale = scaler.get_scale()

    def poison(t):
        model[0].weight.grad[0, 0] = float("inf")

    before = snapshot(model)
    after = train(model, opt, batches(1), scaler=scaler, autocast_dtype=dtype, grad_hook=poison)[-1]
    assert opt.step_count == 6 and scaler.get_scale() < scale
    for k in before:
        assert np.array_equal(before[k], after[k])


def test_step_post_hooks_see_layca_weights_and_closure_works():
    model, opt = _fresh(14)
    seen = []
    opt.register_step_post_hook(lambda o, a, kw: seen.append(float(model[0].weight.detach().norm())))
    opt.register_step_pre_hook(lambda o, a, kw: seen.append(-1.0))
    n0 = float(model[0].weight.detach().norm())
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and math.isfinite(float(loss.detach()))
    assert seen[0] == -1.0 and seen[1] == pytest.approx(n0, rel=1e-6)
    assert opt.step_count == 1
    assert opt.state is opt.base_optimizer.state and opt.defaults is opt.base_optimizer.defaults


def test_constructor_validation():
    model = mlp(0)
    with pytest.raises(TypeError):
        Layca(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho_max"):
        Layca(torch.optim.SGD(model.parameters(), lr=0.1), rho=2.0)
    with pytest.raises(ValueError):
        Layca(torch.optim.SGD(model.parameters(), lr=0.1), alpha=1.5)
    with pytest.raises(ValueError):
        Layca(torch.optim.SGD(model.parameters(), lr=0.1), mode="sgd")
    with pytest.raises(ValueError, match="conflicts"):
        Layca(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, schedule=RhoSchedule(0.2))
    with pytest.raises(TypeError):
        Layca(Layca(torch.optim.SGD(model.parameters(), lr=0.1)))


def test_set_rule_locally():
    model, opt = _fresh(15)
    train(model, opt, batches(2))
    opt.set_rule(alpha=-0.5, rho=0.02)
    # current_rates() describes the step already taken, under the rule that governed it
    np.testing.assert_allclose(opt.current_rates(), 0.05 * eq1(0.4, 7))
    np.testing.assert_allclose(opt.rates_at(3), 0.02 * eq1(-0.5, 7))
    snaps = train(model, opt, batches(3))
    check_angles(snaps, layer_keys(model), lambda t: 0.02 * eq1(-0.5, 7))
    assert opt.command_version == 0 and opt.base_rule is opt.rule


# ---------------------------------------------------------------- control commands


def test_valid_command_applies_at_next_step_with_callback():
    model, opt = _fresh(16)
    results = []
    opt.on_command_result = lambda *r: results.append(r)
    also = []
    opt.add_command_listener(lambda *r: also.append(r))
    train(model, opt, batches(3))
    cmd = layrot_pb2.RateCommand(
        version=1, alpha=0.0, schedule=layrot_pb2.RhoSchedule(rho0=0.02), layer_multipliers={"param4": 2.0}
    )
    opt.submit_command(cmd)
    assert results == [] and opt.command_version == 0  # nothing happens between steps
    np.testing.assert_allclose(opt.current_rates(), 0.05 * eq1(0.4, 7))
    snaps = train(model, opt, batches(3))
    assert results == [(1, True, "", 4)] and also == results
    # default names are optimizer positions: 0.weight, 0.bias, BN w/b, then 3.weight = "param4"
    assert opt.layer_names[1] == "param4"
    want = np.array([0.04 if n == "param4" else 0.02 for n in opt.layer_names])
    check_angles(snaps, layer_keys(model), lambda t: want)
    assert opt.command_version == 1


def test_command_from_background_thread_lands_on_a_step_boundary():
    model, opt = _fresh(17)
    results = []
    opt.add_command_listener(lambda *r: results.append(r))
    go = threading.Event()

    def controller():
        go.wait(5)
        opt.submit_command(layrot_pb2.RateCommand(version=2, alpha=-0.2, schedule=layrot_pb2.RhoSchedule(rho0=0.01)))

    th = threading.Thread(target=controller)
    th.start()
    snaps = train(model, opt, batches(10), after_step=lambda t: (go.set(), th.join()) if t == 4 else None)
    assert len(results) == 1
    version, applied, reason, first = results[0]
    assert (version, applied, first) == (2, True, 5)
    check_angles(snaps, layer_keys(model), lambda t: (0.05 * eq1(0.4, 7)) if t < first else (0.01 * eq1(-0.2, 7)))


INVALID = {
    "nan_alpha": dict(alpha=float("nan")),
    "rho0_above_max": dict(schedule=layrot_pb2.RhoSchedule(rho0=5.0)),
    "alpha_1.5": dict(alpha=1.5),
    "unknown_layer": dict(layer_multipliers={"conv99.weight": 1.0}),
    "wrong_multiplier_count": dict(multipliers=[1.0, 2.0]),
    "negative_multiplier": dict(multipliers=[1, 1, 1, -1, 1, 1, 1]),
    "bad_table": dict(table=layrot_pb2.RateTable(start_step=1, num_layers=7, rates=b"\x00" * 12)),
    "table_wrong_layers": dict(table=layrot_pb2.RateTable(start_step=1, num_layers=3, rates=np.full(3, 0.1).tobytes())),
    "unknown_mode": dict(mode="turbo"),
}


@pytest.mark.parametrize("kind", list(INVALID))
def test_invalid_command_rejected_rates_unchanged(kind):
    model, opt = _fresh(18)
    results = []
    opt.on_command_result = lambda *r: results.append(r)
    train(model, opt, batches(2))
    before = opt.current_rates().copy()
    cmd = layrot_pb2.RateCommand(version=3, **INVALID[kind])
    opt.submit_command(cmd)
    snaps = train(model, opt, batches(2))
    assert len(results) == 1
    version, applied, reason, step = results[0]
    assert version == 3 and applied is False and reason and step == 3
    np.testing.assert_array_equal(opt.current_rates(), before)
    assert opt.command_version == 0
    check_angles(snaps, layer_keys(model), lambda t: before)


def test_superseded_stale_and_repeated_commands():
    model, opt = _fresh(19)
    results = []
    opt.on_command_result = lambda *r: results.append(r)

    def mk(v, a):
        return layrot_pb2.RateCommand(version=v, alpha=a, schedule=layrot_pb2.RhoSchedule(rho0=0.03))

    opt.submit_command(mk(6, 0.1))
    opt.submit_command(mk(5, 0.2))
    train(model, opt, batches(1))
    assert results[0][:2] == (5, False) and "superseded" in results[0][2]
    assert results[1] == (6, True, "", 1)
    opt.submit_command(mk(4, 0.3))
    train(model, opt, batches(1))
    assert results[2][:2] == (4, False) and "stale" in results[2][2]
    opt.submit_command(mk(6, 0.1))  # at-least-once delivery: a repeat
    train(model, opt, batches(1))
    assert results[3] == (6, True, "", 1)
    np.testing.assert_allclose(opt.current_rates(), 0.03 * eq1(0.1, 7))


def test_broken_listener_does_not_stop_training():
    model, opt = _fresh(20)

    def boom(*r):
        raise RuntimeError("listener bug")

    opt.add_command_listener(boom)
    opt.submit_command(layrot_pb2.RateCommand(version=1, alpha=0.0, schedule=layrot_pb2.RhoSchedule(rho0=0.01)))
    train(model, opt, batches(2))
    assert opt.command_version == 1


_garbage = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    alpha=_garbage,
    rho0=_garbage,
    mults=st.lists(_garbage, max_size=8),
    kind=st.sampled_from(["", "constant", "step", "cosine", "?"]),
    total=st.integers(0, 50),
    milestones=st.lists(_garbage, max_size=2),
    factor=_garbage,
)
def test_random_garbage_commands_never_break_training(alpha, rho0, mults, kind, total, milestones, factor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    opt = Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, rho_max=0.5)
    results = []
    opt.on_command_result = lambda *r: results.append(r)
    before = opt.current_rates().copy()
    opt.submit_command(
        layrot_pb2.RateCommand(
            version=1,
            alpha=alpha,
            multipliers=mults,
            schedule=layrot_pb2.RhoSchedule(
                rho0=rho0, kind=kind, total_steps=total, milestones=milestones, factor=factor
            ),
        )
    )
    data = batches(2)
    train(model, opt, data)
    ((version, applied, reason, step),) = results
    rates = opt.current_rates()
    if applied:
        assert np.all(np.isfinite(rates)) and np.all(rates >= 0) and np.all(rates <= 0.5 + 1e-12)
    else:
        assert reason and np.array_equal(rates, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
