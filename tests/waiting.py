"""Polling with a deadline, for tests that watch real processes and servers."""

from __future__ import annotations

import time


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    """The first truthy value of `condition()`, or an AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def reap(procs, timeout_s: float = 30.0) -> None:
    """Wait for each process to exit; kill one that takes longer than `timeout_s`."""
    import subprocess

    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
