"""``layrot-agent control``: steer the Layca rates of running jobs.

Commands talk to the collector's Query service (``SetControl`` /
``GetControl``); the job must run ``layrot.watch(model, optimizer, run=...,
control=True)`` with a ``layrot.Layca`` optimizer. The collector versions each
command, delivers it on the job's session and keeps an audit trail; the job
validates it, applies it at its next step boundary and acknowledges the version.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from layrot.cli.cli_common import (
    CONTEXT_SETTINGS,
    collector_options,
)
from layrot.cli.cli_common import (
    client as _client,
)
from layrot.cli.cli_common import (
    echo_json as _echo_json,
)
from layrot.cli.cli_common import (
    fmt as _fmt,
)
from layrot.cli.cli_common import (
    table as _table,
)
from layrot.cli.cli_common import (
    write_client as _write_client,
)
from layrot.client.errors import CollectorError

if TYPE_CHECKING:  # pragma: no cover
    from layrot.client.query import QueryClient

__all__ = ["control_group"]


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def wait_applied(q: QueryClient, run: str, version: int, timeout: float) -> dict[str, Any]:
    """Poll GetControl until the job answered ``version`` (applied or rejected) or ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = q.get_control(run)
        if st["applied_version"] >= version or st["rejected_reason"] or st["requested_version"] != version:
            return st
        if time.monotonic() >= deadline:
            return st
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _report_set(st: dict[str, Any], version: int, waited: bool, as_json: bool) -> None:
    if as_json:
        _echo_json(st)
        return
    what = next((a["what"] for a in reversed(st["audit"]) if a["event"] == "requested" and a["version"] == version), "")
    click.echo(f"run {st['run']}: version {version} requested ({what})")
    if st["rejected_reason"] and st["requested_version"] == version:
        raise click.ClickException(f"the job rejected version {version}: {st['rejected_reason']}")
    if st["applied_version"] >= version:
        click.echo(f"applied by the job from step {st['applied_step']}")
    elif waited:
        sent = any(a["event"] == "sent" and a["version"] == version for a in st["audit"])
        req = st.get("requested") or {}
        at = req.get("apply_at_step") if req.get("version") == version else 0
        when = f"every rank applies it at step {at}" if at else "the job applies it at its next optimizer step"
        click.echo(
            "not acknowledged yet: " + (when if sent else "no live session; the job gets it when it (re)connects")
        )


def _answer_options(fn: Any) -> Any:
    """--reason, --wait and --json of the commands that send one command and wait for the job's answer."""
    options = [
        click.option("--reason", default="", help="Free text for the audit trail."),
        click.option(
            "--wait",
            "wait",
            type=float,
            default=10.0,
            show_default=True,
            help="Seconds to wait for the job's answer (0 = do not wait).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the control status as JSON."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


# ---------------------------------------------------------------- group
@click.group("control", context_settings=CONTEXT_SETTINGS)
def control_group() -> None:
    """Steer the per-layer Layca rates of a running job (remote control).

    \b
    The job opts in with:
      optimizer = layrot.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
      layrot.watch(model, optimizer, run="my-run", control=True)
    Then:
      layrot-agent control set my-run --alpha 0.5 --rho0 0.037 --milestones 0.8,0.9,0.97 --total-steps 20000
      layrot-agent control auto my-run --target 1.0 --total-steps 20000
      layrot-agent control copy --from adam-run my-run   # my-run: Layca(layrot.SGD_AMom(...))
      layrot-agent control status my-run
      layrot-agent control off my-run
    """


# ---------------------------------------------------------------- set
@control_group.command("set", context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@click.option(
    "--alpha",
    type=float,
    default=0.0,
    show_default=True,
    help="Eq. 1 profile in [-1, 1]: < 0 favours the first layers, > 0 the last, 0 uniform.",
)
@click.option(
    "--rho0",
    type=float,
    default=3.0**-3,
    show_default="3^-3",
    help="Global rate rho(0) per step (the angle is arctan(rho)).",
)
@click.option(
    "--schedule",
    "kind",
    type=click.Choice(["constant", "step", "cosine"]),
    default=None,
    help="rho(t): constant, step decays at --milestones, or cosine to --rho-min "
    "(default: step with --milestones, else constant).",
)
@click.option(
    "--milestones",
    default=None,
    metavar="LIST",
    help="Step decay points: steps (>= 1) or fractions of --total-steps, e.g. 0.8,0.9,0.97.",
)
@click.option("--factor", type=float, default=0.2, show_default=True, help="Decay factor at each milestone.")
@click.option(
    "--total-steps",
    type=click.IntRange(min=0),
    default=0,
    help="Training length in optimizer steps (for fractional milestones and cosine).",
)
@click.option("--rho-min", type=float, default=0.0, show_default=True, help="Floor of the cosine schedule.")
@click.option(
    "--multipliers", default=None, metavar="LIST", help="Per-layer multipliers in forward order (one per layer)."
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME=MULT",
    help="Multiplier of one layer by name (repeatable), on top of --multipliers.",
)
@click.option(
    "--mode",
    type=click.Choice(["layca", "lars"]),
    default="layca",
    show_default=True,
    help="Layca (Algorithm 1) or the LARS-like variant (Appendix A.4).",
)
@click.option("--from-now", is_flag=True, help="Start the schedule at the job's current step instead of step 1.")
@_answer_options
@collector_options
def set_cmd(
    run: str,
    alpha: float,
    rho0: float,
    kind: str | None,
    milestones: str | None,
    factor: float,
    total_steps: int,
    rho_min: float,
    multipliers: str | None,
    layers: tuple[str, ...],
    mode: str,
    from_now: bool,
    reason: str,
    wait: float,
    as_json: bool,
    collector: str,
    token: str | None,
) -> None:
    """Set a static rate profile for RUN: alpha profile x rho(t) x multipliers.

    The job validates the command (finite, rates <= its rho_max, known layer
    names), applies it at its next optimizer step and acknowledges it; a
    rejected command changes nothing and its reason shows in 'control status'.
    In a multi-rank job the collector names the step (a little ahead of the
    ranks) at which every rank switches, so replicas stay identical.

    \b
    Examples:
      layrot-agent control set my-run --alpha 0.5 --rho0 0.05
      layrot-agent control set my-run --rho0 0.037 --milestones 0.8,0.9,0.97 --factor 0.2 --total-steps 20000
      layrot-agent control set my-run --schedule cosine --rho0 0.05 --total-steps 20000 --from-now
      layrot-agent control set my-run --layer conv1.weight=3 --reason "conv1 lags"
    """
    from layrot.controllers.profile import parse_floats, parse_layer_multipliers, profile_command, schedule_from_args

    try:
        schedule = schedule_from_args(
            rho0, kind, parse_floats(milestones, "--milestones"), factor, total_steps, rho_min
        )
        mults = parse_floats(multipliers, "--multipliers")
        by_name = parse_layer_multipliers(layers)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        with _write_client(collector, token) as q:
            offset = 0
            if from_now:
                offset = int(q.get_run(run)["step"])
            cmd = profile_command(
                alpha=alpha,
                schedule=schedule,
                multipliers=mults,
                layer_multipliers=by_name,
                mode=mode,
                reason=reason,
                step_offset=offset,
            )
            st = q.set_control(run, cmd)
            version = st["requested_version"]
            if wait > 0:
                st = wait_applied(q, run, version, wait)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    except CollectorError as exc:
        raise _fail(exc) from None
    _report_set(st, version, wait > 0, as_json)


# ---------------------------------------------------------------- off
@control_group.command("off", context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@_answer_options
@collector_options
def off_cmd(run: str, reason: str, wait: float, as_json: bool, collector: str, token: str | None) -> None:
    """Return RUN to its own Layca settings (those it was started with).

    \b
    Example:
      layrot-agent control off my-run --reason "experiment over"
    """
    from layrot.controllers.profile import off_command

    try:
        with _write_client(collector, token) as q:
            st = q.set_control(run, off_command(reason))
            version = st["requested_version"]
            if wait > 0:
                st = wait_applied(q, run, version, wait)
    except CollectorError as exc:
        raise _fail(exc) from None
    _report_set(st, version, wait > 0, as_json)


# ---------------------------------------------------------------- status
@control_group.command("status", context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@click.option(
    "--audit",
    "audit_n",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Audit entries to print (newest last).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@collector_options
def status_cmd(run: str, audit_n: int, as_json: bool, collector: str, token: str | None) -> None:
    """Requested vs applied control of RUN: version, step applied, per-layer rates, audit trail.

    \b
    Examples:
      layrot-agent control status my-run
      layrot-agent control status my-run --json | jq .rejected_reason
    """
    try:
        with _client(collector, token) as q:
            st = q.get_control(run)
    except CollectorError as exc:
        raise _fail(exc) from None
    if as_json:
        _echo_json(st)
        return
    req = st["requested"]
    if req is None:
        click.echo(f"run {run}: no control command (the job runs its own Layca settings)")
    else:
        what = next(
            (a["what"] for a in reversed(st["audit"]) if a["event"] == "requested" and a["version"] == req["version"]),
            "",
        )
        at = f", from step {req['apply_at_step']} on every rank" if req.get("apply_at_step") else ""
        click.echo(
            f"run {run}: requested version {req['version']} by {req['issued_by'] or '?'} "
            f"({req['controller'] or 'manual'}{at}): {what}"
        )
        if req["reason"]:
            click.echo(f"  reason: {req['reason']}")
    applied = st["applied_version"]
    click.echo(
        f"applied version {applied}"
        + (f" from step {st['applied_step']}" if applied else " (none)")
        + ("" if req is None or applied == req["version"] else "  [requested version not applied]")
    )
    if st["rejected_reason"]:
        click.echo(f"REJECTED by the job: {st['rejected_reason']}")
    ranks = st.get("ranks", [])
    if len(ranks) > 1 or any(r["late"] for r in ranks):
        for r in ranks:
            if r["applied_version"]:
                when = (
                    f"late at step {r['applied_step']} (wanted {r['wanted_step']})"
                    if r["late"]
                    else f"at step {r['applied_step']}"
                )
                line = f"version {r['applied_version']} applied {when}"
            else:
                line = "no command applied"
            if r["rejected_version"]:
                line += f"; rejected version {r['rejected_version']}: {r['rejected_reason']}"
            state = f"step {r['step']}" + ("" if r["connected"] else ", disconnected")
            click.echo(f"  rank {r['rank']} ({state}): {line}")
    names = st["layer_names"]
    reqr, appr = st["requested_rho"], st["applied_rho"]
    if names and (reqr or appr):
        rows = []
        for i, name in enumerate(names):
            r = reqr[i] if i < len(reqr) else None
            a = appr[i] if i < len(appr) else None
            rows.append(
                [
                    str(i),
                    name,
                    _fmt(r),
                    _fmt(a),
                    _fmt(math.degrees(math.atan(a)) if a is not None and math.isfinite(a) else None),
                ]
            )
        click.echo(_table(["INDEX", "LAYER", "RHO REQUESTED", "RHO APPLIED", "ANGLE (DEG)"], rows, right={0, 2, 3, 4}))
    if audit_n and st["audit"]:
        click.echo("audit:")
        rows = []
        for a in st["audit"][-audit_n:]:
            detail = a["what"] or a["reason"]
            if a["what"] and a["reason"]:
                detail += f" ({a['reason']})"
            rows.append(
                [
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["time"])),
                    str(a["version"]),
                    a["event"],
                    str(a["step"]) if a["step"] else "-",
                    a["who"],
                    detail,
                ]
            )
        click.echo(_table(["TIME", "VERSION", "EVENT", "STEP", "WHO", "WHAT / REASON"], rows, right={1, 3}))


# ---------------------------------------------------------------- loops
def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (tests)
            pass
    return stop


Echo = Callable[[str], None]


def _run_controller(
    collector: str,
    token: str | None,
    as_json: bool,
    bad_value: type[click.ClickException],
    start: Callable[[QueryClient, threading.Event, Echo], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> None:
    """Run a controller loop here until it ends or a signal stops it; print its summary (JSON or ``describe``).

    ``start(client, stop, echo)`` runs the loop and returns the summary; a ValueError it raises
    becomes ``bad_value``.
    """
    stop = _stop_on_signals()
    echo: Echo = (lambda s: None) if as_json else click.echo
    try:
        with _write_client(collector, token) as q:
            summary = start(q, stop, echo)
    except ValueError as exc:
        raise bad_value(str(exc)) from None
    except CollectorError as exc:
        raise _fail(exc) from None
    if as_json:
        _echo_json(summary)
    else:
        click.echo(describe(summary))


@control_group.command("auto", context_settings=CONTEXT_SETTINGS)
@click.argument("run")
@click.option(
    "--target",
    type=float,
    default=1.0,
    show_default=True,
    help="Cosine distance to initialization every layer should reach by the end.",
)
@click.option(
    "--total-steps",
    type=click.IntRange(min=1),
    required=True,
    help="Training length in optimizer steps; the loop stops there.",
)
@click.option("--rho0", type=float, default=3.0**-3, show_default="3^-3", help="Global rate rho(0).")
@click.option("--alpha", type=float, default=0.0, show_default=True, help="Eq. 1 profile under the multipliers.")
@click.option(
    "--milestones",
    default="0.8,0.9,0.97",
    show_default=True,
    metavar="LIST",
    help="Step decays of rho(t) (fractions of --total-steps); empty for constant.",
)
@click.option("--factor", type=float, default=0.2, show_default=True, help="Decay factor at each milestone.")
@click.option(
    "--reach",
    type=float,
    default=0.2,
    show_default=True,
    help="Fraction of training by which the reference rotation reaches --target.",
)
@click.option(
    "--rho-max",
    type=float,
    default=0.4,
    show_default=True,
    help="Largest per-step rate the controller asks for (at most the job's rho_max; much higher"
    " rates can wreck training).",
)
@click.option(
    "--min-mult",
    type=float,
    default=1.0,
    show_default=True,
    help="Smallest multiplier: below 1, layers ahead of the reference are slowed below rho(t) (1 = never).",
)
@click.option(
    "--couple",
    type=float,
    default=0.4,
    show_default=True,
    help="Neighbour coupling: each layer's log multiplier is at least this fraction of its forward"
    " neighbours' (a lagging layer only gets far from its initialization if the layers around it"
    " move too; 0 = off).",
)
@click.option(
    "--loss-guard",
    type=float,
    default=0.6,
    show_default=True,
    help="Halve the multipliers' integral parts (at most once per 3 % of training) when the job's"
    " smoothed training loss climbs above this fraction of its initial loss (needs"
    " handle.observe_loss in the job; 0 = off).",
)
@click.option(
    "--loss-hold",
    type=float,
    default=0.4,
    show_default=True,
    help="Stop raising multipliers while the smoothed loss is above this fraction of the initial loss (0 = off).",
)
@click.option(
    "--settle-tol",
    type=float,
    default=0.05,
    show_default=True,
    help="From the first milestone on, stop pushing a layer within this fraction of --target (its"
    " boost decays; pushing it only jitters it around where it is); 0 = off.",
)
@click.option("--interval", type=float, default=5.0, show_default=True, help="Seconds between updates.")
@click.option(
    "--wait", "wait", type=float, default=60.0, show_default=True, help="Seconds to wait for the run to appear."
)
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@collector_options
def auto_cmd(
    run: str,
    target: float,
    total_steps: int,
    rho0: float,
    alpha: float,
    milestones: str,
    factor: float,
    reach: float,
    rho_max: float,
    min_mult: float,
    couple: float,
    loss_guard: float,
    loss_hold: float,
    settle_tol: float,
    interval: float,
    wait: float,
    as_json: bool,
    collector: str,
    token: str | None,
) -> None:
    """Closed loop: steer per-layer multipliers so every layer of RUN reaches --target.

    Runs here, in this process: every --interval seconds it reads the layer
    rotations and the training loss from the collector and sends new
    multipliers on top of rho(t). A PI law in log space pushes a layer that
    lags a reference reaching --target at --reach of training (one that leads
    is not slowed unless --min-mult < 1), and the layers next to a pushed one
    ride along (--couple): a small layer only gets far from its initialization
    if its neighbours move too. Shaking the network is what rotates it and
    what can kill it, so the push stops growing while the job's loss is above
    --loss-hold x its initial loss, and is halved above --loss-guard x (at
    most once per 3 % of training). From the first milestone on, layers within
    --settle-tol of the target are no longer pushed. It stops by itself when
    the run reaches --total-steps or disconnects (Ctrl-C stops it earlier);
    the last command stays in force in the job.

    \b
    Example:
      layrot-agent control auto my-run --target 1.0 --total-steps 20000 --interval 10
    """
    from layrot.controllers.auto import AutoController
    from layrot.controllers.profile import parse_floats

    try:
        ms = tuple(parse_floats(milestones, "--milestones"))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None

    def start(q: QueryClient, stop: threading.Event, echo: Echo) -> dict[str, Any]:
        ctl = AutoController(
            q,
            run,
            total_steps,
            target=target,
            reach=reach,
            rho0=rho0,
            alpha=alpha,
            milestones=ms,
            factor=factor,
            rho_max=rho_max,
            min_mult=min_mult,
            couple=couple,
            loss_guard=loss_guard,
            loss_hold=loss_hold,
            settle_tol=settle_tol,
        )
        return ctl.run_loop(interval=interval, wait=wait, stop=stop, echo=echo)

    def describe(summary: dict[str, Any]) -> str:
        rot = ", ".join(_fmt(r, ".3f") for r in summary["rotation"])
        return (
            f"stopped: {summary['reason']}; {len(summary['versions'])} commands sent, "
            f"{summary['backoffs']} loss-guard back-offs, {summary['holds']} updates on hold;"
            f" rotations [{rot}]"
        )

    _run_controller(collector, token, as_json, click.BadParameter, start, describe)


@control_group.command("copy", context_settings=CONTEXT_SETTINGS)
@click.option("--from", "source", required=True, metavar="RUN_A", help="Run whose recorded rates to replay.")
@click.argument("run")
@click.option(
    "--window-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Steps per command (default: as many as fit in 4 MiB).",
)
@click.option(
    "--rho-max",
    type=float,
    default=1.0,
    show_default=True,
    help="Clip recorded rates above this (the job refuses rates above its own rho_max).",
)
@click.option(
    "--interval", type=float, default=1.0, show_default=True, help="Seconds between checks of the target's progress."
)
@click.option(
    "--wait", "wait", type=float, default=60.0, show_default=True, help="Seconds to wait for the target run to appear."
)
@click.option("--reason", default="", help="Free text for the audit trail.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@collector_options
def copy_cmd(
    source: str,
    run: str,
    window_steps: int | None,
    rho_max: float,
    interval: float,
    wait: float,
    reason: str,
    as_json: bool,
    collector: str,
    token: str | None,
) -> None:
    """AdaptCopy: replay RUN_A's measured per-layer, per-step rates in RUN.

    RUN_A is a monitored run (typically Adam or RMSprop); RUN runs Layca
    with control=True and the same layer names. Its rho_l(t) becomes
    tan(step angle of layer l at step t in RUN_A). Short replays go in one
    command; long ones as windows of steps sent ahead of the job (this
    process keeps running until the last window is out).

    RUN builds its own optimizer. For an Adam-family RUN_A (Adam, AdamW,
    Nadam...) its base optimizer must be SGD_AMom, SGD with Adam-style
    momentum (the paper's Appendix B.4: v = m v + (1 - m) g, w -= lr v):
    layrot.Layca(layrot.SGD_AMom(params, momentum=beta1)), or
    layrot.keras.Layca(layrot.keras.SGD_AMom(momentum=beta_1)).
    torch.optim.SGD(momentum=m, dampening=m) is a different rule (its
    buffer starts at g_1). RMSprop / Adagrad sources keep plain SGD. When
    the runs name their optimizers (watch(..., meta={"optimizer": "Adam"})),
    this command says whether RUN's base fits.

    \b
    Example:
      layrot-agent control copy --from resnet-adam resnet-sgd-amom-layca
    """
    from layrot.controllers.adaptcopy import AdaptCopy

    def start(q: QueryClient, stop: threading.Event, echo: Echo) -> dict[str, Any]:
        copy = AdaptCopy(q, source, run, window_steps=window_steps, rho_max=rho_max, reason=reason)
        return copy.run(interval=interval, wait=wait, stop=stop, echo=echo)

    def describe(summary: dict[str, Any]) -> str:
        text = (
            f"{'done' if summary['complete'] else 'stopped'}: {len(summary['versions'])} commands, "
            f"{summary['steps']} steps replayed in windows of {summary['window_steps']}"
        )
        if summary.get("base_optimizer") == "SGD_AMom" and not summary.get("base_optimizer_ok"):
            text += f"; warning: {summary['base_advice']}"
        return text

    _run_controller(collector, token, as_json, click.ClickException, start, describe)
