"""The alert detectors: abrupt single-step rotations, divergence, stalled runs, rejection bursts.

Why these alerts (Carbonnelle & De Vleeschouwer, Section 5.1, 5.3 and Figure 10):
a layer that rotates a large angle within ONE optimizer step, without the loss
improving, marks unstable training, the situation learning-rate warmups exist
to avoid. The engine flags, per layer and reported step, a step angle that is

* above an absolute limit ``abs_angle`` (default 0.3 rad, 17 deg), armed from
  the first step because the paper's abrupt rotations happen at the very
  beginning of training, or
* far above the layer's own robust recent baseline, once the run is past its
  warm-up (``warmup`` reported steps): ``angle > median + k * spread`` over the
  last ``window`` reported steps of that layer, where ``spread`` is the MAD
  scale ``1.4826 * MAD`` but never less than half the median. The floor matters
  for Layca, whose angles are constant (``arctan(rho_l)``, MAD = 0): there a
  layer must jump to ``1 + k/2`` times its usual angle (6x by default). Step
  decays only lower angles and never fire; SGD's large, fast-decaying first
  steps are covered by the warm-up.

and never below ``min_angle`` (0.01 rad: a step that small moves the cosine
distance by < 5e-5).

Why 0.3 rad: the paper's best Layca setting, rho(0) = 3^-3, turns every layer
by arctan(1/27) = 0.037 rad per step, and its training curves reach a cosine
distance near 1 (90 deg) over the whole run; 0.3 rad is 8x that rate, a
cosine distance of 0.045 in one step. On the digits MLP/CNN used in the tests,
normal SGD (lr 0.05..0.1, with or without momentum), Adam and Layca runs never
exceed 0.11 rad in a step, while plain SGD at lr 0.5 shows the paper's Figure
10 event: the output layer turns 0.52 rad in one step and the loss jumps from
0.89 to 2.34. The baseline rule's k = 10 was chosen on the same runs: their
largest angle/limit ratio after the warm-up is 0.6 (Layca 0.17). A rotation the job asked for is not abrupt: with Layca
the step angle is by construction ``arctan(rho_l)``, so an angle within 25 %
of that never fires (a controller raising the rate is not an instability).

Severity: "critical" when the loss did not improve across the jump, else
"warning". The loss a job reports with step t (``handle.observe_loss``) is
the loss of the forward pass that produced step t's gradient, i.e. measured at
w(t-1), before the jump. So the engine compares the median of the last 5
reported losses up to step t (``loss_before``) with the loss reported at the
next reported step (``loss_after``, the first one measured after the jump). It
waits for that step up to ``loss_wait`` seconds (0.5 s), then raises the alert
anyway ("warning", loss_after unknown). Runs that send no loss get "warning".

Cost: the hot path is a few vectorised numpy passes over each batch's
(steps x layers) angle array: a max over the steps, a per-layer comparison
with the cached limits, one ring write; the full (steps x layers) mask only
when some layer is over its limit, and over the per-run rate limit only its
count. The baseline (median and MAD per layer) is exact over a per-run ring
buffer (layers x window, float32) and recomputed with two row sorts every
``max(1, window // 10)`` reported steps: once per batch under load, at most ~5
steps stale for a slow job, which a 50-step median does not notice; a batch is
judged against the baseline as of its first step. Measured: ~0.1 ms per batch
of 100 steps x 200 layers (4 ns per layer-sample), 2.8 % of the collector's
CPU in benchmarks/ingest.py. Alternatives considered: a streaming quantile
estimate (cheaper but biased for the first hundred steps, which is when SGD's
angles move most) and exact per-step rolling medians (``window`` times dearer).
Non-finite angles (a diverged layer) enter the ring as the layer's median, so
they do not poison its baseline.

Abrupt rotations are evaluated on the run's lowest reporting rank only (data
parallel ranks hold the same weights); divergence on every rank. After a
collector restart each run re-warms its baseline.

Other kinds: "divergence" (critical) when a rank reports non-finite weights
(once per episode: re-armed after a fully finite batch); "stalled" (warning)
when a connected run reports nothing for ``max(stall_seconds, 5 x its usual
report interval)``, resolved when it reports again or disconnects; "rejections"
when the collector rejected >= 10 of the run's messages within 60 s (critical
if none of its batches was accepted in that window), re-armed after a quiet
minute.

Each detector is a small class over the engine's per-run state (``RunAlerts``)
that publishes what it finds on the hub (server/alert_hub.py); the engine
(server/alerts.py) feeds them batches and timer ticks. All of it runs on the
collector's asyncio loop thread.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.server.alert_hub import ALERT_BURST, ALERT_REFILL_PER_S, AlertHub
from layrot.server.alert_thresholds import Thresholds

if TYPE_CHECKING:
    from layrot.server.state import RunState

log = logging.getLogger(__name__)

NAN = float("nan")

KINDS = ("abrupt_rotation", "divergence", "stalled", "rejections")
SEVERITIES = ("warning", "critical")

# The spread of a layer's baseline is at least this fraction of its median
# (Layca's constant angles have MAD = 0).
SPREAD_FLOOR = 0.5
# Normal-distribution consistency factor of the MAD.
MAD_SCALE = 1.4826
# An angle within this factor of the commanded Layca angle arctan(rho) is what the job asked for.
COMMANDED_TOLERANCE = 1.25
# Losses (per run) that make up loss_before.
LOSS_HISTORY = 5
# Rejection bursts: this many rejected messages of one run within REJECT_WINDOW seconds.
REJECT_BURST = 10
REJECT_WINDOW = 60.0
# A stalled run: silent for max(stall_seconds, STALL_INTERVALS x its usual report interval).
STALL_INTERVALS = 5.0
# Baseline state of runs that left (disconnected and silent this long) is freed.
IDLE_FREE_SECONDS = 600.0


def _deg(x: float) -> str:
    return f"{math.degrees(x):.3g} deg" if math.isfinite(x) else "unknown"


# ---------------------------------------------------------------- per-run state


class Baseline:
    """Ring buffer of one rank's recent step angles (layers x window, float32) and its cached limits.

    Layers x window so that the sorts of ``refresh`` run along contiguous rows.
    """

    def __init__(self, rank: int, num_layers: int, window: int) -> None:
        self.rank = rank
        self.L = num_layers
        self.ring = np.zeros((num_layers, window), dtype=np.float32)
        self.pos = 0  # next column to write
        self.count = 0  # columns filled (<= window)
        self.reported = 0  # steps observed (warm-up counter)
        self.last_step = 0  # highest step observed (resent batches are not evaluated twice)
        self.stale = 0  # steps written since the limits were computed
        self.armed = False  # baseline rule armed when the limits were computed
        self.median = np.full(num_layers, np.nan)
        self.limit = np.full(num_layers, np.inf)  # fire when angle > limit (before the Layca exemption)
        self.valid = False
        self.losses: collections.deque[float] = collections.deque(maxlen=LOSS_HISTORY)

    @property
    def window(self) -> int:
        """Reported steps the ring holds."""
        return self.ring.shape[1]

    def resize(self, window: int) -> None:
        """New window length: keep the newest columns."""
        if window == self.window:
            return
        cols = self.columns()
        keep = cols[:, -window:] if cols.shape[1] else cols
        self.ring = np.zeros((self.L, window), dtype=np.float32)
        n = keep.shape[1]
        self.ring[:, :n] = keep
        self.count = n
        self.pos = n % window
        self.valid = False

    def columns(self) -> np.ndarray:
        """Filled columns, oldest first."""
        if self.count < self.window:
            return self.ring[:, : self.count]
        return np.concatenate([self.ring[:, self.pos :], self.ring[:, : self.pos]], axis=1)

    def push(self, angles: np.ndarray) -> None:
        """Append (S, L) angles (non-finite already replaced)."""
        W = self.window
        S = angles.shape[0]
        if S >= W:
            self.ring[:] = angles[-W:].T
            self.pos = 0
            self.count = W
        else:
            end = self.pos + S
            if end <= W:
                self.ring[:, self.pos : end] = angles.T
            else:
                k = W - self.pos
                self.ring[:, self.pos :] = angles[:k].T
                self.ring[:, : S - k] = angles[k:].T
            self.pos = end % W
            self.count = min(W, self.count + S)
        self.stale += S

    def refresh(self, th: Thresholds) -> None:
        """Recompute median, spread and the per-layer limit from the ring (two row sorts, float32)."""
        n = self.count
        self.armed = self.reported >= th.warmup and n >= min(th.warmup, th.window, 3)
        lo, hi = (n - 1) // 2, n // 2
        if n:
            r = self.ring[:, :n]
            srt = np.sort(r, axis=1)
            med = 0.5 * (srt[:, lo].astype(np.float64) + srt[:, hi])
            self.median = med
        if self.armed and math.isfinite(th.k):
            dev = np.sort(np.abs(r - med.astype(np.float32)[:, None]), axis=1)
            mad = 0.5 * (dev[:, lo].astype(np.float64) + dev[:, hi])
            spread = np.maximum(MAD_SCALE * mad, SPREAD_FLOOR * med)
            limit = np.maximum(med + th.k * spread, th.min_angle)
            np.minimum(limit, th.abs_angle, out=limit)
            self.limit = limit
        else:
            self.limit = np.full(self.L, th.abs_angle)
        self.stale = 0
        self.valid = True


class RunAlerts:
    """Everything the engine keeps for one run, grouped by the detector that uses it."""

    def __init__(self) -> None:
        self.baseline: Baseline | None = None
        self.overrides: dict[str, Any] = {}
        self.thresholds: Thresholds | None = None  # cache of defaults + overrides
        self.pending: list[tuple[pb.Alert, float, float]] = []  # (alert, loss_before, deadline)
        self.diverged_ranks: set[int] = set()
        self.tokens = float(ALERT_BURST)
        self.tokens_at: float | None = None
        self.last_batch: float | None = None  # collector monotonic time of the newest batch
        self.connected_since: float | None = None  # first tick that saw it connected without batches
        self.interval = 0.0  # smoothed seconds between batches
        self.stalled = False
        self.reject_total = 0
        self.reject_reasons: collections.Counter[str] = collections.Counter()
        self.reject_events: collections.deque[tuple[float, int]] = collections.deque()
        self.rejecting = False
        self.last_step = 0

    def refill(self, now: float) -> float:
        """Tokens of the rate limit available now."""
        if self.tokens_at is not None:
            self.tokens = min(ALERT_BURST, self.tokens + max(0.0, now - self.tokens_at) * ALERT_REFILL_PER_S)
        self.tokens_at = now
        return self.tokens

    def take_tokens(self, now: float, n: int) -> int:
        """How many of ``n`` alerts the rate limit lets through now (they are taken)."""
        k = min(n, int(self.refill(now)))
        self.tokens -= k
        return k


class RunTable(dict[str, RunAlerts]):
    """The engine's per-run state by run name; entries appear on first use."""

    def get_or_add(self, name: str) -> RunAlerts:
        """The state of ``name``, created empty if the engine has not seen it yet."""
        ra = self.get(name)
        if ra is None:
            ra = self[name] = RunAlerts()
        return ra


# ---------------------------------------------------------------- detectors
class AbruptRotations:
    """Abrupt single-step rotations of the run's lowest rank (hot path: a few vectorised passes per batch).

    An alert whose loss after the jump is not in its batch waits (``pending``)
    for the next batch of the run, at most ``loss_wait`` seconds (``settle_due``).
    """

    def __init__(
        self, hub: AlertHub, clock: Callable[[], float], monotonic: Callable[[], float], loss_wait: float
    ) -> None:
        self.hub = hub
        self.clock = clock
        self.monotonic = monotonic
        self.loss_wait = loss_wait
        self.pending_runs: set[str] = set()

    def observe(
        self,
        rs: RunState,
        ra: RunAlerts,
        th: Thresholds,
        rank: int,
        steps: np.ndarray,
        angle: np.ndarray,
        bad: np.ndarray,
        any_bad: bool,
        rho: np.ndarray | None,
        loss: Sequence[float],
    ) -> None:
        """One accepted batch: update the rank's baseline and raise what is over its limit."""
        b = ra.baseline
        if b is not None and rank > b.rank:
            return  # abrupt rotations: lowest rank only
        L = angle.shape[1]
        if b is None or rank < b.rank or b.L != L:
            b = ra.baseline = Baseline(rank, L, th.window)
        elif b.window != th.window:
            b.resize(th.window)
        top = int(steps[-1]) if steps.shape[0] == 1 else int(steps.max())
        if top <= b.last_step:
            return  # a resent batch
        if int(steps.min()) <= b.last_step:
            keep = steps > b.last_step
            steps, angle, bad = steps[keep], angle[keep], bad[keep]
            rho = rho[keep] if rho is not None else None
            loss = [x for x, k in zip(loss, keep.tolist())] if len(loss) else loss
        b.last_step = top
        ra.last_step = max(ra.last_step, top)
        losses = np.asarray(loss, dtype=np.float64) if len(loss) else None

        if ra.pending:
            self._settle(ra, losses)
        if not b.valid or b.stale >= max(1, th.window // 10) or (not b.armed and b.reported >= th.warmup):
            b.refresh(th)

        if any_bad:  # a diverged layer's NaN/Inf must not poison its baseline
            a = np.where(bad | np.isnan(angle), np.where(np.isfinite(b.median), b.median, 0.0), angle)
        else:
            a = angle
        # One reduction over the steps, then per-layer compares; the (steps x layers)
        # mask only when some layer is over its limit. NaN (a zero-norm layer) never is.
        peak = a[0] if a.shape[0] == 1 else a.max(axis=0)
        if (peak > b.limit).any():
            self._raise(rs, ra, b, th, steps, a, a > b.limit, rho, losses)
        b.push(a)
        b.reported += a.shape[0]
        if losses is not None:
            fin = losses[np.isfinite(losses)]
            if fin.size:
                b.losses.extend(fin[-LOSS_HISTORY:].tolist())

    def _raise(
        self,
        rs: RunState,
        ra: RunAlerts,
        b: Baseline,
        th: Thresholds,
        steps: np.ndarray,
        a: np.ndarray,
        hit: np.ndarray,
        rho: np.ndarray | None,
        losses: np.ndarray | None,
    ) -> None:
        # The rare path: some layer is over its limit.
        if rho is None and ra.refill(self.monotonic()) < 1.0:
            # Over the rate limit: count, nothing else (a storm costs one count_nonzero).
            self.hub.suppressed(rs.run, int(np.count_nonzero(hit)))
            return
        rows, cols = np.nonzero(hit)
        if rho is not None:
            commanded = np.arctan(rho[rows, cols]) * COMMANDED_TOLERANCE
            keep = ~(a[rows, cols] <= commanded)  # NaN rho (layer outside Layca): not commanded
            rows, cols = rows[keep], cols[keep]
        now = self.clock()
        now_m = self.monotonic()
        # Rate limit before any per-alert work: a run whose every layer jumps at every
        # step costs one vectorised pass, not one Python iteration per layer.
        allowed = ra.take_tokens(now_m, int(rows.size))
        if allowed < rows.size:
            self.hub.suppressed(rs.run, int(rows.size) - allowed)
            rows, cols = rows[:allowed], cols[:allowed]
        S = a.shape[0]
        history = list(b.losses)
        for i, j in zip(rows.tolist(), cols.tolist()):
            angle = float(a[i, j])
            base = float(b.median[j]) if b.count else NAN
            by_abs = angle > th.abs_angle
            rule = (
                f"above the absolute limit {_deg(th.abs_angle)}"
                if by_abs
                else f"above its baseline limit {_deg(float(b.limit[j]))} (median {_deg(base)} over the last "
                f"{b.count} reported steps, k={th.k:g})"
            )
            alert = pb.Alert(
                run=rs.run,
                layer=rs.names[j] if j < len(rs.names) else f"#{j}",
                step=int(steps[i]),
                kind="abrupt_rotation",
                angle=angle,
                baseline=base,
                time=now,
                message=f"rotated {_deg(angle)} in one step, {rule}",
                loss_before=NAN,
                loss_after=NAN,
            )
            before = NAN
            if losses is not None:
                seen = history + [x for x in losses[: i + 1].tolist() if math.isfinite(x)]
                if seen:
                    before = float(np.median(seen[-LOSS_HISTORY:]))
            if not math.isfinite(before):
                self._emit(alert, NAN, NAN)
            elif i + 1 < S:
                self._emit(alert, before, float(losses[i + 1]))  # type: ignore[index]
            else:
                ra.pending.append((alert, before, now_m + self.loss_wait))
                self.pending_runs.add(rs.run)

    def settle_due(self, runs: RunTable, now_m: float) -> None:
        """Raise waiting alerts whose next loss did not come within ``loss_wait`` (timer)."""
        for run in list(self.pending_runs):
            ra = runs.get(run)
            if ra is None or not ra.pending:
                self.pending_runs.discard(run)
                continue
            if ra.pending[0][2] <= now_m:
                self._settle(ra, None)
                self.pending_runs.discard(run)

    def _settle(self, ra: RunAlerts, losses: np.ndarray | None) -> None:
        after = float(losses[0]) if losses is not None and losses.size else NAN
        for alert, before, _ in ra.pending:
            self._emit(alert, before, after)
        ra.pending.clear()

    def _emit(self, alert: pb.Alert, before: float, after: float) -> None:
        alert.loss_before = before
        alert.loss_after = after
        if math.isfinite(before) and math.isfinite(after):
            worse = after >= before
            alert.severity = "critical" if worse else "warning"
            alert.message += f"; loss {before:.4g} -> {after:.4g} ({'no improvement' if worse else 'improved'})"
        else:
            alert.severity = "warning"
            alert.message += (
                "; loss unknown (call handle.observe_loss to grade severity)"
                if not math.isfinite(before)
                else "; loss after the step not reported in time"
            )
        self.hub.publish(alert)


class Divergence:
    """Non-finite weights on any rank: one critical alert per episode, re-armed by a fully finite batch."""

    def __init__(self, hub: AlertHub, clock: Callable[[], float]) -> None:
        self.hub = hub
        self.clock = clock

    def observe(
        self, rs: RunState, ra: RunAlerts, rank: int, steps: np.ndarray, bad: np.ndarray, any_bad: bool
    ) -> None:
        """One accepted batch of ``rank`` with its (S, L) non-finite mask ``bad``."""
        if not any_bad:
            if rank in ra.diverged_ranks:
                ra.diverged_ranks.discard(rank)
            return
        if rank in ra.diverged_ranks:
            return
        already = bool(ra.diverged_ranks)
        ra.diverged_ranks.add(rank)
        if already:
            return  # another rank of this run already raised it
        row = int(np.argmax(bad.any(axis=1)))
        cols = np.nonzero(bad[row])[0]
        first = rs.names[int(cols[0])] if int(cols[0]) < len(rs.names) else f"#{int(cols[0])}"
        self.hub.publish(
            pb.Alert(
                run=rs.run,
                layer=first,
                step=int(steps[row]),
                kind="divergence",
                severity="critical",
                angle=NAN,
                baseline=NAN,
                time=self.clock(),
                loss_before=NAN,
                loss_after=NAN,
                message=(
                    f"non-finite weights (NaN/Inf) in {cols.size} of {bad.shape[1]} layers at step "
                    f"{int(steps[row])} (rank {rank}), first {first}: the run diverged"
                ),
            )
        )


class Stalls:
    """A connected run silent for ``max(stall_seconds, STALL_INTERVALS x its report interval)``.

    The alert is held (firing in Alertmanager) until the run reports again or disconnects.
    """

    def __init__(
        self, hub: AlertHub, clock: Callable[[], float], runs: RunTable, thresholds: Callable[[str], Thresholds]
    ) -> None:
        self.hub = hub
        self.clock = clock
        self.runs = runs
        self.thresholds = thresholds

    def on_batch(self, run: str, ra: RunAlerts, now_m: float) -> None:
        """A batch arrived: learn the report interval, resolve a held stall."""
        if ra.last_batch is not None:
            dt = now_m - ra.last_batch
            ra.interval = dt if ra.interval == 0.0 else 0.8 * ra.interval + 0.2 * dt
        ra.last_batch = now_m
        if ra.stalled:
            ra.stalled = False
            self.hub.resolve(run, "", "stalled")

    def check(self, rs: RunState, now_m: float) -> None:
        """Timer: raise, resolve or forget the stall of one run."""
        ra = self.runs.get(rs.run)
        if not rs.connected:
            if ra is not None:
                ra.connected_since = None
                if ra.stalled:
                    ra.stalled = False
                    self.hub.resolve(rs.run, "", "stalled")
                if ra.baseline is not None and ra.last_batch is not None and now_m - ra.last_batch > IDLE_FREE_SECONDS:
                    ra.baseline = None  # free the ring; a returning run re-warms
            return
        ra = self.runs.get_or_add(rs.run)
        if ra.last_batch is None and ra.connected_since is None:
            ra.connected_since = now_m
        ref = ra.last_batch if ra.last_batch is not None else ra.connected_since
        th = self.thresholds(rs.run)
        limit = max(th.stall_seconds, STALL_INTERVALS * ra.interval)
        silent = now_m - ref  # type: ignore[operator]
        if silent > limit and not ra.stalled:
            ra.stalled = True
            snap = rs.primary()
            step = snap.step if snap is not None else 0
            self.hub.publish(
                pb.Alert(
                    run=rs.run,
                    layer="",
                    step=step,
                    kind="stalled",
                    severity="warning",
                    angle=NAN,
                    baseline=NAN,
                    time=self.clock(),
                    loss_before=NAN,
                    loss_after=NAN,
                    message=(f"connected but no report for {silent:.0f} s (limit {limit:.0f} s); last step {step}"),
                ),
                hold=True,
            )


class RejectionBursts:
    """>= REJECT_BURST rejected messages of a run within REJECT_WINDOW seconds; re-armed after a quiet window."""

    def __init__(self, hub: AlertHub, clock: Callable[[], float], runs: RunTable) -> None:
        self.hub = hub
        self.clock = clock
        self.runs = runs

    def check(self, rs: RunState, now_m: float) -> None:
        """Timer: compare the run's rejection counters with the last tick's."""
        total = sum(rs.rejected.values())
        ra = self.runs.get(rs.run)
        if ra is None:
            if total == 0:
                return
            ra = self.runs.get_or_add(rs.run)
        if total > ra.reject_total:
            ra.reject_events.append((now_m, total - ra.reject_total))
        ra.reject_total = total
        while ra.reject_events and ra.reject_events[0][0] < now_m - REJECT_WINDOW:
            ra.reject_events.popleft()
        recent = sum(n for _, n in ra.reject_events)
        if recent == 0:
            ra.rejecting = False
            ra.reject_reasons = collections.Counter(rs.rejected)
            return
        if ra.rejecting or recent < REJECT_BURST:
            return
        ra.rejecting = True
        reasons = collections.Counter(rs.rejected)
        reasons.subtract(ra.reject_reasons)
        ra.reject_reasons = collections.Counter(rs.rejected)
        text = ", ".join(f"{k}: {v}" for k, v in reasons.most_common() if v > 0) or "unknown"
        accepted = ra.last_batch is not None and ra.last_batch >= now_m - REJECT_WINDOW
        self.hub.publish(
            pb.Alert(
                run=rs.run,
                layer="",
                step=ra.last_step,
                kind="rejections",
                severity="warning" if accepted else "critical",
                angle=NAN,
                baseline=NAN,
                time=self.clock(),
                loss_before=NAN,
                loss_after=NAN,
                message=(
                    f"{recent} messages rejected in the last {REJECT_WINDOW:.0f} s ({text})"
                    + ("" if accepted else "; no batch accepted in that time")
                ),
            )
        )
