"""AdaptCopy (the paper's Section 5.4): replay one run's measured per-layer rates in another.

The source run (typically Adam or RMSprop) was monitored by layrot, so the
collector holds its per-step, per-layer step angles theta_l(t). Layca with rate
rho rotates a layer by exactly arctan(rho) per step, so replaying
``rho_l(t) = tan(theta_l(t))`` with SGD + Layca in the target run reproduces the
source's rotation rates step by step (with SGD's directions).

Delivery: the rates travel as ``RateCommand.table`` segments (float64, steps x
layers). A segment must stay well below the 16 MiB message limit, so long runs
are sent as windows of steps, each a new command version, sent ahead of the
job: the next window goes out when the job has used half of the current one.
Target step t replays source step t (absolute alignment); steps the job took
before the first window arrived ran on its own settings. Beyond a window
(controller gone, or the source run was shorter) the job holds a constant,
uniform rate: the median of the window's last row.

The base optimizer: Layca keeps only the direction of the target's base step,
so the copy reproduces the source's rates with the target's directions. For an
Adam-family source that direction should follow Adam's average of gradients:
the target's base optimizer should be ``layrot.SGD_AMom`` (the paper's Appendix
B.4; ``torch.optim.SGD(momentum=m, dampening=m)`` is a different rule). The job
builds its own optimizer, so the controller can only advise: it reads the
optimizer names the runs declared in their metadata (``watch(...,
meta={"optimizer": "Adam"})``) and says what the target should run
(:func:`base_advice`). It simulates no optimizer itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from layrot.client.query import CollectorError, History, QueryClient
from layrot.controllers.profile import issuer
from layrot.controllers.runs import wait_for_run
from layrot.core.amom import OPTIMIZER_META_KEY, base_for, is_sgd_amom
from layrot.proto import layrot_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WINDOW_BYTES", "CopyPlan", "recorded_rates", "BaseAdvice", "base_advice", "AdaptCopy"]

# Table bytes per command: a quarter of the 16 MiB message limit.
DEFAULT_WINDOW_BYTES = 4 << 20


@dataclass
class CopyPlan:
    """Rates to replay: ``rates[t - 1]`` is the per-layer rate of step t (t = 1..num_steps)."""

    layer_names: list[str]
    rates: np.ndarray  # (num_steps, L) float64, layer order of the source
    clipped: int  # values reduced to rho_max
    filled: int  # steps not reported by the source (every > 1) or non-finite, filled in

    @property
    def num_steps(self) -> int:
        return int(self.rates.shape[0])


def recorded_rates(h: History, rho_max: float = 1.0) -> CopyPlan:
    """Per-step rates ``tan(step angle)`` of a monitored run, for steps 1..its last step.

    Steps the source did not report (``every`` > 1) or reported as non-finite take
    the rate of the next reported step (a step angle describes one optimizer step,
    and neighbours rotate alike). Rates above ``rho_max`` (45 degrees at 1.0) are
    clipped, since the job would refuse them, and counted.
    """
    if len(h) == 0:
        raise ValueError(f"run {h.run!r} has no reported steps to copy")
    steps = h.steps.astype(np.int64)
    if steps.min() < 1:
        raise ValueError("history steps must be >= 1")
    angles = np.asarray(h.step_angle, dtype=np.float64)
    ok_angle = np.isfinite(angles) & (angles >= 0) & (angles < np.pi / 2)
    if not ok_angle.any(axis=0).all():
        bad = [h.layer_names[i] for i in np.flatnonzero(~ok_angle.any(axis=0))]
        raise ValueError(f"run {h.run!r} has no usable step angle for layers {bad[:5]}")
    S = int(steps.max())
    L = angles.shape[1]
    rates = np.full((S, L), np.nan)
    rates[steps - 1] = np.where(ok_angle, np.tan(np.where(ok_angle, angles, 0.0)), np.nan)
    missing = ~np.isfinite(rates)
    filled = int(missing.any(axis=1).sum())
    if missing.any():
        # Backfill from the next known step; after the last known step, forward-fill.
        for col in range(L):
            c = rates[:, col]
            known = np.flatnonzero(np.isfinite(c))
            nxt = np.searchsorted(known, np.arange(S))
            nxt = np.minimum(nxt, known.size - 1)
            rates[:, col] = np.where(np.isfinite(c), c, c[known[nxt]])
    clipped = int(np.count_nonzero(rates > rho_max))
    np.minimum(rates, rho_max, out=rates)
    return CopyPlan(layer_names=list(h.layer_names), rates=rates, clipped=clipped, filled=filled)


@dataclass
class BaseAdvice:
    """Which base optimizer the target should run under Layca, from the runs' metadata."""

    source_optimizer: str  # as the source declared it ("" = not declared)
    target_optimizer: str  # as the target declared it ("" = not declared)
    recommended: str | None  # "SGD_AMom", "SGD", or None (unknown source optimizer)
    matches: bool | None  # the target runs the recommended base; None = cannot tell
    message: str


def base_advice(source_meta: Mapping[str, str], target_meta: Mapping[str, str]) -> BaseAdvice:
    """Advice on the target's base optimizer, from ``meta["optimizer"]`` of both runs.

    An Adam-family source (Adam, AdamW, Nadam...) needs ``layrot.SGD_AMom`` as the
    target's base (the paper's Appendix B.4); RMSprop / Adagrad / SGD sources keep
    plain SGD. Names may carry the Layca wrapper (``"Layca(SGD_AMom)"``).
    """
    src = str(source_meta.get(OPTIMIZER_META_KEY, "")).strip()
    dst = str(target_meta.get(OPTIMIZER_META_KEY, "")).strip()
    rec = base_for(src) if src else None
    matches: bool | None = None
    if not src:
        msg = (
            "the source run does not name its optimizer (watch(..., meta={'optimizer': 'Adam'})); "
            "if it was Adam-family, the target's base optimizer should be layrot.SGD_AMom (Appendix B.4)"
        )
    elif rec is None:
        msg = f"source optimizer {src!r} is not one layrot knows; no advice on the target's base optimizer"
    elif rec == "SGD_AMom":
        if dst:
            matches = is_sgd_amom(dst)
        if matches:
            msg = f"source ran {src}; the target's base {dst} is SGD_AMom, as Appendix B.4 needs"
        else:
            msg = (
                f"source ran {src} (Adam-style momentum): the target's base optimizer should be "
                f"layrot.SGD_AMom (Appendix B.4), not {dst or 'an undeclared optimizer'}; "
                "torch SGD(momentum=m, dampening=m) is a different rule"
            )
    else:
        if dst:
            matches = base_for(dst) == "SGD" and not is_sgd_amom(dst)
        msg = f"source ran {src} (no Adam-style momentum): plain SGD is the target's base optimizer"
    return BaseAdvice(src, dst, rec, matches, msg)


class AdaptCopy:
    """Replays ``source``'s recorded rates in ``target`` through the collector's control plane.

    Args:
        client: a QueryClient (with the token if the collector needs one).
        source, target: run ids; the target must run ``watch(..., control=True)``
            with a ``layrot.Layca`` optimizer and have the same layer names. For an
            Adam-family source, the target's base optimizer should be
            ``layrot.SGD_AMom`` (see :func:`base_advice`).
        window_steps: steps per command; default as many as fit in ``window_bytes``.
        rho_max: rates above it are clipped (the job refuses commands above its own).
    """

    def __init__(
        self,
        client: QueryClient,
        source: str,
        target: str,
        *,
        window_steps: int | None = None,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        rho_max: float = 1.0,
        reason: str = "",
        issued_by: str | None = None,
    ) -> None:
        self.client = client
        self.source = source
        self.target = target
        self.window_steps = window_steps
        self.window_bytes = window_bytes
        self.rho_max = rho_max
        self.reason = reason or f"AdaptCopy from {source}"
        self.issued_by = issued_by or issuer()
        self.plan: CopyPlan | None = None
        self.order: np.ndarray | None = None  # target layer j <- source column order[j]
        self.sent_until = 0  # first step not covered by the newest window
        self.versions: list[int] = []

    # ------------------------------------------------------------ planning
    def load(self, target_layers: list[str]) -> CopyPlan:
        """Read the source history and map its layers onto the target's by name."""
        plan = recorded_rates(self.client.history(self.source), self.rho_max)
        pos = {n: i for i, n in enumerate(plan.layer_names)}
        missing = [n for n in target_layers if n not in pos]
        if missing:
            raise ValueError(
                f"the source run {self.source!r} has no layers {missing[:5]} of the target "
                f"{self.target!r}; AdaptCopy needs the same architecture (layer names)"
            )
        self.order = np.array([pos[n] for n in target_layers], dtype=np.int64)
        self.plan = plan
        L = len(target_layers)
        if self.window_steps is None:
            self.window_steps = max(1, self.window_bytes // (8 * max(1, L)))
        return plan

    def command(self, start: int) -> pb.RateCommand:
        """The command covering steps ``start .. start + window_steps - 1`` (clamped to the source)."""
        assert self.plan is not None and self.order is not None and self.window_steps
        start = max(1, int(start))
        end = min(start + self.window_steps, self.plan.num_steps + 1)
        if end <= start:
            raise ValueError(f"step {start} is past the source run's {self.plan.num_steps} steps")
        rows = np.ascontiguousarray(self.plan.rates[start - 1 : end - 1][:, self.order], dtype="<f8")
        hold = float(np.median(rows[-1]))
        return pb.RateCommand(
            mode="layca",
            alpha=0.0,
            schedule=pb.RhoSchedule(rho0=hold, kind="constant"),
            table=pb.RateTable(start_step=start, num_layers=rows.shape[1], rates=rows.tobytes()),
            reason=f"{self.reason}: steps {start}..{end - 1}",
            controller="copy",
            issued_by=self.issued_by,
        )

    def send(self, start: int) -> int:
        """Send the window starting at ``start``; returns its version."""
        cmd = self.command(start)
        status = self.client.set_control(self.target, cmd)
        version = int(status["requested_version"])
        n = len(cmd.table.rates) // (8 * cmd.table.num_layers)
        self.sent_until = start + n
        self.versions.append(version)
        log.info(
            "AdaptCopy %s -> %s: version %d covers steps %d..%d",
            self.source,
            self.target,
            version,
            start,
            self.sent_until - 1,
        )
        return version

    def advise(self, target_meta: Mapping[str, str]) -> BaseAdvice:
        """:func:`base_advice` for the source's metadata (read from the collector) and ``target_meta``."""
        try:
            source_meta = self.client.get_run(self.source).get("meta") or {}
        except CollectorError as exc:
            # The history was readable a moment ago: a run the summary no longer has still copies.
            log.warning("AdaptCopy: no metadata for %s: %s", self.source, exc)
            source_meta = {}
        advice = base_advice(source_meta, target_meta)
        if advice.recommended == "SGD_AMom" and not advice.matches:
            log.warning("AdaptCopy %s -> %s: %s", self.source, self.target, advice.message)
        else:
            log.info("AdaptCopy %s -> %s: %s", self.source, self.target, advice.message)
        return advice

    # ------------------------------------------------------------ the loop
    def due(self, step: int) -> int | None:
        """Start of the window to send when the target reported ``step``, or None (nothing due)."""
        assert self.plan is not None and self.window_steps
        if self.sent_until > self.plan.num_steps:
            return None
        if not self.versions or step + self.window_steps // 2 >= self.sent_until:
            return max(1, step + 1)
        return None

    @property
    def done(self) -> bool:
        """Every recorded step has been sent."""
        return self.plan is not None and self.sent_until > self.plan.num_steps

    def run(
        self,
        interval: float = 1.0,
        wait: float = 60.0,
        stop: threading.Event | None = None,
        echo: Callable[[str], None] = lambda s: None,
    ) -> dict:
        """Wait for the target, send windows ahead of it until the source's steps are covered.

        Returns a summary dict. Stops early when the target disconnects.
        """
        stop = stop or threading.Event()
        detail = wait_for_run(self.client, self.target, wait, stop)
        plan = self.load([lay["name"] for lay in detail["layers"]])
        advice = self.advise(detail.get("meta") or {})
        echo(
            f"AdaptCopy {self.source} -> {self.target}: {plan.num_steps} steps x {len(detail['layers'])} layers, "
            f"window {self.window_steps} steps; clipped {plan.clipped} values to rho_max {self.rho_max:g}, "
            f"filled {plan.filled} unreported steps"
        )
        echo(f"base optimizer: {advice.message}")
        seen_connected = detail["connected"]
        gaps = 0
        while not stop.is_set():
            step = int(detail["step"])
            start = self.due(step)
            if start is not None:
                if self.versions and step >= self.sent_until:
                    gaps += 1
                    log.warning(
                        "AdaptCopy: the target reached step %d, past the window ending at %d; "
                        "it held a constant rate meanwhile (use a larger --window-steps or a smaller "
                        "--interval)",
                        step,
                        self.sent_until - 1,
                    )
                v = self.send(start)
                echo(f"  version {v}: steps {start}..{self.sent_until - 1}")
            if self.done:
                break
            if seen_connected and not detail["connected"]:
                echo(f"target {self.target} disconnected at step {step}; stopping")
                break
            stop.wait(interval)
            try:
                detail = self.client.get_run(self.target)
            except CollectorError as exc:
                log.warning("AdaptCopy: %s", exc)
                continue
            seen_connected = seen_connected or detail["connected"]
        return {
            "source": self.source,
            "target": self.target,
            "versions": list(self.versions),
            "steps": plan.num_steps,
            "window_steps": self.window_steps,
            "clipped": plan.clipped,
            "filled": plan.filled,
            "gaps": gaps,
            "complete": self.done,
            "source_optimizer": advice.source_optimizer,
            "base_optimizer": advice.recommended,
            "base_optimizer_ok": advice.matches,
            "base_advice": advice.message,
        }
