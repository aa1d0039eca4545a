"""The web view (server/webui, served by server/web.py) in a real headless Chromium.

A real collector on loopback fed by real gRPC sessions (simulated jobs whose float64 truth is
known, and an alert raised for real by the collector's engine); the page is Debian's Chromium
driven by Playwright. Every number read off the page is checked against the history and
summaries from the gRPC ``QueryClient`` (an independent path: protobuf, not the JSON the page
reads), to the precision the page prints (4 decimals for rotations and angles).
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from web_browser import browser_missing, chromium

from layrot.client.query import QueryClient
from layrot.proto import layrot_pb2 as pb

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as context:
        yield context


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    p = browser.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    p.close()
    assert not errors, f"the page raised: {errors}"


def f4(v: float) -> str:
    return f"{v:.4f}"


def feed(ingest: Any, collector: Any, job: Any, batches: list[tuple[int, float]], **hello: Any) -> Any:
    """Open a session for ``job`` and send ``(n_steps, angle)`` batches; returns the session once acked."""
    s = ingest(collector)
    s.send(job.hello(**hello))
    for n, angle in batches:
        s.send(job.batch(n, angle=angle))
    s.wait_ack(job.seq)
    return s


def ready(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#view[data-ready]", timeout=15000)


def cell(page: Any, row: str, col: str) -> str:
    return page.inner_text(f'{row} td[data-col="{col}"]').strip()


def test_runs_table_and_run_page_show_the_history(collector: Any, ingest: Any, sim_job: Any, page: Any) -> None:
    a = sim_job(run="alpha", layer_sizes=(30, 50, 20, 40, 10), seed=1)
    b = sim_job(run="beta/2", layer_sizes=(16, 16, 16), seed=2, step_angle=0.02)
    c = sim_job(run="gamma", layer_sizes=(400, 300, 3, 2), seed=5)  # big layers drift far, tiny ones wander
    # step 26: a spike the alert engine reports; 40 of 60 announced steps: the indicator judges under-rotation
    feed(ingest, collector, a, [(25, 0.01), (1, 1.2), (14, 0.03)], total_steps=60)
    feed(ingest, collector, b, [(30, 0.02)])
    feed(ingest, collector, c, [(30, 0.35)], total_steps=40)
    with QueryClient(collector.grpc_address) as q:
        runs = {r["run"]: r for r in q.list_runs()}
        hist = {name: q.history(name) for name in runs}
        alerts = q.list_alerts("alpha")
    assert alerts and any(al["step"] == 26 for al in alerts), alerts
    for name, h in hist.items():  # the summaries the table prints are the history's newest row
        # The live value (float64) against the history's float32 copy of it.
        assert runs[name]["min_rotation"] == pytest.approx(h.rotation[-1].min(), rel=6e-8, abs=1e-12)

    ready(page, collector.http_url + "/")
    assert page.title() == "layrot"
    for name, r in runs.items():
        row = f'#runs tr[data-run="{name}"]'
        h = hist[name]
        assert cell(page, row, "framework") == r["framework"] == "pytorch"
        assert cell(page, row, "step") == str(int(h.steps[-1]))
        assert cell(page, row, "connected") == "yes"
        assert cell(page, row, "min_rotation") == f4(h.rotation[-1].min())
        assert cell(page, row, "mean_rotation") == f4(h.rotation[-1].mean())
        assert cell(page, row, "num_layers") == str(h.num_layers)
        # The indicator, from the history's newest row and the collector's target.
        target = r["rotation_target"]
        assert target == 0.9
        assert cell(page, row, "at_target") == f"{100 * np.mean(h.rotation[-1] >= target):.0f} %"
        judged = name in ("alpha", "gamma")
        assert r["indicator_judged"] is judged
        under = int(np.sum(h.rotation[-1] < target))
        assert cell(page, row, "under_rotated") == (str(under) if judged else "–")
        opened = sum(1 for al in (alerts if name == "alpha" else []) if not al["resolved"])
        assert cell(page, row, "open_alerts") == str(opened)
    assert cell(page, '#runs tr[data-run="gamma"]', "at_target") == "75 %"  # 3 of 4 layers past 0.9

    # The run page, reached by its link (a "/" in the name is percent-encoded in the hash).
    page.click('#runs tr[data-run="beta/2"] a')
    page.wait_for_selector("#view[data-ready]")
    assert page.inner_text("#run-name") == "beta/2"
    page.click("text=← runs")
    page.wait_for_selector('#runs tr[data-run="alpha"]')
    page.click('#runs tr[data-run="alpha"] a')
    page.wait_for_selector("#view[data-ready]")
    h = hist["alpha"]
    assert page.inner_text('#summary [data-k="step"]') == str(int(h.steps[-1]))
    for l, name in enumerate(h.layer_names):  # the newest report per layer, printed
        row = f'#layers tr[data-layer="{name}"]'
        assert cell(page, row, "rotation") == f4(h.rotation[-1, l])
        assert cell(page, row, "step_angle") == f4(h.step_angle[-1, l])
        assert cell(page, row, "weight_norm") == f4(h.weight_norm[-1, l])
        assert cell(page, row, "under_rotated") == ("yes" if h.rotation[-1, l] < 0.9 else "")  # all, at 40 of 60
    np.testing.assert_allclose(h.rotation, a.truth_array("rotation"), rtol=1e-6, atol=1e-12)  # the history is the truth

    # Hovered values: the curves' readout names a step and a layer; its value is that cell of the history.
    over = page.locator("#curves .u-over").bounding_box()
    assert over is not None
    seen = set()
    for frac in (0.1, 0.5, 0.97):
        page.mouse.move(over["x"] + frac * over["width"], over["y"] + 0.98 * over["height"])
        readout = page.locator("#readout")
        step = int(readout.locator('[data-k="step"]').inner_text())
        layer = readout.locator('[data-k="layer"]').inner_text()
        i = int(np.searchsorted(h.steps, step))
        assert h.steps[i] == step
        assert readout.locator('[data-k="rotation"]').inner_text() == f4(h.rotation[i, h.layer_names.index(layer)])
        seen.add(step)
    assert len(seen) == 3

    heat = page.locator("#heatmap").bounding_box()
    assert heat is not None
    page.mouse.move(heat["x"] + heat["width"] * 25.5 / 40, heat["y"] + heat["height"] * 0.1)  # column of step 26
    text = page.inner_text("#heat-readout")
    assert text == f"step 26 · layer {h.layer_names[0]} · step angle {f4(h.step_angle[25, 0])} rad", text
    assert f4(h.step_angle[25, 0]) == "1.2000"

    # The alert is on the page: in the alerts table (and drawn on the curves' timeline).
    assert page.locator('#alerts tr[data-step="26"]').count() >= 1


def test_a_new_report_shows_without_reload(collector: Any, ingest: Any, sim_job: Any, page: Any) -> None:
    job = sim_job(run="live", layer_sizes=(20, 20, 20, 20))
    s = feed(ingest, collector, job, [(10, 0.05)])
    ready(page, collector.http_url + "/#/run/live")
    page.evaluate("window.__notReloaded = true")
    assert page.inner_text('#summary [data-k="step"]') == "10"

    s.send(job.batch(5, angle=0.2))
    s.wait_ack(job.seq)
    page.wait_for_function(
        "() => document.querySelector('#summary [data-k=\"step\"]').textContent === '15'", timeout=10000
    )
    with QueryClient(collector.grpc_address) as q:
        h = q.history("live")
    assert int(h.steps[-1]) == 15
    for l, name in enumerate(h.layer_names):
        assert cell(page, f'#layers tr[data-layer="{name}"]', "rotation") == f4(h.rotation[-1, l])
    # The curves got the new steps too: hovering their right end reads step 15's values (the history
    # is fetched after the summary in the same poll: hover again until it has arrived).
    over = page.locator("#curves .u-over").bounding_box()
    readout = page.locator("#readout")
    deadline = time.monotonic() + 10
    for k in itertools.count():
        page.mouse.move(over["x"] + over["width"] - 1 - k % 2, over["y"] + over["height"] / 2)
        if readout.locator('[data-k="step"]').inner_text() == "15" or time.monotonic() > deadline:
            break
        page.wait_for_timeout(200)
    assert readout.locator('[data-k="step"]').inner_text() == "15"
    layer = readout.locator('[data-k="layer"]').inner_text()
    assert readout.locator('[data-k="rotation"]').inner_text() == f4(h.rotation[-1, h.layer_names.index(layer)])
    assert page.evaluate("window.__notReloaded") is True

    # And the runs table follows a run that appears later.
    page.click("text=← runs")
    page.wait_for_selector('#runs tr[data-run="live"]')
    late = sim_job(run="late", layer_sizes=(8, 8), seed=9)
    feed(ingest, collector, late, [(3, 0.1)])
    page.wait_for_selector('#runs tr[data-run="late"]', timeout=10000)
    assert page.evaluate("window.__notReloaded") is True


def test_layca_rates_requested_vs_applied(collector: Any, ingest: Any, sim_job: Any, page: Any) -> None:
    job = sim_job(run="steered", layer_sizes=(20, 30, 40), layca=True)
    s = feed(ingest, collector, job, [(5, 0.05)], capabilities=pb.Capabilities(layca=True, loss=True, control=True))
    with QueryClient(collector.grpc_address) as q:
        q.set_control("steered", pb.RateCommand(alpha=0.5, schedule=pb.RhoSchedule(rho0=0.03), issued_by="t@lab"))
        s.send(job.batch(2))
        s.wait_ack(job.seq)
        st = q.get_control("steered")
    assert st["requested_version"] == 1 and len(st["requested_rho"]) == 3
    ready(page, collector.http_url + "/#/run/steered")
    page.wait_for_selector("#rates")
    rows = page.locator("#rates tbody tr")
    assert rows.count() == 3
    for i in range(3):
        tds = rows.nth(i).locator("td")
        assert tds.nth(1).inner_text() == st["layer_names"][i]
        assert tds.nth(2).inner_text() == f"{st['requested_rho'][i]:#.4g}"
        applied = st["applied_rho"][i] if i < len(st["applied_rho"]) else float("nan")
        assert tds.nth(3).inner_text() == ("–" if np.isnan(applied) else f"{applied:#.4g}")
    assert "requested version 1" in page.inner_text("#control")


def test_compare_page(collector: Any, ingest: Any, sim_job: Any, page: Any) -> None:
    jobs = [
        sim_job(run="c1", layer_sizes=(10, 20, 30), seed=3, step_angle=0.02),
        sim_job(run="c2", layer_sizes=(10, 20, 30, 40, 50), seed=4, step_angle=0.04),
    ]
    for j in jobs:
        feed(ingest, collector, j, [(20, j.step_angle)])
    ready(page, collector.http_url + "/")
    page.check('#runs tr[data-run="c1"] input[type=checkbox]')
    page.check('#runs tr[data-run="c2"] input[type=checkbox]')
    page.click("text=compare selected")
    page.wait_for_selector("#view[data-ready]")
    assert page.url.endswith("#/compare/c1,c2")
    with QueryClient(collector.grpc_address) as q:
        for j in jobs:
            h = q.history(j.run)
            row = f'#compare tr[data-run="{j.run}"]'
            assert cell(page, row, "step") == "20"
            assert cell(page, row, "min_rotation") == f4(h.rotation[-1].min())
            assert cell(page, row, "mean_rotation") == f4(h.rotation[-1].mean())
    assert page.locator(".uplot").count() == 3  # mean, min, by depth


def test_read_token_login(collector_factory: Any, ingest: Any, sim_job: Any, page: Any, tmp_path: Any) -> None:
    c = collector_factory(db_path=tmp_path / "tok.db", token="write-tok", read_token="read-tok")
    job = sim_job(run="secret", layer_sizes=(12, 12))
    s = ingest(c, token="write-tok")
    s.send(job.hello())
    s.send(job.batch(4))
    s.wait_ack(job.seq)
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/api/v1/" in r.url else None)
    page.goto(c.http_url + "/")
    page.wait_for_selector("#login:not([hidden])")
    assert "read token" in page.inner_text("#status")
    page.fill("#token", "wrong")
    page.click("#login button")
    page.wait_for_selector("#login:not([hidden])")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('refused')")
    page.fill("#token", "read-tok")
    page.click("#login button")
    page.wait_for_selector('#runs tr[data-run="secret"]')
    assert page.evaluate("sessionStorage.getItem('layrot.token')") == "read-tok"
    assert "Bearer read-tok" in sent and "Bearer wrong" in sent
    # The token outlives navigation within the tab (sessionStorage), not the tab.
    page.reload()
    page.wait_for_selector('#runs tr[data-run="secret"]')
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('layrot.token')") is None


def test_screenshot(collector: Any, ingest: Any, sim_job: Any, page: Any, tmp_path: Any) -> None:
    """The run page renders (a PNG of it is not blank); docs/webview.png comes from benchmarks/webview.py."""
    job = sim_job(run="shot", layer_sizes=tuple(range(10, 90, 10)))
    feed(ingest, collector, job, [(60, 0.03), (1, 0.6), (40, 0.03)])
    ready(page, collector.http_url + "/#/run/shot")
    time.sleep(0.2)  # let the charts paint
    path = tmp_path / "run.png"
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1280 and height > 900
    # The curves' canvas has drawn something: pixels of more than one colour.
    colours = page.evaluate(
        """() => { const c = document.querySelector('#curves canvas'); const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; const s = new Set();
        for (let i = 0; i < d.length; i += 4 * 97) s.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]); return s.size; }"""
    )
    assert colours > 5
