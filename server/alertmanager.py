"""Push the collector's alerts to Alertmanager (API v2 ``POST /api/v2/alerts``), off the ingest path.

``AlertmanagerPusher.fire`` / ``resolve`` only put an item on a bounded queue
(never block; a full queue drops the item and counts it). One daemon thread
per Alertmanager URL owns everything else: it merges updates per alert, POSTs
them in one request, retries failures with exponential backoff (0.5 s up to
30 s), and re-posts firing alerts every ``resend`` seconds, as Prometheus
does, so an Alertmanager restart forgets nothing for long.

An Alertmanager alert is identified by its labels: alertname, run, layer
(when there is one), severity, kind and ``source="layrot-collector"`` (the
deploy/alertmanager config inhibits the Prometheus copies of the same events
by that label). Step, angle, baseline and losses are annotations of the
episode's worst event (largest angle; the newest for kinds without one), with
``events`` (count) and ``last_step``. Alerts are events, so each is *resolved* after ``quiet``
seconds without a new event: it is re-posted with ``endsAt`` = now. Every
post of a firing alert also carries ``endsAt`` in the future (last event +
quiet, or now + 3 x resend for held alerts such as a stalled run), so
Alertmanager resolves it by itself if the collector goes away. Held alerts
stay firing until ``resolve``.

Only the standard library (urllib) is used. For an HA pair of Alertmanagers
give every instance's URL (one pusher each), as Prometheus does.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import queue
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from layrot.proto import layrot_pb2 as pb

log = logging.getLogger(__name__)

SOURCE = "layrot-collector"
# Alert names as in deploy/prometheus/rules/layrot.rules.yml, so pushed alerts
# and the Prometheus copies group and inhibit together in Alertmanager.
ALERT_NAMES = {
    "abrupt_rotation": "LayrotAbruptRotation",
    "divergence": "LayrotRunDiverged",
    "stalled": "LayrotRunStalled",
    "rejections": "LayrotRunMessagesRejected",
    "not_learning": "LayrotRunNotLearning",
    "run_lost": "LayrotRunLost",
}
SUMMARIES = {
    "abrupt_rotation": "Abrupt rotation in run {run}, layer {layer}",
    "divergence": "Run {run} diverged (NaN/Inf weights)",
    "stalled": "Run {run} stalled",
    "rejections": "Collector rejects messages from run {run}",
    "not_learning": "Run {run} is not learning (loss at its untrained value)",
    "run_lost": "Run {run} lost (session ended without Goodbye)",
}


def api_url(url: str) -> str:
    """``http://host:9093`` -> ``http://host:9093/api/v2/alerts`` (a full API URL is kept; credentials dropped)."""
    return split_credentials(url)[0]


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host:9093/x`` -> (``http://host:9093/x/api/v2/alerts``, user, password).

    The credentials are percent-decoded (``%40`` for an ``@`` in a password); a URL
    without them gives (url, None, None). The URL that is logged and labels the
    metrics never carries the password.
    """
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    user = password = None
    if "@" in parts.netloc:
        cred, host = parts.netloc.rsplit("@", 1)
        u, _, pw = cred.partition(":")
        user, password = urllib.parse.unquote(u), urllib.parse.unquote(pw)
        parts = parts._replace(netloc=host)
    url = urllib.parse.urlunsplit(parts)
    return (url if url.endswith("/api/v2/alerts") else url + "/api/v2/alerts"), user, password


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the Alertmanager {what} file {path}: {exc.strerror or exc}") from None
    if not text:
        raise ValueError(f"the Alertmanager {what} file {path} is empty")
    return text


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def labels_of(alert: pb.Alert) -> dict[str, str]:
    """Alertmanager labels of an alert (empty values left out, as Prometheus does)."""
    labels = {
        "alertname": ALERT_NAMES.get(alert.kind, "LayrotAlert"),
        "run": alert.run,
        "layer": alert.layer,
        "severity": alert.severity,
        "kind": alert.kind,
        "incident": alert.incident,
        "source": SOURCE,
    }
    return {k: v for k, v in labels.items() if v}


def _num(x: float, fmt: str = ".6g") -> str | None:
    return format(x, fmt) if math.isfinite(x) else None


def annotations_of(alert: pb.Alert) -> dict[str, str]:
    """Annotations: summary, description, step, angle, baseline (radians and degrees), losses."""
    out = {
        "summary": SUMMARIES.get(alert.kind, "layrot alert in run {run}").format(
            run=alert.run, layer=alert.layer or "-"
        ),
        "description": alert.message,
        "step": str(alert.step),
    }
    if len(alert.layers):
        out["layers"] = ", ".join(alert.layers)
    if alert.last_step:
        out["last_step"] = str(alert.last_step)
    for key in ("angle", "baseline"):
        v = getattr(alert, key)
        if math.isfinite(v):
            out[key] = _num(v)  # type: ignore[assignment]
            out[key + "_degrees"] = _num(math.degrees(v), ".4g")  # type: ignore[assignment]
    for key in ("loss_before", "loss_after"):
        v = getattr(alert, key)
        if math.isfinite(v):
            out[key] = _num(v)  # type: ignore[assignment]
    return out


@dataclass
class _Entry:
    labels: dict[str, str]
    annotations: dict[str, str]
    starts: float
    last_event: float
    hold: bool
    worst: float = math.nan  # largest angle of the episode (its event's annotations are shown)
    events: int = 1
    ends: float | None = None  # set when resolved
    dirty: bool = True  # needs a POST
    last_post: float = field(default=0.0)


class AlertmanagerPusher:
    """Background pusher to one Alertmanager. ``fire``/``resolve`` are thread-safe and never block."""

    def __init__(
        self,
        url: str,
        quiet: float = 300.0,
        resend: float = 60.0,
        timeout: float = 5.0,
        max_queue: int = 10_000,
        max_active: int = 10_000,
        backoff: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], float] = time.time,
        user: str | None = None,
        password_file: str | None = None,
        token_file: str | None = None,
        ca: str | None = None,
    ) -> None:
        """Credentials: basic auth from the URL (``http://user:pw@host``) or ``user`` and
        ``password_file``, or a bearer token from ``token_file`` (not both); ``ca`` a PEM
        bundle to verify an https Alertmanager (or its proxy) with. Files are read once,
        here; a bad one raises ValueError naming it.
        """
        self.url, url_user, url_password = split_credentials(url)
        if user is not None and url_user is not None:
            raise ValueError("Alertmanager credentials given twice: in the URL and as a user")
        password = url_password
        if password_file:
            if url_password is not None:
                raise ValueError("Alertmanager password given twice: in the URL and as a password file")
            password = _read_secret(password_file, "password")
        user = user if user is not None else url_user
        if password is not None and user is None:
            raise ValueError("an Alertmanager password needs a user (--alertmanager-user or http://user:pw@host)")
        self._headers = {"Content-Type": "application/json"}
        if token_file:
            if user is not None:
                raise ValueError("give the Alertmanager either basic auth or a bearer token, not both")
            self._headers["Authorization"] = "Bearer " + _read_secret(token_file, "token")
        elif user is not None:
            basic = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = "Basic " + basic
        self._context: ssl.SSLContext | None = None
        if ca:
            try:
                self._context = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the Alertmanager CA {ca}: {exc}") from None
        if "Authorization" in self._headers and self.url.startswith("http://"):
            log.warning("Alertmanager %s: credentials sent over plain http", self.url)
        self.quiet = float(quiet)
        self.resend = float(resend)
        self.timeout = float(timeout)
        self.max_active = max_active
        self.backoff = backoff
        self.clock = clock
        self._queue: queue.Queue[tuple[str, Any, bool] | None] = queue.Queue(maxsize=max_queue)
        self._active: dict[tuple[tuple[str, str], ...], _Entry] = {}
        self._posts = 0
        self._errors = 0
        self._dropped = 0
        self._stop = threading.Event()
        self._delay = 0.0
        self._retry_at = 0.0
        self.last_error = ""
        self._thread = threading.Thread(target=self._main, name="layrot-alertmanager", daemon=True)

    # ------------------------------------------------------------ producer side (any thread)
    def start(self) -> AlertmanagerPusher:
        self._thread.start()
        return self

    def fire(self, alert: pb.Alert, hold: bool = False) -> None:
        """Queue an alert event (a copy is taken). Drops and counts when the queue is full."""
        item = pb.Alert()
        item.CopyFrom(alert)
        self._put(("fire", item, hold))

    def resolve(self, run: str, layer: str, kind: str) -> None:
        """Resolve the firing alert(s) of (run, layer, kind), whatever their severity."""
        self._put(("resolve", (run, layer, kind), False))

    def _put(self, item: tuple[str, Any, bool]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += 1

    def stats(self) -> dict[str, Any]:
        return {
            "posts": self._posts,
            "errors": self._errors,
            "dropped": self._dropped,
            "active": len(self._active),
            "queued": self._queue.qsize(),
            "last_error": self.last_error,
        }

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread after one last attempt to deliver what is pending (bounded by ``timeout``)."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout + self.timeout)

    # ------------------------------------------------------------ the thread
    def _main(self) -> None:
        while True:
            now = self.clock()
            wait = self._next_due(now) - now
            items: list[tuple[str, Any, bool] | None] = []
            try:
                items.append(self._queue.get(timeout=max(0.0, min(wait, 1.0))))
            except queue.Empty:
                pass
            stop = self._stop.is_set()
            while True:  # take whatever else is queued: one POST for a burst
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for it in items:
                if it is None:
                    stop = True
                else:
                    self._apply(it)
            now = self.clock()
            self._expire(now)
            if now >= self._retry_at:  # when stopping too: no extra wait on an Alertmanager in backoff
                self._flush(now)
            if stop:
                return

    def _next_due(self, now: float) -> float:
        due = now + 1.0
        for e in self._active.values():
            if e.dirty:
                return max(now, self._retry_at)
            due = min(due, e.last_post + self.resend)
            if not e.hold:
                due = min(due, e.last_event + self.quiet)
        return due

    def _apply(self, item: tuple[str, Any, bool]) -> None:
        op, payload, hold = item
        now = self.clock()
        if op == "fire":
            alert: pb.Alert = payload
            labels = labels_of(alert)
            key = tuple(sorted(labels.items()))
            if alert.incident:  # an escalated incident: its lower-severity copy ends now
                for k2, other in self._active.items():
                    if k2 != key and other.ends is None and other.labels.get("incident") == alert.incident:
                        other.ends = now
                        other.dirty = True
            e = self._active.get(key)
            if e is None or e.ends is not None:
                if e is None and len(self._active) >= self.max_active:
                    self._dropped += 1
                    return
                ann = annotations_of(alert)
                ann["events"], ann["last_step"] = "1", str(alert.last_step or alert.step)
                self._active[key] = _Entry(
                    labels, ann, starts=alert.time or now, last_event=now, hold=hold, worst=alert.angle
                )
            else:
                # Show the worst event of the episode (a re-initialized layer's 90 deg, not the
                # smaller jumps of its recovery), with the count and the newest step.
                e.events += 1
                # An incident's update is its newest version: shown as it is.
                if alert.incident or not (alert.angle <= e.worst) or math.isnan(alert.angle):
                    e.annotations = annotations_of(alert)
                    e.worst = alert.angle
                e.annotations["events"] = str(e.events)
                e.annotations["last_step"] = str(alert.last_step or alert.step)
                e.last_event = now
                e.hold = e.hold or hold
                e.dirty = True
        else:
            run, layer, kind = payload
            for e in self._active.values():
                lab = e.labels
                if (
                    lab.get("run") == run
                    and lab.get("layer", "") == layer
                    and lab.get("kind") == kind
                    and e.ends is None
                ):
                    e.ends = now
                    e.dirty = True

    def _expire(self, now: float) -> None:
        for e in self._active.values():
            if e.ends is not None:
                continue
            if not e.hold and now - e.last_event >= self.quiet:
                e.ends = now
                e.dirty = True
            elif now - e.last_post >= self.resend:
                e.dirty = True

    def _payload(self, e: _Entry, now: float) -> dict[str, Any]:
        if e.ends is not None:
            ends = e.ends
        elif e.hold:
            ends = now + 3 * self.resend
        else:
            ends = e.last_event + self.quiet
        return {
            "labels": e.labels,
            "annotations": e.annotations,
            "startsAt": rfc3339(e.starts),
            "endsAt": rfc3339(ends),
        }

    def _flush(self, now: float) -> None:
        batch = [(k, e) for k, e in self._active.items() if e.dirty]
        if not batch:
            return
        body = json.dumps([self._payload(e, now) for _, e in batch]).encode()
        ok, retry = self._post(body)
        if ok or not retry:
            self._delay = 0.0
            self._retry_at = 0.0
            for k, e in batch:
                e.dirty = False
                e.last_post = now
                if e.ends is not None:
                    del self._active[k]
            if not ok:  # refused for good (4xx): do not resend the same payload forever
                self._dropped += len(batch)
        else:
            self._delay = min(self.backoff[1], max(self.backoff[0], 2 * self._delay))
            self._retry_at = now + self._delay

    def _post(self, body: bytes) -> tuple[bool, bool]:
        """(delivered, worth retrying)."""
        req = urllib.request.Request(self.url, data=body, method="POST", headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._context) as resp:
                resp.read()
            self._posts += 1
            return True, False
        except urllib.error.HTTPError as exc:
            self._errors += 1
            detail = exc.read()[:300].decode("utf-8", "replace") if exc.fp is not None else ""
            self.last_error = f"HTTP {exc.code}: {detail}"
            retry = exc.code >= 500 or exc.code in (401, 403, 429)  # credentials may be fixed at the proxy
            log.warning(
                "Alertmanager %s answered %s%s",
                self.url,
                self.last_error,
                "; retrying" if retry else "; alerts dropped",
            )
            return False, retry
        except (OSError, ValueError) as exc:  # refused, timeout, DNS, reset
            self._errors += 1
            self.last_error = str(exc)
            log.warning(
                "cannot reach Alertmanager %s: %s (retrying in %.1f s)",
                self.url,
                exc,
                min(self.backoff[1], max(self.backoff[0], 2 * self._delay)),
            )
            return False, True
