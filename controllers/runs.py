"""Helpers shared by the controller loops: finding the run they steer."""

from __future__ import annotations

import threading
import time

import grpc

from layrot.client.query import CollectorError, QueryClient

__all__ = ["wait_for_run"]


def wait_for_run(
    client: QueryClient, run: str, wait: float, stop: threading.Event | None = None, poll: float = 0.2
) -> dict:
    """``client.get_run(run)`` once the run exists; it appears after the job's first optimizer step.

    Raises CollectorError when ``wait`` seconds pass first, or on any other error.
    """
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            return client.get_run(run)
        except CollectorError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND or time.monotonic() >= deadline:
                raise
        if stop is not None and stop.is_set():
            raise CollectorError(f"stopped while waiting for run {run!r}")
        time.sleep(poll)
