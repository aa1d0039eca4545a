"""What the PyTorch and TensorFlow watch handles share: their settings, opening the reporter, closing,
flushing, the checkpoint state's frame and names (``state_dict`` / ``load_state_dict``), and the one
calling convention of the watch entry points."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from layrot.agent.bridges import Bridge, bridges_for, chain, close_bridges
from layrot.agent.local_view import LayerReport
from layrot.agent.reporter import (
    LayerSpec,
    Reporter,
    ReporterStats,
    check_collector,
    check_run_name,
    check_total_steps,
    default_run_name,
    spool_settings,
)
from layrot.agent.transport import TLSConfig

log = logging.getLogger(__name__)

#: Version of the dict that ``state_dict()`` returns.
STATE_VERSION = 1


def legacy_positionals(
    where: str, args: tuple[Any, ...], names: Sequence[str], values: dict[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Map arguments passed by position beyond the current signature to their old names, with a DeprecationWarning.

    The watch entry points take their framework objects and ``run`` by position and
    everything else by keyword; ``names`` is the old positional order after ``run``.
    ``values`` holds the keyword arguments as received (``defaults``: their defaults);
    returns them updated. Raises TypeError like Python would for a value given twice.
    """
    if not args:
        return values
    if len(args) > len(names):
        raise TypeError(f"{where} takes at most {len(names)} more positional arguments after run ({len(args)} given)")
    used = list(names[: len(args)])
    warnings.warn(
        f"{where}: passing {', '.join(used)} by position is deprecated; pass {'them' if len(used) > 1 else 'it'} "
        f"by keyword ({', '.join(f'{n}=...' for n in used)})",
        DeprecationWarning,
        stacklevel=3,
    )
    out = dict(values)
    for name, value in zip(used, args):
        if out[name] is not defaults[name] and out[name] != defaults[name]:
            raise TypeError(f"{where} got multiple values for argument {name!r}")
        out[name] = value
    return out


@dataclass(frozen=True)
class WatchOptions:
    """Where and how a watch reports, checked before training starts (see :func:`watch_options`)."""

    run: str
    collector: str  # host:port, or "offline"
    tls: TLSConfig
    spool: bool
    spool_max_bytes: int

    def reporter_kwargs(self) -> dict[str, Any]:
        """The Reporter arguments these options set."""
        return {
            "collector": self.collector,
            "tls": self.tls,
            "spool": self.spool,
            "spool_max_bytes": self.spool_max_bytes,
        }


def watch_options(
    run: str | None,
    collector: str | None,
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    spool: bool | None = None,
    spool_max_bytes: int | None = None,
) -> WatchOptions:
    """Resolve and check a watch's run name, collector address, TLS files and spool settings.

    This is the one place layrot raises to the user: a run name the collector would
    refuse (empty, over its length limit), an address that is not ``host:port``, an
    unreadable TLS file or a bad spool bound is a ValueError here, before the first
    step, instead of a run whose every step is lost later.
    """
    name = run if run is not None else default_run_name()
    check_run_name(name)
    tls = TLSConfig.from_env(tls_ca, tls_cert, tls_key)
    address = check_collector(collector, tls)
    on, max_bytes = spool_settings(spool, spool_max_bytes)
    if address == "offline" and not on:
        raise ValueError(
            "collector='offline' (or LAYROT_MODE=offline) records to the spool only: spool=False contradicts it"
        )
    return WatchOptions(name, address, tls, on, max_bytes)


_H = TypeVar("_H", bound="WatchBase")


class DeprecatedStateNames:
    """The old names ``state()`` / ``load_state()`` of ``state_dict()`` / ``load_state_dict()``."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Deprecated name of :meth:`state_dict`."""
        warnings.warn(
            f"{type(self).__name__}.state() is deprecated; use state_dict()", DeprecationWarning, stacklevel=2
        )
        return self.state_dict()

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Deprecated name of :meth:`load_state_dict`."""
        warnings.warn(
            f"{type(self).__name__}.load_state() is deprecated; use load_state_dict()", DeprecationWarning, stacklevel=2
        )
        self.load_state_dict(state)


def log_failure(first: bool, who: str, where: str, exc: BaseException, consequence: str) -> None:
    """The one warning (with its traceback) of the first failure a guard caught, a debug line for the others."""
    if first:
        log.warning(
            "layrot: %s failed in %s (%s: %s); training continues, %s",
            who,
            where,
            type(exc).__name__,
            exc,
            consequence,
            exc_info=exc,
        )
    else:
        log.debug("layrot: %s failed again in %s: %r", who, where, exc)


class WatchBase:
    """Base of the watch handles; subclasses set the attributes below and may override :meth:`_detach`."""

    run: str
    reporter: Reporter | None
    _closed: bool
    _layca: Any
    _control: bool
    _names: Sequence[str]
    _run_key: str
    _run_key_restored: bool = False
    _options: WatchOptions
    _token: str | None
    _meta: dict[str, str]
    _reporter_options: dict[str, Any]
    _total_steps: int = 0  # the planned last step (0 = unknown), sent in the Hello
    _init_norms: list[float]
    every: int

    def _configure(
        self,
        run: str | None,
        collector: str | None,
        every: int,
        token: str | None,
        meta: Mapping[str, str] | None,
        reporter_options: Mapping[str, Any] | None,
        tls_ca: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        spool: bool | None,
        spool_max_bytes: int | None,
        *,
        total_steps: int | None = None,
        on_report: Callable[[LayerReport], object] | None = None,
        log_to: Any = None,
        make_writer: Callable[[str], Any] | None = None,
    ) -> None:
        """Check and keep the settings every watch handle takes (ValueError before training starts).

        ``total_steps``: the optimizer step the job plans to end at (None = unknown); the
        collector judges ``not_learning`` at a share of it instead of after a fixed count.
        ``on_report``: called on the reporter's thread with each reported step's numbers.
        ``log_to``: W&B / MLflow / TensorBoard targets fed from the same reports
        (agent/bridges.py); ``make_writer(dir)`` builds the framework's SummaryWriter
        for ``"tensorboard:DIR"``.
        """
        if on_report is not None and not callable(on_report):
            raise TypeError(f"on_report must be callable, got {type(on_report).__name__}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._total_steps = check_total_steps(total_steps)
        self._options = watch_options(
            run,
            collector,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            spool=spool,
            spool_max_bytes=spool_max_bytes,
        )
        self.run = self._options.run
        self.every = int(every)
        self._token = token
        self._meta = dict(meta or {})
        self._reporter_options = dict(reporter_options or {})
        self.bridges: list[Bridge] = bridges_for(log_to, make_writer)
        report_cb = chain([*self.bridges, *([on_report] if on_report is not None else [])])
        if report_cb is not None:
            self._reporter_options["on_report"] = report_cb
        self.reporter = None
        self._closed = False

    def _set_control(self, layca: Any, control: bool, needs: str) -> None:
        """Keep the Layca optimizer (or None) and whether it takes remote commands (``needs``: its public name)."""
        if control and layca is None:
            raise ValueError(f"control=True needs a {needs} optimizer (remote control sets Layca rates)")
        self._layca = layca
        self._control = control

    def _open_reporter(
        self,
        specs: Sequence[LayerSpec],
        framework: str,
        framework_version: str,
        rank: int,
        world_size: int,
        meta: dict[str, str],
    ) -> Reporter:
        """Start the reporter for these layers; with control on, Layca takes its commands and reports back."""
        commands = self._layca if (self._control and self._layca is not None) else None
        reporter = Reporter(
            self.run,
            specs,
            token=self._token,
            run_key=self._run_key,
            run_key_restored=self._run_key_restored,
            framework=framework,
            framework_version=framework_version,
            rank=rank,
            world_size=world_size,
            every=self.every,
            layca=self._layca is not None,
            control=self._control,
            loss=True,
            meta=meta,
            on_command=commands.submit_command if commands is not None else None,
            total_steps=self._total_steps,
            **{**self._options.reporter_kwargs(), **self._reporter_options},
        )
        self.reporter = reporter
        if commands is not None:
            commands.add_command_listener(reporter.command_result)
        return reporter

    def set_total_steps(self, total_steps: int | None) -> None:
        """Announce the optimizer step the run plans to end at (None = unknown; ValueError if negative).

        The collector judges ``not_learning`` at a share of it. Before the first report it
        goes out with the first Hello; later, with the next reconnect's.
        """
        self._total_steps = check_total_steps(total_steps)
        if self.reporter is not None:
            self.reporter.set_total_steps(self._total_steps)

    def latest(self) -> LayerReport | None:
        """The newest reported step as the collector computes it (per-layer rotation, step angle, norm, rho,
        the loss), from this process's own measurements: no collector needed; None before the first report."""
        return self.reporter.local.latest if self.reporter is not None else None

    @property
    def layer_names(self) -> list[str]:
        """Monitored layers, in the order they are reported."""
        return list(self._names)

    @property
    def stats(self) -> ReporterStats:
        """Reporter counters (drops, acks, reconnects); zeros before the first step."""
        return self.reporter.stats if self.reporter is not None else ReporterStats()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the collector acknowledged every reported step (or timeout)."""
        return self.reporter.flush(timeout) if self.reporter is not None else True

    def close(self, timeout: float = 5.0) -> None:
        """Detach from the training job, flush what the collector can still take, stop the reporter's threads."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        if self._layca is not None and self._control and self.reporter is not None:
            try:
                self._layca.remove_command_listener(self.reporter.command_result)
            except ValueError:
                pass
        if self.reporter is not None:
            self.reporter.close(timeout)
        close_bridges(self.bridges)  # after the reporter: its last reports are logged first

    def _detach(self) -> None:
        """Remove framework hooks (nothing by default)."""

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs so a resumed job continues its rotation curves (w(0), step, names)."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before the next step)."""
        raise NotImplementedError

    @property
    def run_key(self) -> str:
        """The job's key to its run (saved by :meth:`state_dict`; a resumed job must load it to write the run)."""
        return self.reporter.run_key if self.reporter is not None else self._run_key

    def _state_frame(self, step: int) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "run": self.run,
            "step": int(step),
            "names": list(self._names),
            "run_key": self.run_key,
        }

    def _restore_common(self, state: Mapping[str, Any], index: Mapping[str, int]) -> int:
        """Take the init norms and run key of a saved state (``index``: :meth:`_state_index`); returns its step."""
        self._init_norms = [float(state["init_norms"][index[n]]) for n in self._names]
        self._restore_run_key(state)
        if self.reporter is not None:
            log.warning("layrot: load_state_dict after reporting began; the collector keeps the old layer norms")
        return int(state["step"])

    def _restore_run_key(self, state: Mapping[str, Any]) -> None:
        """Take the run key of a saved state (older states have none: the job keeps its own)."""
        key = state.get("run_key")
        if isinstance(key, str) and key:
            self._run_key = key
            self._run_key_restored = True

    def _state_index(self, state: Mapping[str, Any], same_by_position: bool = False) -> dict[str, int]:
        """Saved position of each current layer name; raises ValueError when the state does not fit.

        ``same_by_position``: the caller checked that the saved layers are these
        layers under other names (e.g. Keras paths rebuilt by load_model).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported layrot watch state version {state.get('version')!r}")
        index = {n: i for i, n in enumerate(state["names"])}
        missing = [n for n in self._names if n not in index]
        if not missing:
            return index
        if same_by_position and len(state["names"]) == len(self._names):
            return {n: i for i, n in enumerate(self._names)}
        raise ValueError(f"the saved state has no w(0) for layers {missing}")
