"""The job-side command intake both Laycas share (layrot.agent.commands.CommandInbox), framework-free."""

from __future__ import annotations

import pickle
import threading

import pytest

from layrot.agent.commands import NEVER, CommandInbox, RateCommand
from layrot.core.rates import RateRule, RhoSchedule

NAMES = ("a", "b", "c")
BASE = RateRule(NAMES, schedule=RhoSchedule(rho0=0.01))


def command(version: int, rho0: float = 0.02, apply_at_step: int = 0) -> RateCommand:
    cmd = RateCommand(version=version, mode="layca", alpha=0.0, apply_at_step=apply_at_step)
    cmd.schedule.rho0 = rho0
    cmd.schedule.kind = "constant"
    return cmd


def test_nothing_waiting_costs_one_compare():
    inbox = CommandInbox()
    assert inbox.due_at == NEVER and not inbox.has_pending
    assert inbox.decide(1, NAMES, 1.0, BASE) is None


def test_submit_copies_and_decide_applies_the_newest():
    inbox = CommandInbox()
    heard: list[tuple] = []
    inbox.add_listener(lambda *r: heard.append(r))
    cmd = command(1)
    inbox.submit(cmd)
    cmd.schedule.rho0 = 99.0  # the caller reuses its message: the queued copy is unaffected
    inbox.submit(command(2, rho0=0.03))
    assert inbox.due_at == 0 and inbox.has_pending
    installed: list[RateRule] = []

    def install(rule: RateRule) -> None:
        assert heard == []  # the rule is in force before anyone hears it was applied
        installed.append(rule)

    rule = inbox.decide(5, NAMES, 1.0, BASE, install=install)
    assert rule is not None and rule.version == 2 and rule.schedule.rho0 == 0.03
    assert installed == [rule]
    assert [(v, ok) for v, ok, _, _ in heard] == [(1, False), (2, True)]
    assert "superseded" in heard[0][2] and heard[1][3] == 5
    assert inbox.last_result == (2, True, "", 5) and inbox.due_at == NEVER


def test_held_commands_wait_for_their_step():
    inbox = CommandInbox()
    inbox.submit(command(1, apply_at_step=10))
    assert inbox.decide(3, NAMES, 1.0, BASE) is None
    assert inbox.due_at == 10 and inbox.has_pending
    rule = inbox.decide(10, NAMES, 1.0, BASE)
    assert rule is not None and rule.version == 1 and not inbox.has_pending


def test_rejections_repeats_and_stale_versions():
    inbox = CommandInbox()
    heard: list[tuple] = []
    inbox.on_result = lambda *r: heard.append(r)
    inbox.submit(command(3, rho0=2.0))  # above rho_max
    assert inbox.decide(1, NAMES, 1.0, BASE) is None
    assert heard[-1][:2] == (3, False) and "rho_max" in heard[-1][2]
    inbox.submit(command(3, rho0=2.0))  # a re-send gets its earlier answer
    inbox.decide(2, NAMES, 1.0, BASE)
    assert heard[-1] == heard[-2]
    inbox.submit(command(2))
    inbox.decide(3, NAMES, 1.0, BASE)
    assert "stale" in heard[-1][2]


def test_a_broken_listener_never_stops_training(caplog):
    inbox = CommandInbox()
    heard: list[tuple] = []

    def broken(*r: object) -> None:
        raise RuntimeError("boom")

    inbox.add_listener(broken)
    inbox.add_listener(lambda *r: heard.append(r))
    inbox.submit(command(1))
    assert inbox.decide(1, NAMES, 1.0, BASE) is not None
    assert heard and "listener failed" in caplog.text
    inbox.remove_listener(broken)
    with pytest.raises(ValueError):
        inbox.remove_listener(broken)


def test_on_pending_mirrors_whether_commands_wait():
    flags: list[bool] = []
    inbox = CommandInbox()
    inbox.submit(command(1, apply_at_step=4))
    inbox.set_on_pending(flags.append)  # told the current state at once
    assert flags == [True]
    inbox.decide(2, NAMES, 1.0, BASE)  # taken, then held again
    assert flags[-2:] == [False, True]
    inbox.decide(4, NAMES, 1.0, BASE)
    assert flags[-1] is False


def test_checkpoint_state_and_pickling():
    inbox = CommandInbox()
    inbox.add_listener(lambda *r: None)
    inbox.submit(command(1))
    inbox.decide(1, NAMES, 1.0, BASE)
    inbox.submit(command(2))
    state = inbox.state_dict()
    assert state == {"last_result": [1, True, "", 1]}
    fresh = CommandInbox()
    fresh.load_state_dict(state)
    assert fresh.last_result == (1, True, "", 1)
    copy = pickle.loads(pickle.dumps(inbox))
    # A copy keeps the last answer, not the queue or the listeners.
    assert copy.last_result == (1, True, "", 1) and not copy.has_pending and copy.listeners == []
    assert isinstance(copy._lock, type(threading.Lock()))


def test_submit_from_many_threads():
    inbox = CommandInbox()
    threads = [threading.Thread(target=inbox.submit, args=(command(v),)) for v in range(1, 41)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    heard: list[tuple] = []
    inbox.add_listener(lambda *r: heard.append(r))
    rule = inbox.decide(1, NAMES, 1.0, BASE)
    assert rule is not None and rule.version == 40 and len(heard) == 40
