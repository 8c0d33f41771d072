"""The rq queues experiments wait in: the shared `gpu` queue, and one queue per hardware class.

Every worker listens on `gpu`. A worker started with `arrl worker-queues` (and every worker
`arrl run` starts) also listens, first, on its own class's queue, `gpu@<class>`. What goes there
is a re-run of the incumbent meant for that class (`extra.for_class`): with workers of several
hardware classes (`--hardware-class any`), a class with no score of the incumbent gets one from
that re-run, and on the shared queue it lands on whichever worker is free first, half the time
on another class, where it scores nothing the class needed.

A job is sent to a class's queue only while a live worker listens on it, and the sweeper moves
one that waited there too long, or whose workers are gone, back to `gpu` (`pipeline.sweeper`):
a class queue never strands a job. Blocking rq calls: run them in a thread from async code.
"""

from __future__ import annotations

import re
from typing import Any

from rq import Queue, Worker

from arrl.campaign import QUEUE_NAME
from arrl.serialization import MsgpackSerializer

CLASS_QUEUE_PREFIX = f"{QUEUE_NAME}@"


def class_queue_name(hardware_class: str) -> str:
    """`gpu@<class>`, the class written with letters, digits, dots and dashes only, so that the
    name is one word on an `rq worker` command line ("cpu:AMD EPYC 7B13 x2" -> "gpu@cpu-AMD-EPYC-7B13-x2")."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", hardware_class).strip("-")
    if not slug:
        raise ValueError(f"no queue name for hardware class {hardware_class!r}")
    return CLASS_QUEUE_PREFIX + slug


def queue(sync_redis: Any, name: str = QUEUE_NAME) -> Queue:
    return Queue(name, connection=sync_redis, serializer=MsgpackSerializer)


def class_queues(sync_redis: Any) -> list[Queue]:
    """The class queues rq knows of (each created by its first job)."""
    return [queue(sync_redis, q.name) for q in Queue.all(connection=sync_redis)
            if q.name.startswith(CLASS_QUEUE_PREFIX)]


def all_queues(sync_redis: Any) -> list[Queue]:
    """`gpu`, then the class queues: where a campaign's jobs may wait, run and fail."""
    return [queue(sync_redis), *class_queues(sync_redis)]


def listened(sync_redis: Any, name: str) -> bool:
    """Whether a live worker listens on queue `name`: registered on it, its worker key not expired
    (a worker that stopped cleanly unregisters; one killed drops out when its key expires)."""
    return bool(Worker.all(queue=queue(sync_redis, name)))


def queue_for(sync_redis: Any, proposal: dict[str, Any]) -> str:
    """Where a proposal's job waits: its class's queue for a re-run meant for a class
    (`extra.for_class`) that a live worker listens on, else `gpu`."""
    extra = proposal.get("extra") or {}
    cls = extra.get("for_class") if isinstance(extra, dict) else None
    if cls:
        name = class_queue_name(str(cls))
        if listened(sync_redis, name):
            return name
    return QUEUE_NAME


__all__ = ["CLASS_QUEUE_PREFIX", "all_queues", "class_queue_name", "class_queues", "listened", "queue", "queue_for"]
