"""The alert detectors: abrupt-rotation incidents, divergence, not learning, stalled runs, rejection bursts.

Why (Carbonnelle & De Vleeschouwer, Section 5.1, 5.3 and Figure 10): layers that
rotate a large angle within ONE optimizer step, without the loss improving, mark
unstable training. Fast early training is not that: from scratch the first steps
are large and decay, plain SGD without momentum swings its angles by 3-10x from
step to step (in benchmarks/alert_corpus.py's healthy plain-SGD CNN runs half the
layers jump 10x together, with the loss up, and the runs still end at 92 %). So the
detector asks "far above what THIS layer usually does, measured in its own noise",
and looks at the run as a whole.

The model, per run (its lowest reporting rank; data-parallel ranks hold the same weights):

* Baseline per layer over its last ``window`` (50) reported steps: the median step
  angle ``m`` and the spread ``s`` of the LOG angles (1.4826 x MAD, at least
  ``SPREAD_FLOOR`` = 0.1, i.e. 10 %). Log, because angles are multiplicative: a
  layer whose angles vary 2x step to step has a 2x-wide band, whatever its level.
* A layer jumps when ``log(angle) - log(m) > max(k x s, log(ratio))``, k = 9 and
  ratio = 3, and the angle is >= ``min_angle`` (0.01 rad). The rules arm after
  ``warmup`` (20) reported steps of the layer: before that only the extreme rule.
* An incident is a step where (a) at least ``group`` (half) of the layers jump
  together, or (b) one layer jumps ``single_ratio`` (8) x its own median and 8 x
  the median angle of the other layers at that step (a re-initialized layer), or
  (c) any layer turns more than ``abs_angle`` (1.0 rad = 57 deg) in one step: the
  extreme rule, armed from the first step.
* One incident is ONE alert: ``layer`` is its largest jump, ``layers`` every layer
  that jumped, ``incident`` its id (run/abrupt_rotation/step). Incidents at the next
  steps within ``refractory`` (20) reported steps of its newest jump join it: an
  update (same id, ``updates`` + 1) when it gained layers or became extreme,
  silently otherwise; the window restarts at each joined jump.
* Severity: "critical" when the loss got worse across the jump or the jump is
  extreme, else "warning". The loss reported with step t is measured at w(t-1),
  before the jump: ``loss_before`` is the median of the last 5 reported losses up to
  step t, ``loss_after`` the loss reported at the next step; the alert waits up to
  ``loss_wait`` (0.5 s) for it, then goes out without it.
* Layca: an angle within 25 % of the commanded ``arctan(rho_l)`` never jumps.

Why these values (benchmarks/alert_corpus.py, both seeds, 62 runs replayed from their
stored angles): the largest robust z of the median layer on healthy runs is 6.5 (SGD
with momentum at step 35), of any single layer 7.6; the x10 learning-rate spikes put
the median layer at z 12.5-17.5 and 8-11x, x100 at z 25-46; a re-initialized layer
at z 23-66 and 300-750x its median (angle 1.54-1.57 rad). Healthy first steps reach
0.62 rad (BatchNorm SGD at lr 1.0, step 2): hence 1.0 rad for the extreme rule. A
jump of 10x on a layer whose angles swing like plain SGD's (s ~ 0.4) is within its
own noise: not an incident, by design.

Cost: the hot path is unchanged in form: a max over the batch's steps and a compare
with the cached per-layer limits ``m x exp(max(k s, log ratio))``; the (steps x
layers) work only when some layer is over. The baseline (median and MAD of the log
angles per layer) is exact over a per-run ring buffer (layers x window, float32),
recomputed with two row sorts and one log pass every ``max(1, window // 10)``
reported steps; a batch is judged against the baseline as of its first step.
Non-finite angles (a diverged layer) enter the ring as the layer's median.

not_learning (class ``NotLearning``), two tests, each judged once, held until the loss
falls, then resolved:

* At ``not_learning_share`` (5 %) of the run's announced length (``Hello.total_steps``,
  set by ``watch(..., total_steps=N)`` and the callbacks; step 15 of a 300-step run):
  the loss has not fallen 5 % since the middle third of the steps so far AND the weights
  are dead: no layer turned more than ``FROZEN_ANGLE`` (1e-6 rad) in any step (lr 0,
  frozen weights) or the median layer is more than 45 degrees from its w(0) (Layca at
  rho 3^-1..1 re-draws the weights every few steps). Why the weights and not the loss
  alone: at 5 % of a 300-step run the loss cannot tell a dead run from a slow healthy one
  (benchmarks/alert_corpus.py, seeds 0-3, at step 15: from the median of steps 6-10 to
  that of steps 11-15 the loss moved -0.7..+2.9 % on the four healthy cnn-sgd-lr0.15
  runs, then at 2.28-2.32, and -2.0..+0.5 % on the four shuffled-label runs, at
  2.31-2.35; the Layca rho 1 runs sit at 2.31-2.36 after their first spikes). The weights
  can: the median layer of the 76 healthy runs is 1.1-21.1 degrees from w(0) at their
  share point and none stands still; Layca rho 1 is at 86-108 degrees, lr 0 at exactly 0
  (shuffled labels: 2.3-5.0 degrees, like a healthy run).
* After ``max(not_learning_steps, share point)`` reported steps with losses (100 on a
  300-step run; the only test when no length was announced): the loss is still within
  ``not_learning_drop`` (5 %) of its untrained value (the lower of the median of the
  first 5 losses and the level a tenth of the way), was there halfway too, and has not
  fallen 5 % since. Healthy corpus runs are 5 % below their untrained loss by step 13-51;
  a slower real job sets ``not_learning_steps`` per run. A run that learns nothing with
  moving weights (shuffled labels) is found only here: at 100 steps, not at 5 % of a
  short run.

Other kinds: "divergence" (critical) when a rank reports non-finite weights (once per
episode, re-armed after a fully finite batch; the layers listed); "stalled" (warning)
when a connected run reports nothing for ``max(stall_seconds, 5 x its usual report
interval)``, resolved when it reports again or disconnects; "rejections" when the
collector rejected >= 10 of the run's messages within 60 s (critical if none of its
batches was accepted in that window), re-armed after a quiet minute; "run_lost"
(server/alert_lost.py).

Each detector is a small class over the engine's per-run state (``RunAlerts``) that
publishes what it finds on the hub (server/alert_hub.py); the engine
(server/alerts.py) feeds them batches and timer ticks. All of it runs on the
collector's asyncio loop thread. After a collector restart each run re-warms.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from layrot.proto import layrot_pb2 as pb
from layrot.server.alert_hub import ALERT_BURST, ALERT_REFILL_PER_S, AlertHub, event_alert
from layrot.server.alert_thresholds import Thresholds

if TYPE_CHECKING:
    from layrot.server.state import RunState

log = logging.getLogger(__name__)

NAN = float("nan")

KINDS = ("abrupt_rotation", "divergence", "not_learning", "stalled", "rejections", "run_lost")
SEVERITIES = ("warning", "critical")

# The spread of a layer's log step angles is at least this (Layca's constant angles have MAD = 0).
SPREAD_FLOOR = 0.1
# Angles below this count as this in log space (a frozen layer's zero steps).
TINY_ANGLE = 1e-9
# not_learning: the untrained loss is the median of the first NL_FIRST losses, "now" the median of the last NL_RECENT.
NL_FIRST = 5
NL_RECENT = 10
# not_learning's dead-weights test: losses it needs (thirds of at least 2), a step angle that is "not moving"
# (radians; float64 rounding of an unchanged weight gives ~1e-8), and the median cosine distance from w(0)
# that is "scrambled" (1 - cos 45 deg; healthy corpus runs are at most 21 deg from w(0) at 5 % of the run).
NL_MIN_DEAD = 6
FROZEN_ANGLE = 1e-6
SCRAMBLED_COSINE = 1.0 - math.cos(math.pi / 4)
# Losses kept per run until not_learning is judged (not_learning_steps above it: judged on the first ones).
NL_HISTORY_MAX = 100_000
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


def _log_angles(a: np.ndarray) -> np.ndarray:
    """log(max(a, TINY_ANGLE)) in ``a``'s dtype (float32 for the ring)."""
    return np.log(np.maximum(a, TINY_ANGLE))


class Baseline:
    """Ring buffer of one rank's recent step angles (layers x window, float32) and its cached limits.

    Layers x window so that the sorts of ``refresh`` run along contiguous rows.
    """

    def __init__(self, rank: int, num_layers: int, window: int) -> None:
        self.rank = rank
        self.L = num_layers
        self.ring = np.zeros((num_layers, window), dtype=np.float32)
        # log(max(angle, TINY_ANGLE)) of each column, taken once when it is pushed: refresh
        # runs every few steps over the whole window and would otherwise take every log again.
        self.lring = np.zeros((num_layers, window), dtype=np.float32)
        self.pos = 0  # next column to write
        self.count = 0  # columns filled (<= window)
        self.reported = 0  # steps observed (warm-up counter)
        self.last_step = 0  # highest step observed (resent batches are not evaluated twice)
        self.stale = 0  # steps written since the limits were computed
        self.armed = False  # baseline rules armed when the limits were computed
        self.median = np.full(num_layers, np.nan)
        self.limit = np.full(num_layers, np.inf)  # a layer jumps when angle > limit (before the Layca exemption)
        self.single = np.full(num_layers, np.inf)  # one layer alone makes an incident above this
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
        self.lring = _log_angles(self.ring)
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
        ring, lring = self.ring, self.lring
        if S >= W:
            ring[:] = angles[-W:].T
            lring[:] = _log_angles(ring)
            self.pos = 0
            self.count = W
        else:
            pos = self.pos
            end = pos + S
            if end <= W:
                ring[:, pos:end] = angles.T
                lring[:, pos:end] = _log_angles(ring[:, pos:end])
            else:
                k = W - pos
                ring[:, pos:] = angles[:k].T
                ring[:, : S - k] = angles[k:].T
                lring[:, pos:] = _log_angles(ring[:, pos:])
                lring[:, : S - k] = _log_angles(ring[:, : S - k])
            self.pos = end % W
            self.count = min(W, self.count + S)
        self.stale += S

    def refresh(self, th: Thresholds) -> None:
        """Recompute the per-layer median, the log-angle spread and the limits (two row sorts, float32)."""
        n = self.count
        self.armed = self.reported >= th.warmup and n >= min(th.warmup, th.window, 3)
        lo, hi = (n - 1) // 2, n // 2
        if n:
            r = self.ring[:, :n]
            srt = np.sort(r, axis=1)
            med = 0.5 * (srt[:, lo].astype(np.float64) + srt[:, hi])
            self.median = med
        if self.armed and (math.isfinite(th.k) or math.isfinite(th.ratio)):
            # The median of the log angles is the log of the median angle (log is monotonic);
            # the spread is the MAD of the log angles, so a rule reads "x times the usual angle".
            lmed = np.log(np.maximum(med, TINY_ANGLE))
            lr = self.lring[:, :n]
            dev = np.sort(np.abs(lr - lmed.astype(np.float32)[:, None]), axis=1)
            mad = 0.5 * (dev[:, lo].astype(np.float64) + dev[:, hi])
            spread = np.maximum(MAD_SCALE * mad, SPREAD_FLOOR)
            excess = np.maximum(th.k * spread, math.log(th.ratio))
            with np.errstate(over="ignore"):
                limit = np.maximum(np.exp(lmed + excess), th.min_angle)
                single = np.maximum(limit, med * th.single_ratio)
            self.limit = np.minimum(limit, th.abs_angle)
            self.single = np.minimum(single, th.abs_angle)
        else:
            self.limit = np.full(self.L, th.abs_angle)
            self.single = self.limit
        self.stale = 0
        self.valid = True


class Incident:
    """The open abrupt-rotation incident of a run: its alert, layers, and the step its refractory window ends."""

    def __init__(self, alert: pb.Alert, until: int, extreme: bool) -> None:
        self.alert = alert
        self.until = until
        self.extreme = extreme
        self.events = 1  # steps with jumps merged into it
        self.layers: dict[str, float] = {}  # layer -> largest angle
        self.ratio = 1.0  # largest angle / own median of the incident
        self.pending = True  # waiting for the loss after the first jump
        self.before = NAN
        self.after = NAN
        self.rule = ""


class RunAlerts:
    """Everything the engine keeps for one run, grouped by the detector that uses it."""

    def __init__(self) -> None:
        self.baseline: Baseline | None = None
        self.overrides: dict[str, Any] = {}
        self.thresholds: Thresholds | None = None  # cache of defaults + overrides
        self.incident: Incident | None = None
        self.pending_deadline = 0.0  # monotonic time the open incident stops waiting for its loss
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
        self.learning = LearningState()

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


class LearningState:
    """not_learning: the run's losses until it is judged, its newest ones, the alert while firing."""

    def __init__(self) -> None:
        self.rank: int | None = None
        self.history: list[float] = []
        self.recent: collections.deque[float] = collections.deque(maxlen=NL_RECENT)
        self.reported = 0
        self.last_step = 0
        self.judged = False  # the loss test ran (or an alert fired): only resolution is left
        self.weights_judged = False  # the dead-weights test ran
        self.max_angle = 0.0  # largest step angle of any layer so far (until judged)
        self.line = NAN
        self.alert: pb.Alert | None = None


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
    """Abrupt-rotation incidents of the run's lowest rank (hot path: a few vectorised passes per batch).

    An incident whose loss after the jump is not in its batch waits for the
    next batch of the run, at most ``loss_wait`` seconds (``settle_due``).
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
        """One accepted batch: update the rank's baseline and raise (or extend) incidents."""
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
        if steps.shape[0] > 1 and int(steps.min()) <= b.last_step:  # one step: it is top, already newer
            keep = steps > b.last_step
            steps, angle, bad = steps[keep], angle[keep], bad[keep]
            rho = rho[keep] if rho is not None else None
            loss = [x for x, k in zip(loss, keep.tolist()) if k] if len(loss) else loss
        b.last_step = top
        ra.last_step = max(ra.last_step, top)
        losses = np.asarray(loss, dtype=np.float64) if len(loss) else None

        inc = ra.incident
        if inc is not None and inc.pending:
            self._settle(rs.run, ra, losses)
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
            self._raise(rs, ra, b, th, steps, a, rho, losses)
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
        rho: np.ndarray | None,
        losses: np.ndarray | None,
    ) -> None:
        # The rare path: some layer is over its limit. Which steps are incidents?
        hit = a > b.limit
        if rho is not None:  # what Layca commanded is not abrupt (NaN rho: a layer outside Layca)
            hit &= ~(a <= np.arctan(rho) * COMMANDED_TOLERANCE)
        rows = np.nonzero(hit.any(axis=1))[0]
        if not rows.size:
            return
        L = a.shape[1]
        need = min(L, max(2, math.ceil(th.group * L)))
        extreme_m = hit & (a > th.abs_angle)
        single_m = hit & (a > b.single)
        n_hit = hit.sum(axis=1)
        history = list(b.losses)
        S = a.shape[0]
        for i in rows.tolist():
            step = int(steps[i])
            cols = np.nonzero(hit[i])[0]
            extreme = bool(extreme_m[i].any())
            incident = extreme or int(n_hit[i]) >= need
            if not incident and single_m[i].any():
                # One layer far above its own median and far above what the other layers do now.
                others = np.delete(a[i], cols)
                ref = float(np.median(others)) if others.size else 0.0
                incident = bool((a[i][single_m[i]] > th.single_ratio * ref).any())
            if not incident:
                continue
            inc = ra.incident
            if inc is not None and step <= inc.until:
                self._merge(rs, ra, inc, th, b, step, a[i], cols, extreme)
                continue
            if inc is not None and inc.pending:  # an older one still waits for its loss: raise it now
                self._finish(rs.run, ra, NAN)
            before = NAN
            if losses is not None:
                seen = history + [x for x in losses[: i + 1].tolist() if math.isfinite(x)]
                if seen:
                    before = float(np.median(seen[-LOSS_HISTORY:]))
            self._open(rs, ra, th, b, step, a[i], cols, extreme, before)
            if math.isfinite(before) and i + 1 < S:
                self._finish(rs.run, ra, float(losses[i + 1]))  # type: ignore[index]
            elif not math.isfinite(before):
                self._finish(rs.run, ra, NAN)
            else:
                ra.pending_deadline = self.monotonic() + self.loss_wait
                self.pending_runs.add(rs.run)

    def _open(
        self,
        rs: RunState,
        ra: RunAlerts,
        th: Thresholds,
        b: Baseline,
        step: int,
        row: np.ndarray,
        cols: np.ndarray,
        extreme: bool,
        before: float,
    ) -> None:
        j = int(cols[int(np.argmax(row[cols]))])
        name = rs.names[j] if j < len(rs.names) else f"#{j}"
        now = self.clock()
        alert = pb.Alert(
            run=rs.run,
            layer=name,
            step=step,
            last_step=step,
            kind="abrupt_rotation",
            angle=float(row[j]),
            baseline=float(b.median[j]) if b.count else NAN,
            time=now,
            updated=now,
            incident=f"{rs.run}/abrupt_rotation/{step}",
            loss_before=before,
            loss_after=NAN,
        )
        inc = ra.incident = Incident(alert, step + th.refractory, extreme)
        inc.before = before
        self._add_layers(rs, inc, b, row, cols)
        inc.rule = (
            f"above the extreme limit {_deg(th.abs_angle)}"
            if extreme
            else (
                f"{len(cols)} of {b.L} layers above their baselines"
                if len(cols) > 1
                else "one layer far above its own baseline and the other layers"
            )
        )

    def _add_layers(self, rs: RunState, inc: Incident, b: Baseline, row: np.ndarray, cols: np.ndarray) -> bool:
        grew = False
        for j in cols.tolist():
            name = rs.names[j] if j < len(rs.names) else f"#{j}"
            v = float(row[j])
            med = float(b.median[j]) if b.count else NAN
            if math.isfinite(med) and med > 0:
                inc.ratio = max(inc.ratio, v / med)
            if name not in inc.layers:
                grew = True
                inc.layers[name] = v
            elif v > inc.layers[name]:
                inc.layers[name] = v
        return grew

    def _merge(
        self,
        rs: RunState,
        ra: RunAlerts,
        inc: Incident,
        th: Thresholds,
        b: Baseline,
        step: int,
        row: np.ndarray,
        cols: np.ndarray,
        extreme: bool,
    ) -> None:
        """A jump inside the open incident's refractory window: the same incident, updated."""
        grew = self._add_layers(rs, inc, b, row, cols)
        inc.events += 1
        inc.until = step + th.refractory
        inc.alert.last_step = step
        escalated = extreme and not inc.extreme
        inc.extreme = inc.extreme or extreme
        if inc.pending or not (grew or escalated):
            return
        if ra.take_tokens(self.monotonic(), 1) < 1:
            self.hub.suppressed(rs.run, 1)
            return
        self._publish(inc, update=True)

    def settle_due(self, runs: RunTable, now_m: float) -> None:
        """Raise waiting incidents whose next loss did not come within ``loss_wait`` (timer)."""
        for run in list(self.pending_runs):
            ra = runs.get(run)
            if ra is None or ra.incident is None or not ra.incident.pending:
                self.pending_runs.discard(run)
                continue
            if ra.pending_deadline <= now_m:
                self._finish(run, ra, NAN)

    def _settle(self, run: str, ra: RunAlerts, losses: np.ndarray | None) -> None:
        after = float(losses[0]) if losses is not None and losses.size else NAN
        self._finish(run, ra, after)

    def _finish(self, run: str, ra: RunAlerts, after: float) -> None:
        """The first publication of the open incident, graded by the loss after its first jump."""
        inc = ra.incident
        self.pending_runs.discard(run)
        if inc is None or not inc.pending:
            return
        inc.pending = False
        inc.after = after
        if ra.take_tokens(self.monotonic(), 1) < 1:
            self.hub.suppressed(run, 1)
            return
        self._publish(inc, update=False)

    def _publish(self, inc: Incident, update: bool) -> None:
        alert = inc.alert
        before, after = inc.before, inc.after
        alert.loss_before = before
        alert.loss_after = after
        worse = math.isfinite(before) and math.isfinite(after) and after > before
        alert.severity = "critical" if (inc.extreme or worse) else "warning"
        del alert.layers[:]
        ordered = sorted(inc.layers.items(), key=lambda kv: -kv[1])
        alert.layers.extend(name for name, _ in ordered)
        shown = ", ".join(f"{name} {_deg(v)}" for name, v in ordered[:8])
        more = f" and {len(ordered) - 8} more" if len(ordered) > 8 else ""
        text = (
            f"{len(ordered)} layer{'s' if len(ordered) > 1 else ''} rotated abruptly at step {alert.step}"
            f" ({inc.rule}; up to {inc.ratio:.3g}x their usual angle): {shown}{more}"
        )
        if math.isfinite(before) and math.isfinite(after):
            text += f"; loss {before:.4g} -> {after:.4g} ({'worse' if worse else 'improved'})"
        elif not math.isfinite(before):
            text += "; loss unknown (call handle.observe_loss to grade severity)"
        else:
            text += "; loss after the step not reported in time"
        if inc.events > 1:
            text += f"; {inc.events} steps with jumps up to step {alert.last_step}"
        alert.message = text
        if update:
            alert.updates += 1
            alert.updated = self.clock()
        self.hub.publish(alert)


class NotLearning:
    """The run does not learn: judged at ``not_learning_share`` of its announced length, and by its loss.

    Two tests, both on the run's lowest rank, each judged once (module docstring: why):

    * Dead weights, at the share point ``J = ceil(not_learning_share x total_steps)``
      when the job announced ``total_steps`` (``Hello.total_steps``), else with the loss
      test: the loss has not fallen since the first third of the steps so far (the
      median of the last third is above ``(1 - drop)`` x the median of the middle
      third) AND the weights are dead: no monitored layer turned more than
      ``FROZEN_ANGLE`` in any step (lr 0, frozen layers), or the median layer is at a
      cosine distance of at least ``SCRAMBLED_COSINE`` (45 degrees) from its w(0)
      (Layca at rho 3^-1..1: the weights are re-drawn every few steps).
    * Loss only, after ``max(not_learning_steps, J)`` reported steps with losses: the
      untrained loss ``u`` is the lower of the median of the first ``NL_FIRST`` losses
      and the median of the ``NL_RECENT`` losses around a tenth of the way (a Layca
      run at a huge rho starts at a loss of 100+ and settles at the chance level
      within a few steps), the halfway level ``h`` the median of those around half of
      the way, ``now`` the median of the newest ``NL_RECENT``. Not learning when ``now``
      is above both ``(1 - drop) x u`` and ``(1 - drop) x h``: still at the untrained
      loss, and flat.

    Held (firing in Alertmanager) and resolved, with a terminal update of the same
    incident, once ``now`` falls below the line the alert names.
    """

    def __init__(self, hub: AlertHub, clock: Callable[[], float]) -> None:
        self.hub = hub
        self.clock = clock

    def observe(
        self,
        rs: RunState,
        ra: RunAlerts,
        th: Thresholds,
        rank: int,
        steps: np.ndarray,
        loss: Sequence[float],
        angle: np.ndarray | None = None,
        rotation: np.ndarray | None = None,
    ) -> None:
        """One accepted batch with losses; ``angle`` / ``rotation`` its (S, L) step angles and cosine distances."""
        st = ra.learning
        if st.rank is None or rank < st.rank:
            st.rank = rank
        elif rank > st.rank:
            return
        top = int(steps.max())
        if top <= st.last_step:
            return
        st.last_step = top
        if st.judged and st.alert is None:
            return  # judged learning: nothing more to do for this run
        fin = [x for x in loss if math.isfinite(x)]
        if not fin:
            return
        st.reported += len(fin)
        st.recent.extend(fin[-NL_RECENT:])
        if st.judged:
            self._resolve_if_learning(rs, st, top)
            return
        share_at = share_point(rs.total_steps, th.not_learning_share)
        dead_due = not st.weights_judged and share_at is not None and top >= share_at
        values = np.asarray(loss, dtype=np.float64)
        k = len(steps) - 1
        if dead_due and values.size == len(steps):
            k = int(np.argmax(steps >= share_at))  # judged as of the share step: a batch may run past it
        self._take(st, values[: k + 1], None if angle is None else angle[: k + 1])
        if dead_due and len(st.history) >= NL_MIN_DEAD:
            st.weights_judged = True
            row = None if rotation is None or rotation.shape[0] <= k else rotation[k]
            if self._dead_weights(rs, st, th, int(steps[k]), row):
                return
        self._take(st, values[k + 1 :], None if angle is None else angle[k + 1 :])
        n = len(st.history)
        loss_at = th.not_learning_steps if share_at is None else max(th.not_learning_steps, share_at)
        need = max(loss_at, 2 * NL_RECENT)
        if not math.isfinite(loss_at) or n < need:
            del st.history[NL_HISTORY_MAX:]
            return
        # The step the needed loss came with (a batch may carry several steps past it): the alert's step.
        if values.size == len(steps):
            with_loss = np.asarray(steps)[np.isfinite(values)]
            before = n - with_loss.size
            if before < need <= n:
                top = int(with_loss[int(math.ceil(need)) - before - 1])
        if not st.weights_judged:  # no announced length: the dead-weights test joins the loss test
            st.weights_judged = True
            row = None if rotation is None or not rotation.shape[0] else rotation[-1]
            if self._dead_weights(rs, st, th, top, row):
                return
        self._loss_test(rs, st, th, top)

    @staticmethod
    def _take(st: LearningState, values: np.ndarray, angle: np.ndarray | None) -> None:
        """Add a slice of a batch: its finite losses to the history, its largest step angle to ``max_angle``."""
        st.history.extend(values[np.isfinite(values)].tolist())
        if angle is not None and angle.size:
            ok = angle[np.isfinite(angle)]
            if ok.size:
                st.max_angle = max(st.max_angle, float(ok.max()))

    def _dead_weights(
        self, rs: RunState, st: LearningState, th: Thresholds, top: int, rotation: np.ndarray | None
    ) -> bool:
        """The share-point test at step ``top`` (``rotation``: its (L,) cosine distances to w(0), if known).

        A flat loss with weights that stand still or are scrambled; True if it fired.
        """
        hist = st.history
        n = len(hist)
        middle = float(np.median(hist[n // 3 : 2 * n // 3]))
        last = float(np.median(hist[2 * n // 3 :]))
        drop = th.not_learning_drop
        if last < middle - drop * abs(middle):
            return False  # still falling: whatever the weights do, the loss improves
        frozen = st.max_angle <= FROZEN_ANGLE
        spread = NAN
        if rotation is not None and rotation.size:
            ok = rotation[np.isfinite(rotation)]
            spread = float(np.median(ok)) if ok.size else NAN
        scrambled = math.isfinite(spread) and spread >= SCRAMBLED_COSINE
        if not (frozen or scrambled):
            return False
        if frozen:
            why = f"no layer turned more than {_deg(max(st.max_angle, 0.0))} in a step (lr 0 or frozen weights)"
        else:
            why = (
                f"the median layer is {_deg(math.acos(max(-1.0, 1.0 - spread)))} from its initial weights "
                "(scrambled, as by a far too large Layca rate)"
            )
        of = f" of {rs.total_steps}" if rs.total_steps else ""
        text = (
            f"not learning: at step {top}{of}, the loss {last:.4g} (median of the last third) has not fallen "
            f"{100 * drop:g} % below {middle:.4g} (the middle third) and {why}"
        )
        self._fire(rs, st, top, middle, last, _below(min(middle, last), drop), text)
        return True

    def _loss_test(self, rs: RunState, st: LearningState, th: Thresholds, top: int) -> None:
        """The loss-only test after enough reported steps (see the class docstring)."""
        hist = st.history
        st.judged = True
        st.history = []

        def level(at: int) -> float:
            lo = max(0, min(len(hist) - NL_RECENT, at - NL_RECENT // 2))
            return float(np.median(hist[lo : lo + NL_RECENT]))

        first = float(np.median(hist[:NL_FIRST]))
        u = min(first, level(len(hist) // 10))
        h = level(len(hist) // 2)
        now = float(np.median(st.recent))
        drop = th.not_learning_drop
        # Flat all the way: a run that fell well below u by halfway learned, and a bump of its loss now is not that.
        if not (now >= u - drop * abs(u) and now >= h - drop * abs(h) and h >= u - drop * abs(u)):
            return
        text = (
            f"not learning: after {st.reported} reported steps with a loss, the loss is {now:.4g} (median of "
            f"the last {NL_RECENT}): not {100 * drop:g} % below its untrained value {u:.4g} nor below its "
            f"level halfway {h:.4g}"
        )
        self._fire(rs, st, top, u, now, _below(min(u, h), drop), text)

    def _fire(
        self, rs: RunState, st: LearningState, top: int, before: float, now: float, line: float, text: str
    ) -> None:
        st.judged = True
        st.history = []
        st.line = line
        t = self.clock()
        st.alert = pb.Alert(
            run=rs.run,
            layer="",
            step=top,
            last_step=top,
            kind="not_learning",
            severity="warning",
            angle=NAN,
            baseline=NAN,
            time=t,
            updated=t,
            incident=f"{rs.run}/not_learning/{top}",
            loss_before=before,
            loss_after=now,
            message=text,
        )
        self.hub.publish(st.alert, hold=True)

    def _resolve_if_learning(self, rs: RunState, st: LearningState, top: int) -> None:
        # Every batch while the alert is open: the median of a few floats in Python (the same value as
        # numpy's: the middle one, or the mean of the two middle ones) costs ~1 us where np.median took ~70.
        now = float(statistics.median(st.recent))
        if st.alert is not None and now < st.line:
            alert = st.alert
            st.alert = None
            alert.last_step = top
            alert.loss_after = now
            alert.updates += 1
            alert.updated = alert.resolved = self.clock()
            alert.message += f"; resolved at step {top}: loss {now:.4g}"
            self.hub.publish(alert)
            self.hub.resolve(rs.run, "", "not_learning")


def share_point(total_steps: int, share: float) -> int | None:
    """The step at which a run of ``total_steps`` planned steps is judged (None: length unknown)."""
    if total_steps <= 0:
        return None
    return max(1, math.ceil(share * total_steps - 1e-9))


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
        names = [rs.names[c] if c < len(rs.names) else f"#{c}" for c in cols.tolist()]
        first = names[0]
        self.hub.publish(
            event_alert(
                run=rs.run,
                layer=first,
                step=int(steps[row]),
                kind="divergence",
                severity="critical",
                layers=names,
                time=self.clock(),
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
        if not rs.sessions:  # open here: a run fed through another collector stalls there, not here
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
                event_alert(
                    run=rs.run,
                    layer="",
                    step=step,
                    kind="stalled",
                    severity="warning",
                    time=self.clock(),
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
            event_alert(
                run=rs.run,
                layer="",
                step=ra.last_step,
                kind="rejections",
                severity="warning" if accepted else "critical",
                time=self.clock(),
                message=(
                    f"{recent} messages rejected in the last {REJECT_WINDOW:.0f} s ({text})"
                    + ("" if accepted else "; no batch accepted in that time")
                ),
            )
        )


def _below(level: float, drop: float) -> float:
    """The loss the run must fall under to count as learning again: ``drop`` (relative) below ``level``."""
    return level - drop * abs(level)
