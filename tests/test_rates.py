"""Rate rules (core/rates.py) against the paper's formulas written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import eq1

from layrot.core.rates import RateRule, RateTable, RhoSchedule, alpha_profile
from layrot.proto import layrot_pb2
from layrot.proto.commands import rule_from_command, schedule_from_proto, schedule_to_proto, validate_command

NAMES = [f"layer{i}" for i in range(6)]


# ---------------------------------------------------------------- alpha profile


@pytest.mark.parametrize("L", [1, 2, 3, 6, 17])
@pytest.mark.parametrize("alpha", [-1.0, -0.8, -0.25, 0.0, 1e-9, 0.3, 0.5, 0.99, 1.0])
def test_alpha_profile_matches_eq1(alpha, L):
    got = alpha_profile(alpha, L)
    assert got.dtype == np.float64 and got.shape == (L,)
    np.testing.assert_allclose(got, eq1(alpha, L), rtol=1e-14, atol=0)


def test_alpha_profile_extremes_freeze_all_but_one_layer():
    assert alpha_profile(1.0, 5).tolist() == [0, 0, 0, 0, 1]
    assert alpha_profile(-1.0, 5).tolist() == [1, 0, 0, 0, 0]
    assert alpha_profile(0.0, 4).tolist() == [1, 1, 1, 1]
    # direction: alpha > 0 favours the last layers, alpha < 0 the first ones
    assert np.all(np.diff(alpha_profile(0.4, 6)) > 0)
    assert np.all(np.diff(alpha_profile(-0.4, 6)) < 0)


@pytest.mark.parametrize("alpha", [1.5, -1.0001, float("nan"), float("inf"), "x"])
def test_alpha_profile_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError):
        alpha_profile(alpha, 4)


# ---------------------------------------------------------------- schedules


def test_constant_schedule():
    s = RhoSchedule(rho0=0.07)
    assert [s.rho_at(t) for t in (1, 2, 1000)] == [0.07] * 3
    assert RhoSchedule().rho0 == 3.0**-3


def test_step_schedule_with_steps_and_fractions():
    s = RhoSchedule(rho0=0.1, kind="step", milestones=(0.8, 0.9, 97), factor=0.2, total_steps=100)
    assert s.milestone_steps == (80, 90, 97)
    for t in range(1, 120):
        k = (t > 80) + (t > 90) + (t > 97)
        assert s.rho_at(t) == pytest.approx(0.1 * 0.2**k, rel=1e-15), t
    assert s.rho_at(1) == 0.1 and s.rho_at(0) == 0.1


def test_cosine_schedule():
    s = RhoSchedule(rho0=0.1, kind="cosine", total_steps=50, rho_min=0.01)
    for t in range(1, 80):
        p = min((t - 1) / 50, 1.0)
        want = 0.01 + 0.09 * (1 + math.cos(math.pi * p)) / 2
        assert s.rho_at(t) == pytest.approx(want, rel=1e-14)
    assert s.rho_at(1) == 0.1
    assert s.rho_at(51) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="step", milestones=(0.5,)), "total_steps"),
        (dict(kind="cosine"), "total_steps"),
        (dict(kind="step", milestones=(10,), factor=0.0), "factor"),
        (dict(kind="step", milestones=(10,), factor=1.5), "factor"),
        (dict(kind="step", milestones=(-3,)), "milestones"),
        (dict(kind="step", milestones=(0,)), "milestones"),
        (dict(kind="step", milestones=(10.5,)), "whole"),
        (dict(kind="step", milestones=(float("nan"),)), "milestones"),
        (dict(kind="cosine", total_steps=10, rho_min=1.0), "rho_min"),
        (dict(kind="linear"), "kind"),
        (dict(rho0=-0.1), "rho0"),
        (dict(rho0=float("nan")), "rho0"),
        (dict(total_steps=-1), "total_steps"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RhoSchedule(**kwargs)


def test_schedule_proto_and_dict_round_trip():
    s = RhoSchedule(rho0=0.2, kind="step", milestones=(0.5, 70), factor=0.3, total_steps=100)
    assert schedule_from_proto(schedule_to_proto(s)) == s
    assert RhoSchedule.from_dict(s.to_dict()) == s
    c = RhoSchedule(rho0=0.2, kind="cosine", total_steps=9, rho_min=0.05)
    assert schedule_from_proto(schedule_to_proto(c)) == c
    # proto3 default kind "" means constant
    assert schedule_from_proto(layrot_pb2.RhoSchedule(rho0=0.3)).kind == "constant"


# ---------------------------------------------------------------- rules


def test_rule_rates_profile_schedule_multipliers():
    sched = RhoSchedule(rho0=0.1, kind="step", milestones=(5,), factor=0.5)
    mult = (1.0, 2.0, 0.5, 1.0, 1.0, 0.0)
    rule = RateRule(
        tuple(NAMES),
        alpha=-0.4,
        schedule=sched,
        multipliers=mult,
        layer_multipliers={"layer3": 3.0, "layer1": 0.5},
        step_offset=2,
    )
    by_name = np.array([1, 0.5, 1, 3, 1, 1], dtype=float)
    for t in range(1, 12):
        ts = max(t - 2, 1)
        rho = 0.1 * (0.5 if ts > 5 else 1.0)
        want = np.array(eq1(-0.4, 6)) * rho * np.array(mult) * by_name
        np.testing.assert_allclose(rule.rates(t), want, rtol=1e-14)
    assert rule.max_rate() == pytest.approx(max(np.array(eq1(-0.4, 6)) * 0.1 * np.array(mult) * by_name))


def test_rule_table_covers_its_steps_then_falls_back():
    table = np.arange(3 * 6, dtype=float).reshape(3, 6) / 100
    rule = RateRule(
        tuple(NAMES),
        alpha=0.5,
        schedule=RhoSchedule(0.05),
        multipliers=(2,) * 6,
        table=RateTable(start_step=10, rates=table),
    )
    for t in (1, 9, 13, 100):
        np.testing.assert_allclose(rule.rates(t), np.array(eq1(0.5, 6)) * 0.05 * 2)
    for t in (10, 11, 12):
        np.testing.assert_allclose(rule.rates(t), table[t - 10] * 2)
    assert rule.source(11) == ("table", 1)


def test_rule_validation_and_round_trip():
    with pytest.raises(ValueError):
        RateRule(("a", "b"), multipliers=(1.0,))
    with pytest.raises(ValueError):
        RateRule(("a", "b"), layer_multipliers={"c": 1.0})
    with pytest.raises(ValueError):
        RateRule(("a", "b"), mode="sgd")
    with pytest.raises(ValueError):
        RateRule(("a", "a"))
    rule = RateRule(
        tuple(NAMES),
        mode="lars",
        alpha=0.2,
        multipliers=(1, 2, 3, 4, 5, 6),
        layer_multipliers={"layer0": 0.25},
        step_offset=3,
        version=9,
        table=RateTable(4, np.full((2, 6), 0.01)),
        schedule=RhoSchedule(0.1, "cosine", total_steps=10, rho_min=0.0),
    )
    back = RateRule.from_dict(rule.to_dict())
    for t in range(1, 20):
        np.testing.assert_array_equal(back.rates(t), rule.rates(t))
    assert (back.mode, back.version, back.step_offset) == ("lars", 9, 3)


def test_rule_permuted_keeps_each_layers_settings():
    rule = RateRule(
        ("a", "b", "c"), alpha=0.0, schedule=RhoSchedule(0.1), multipliers=(1, 2, 3), layer_multipliers={"a": 5.0}
    )
    p = rule.permuted([2, 0, 1], ["c", "a", "b"])
    np.testing.assert_allclose(p.rates(1), [0.3, 0.5, 0.2])


# ---------------------------------------------------------------- commands


def good_command(**kw) -> layrot_pb2.RateCommand:
    cmd = layrot_pb2.RateCommand(
        version=3, mode="layca", alpha=0.25, schedule=layrot_pb2.RhoSchedule(rho0=0.05, kind="constant")
    )
    for k, v in kw.items():
        if k == "layer_multipliers":
            cmd.layer_multipliers.update(v)
        elif k == "multipliers":
            cmd.multipliers.extend(v)
        else:
            setattr(cmd, k, v) if not isinstance(v, (layrot_pb2.RhoSchedule, layrot_pb2.RateTable)) else getattr(
                cmd, k
            ).CopyFrom(v)
    return cmd


def table_msg(rates: np.ndarray, num_layers: int | None = None, start: int = 1) -> layrot_pb2.RateTable:
    return layrot_pb2.RateTable(
        start_step=start,
        num_layers=rates.shape[1] if num_layers is None else num_layers,
        rates=np.asarray(rates, "<f8").tobytes(),
    )


def test_valid_command_accepted_and_built():
    cmd = good_command(multipliers=[1, 1, 2, 1, 1, 1], layer_multipliers={"layer5": 0.5})
    assert validate_command(cmd, NAMES, rho_max=1.0) is None
    rule = rule_from_command(cmd, NAMES, RateRule(tuple(NAMES)))
    want = np.array(eq1(0.25, 6)) * 0.05 * np.array([1, 1, 2, 1, 1, 0.5])
    np.testing.assert_allclose(rule.rates(7), want, rtol=1e-14)
    assert rule.version == 3


@pytest.mark.parametrize(
    "cmd, fragment",
    [
        (good_command(alpha=float("nan")), "alpha"),
        (good_command(alpha=1.5), "alpha"),
        (good_command(schedule=layrot_pb2.RhoSchedule(rho0=2.0)), "rho_max"),
        (good_command(schedule=layrot_pb2.RhoSchedule(rho0=-0.1)), "negative"),
        (good_command(schedule=layrot_pb2.RhoSchedule(rho0=float("inf"))), "finite"),
        (good_command(schedule=layrot_pb2.RhoSchedule(rho0=0.1, kind="cosine")), "schedule"),
        (good_command(schedule=layrot_pb2.RhoSchedule(rho0=0.1, kind="step", milestones=[0.5])), "schedule"),
        (good_command(schedule=layrot_pb2.RhoSchedule(rho0=0.1, kind="exp")), "schedule"),
        (good_command(layer_multipliers={"nope": 1.0}), "unknown layer"),
        (good_command(multipliers=[1.0, 1.0]), "multipliers"),
        (good_command(multipliers=[1, 1, -1, 1, 1, 1]), "negative"),
        (good_command(multipliers=[1, 1, float("nan"), 1, 1, 1]), "finite"),
        (good_command(multipliers=[1, 1, 100, 1, 1, 1]), "rho_max"),
        (good_command(layer_multipliers={"layer1": -2.0}), "negative"),
        (good_command(mode="adam"), "mode"),
        (good_command(table=table_msg(np.full((4, 5), 0.01))), "num_layers"),
        (good_command(table=layrot_pb2.RateTable(num_layers=6, rates=b"\0" * 20)), "bytes"),
        (good_command(table=table_msg(np.full((2, 6), np.nan))), "non-finite"),
        (good_command(table=table_msg(np.full((2, 6), 3.0))), "rho_max"),
        (good_command(table=table_msg(np.full((2, 6), -0.1))), "rho_max"),
    ],
)
def test_invalid_commands_rejected_with_reason(cmd, fragment):
    reason = validate_command(cmd, NAMES, rho_max=1.0)
    assert reason is not None and fragment in reason, reason


def test_off_command_returns_to_base_rule():
    base = RateRule(tuple(NAMES), alpha=-0.3, schedule=RhoSchedule(0.02))
    off = layrot_pb2.RateCommand(version=7, mode="off")
    assert validate_command(off, NAMES, 1.0) is None
    rule = rule_from_command(off, NAMES, base)
    np.testing.assert_array_equal(rule.rates(5), base.rates(5))
    assert rule.version == 7


def test_command_without_schedule_keeps_base_schedule():
    base = RateRule(tuple(NAMES), schedule=RhoSchedule(0.02, "step", (4,), 0.5))
    cmd = layrot_pb2.RateCommand(version=1, mode="lars", alpha=0.0)
    assert validate_command(cmd, NAMES, 1.0, base=base) is None
    rule = rule_from_command(cmd, NAMES, base)
    assert rule.mode == "lars" and rule.rates(5)[0] == pytest.approx(0.01)


def test_table_command_rates():
    tab = np.random.default_rng(0).uniform(0, 0.1, size=(5, 6))
    cmd = good_command(table=table_msg(tab, start=20))
    assert validate_command(cmd, NAMES, 1.0) is None
    rule = rule_from_command(cmd, NAMES, RateRule(tuple(NAMES)))
    np.testing.assert_array_equal(rule.rates(22), tab[2])
    np.testing.assert_allclose(rule.rates(25), np.array(eq1(0.25, 6)) * 0.05)


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.floats(-2, 2), st.sampled_from([0.0, 1.0, -1.0, 1e308])
)


@settings(max_examples=300, deadline=None)
@given(
    alpha=finite_or_not,
    rho0=finite_or_not,
    factor=finite_or_not,
    rho_min=finite_or_not,
    kind=st.sampled_from(["", "constant", "step", "cosine", "bogus"]),
    milestones=st.lists(finite_or_not, max_size=3),
    total=st.integers(0, 1000),
    mults=st.lists(finite_or_not, max_size=7),
    named=st.dictionaries(st.sampled_from(NAMES + ["ghost"]), finite_or_not, max_size=3),
    table=st.one_of(st.none(), st.lists(finite_or_not, max_size=13)),
    mode=st.sampled_from(["", "layca", "lars", "off", "x"]),
)
def test_garbage_commands_never_crash_and_accepted_ones_are_safe(
    alpha, rho0, factor, rho_min, kind, milestones, total, mults, named, table, mode
):
    cmd = layrot_pb2.RateCommand(
        version=1,
        mode=mode,
        alpha=alpha,
        multipliers=mults,
        schedule=layrot_pb2.RhoSchedule(
            rho0=rho0, kind=kind, milestones=milestones, factor=factor, total_steps=total, rho_min=rho_min
        ),
    )
    cmd.layer_multipliers.update(named)
    if table is not None:
        cmd.table.CopyFrom(layrot_pb2.RateTable(start_step=3, num_layers=6, rates=np.asarray(table, "<f8").tobytes()))
    reason = validate_command(cmd, NAMES, rho_max=0.5)
    if reason is None:
        rule = rule_from_command(cmd, NAMES, RateRule(tuple(NAMES)))
        for t in (1, 3, 4, 50, 2000):
            r = rule.rates(t)
            assert r.shape == (6,) and np.all(np.isfinite(r)) and np.all(r >= 0) and np.all(r <= 0.5 + 1e-12)
    else:
        assert isinstance(reason, str) and reason
