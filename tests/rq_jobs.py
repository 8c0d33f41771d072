"""Job functions for rq tests: workers import them by dotted path (``rq_jobs.echo``)."""

from __future__ import annotations

from typing import Any


def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """Return the payload with a marker, so the test sees the job really ran."""
    return {**payload, "echoed": True}
