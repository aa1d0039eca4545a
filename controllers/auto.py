"""Closed-loop rate control: bring every layer's rotation to a target by the end of training.

The paper finds the best generalization when *every* layer's cosine distance
to its initialization ends close to 1. A global Layca rate does not get there
for all layers: small layers (a first convolution with few input channels) and
the classifier lag behind. This controller watches the measured rotations and
steers per-layer multipliers on top of a warmup-free global schedule rho(t):

    x      = step / total_steps                          (training progress)
    D(x)   = target * sqrt(min(1, x / reach))            (where layers should be)
    e_l    = (D(x) - rotation_l) / target                (> 0: layer l lags)
    I_l   += ki * e_l * dx                               (integral, log space; not raised while holding)
    o_l    = clip(I_l + kp * e_l, log m_min, log m_max_l)   (the layer's own log multiplier)
    n_l    = max(o_l-1, o_l+1)                           (its forward neighbours')
    m_l    = exp(min(max(o_l, couple * n_l if n_l > 0), log m_max_l))

What each part is for, measured on the digits CNN of
``benchmarks/control_auto.py`` (rotations in float64 from the weights). With
the real CLI process the smallest layer ended at 0.934-0.998 in 8 of 8 seeds
of 2000 steps, and at 0.885-0.981 in 16 runs of 1000 steps (one below 0.9:
there the CLI's reaction time, first command 20-40 steps in, is a large part
of the 200-step early push); the law before these parts reached 0.9 in 4 of 8
runs of 1000 steps. Per part, ``--ablation`` drives the law in-process at 1000
steps with the CLI's timing imitated (16 runs: 8 seeds x 2 timings) and
reports the mean and worst over runs of the smallest layer's final rotation:
0.956 and 0.931 for the law, none of the 16 below 0.92, test accuracy
>= 98.65 %.

- **PI toward a fast reference.** A lagging layer's multiplier grows
  geometrically as long as it lags; ``m_max_l`` keeps
  ``rho0 * profile_l * m_l <= rho_max``. A leading layer is not slowed below
  the schedule the user chose unless ``min_mult`` < 1 (0.25, the earlier
  default, measured the same: 0.961 / 0.913). The small layers of that CNN
  (first conv, 800 weights; classifier, 640) sit at the cap, 0.4 rad per
  step, from ~20 % of training on; a cap of 0.5 brought nothing (0.952 /
  0.905) for 4x the back-offs, and pushing harder early (ki 80) lost
  accuracy (worst 97.6 %).
- **Neighbour coupling** (``couple``). A layer at the cap does not rotate
  further than its basin lets it: its rotation soon plateaus (0.85-0.93) and
  jitters while the layers it feeds and reads from keep the network's memory
  of its initial features. It gets further only when they move too: with the
  first and last layer held at the cap and the others at 1x / 1.5x / 2x /
  2.5x, the mean smallest rotation over 8 seeds was 0.885 / 0.950 / 0.954 /
  0.965, and 3x killed 4 of 8 runs. So each layer's log multiplier is at
  least ``couple`` (0.4) times its forward neighbours' own when they are
  pushed: 2.6x next to a layer at the cap. Without it: 0.945 / 0.896, 3 runs
  below 0.92.
- **Loss hold and guard** (``loss_hold``, ``loss_guard``, ``react``).
  Shaking the network is what moves the small layers, and it is also what
  kills runs, so the training loss (the job's ``handle.observe_loss``),
  smoothed over ``react`` (3 %) of training, is compared with the untrained
  network's loss (the run's first reported losses, read from the history
  whenever the controller starts; relative to its own first window, which
  the CLI process opens 20-40 steps into this run, the guard backed off on
  ordinary noise in 6 of 8 runs): above 0.4 x that, integral parts stop
  growing; above 0.6 x, they are halved, at most once per ``react`` of
  training. Without the hold: 0.940 / 0.876; halving at every update instead
  (the smoothed loss lags, so the cuts pile up): 0.953 / 0.902.
- **Settling** (``settle_from``, ``settle_tol``). After the schedule's first
  decay the network converges, and a layer still held at a large multiplier
  only jitters around where it is. From ``settle_from`` on, a layer within
  ``settle_tol`` (5 %) of the target stops being pushed and its integral
  part decays over ``react``; laggards below that keep their push. Without
  it: 0.950 / 0.917, accuracy down to 97.98 %.

Pushing a laggard harder after the first decay (the job's rho_max allows
27x) changed nothing (2 seeds), as the earlier version of this controller
found: pushed late, a small layer only bounces around its region.

The controller runs as a loop in the operator's process (``layrot-agent
control auto``): it reads rotations (GetRun) and losses (GetHistory) through
the collector's Query service and sends commands through SetControl. It keeps
no state on the collector; stopped and restarted, it starts again from
multipliers 1 (the job keeps the last command meanwhile).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layrot.client.query import CollectorError, QueryClient
from layrot.controllers.profile import issuer, profile_command
from layrot.controllers.runs import wait_for_run
from layrot.core.rates import RhoSchedule, alpha_profile
from layrot.proto import layrot_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["AutoPolicy", "AutoController"]

#: The untrained network's loss is the mean of this many first reported losses.
INITIAL_LOSSES = 3


@dataclass
class AutoPolicy:
    """The control law (pure numpy; see the module docstring).

    Args:
        num_layers: layers in forward order.
        total_steps: optimizer steps of the whole training run.
        target: cosine distance every layer should reach (1.0 = orthogonal to init).
        reach: fraction of training by which the reference reaches ``target``.
        kp, ki: proportional and integral gains (on log multipliers).
        min_mult: smallest multiplier. Below 1 a layer ahead of the reference is
            slowed down; the default 1 never goes below the user's schedule.
        max_mult: largest multiplier, per layer or one for all.
        couple: a layer's log multiplier is at least ``couple`` times the larger
            of its forward neighbours' own, when that is a boost (0 disables the
            coupling).
        loss_guard: back off (halve every multiplier's integral part) when the
            smoothed training loss climbs back above this fraction of the initial
            loss (the untrained network's); 0 disables the guard.
        loss_hold: while the smoothed loss is above this fraction of the initial
            loss, integral parts may fall but not grow (0 disables the hold).
        react: reaction time, as a fraction of training: the loss is smoothed over
            it, the guard backs off at most once per it (unless ``backoff_every``
            says otherwise), and a settled layer's integral part decays over it.
        backoff_every: at most one back-off per this fraction of training
            (None: ``react``; 0: at every update while the loss is too high).
        settle_from: fraction of training from which layers settle (the schedule's
            first decay; 1.0 = never).
        settle_tol: from ``settle_from`` on, a layer within this fraction of
            ``target`` is no longer pushed and its integral part decays.
    """

    num_layers: int
    total_steps: int
    target: float = 1.0
    reach: float = 0.2
    kp: float = 3.0
    ki: float = 40.0
    min_mult: float = 1.0
    max_mult: np.ndarray | float = 10.0
    couple: float = 0.4
    loss_guard: float = 0.6
    loss_hold: float = 0.4
    react: float = 0.03
    backoff_every: float | None = None
    settle_from: float = 1.0
    settle_tol: float = 0.05
    integral: np.ndarray = field(init=False)
    last_step: int = field(init=False, default=0)
    first_loss: float = field(init=False, default=math.nan)
    loss_ema: float = field(init=False, default=math.nan)
    _loss_step: int = field(init=False, default=0, repr=False)
    holding: bool = field(init=False, default=False)
    backoffs: int = field(init=False, default=0)
    holds: int = field(init=False, default=0)
    _armed: bool = field(init=False, default=False, repr=False)
    _last_backoff: float = field(init=False, default=-math.inf, repr=False)

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        if not (0.0 < self.target <= 2.0):
            raise ValueError(f"target must be a cosine distance in (0, 2], got {self.target}")
        if not (0.0 < self.reach <= 1.0):
            raise ValueError(f"reach must be in (0, 1], got {self.reach}")
        if not (0.0 < self.min_mult <= 1.0):
            raise ValueError(f"min_mult must be in (0, 1], got {self.min_mult}")
        if not (0.0 <= self.couple <= 1.0):
            raise ValueError(f"couple must be in [0, 1], got {self.couple}")
        if not (0.0 < self.react <= 1.0):
            raise ValueError(f"react must be in (0, 1], got {self.react}")
        if not (0.0 <= self.settle_tol < 1.0) or not (0.0 <= self.settle_from <= 1.0):
            raise ValueError(
                f"settle_tol must be in [0, 1) and settle_from in [0, 1], got {self.settle_tol}, {self.settle_from}"
            )
        if self.loss_hold > 0 and self.loss_guard > 0 and self.loss_hold > self.loss_guard:
            raise ValueError(f"loss_hold ({self.loss_hold:g}) must not exceed loss_guard ({self.loss_guard:g})")
        every = self.react if self.backoff_every is None else self.backoff_every
        if every < 0:
            raise ValueError(f"backoff_every must be >= 0, got {every}")
        self._backoff_gap = every * self.total_steps
        self.integral = np.zeros(self.num_layers)
        hi = np.broadcast_to(np.asarray(self.max_mult, dtype=np.float64), (self.num_layers,))
        self._log_hi = np.log(np.maximum(hi, self.min_mult))
        self._log_lo = math.log(self.min_mult)

    def reference(self, step: int) -> float:
        """D(x): the rotation the layers should have at ``step``."""
        x = min(1.0, max(0, step) / (self.reach * self.total_steps))
        return self.target * math.sqrt(x)

    def set_initial_loss(self, loss: float) -> None:
        """The untrained network's loss: the reference of the loss guard and hold (NaN = unknown)."""
        if math.isfinite(loss) and loss > 0:
            self.first_loss = float(loss)

    def observe_loss(self, loss: float, step: int | None = None) -> bool:
        """Feed the mean training loss since the previous update; True when the policy backed off.

        Rotating layers fast shakes the network and the loss rises while it does;
        that is expected, and the more the network is shaken the further its
        small layers get from their initialization (module docstring). A loss
        climbing back towards that of the untrained network means the rates are
        destroying what was learned (measured on a digits CNN: a run whose loss
        passed ~1.0 went on to ln 10 within 100 steps, and stayed there), so:

        - above ``loss_hold`` x the initial loss (smoothed over ``react`` of
          training), the integral parts stop growing (:attr:`holding`);
        - above ``loss_guard`` x the initial loss, every integral part is halved,
          at most once per ``backoff_every`` (default ``react``) of training: the
          smoothed loss lags, and halving at every update while it came down cut
          the multipliers 8-fold and more, after which the small layers fell
          back towards their initialization.

        The initial loss is :meth:`set_initial_loss`'s, else the first loss fed
        here. A guard relative to the best loss instead fires on ordinary noise
        once the loss is small, and starves the controller.
        """
        if not math.isfinite(loss):
            return False
        if math.isnan(self.first_loss):
            self.first_loss = loss  # the untrained network's loss is the reference, not the EMA's start
            return False
        # Smoothed: a dying run's loss climbs for many steps, while single noisy
        # windows must not cost the laggards their progress. Over steps, not
        # updates, so the guard reacts alike however often the controller updates.
        now = self.last_step if step is None else int(step)
        a = 1.0 - math.exp(-max(1, now - self._loss_step) / max(1.0, self.react * self.total_steps))
        self._loss_step = max(self._loss_step, now)
        self.loss_ema = loss if math.isnan(self.loss_ema) else (1.0 - a) * self.loss_ema + a * loss
        limit = self.loss_guard * self.first_loss
        if not self._armed:  # only a loss that fell below the limits can climb back above them
            levels = [x for x in (self.loss_guard, self.loss_hold) if x > 0]
            self._armed = bool(levels) and self.loss_ema <= min(levels) * self.first_loss
            return False
        self.holding = self.loss_hold > 0 and self.loss_ema > self.loss_hold * self.first_loss
        self.holds += int(self.holding)
        if self.loss_guard > 0 and self.loss_ema > limit and now - self._last_backoff >= self._backoff_gap:
            self.integral = np.maximum(self.integral - math.log(2.0), self._log_lo)
            self._last_backoff = now
            self.backoffs += 1
            return True
        return False

    def update(self, step: int, rotation: np.ndarray) -> np.ndarray:
        """New multipliers from the rotations measured at ``step`` (NaN = unknown, no change)."""
        rotation = np.asarray(rotation, dtype=np.float64)
        hi = self._log_hi
        dx = max(0, int(step) - self.last_step) / self.total_steps
        self.last_step = max(self.last_step, int(step))
        err = (self.reference(step) - rotation) / self.target
        err = np.where(np.isfinite(err), err, 0.0)
        there = np.zeros(self.num_layers, dtype=bool)
        if self.settle_tol > 0 and step >= self.settle_from * self.total_steps:
            there = np.isfinite(rotation) & (rotation >= self.target * (1.0 - self.settle_tol))
            err = np.where(there, 0.0, err)
        growth = self.ki * err * dx
        if self.holding:
            growth = np.minimum(growth, 0.0)
        self.integral = np.clip(self.integral + growth, self._log_lo, hi)
        if there.any():
            self.integral = np.where(there, self.integral * math.exp(-dx / self.react), self.integral)
        own = np.clip(self.integral + self.kp * err, self._log_lo, hi)
        if self.couple > 0:  # pulled up towards pushed neighbours, never down
            nb = self.neighbours(own)
            own = np.maximum(own, np.where(nb > 0, self.couple * nb, -np.inf))
        return np.exp(np.minimum(own, hi))

    @staticmethod
    def neighbours(values: np.ndarray) -> np.ndarray:
        """Per layer, the larger of its forward neighbours' values (-inf for a single layer)."""
        out = np.full_like(values, -np.inf)
        out[1:] = np.maximum(out[1:], values[:-1])
        out[:-1] = np.maximum(out[:-1], values[1:])
        return out


class AutoController:
    """The loop: measure through the Query service, decide, send a RateCommand, repeat.

    Args:
        client: QueryClient (with the token when the collector requires one).
        run: the run to steer (``watch(..., control=True)`` with ``layrot.Layca``).
        total_steps: optimizer steps of the training run; the loop stops there.
        target, reach, kp, ki, min_mult: see :class:`AutoPolicy`.
        rho0, alpha, milestones, factor: the global schedule and profile the
            multipliers sit on (default: the paper's 3^-3 with x0.2 decays at
            80, 90 and 97 % of training).
        rho_max: the largest per-step rate the controller may ask (<= the job's rho_max).
        min_change: send a new command only when some multiplier moved by more
            than this fraction (fewer versions, shorter audit trail).
        couple, settle_tol: see :class:`AutoPolicy`; layers settle from the first milestone.
        loss_guard, loss_hold: see :class:`AutoPolicy`; they need the job to report
            its loss (``handle.observe_loss(loss)``), else they stay inactive.
    """

    def __init__(
        self,
        client: QueryClient,
        run: str,
        total_steps: int,
        *,
        target: float = 1.0,
        reach: float = 0.2,
        kp: float = 3.0,
        ki: float = 40.0,
        min_mult: float = 1.0,
        rho0: float = 3.0**-3,
        alpha: float = 0.0,
        milestones: tuple[float, ...] = (0.8, 0.9, 0.97),
        factor: float = 0.2,
        rho_max: float = 0.4,
        min_change: float = 0.02,
        couple: float = 0.4,
        loss_guard: float = 0.6,
        loss_hold: float = 0.4,
        settle_tol: float = 0.05,
        issued_by: str | None = None,
    ) -> None:
        self.client = client
        self.run = run
        self.total_steps = int(total_steps)
        self.alpha = float(alpha)
        self.schedule = RhoSchedule(
            rho0=rho0,
            kind="step" if milestones else "constant",
            milestones=tuple(milestones),
            factor=factor,
            total_steps=self.total_steps,
        )
        self.rho_max = float(rho_max)
        if rho0 <= 0 or rho0 > rho_max:
            raise ValueError(f"rho0 must be in (0, rho_max={rho_max:g}], got {rho0:g}")
        self.policy_args: dict[str, Any] = dict(
            total_steps=self.total_steps,
            target=target,
            reach=reach,
            kp=kp,
            ki=ki,
            min_mult=min_mult,
            couple=couple,
            loss_guard=loss_guard,
            loss_hold=loss_hold,
            settle_tol=settle_tol,
            settle_from=min(1.0, min(self.schedule.milestone_steps, default=self.total_steps) / self.total_steps),
        )
        AutoPolicy(num_layers=1, **self.policy_args)  # bad arguments fail here, before the loop
        self.min_change = float(min_change)
        self.issued_by = issued_by or issuer()
        self.policy: AutoPolicy | None = None
        self.multipliers: np.ndarray | None = None
        self.versions: list[int] = []
        self.updates = 0
        self._loss_from = 0
        self._last_loss = math.nan

    def _make_policy(self, num_layers: int) -> AutoPolicy:
        profile = alpha_profile(self.alpha, num_layers)
        # A layer the alpha profile freezes (multiplier 0) stays frozen.
        with np.errstate(divide="ignore"):
            max_mult = np.where(profile > 0, self.rho_max / (self.schedule.rho0 * profile), 1.0)
        return AutoPolicy(num_layers=num_layers, max_mult=max_mult, **self.policy_args)

    def command(self, multipliers: np.ndarray, step: int, rotation: np.ndarray) -> pb.RateCommand:
        """The RateCommand for new multipliers (reason names the most lagging layer)."""
        worst = int(np.nanargmin(rotation)) if np.isfinite(rotation).any() else 0
        reason = (
            f"auto: step {step}/{self.total_steps}, target {self.policy_args['target']:g}, "
            f"min rotation {np.nanmin(rotation) if np.isfinite(rotation).any() else float('nan'):.3f} "
            f"(layer {worst})"
        )
        return profile_command(
            alpha=self.alpha,
            schedule=self.schedule,
            multipliers=multipliers.tolist(),
            reason=reason,
            controller="auto",
            issued_by=self.issued_by,
        )

    def initial_loss(self, step: int) -> float:
        """Mean of the first :data:`INITIAL_LOSSES` losses the run reported (the untrained network's loss).

        NaN if the run reported none.

        The guard's reference must be the untrained network's loss whenever the
        controller starts. Its own first window ends wherever the controller
        happened to start: the CLI process starts 20-40 steps into the digits
        benchmark, whose loss has by then fallen from 2.3 to ~0.7, and a guard
        relative to that backed off on the ordinary noise of the pushed layers
        (2-3 back-offs in 6 of 8 runs, which cost the small layers their progress).
        """
        try:
            for chunk in self.client.iter_history(self.run, since_step=1, until_step=step):
                ok = chunk.loss[np.isfinite(chunk.loss)]
                if ok.size:
                    return float(ok[:INITIAL_LOSSES].mean())
        except CollectorError as exc:
            log.warning("auto: cannot read the initial loss: %s", exc)
        return math.nan

    def window_loss(self, step: int) -> float:
        """Mean training loss the job reported since the previous update (NaN without losses)."""
        if self.policy is None or max(self.policy.loss_guard, self.policy.loss_hold) <= 0 or step <= self._loss_from:
            return math.nan
        try:
            loss = self.client.history(self.run, since_step=self._loss_from + 1, until_step=step).loss
        except CollectorError as exc:
            log.warning("auto: cannot read the loss: %s", exc)
            return math.nan
        self._loss_from = step
        ok = loss[np.isfinite(loss)]
        self._last_loss = float(ok.mean()) if ok.size else math.nan
        if ok.size and math.isnan(self.policy.first_loss):  # once the job reports losses at all
            self.policy.set_initial_loss(self.initial_loss(step))
        return self._last_loss

    def tick(self, detail: dict) -> int | None:
        """One control update from a ``get_run`` result; returns the version sent, or None."""
        layers = detail["layers"]
        if self.policy is None:
            self.policy = self._make_policy(len(layers))
        step = int(detail["step"])
        rotation = np.array([lay["rotation"] for lay in layers], dtype=np.float64)
        backed_off = self.policy.observe_loss(self.window_loss(step), step)
        m = self.policy.update(step, rotation)
        self.updates += 1
        if self.multipliers is not None and np.all(np.abs(m / self.multipliers - 1.0) <= self.min_change):
            return None
        cmd = self.command(m, step, rotation)
        if self.policy.holding and not backed_off:
            cmd.reason += (
                f"; loss {self._last_loss:.3g} > {self.policy.loss_hold:g} x initial "
                f"{self.policy.first_loss:.3g}: holding"
            )
        if backed_off:
            cmd.reason += (
                f"; loss {self._last_loss:.3g} > {self.policy.loss_guard:g} x initial "
                f"{self.policy.first_loss:.3g}: backing off"
            )
        status = self.client.set_control(self.run, cmd)
        self.multipliers = m
        version = int(status["requested_version"])
        self.versions.append(version)
        return version

    def run_loop(
        self,
        interval: float = 5.0,
        wait: float = 60.0,
        max_offline: float = 120.0,
        stop: threading.Event | None = None,
        echo: Callable[[str], None] = lambda s: None,
    ) -> dict:
        """Update every ``interval`` seconds until the run reaches ``total_steps`` or disconnects.

        Waits up to ``wait`` seconds for the run to appear; gives up when the
        collector is unreachable for ``max_offline`` seconds. Returns a summary.
        """
        stop = stop or threading.Event()
        detail = wait_for_run(self.client, self.run, wait, stop)
        seen_connected = bool(detail["connected"])
        last_ok = time.monotonic()
        reason = "stopped"
        while not stop.is_set():
            step = int(detail["step"])
            if step >= self.total_steps:
                reason = f"the run reached total steps ({step} >= {self.total_steps})"
                break
            if seen_connected and not detail["connected"]:
                reason = f"the run disconnected at step {step}"
                break
            if step > (self.policy.last_step if self.policy is not None else 0):
                version = self.tick(detail)
                if version is not None:
                    mn = ", ".join(f"{x:.2f}" for x in self.multipliers)  # type: ignore[union-attr]
                    echo(f"step {step}: version {version}, multipliers [{mn}]")
            stop.wait(interval)
            try:
                detail = self.client.get_run(self.run)
                last_ok = time.monotonic()
            except CollectorError as exc:
                if time.monotonic() - last_ok > max_offline:
                    reason = f"collector unreachable for {max_offline:g} s: {exc}"
                    break
                log.warning("auto: %s (retrying)", exc)
                continue
            seen_connected = seen_connected or bool(detail["connected"])
        rotation = [lay["rotation"] for lay in detail["layers"]]
        return {
            "run": self.run,
            "reason": reason,
            "step": int(detail["step"]),
            "updates": self.updates,
            "backoffs": self.policy.backoffs if self.policy is not None else 0,
            "holds": self.policy.holds if self.policy is not None else 0,
            "versions": list(self.versions),
            "rotation": rotation,
            "multipliers": None if self.multipliers is None else self.multipliers.tolist(),
        }
