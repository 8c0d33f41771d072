"""The stage loop: feed one stream of the bus to a handler, at least once, until told to stop.

Acknowledged only after the handler returned; failures are retried through re-claims and end in
the dead-letter stream (arrl.bus). Every stage's main loop is this function.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import structlog

from arrl.bus import REDIS_ERRORS, Backoff, Bus, Delivery

log = structlog.get_logger("arrl.bus")

Handler = Callable[[dict[str, Any]], Awaitable[object]]


async def run_consumer(
    bus: Bus,
    stream: str,
    group: str,
    consumer: str,
    handler: Handler,
    *,
    stop: anyio.Event | None = None,
    count: int = 10,
    block_ms: int = 500,
    expect_kind: str | None = None,
    max_messages: int | None = None,
) -> int:
    """Feed ``stream`` to ``handler`` until ``stop`` is set; returns how many were handled.

    An entry is acked only after ``handler`` returned. A handler exception is logged and
    leaves the entry pending, so it is re-claimed after ``bus.claim_idle_ms`` (by this or
    another consumer) and dead-lettered after ``bus.max_deliveries``. ``stop`` is checked
    between batches, so it takes effect within about ``block_ms``; a fetched batch is
    finished first, since an unfinished entry would wait ``claim_idle_ms`` to be re-claimed.
    Keep ``claim_idle_ms`` above the slowest handler's run time, or another consumer
    re-claims an entry that is still being handled and both handle it.
    """
    bound = log.bind(stream=stream, group=group, consumer=consumer)
    handled = 0
    backoff = Backoff()
    group_ready = False
    while stop is None or not stop.is_set():
        try:
            if not group_ready:
                await bus.ensure_group(stream, group)
                group_ready = True
            # Never fetch more than max_messages still allows: extra entries would sit
            # pending on this consumer until claim_idle_ms passed.
            want = count if max_messages is None else min(count, max_messages - handled)
            deliveries = await bus.consume(stream, group, consumer, want, block_ms, expect_kind=expect_kind)
        except REDIS_ERRORS as exc:
            # Redis restarting is survivable: streams and groups persist (with AOF), and
            # whatever was pending is re-claimed when it comes back.
            bound.warning("bus.consume_failed", error=repr(exc), retry_in_s=backoff.delay_s)
            await backoff.pause()
            continue
        backoff.reset()
        for delivery in deliveries:
            message = delivery.message
            if message is None:  # consume() dead-letters these; never hand them out
                continue
            error = await _handle(handler, message, delivery, bound, stop)
            if error is not None:
                try:  # for the dead letter this entry becomes if it keeps failing
                    await bus.note_error(stream, group, delivery.entry_id, error)
                except REDIS_ERRORS:
                    pass
                continue
            try:
                await bus.ack(stream, group, delivery.entry_id)
            except REDIS_ERRORS as exc:
                # The side effect happened but the ack was lost: the entry is redelivered
                # and the idempotent handler sees a duplicate, which it must tolerate.
                bound.warning("bus.ack_failed", entry_id=delivery.entry_id, error=repr(exc))
                continue
            handled += 1
            if max_messages is not None and handled >= max_messages:
                return handled
    return handled


# A handler that failed only because Redis was unreachable is tried again after a pause, up to
# this long in all, rather than left pending for claim_idle_ms (handlers are idempotent).
HANDLER_REDIS_RETRY_S: Final[float] = 60.0


async def _handle(handler: Handler, message: dict[str, Any], delivery: Delivery, bound: Any,
                  stop: anyio.Event | None) -> str | None:
    """Run the handler once, or again while Redis is unreachable; None when it returned, else
    the error that made it fail."""
    deadline = time.monotonic() + HANDLER_REDIS_RETRY_S
    backoff = Backoff(0.2)
    while True:
        try:
            await handler(message)
            return None
        except REDIS_ERRORS as exc:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                bound.warning("bus.handler_failed", entry_id=delivery.entry_id, error=repr(exc),
                              experiment_id=message.get("experiment_id"), deliveries=delivery.deliveries)
                return f"{type(exc).__name__}: {exc}"
            bound.warning("bus.handler_redis_unavailable", entry_id=delivery.entry_id, error=repr(exc),
                          retry_in_s=backoff.delay_s)
            await backoff.pause()
        except Exception as exc:
            bound.exception(
                "bus.handler_failed",
                entry_id=delivery.entry_id,
                experiment_id=message.get("experiment_id"),
                deliveries=delivery.deliveries,
            )
            return f"{type(exc).__name__}: {exc}"
