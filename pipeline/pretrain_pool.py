"""Worker processes for `arrl pretrain --workers N`: they play a group's campaigns side by side
(and `scripts/bench_offline.py --workers N`'s campaigns).

The processes are spawned, not forked: the parent has run torch already, and a forked child of a
process whose thread pools have started can hang in its first parallel operation. Each worker
imports torch once and plays many campaigns (`arrl.pretrain.play_member_from_weights`). Workers
ignore Ctrl-C: the parent alone stops, writes what it has and cancels what is queued, rather than
every process printing its own traceback, and a pool left by an error or Ctrl-C waits only for the
campaigns already handed to a worker (a benchmark queues all of its campaigns at once).
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Any


class CampaignPool(ProcessPoolExecutor):
    """A process pool whose `with` block, left by an exception, drops the queued work."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def campaign_pool(workers: int) -> CampaignPool:
    """A pool of `workers` processes for `arrl.pretrain.pretrain(pool=...)`; use it as a context manager."""
    if workers < 1:
        raise ValueError(f"workers must be 1 or more, not {workers}")
    return CampaignPool(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                        initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
