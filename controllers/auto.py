"""Closed-loop rate control: bring every layer's rotation to a target by the end of training.

The paper finds the best generalization when *every* layer's cosine distance
to its initialization ends close to 1. A global Layca rate does not get there
for all layers: small layers (a first convolution with few input channels) and
the classifier lag behind. This controller watches the measured rotations and
steers per-layer multipliers on top of a warmup-free global schedule rho(t):

    x      = step / total_steps                        (training progress)
    D(x)   = target * sqrt(min(1, x / reach))          (where layers should be)
    e_l    = (D(x) - rotation_l) / target              (> 0: layer l lags)
    I_l   += ki * e_l * dx                             (integral, log space)
    m_l    = exp(clip(I_l + kp * e_l, log m_min, log m_max_l))

A lagging layer's multiplier grows (geometrically, as long as it lags) and a
layer ahead of the reference is slowed down to ``m_min``; ``m_max_l`` keeps
``rho0 * profile_l * m_l <= rho_max``. The reference rises fast (square root,
reaching the target at 20 % of training by default): a lagging layer must be
pushed before the rest of the network has co-adapted around it; pushed late, a
small layer only bounces around its current region however large its rate
(measured on a digits CNN: the first convolution stalled near 0.85 at 23
degrees per step when boosted from 30 % of training on, and reached 0.96-0.98
when boosted from the start). The cap matters: at rho_max 0.5 some seeds of
that CNN died (constant predictions); 0.4 is the default. Even at 0.4 a run
can die (2 of 8 CLI runs on that CNN), so a loss guard backs every multiplier
off while the job's training loss climbs back towards its initial value (see
:meth:`AutoPolicy.observe_loss`); none of the 6 runs measured with it died.

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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from layrot.agent.query import CollectorError, QueryClient
from layrot.controllers.profile import issuer, profile_command
from layrot.controllers.runs import wait_for_run
from layrot.proto.rates import RhoSchedule, alpha_profile
from layrot.proto import layrot_pb2 as pb

log = logging.getLogger("layrot.controllers.auto")

__all__ = ["AutoPolicy", "AutoController"]


@dataclass
class AutoPolicy:
    """The control law (pure numpy; see the module docstring).

    Args:
        num_layers: layers in forward order.
        total_steps: optimizer steps of the whole training run.
        target: cosine distance every layer should reach (1.0 = orthogonal to init).
        reach: fraction of training by which the reference reaches ``target``.
        kp, ki: proportional and integral gains (on log multipliers).
        min_mult: smallest multiplier (how far a leading layer is slowed down).
        max_mult: largest multiplier, per layer or one for all.
        loss_guard: back off (halve every multiplier's integral part) when the mean
            training loss since the previous update climbs back above this fraction
            of the first such mean (the loss of the untrained network); 0 disables it.
    """

    num_layers: int
    total_steps: int
    target: float = 1.0
    reach: float = 0.2
    kp: float = 3.0
    ki: float = 40.0
    min_mult: float = 0.25
    max_mult: np.ndarray | float = 10.0
    loss_guard: float = 0.75
    integral: np.ndarray = field(init=False)
    last_step: int = field(init=False, default=0)
    first_loss: float = field(init=False, default=math.nan)
    loss_ema: float = field(init=False, default=math.nan)
    _armed: bool = field(init=False, default=False, repr=False)
    backoffs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        if not (0.0 < self.target <= 2.0):
            raise ValueError(f"target must be a cosine distance in (0, 2], got {self.target}")
        if not (0.0 < self.reach <= 1.0):
            raise ValueError(f"reach must be in (0, 1], got {self.reach}")
        if not (0.0 < self.min_mult <= 1.0):
            raise ValueError(f"min_mult must be in (0, 1], got {self.min_mult}")
        self.integral = np.zeros(self.num_layers)
        hi = np.broadcast_to(np.asarray(self.max_mult, dtype=np.float64), (self.num_layers,))
        self._log_hi = np.log(np.maximum(hi, self.min_mult))
        self._log_lo = math.log(self.min_mult)

    def reference(self, step: int) -> float:
        """D(x): the rotation the layers should have at ``step``."""
        x = min(1.0, max(0, step) / (self.reach * self.total_steps))
        return self.target * math.sqrt(x)

    def observe_loss(self, loss: float) -> bool:
        """Feed the mean training loss since the previous update; True when the policy backed off.

        Rotating layers fast shakes the network and the loss rises while it does;
        that is expected. A loss climbing back towards that of the untrained network
        means the rates are destroying what was learned (measured: a digits CNN
        driven by this controller without the guard died in 2 of 8 runs, its loss
        stuck at ln 10), so every multiplier's integral part is halved, at every
        update, until the loss (smoothed over updates) is back under ``loss_guard``
        times the first one.
        A guard relative to the best loss instead fires on ordinary noise once the
        loss is small, and starves the controller.
        """
        if self.loss_guard <= 0 or not math.isfinite(loss):
            return False
        if math.isnan(self.first_loss):
            self.first_loss = loss  # the untrained network's loss is the reference, not the EMA's start
            return False
        # Smoothed over a few updates: a dying run's loss climbs for many steps,
        # while single noisy windows must not cost the laggards their progress.
        self.loss_ema = loss if math.isnan(self.loss_ema) else 0.7 * self.loss_ema + 0.3 * loss
        limit = self.loss_guard * self.first_loss
        if not self._armed:  # only a loss that fell below the limit can climb back above it
            self._armed = self.loss_ema <= limit
            return False
        if self.loss_ema > limit:
            self.integral = np.maximum(self.integral - math.log(2.0), self._log_lo)
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
        self.integral = np.clip(self.integral + self.ki * err * dx, self._log_lo, hi)
        return np.exp(np.clip(self.integral + self.kp * err, self._log_lo, hi))


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
        loss_guard: see :class:`AutoPolicy`; it needs the job to report its loss
            (``handle.observe_loss(loss)``), else it stays inactive.
    """

    def __init__(self, client: QueryClient, run: str, total_steps: int, *, target: float = 1.0,
                 reach: float = 0.2, kp: float = 3.0, ki: float = 40.0, min_mult: float = 0.25,
                 rho0: float = 3.0 ** -3, alpha: float = 0.0,
                 milestones: tuple[float, ...] = (0.8, 0.9, 0.97), factor: float = 0.2,
                 rho_max: float = 0.4, min_change: float = 0.02, loss_guard: float = 0.75,
                 issued_by: str | None = None) -> None:
        self.client = client
        self.run = run
        self.total_steps = int(total_steps)
        self.alpha = float(alpha)
        self.schedule = RhoSchedule(rho0=rho0, kind="step" if milestones else "constant",
                                    milestones=tuple(milestones), factor=factor, total_steps=self.total_steps)
        self.rho_max = float(rho_max)
        if rho0 <= 0 or rho0 > rho_max:
            raise ValueError(f"rho0 must be in (0, rho_max={rho_max:g}], got {rho0:g}")
        self.policy_args = dict(total_steps=self.total_steps, target=target, reach=reach, kp=kp, ki=ki,
                                min_mult=min_mult, loss_guard=loss_guard)
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
        reason = (f"auto: step {step}/{self.total_steps}, target {self.policy_args['target']:g}, "
                  f"min rotation {np.nanmin(rotation) if np.isfinite(rotation).any() else float('nan'):.3f} "
                  f"(layer {worst})")
        return profile_command(alpha=self.alpha, schedule=self.schedule, multipliers=multipliers.tolist(),
                               reason=reason, controller="auto", issued_by=self.issued_by)

    def window_loss(self, step: int) -> float:
        """Mean training loss the job reported since the previous update (NaN without losses)."""
        if self.policy is None or self.policy.loss_guard <= 0 or step <= self._loss_from:
            return math.nan
        try:
            loss = self.client.history(self.run, since_step=self._loss_from + 1, until_step=step).loss
        except CollectorError as exc:
            log.warning("auto: cannot read the loss: %s", exc)
            return math.nan
        self._loss_from = step
        ok = loss[np.isfinite(loss)]
        self._last_loss = float(ok.mean()) if ok.size else math.nan
        return self._last_loss

    def tick(self, detail: dict) -> int | None:
        """One control update from a ``get_run`` result; returns the version sent, or None."""
        layers = detail["layers"]
        if self.policy is None:
            self.policy = self._make_policy(len(layers))
        step = int(detail["step"])
        rotation = np.array([lay["rotation"] for lay in layers], dtype=np.float64)
        backed_off = self.policy.observe_loss(self.window_loss(step))
        m = self.policy.update(step, rotation)
        self.updates += 1
        if self.multipliers is not None and np.all(np.abs(m / self.multipliers - 1.0) <= self.min_change):
            return None
        cmd = self.command(m, step, rotation)
        if backed_off:
            cmd.reason += (f"; loss {self._last_loss:.3g} > {self.policy.loss_guard:g} x initial "
                           f"{self.policy.first_loss:.3g}: backing off")
        status = self.client.set_control(self.run, cmd)
        self.multipliers = m
        version = int(status["requested_version"])
        self.versions.append(version)
        return version

    def run_loop(self, interval: float = 5.0, wait: float = 60.0, max_offline: float = 120.0,
                 stop: threading.Event | None = None, echo: Callable[[str], None] = lambda s: None) -> dict:
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
        return {"run": self.run, "reason": reason, "step": int(detail["step"]), "updates": self.updates,
                "backoffs": self.policy.backoffs if self.policy is not None else 0,
                "versions": list(self.versions), "rotation": rotation,
                "multipliers": None if self.multipliers is None else self.multipliers.tolist()}
