"""The device gate: one timed training at a time per device, the next candidate prepared meanwhile.

On a GPU, a new candidate spends seconds before its first timed step: `torch.compile` (2-5 s from
a warm compile cache, 10-30 s cold) and the profile's warm-up steps. With two workers on one GPU
and the gate, that preparation overlaps the other worker's training:

    worker A   [train e1 ......... eval] [prepare e3][wait] [train e3 ........ eval]
    worker B   [prepare e2][wait ........]  [train e2 ........ eval] [prepare e4][wait]

The trainer runs its candidate up to the end of the warm-up steps, then the harness emits
`train.gate` and blocks reading a pipe; the runner takes this device's lock and writes one byte,
and only then does the harness start the training clock. The lock is held through evaluation and
let go when the summary arrives (or the trainer ends), so timed training and evaluation never
share the device: results stay comparable, whatever else the device is doing. What the running
experiment does share the device with is the next candidate's compilation and warm-up steps,
which `scripts/bench_pipeline.py executors` measures as its slowdown.

The lock is an `flock` on a file under `$ARRL_HOME/locks`, one per device of this host. The
kernel lets go of it when its holder's process dies, so a killed worker never blocks the device.

`ARRL_DEVICE_LOCK` chooses: `auto` (the default: on for CUDA, off for CPU, where preparing the
next candidate would take cores from the running one), `on` or `off`.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path

import anyio

from frozen_env.constants import arrl_home

POLL_S = 0.005  # how often a waiting runner retries the lock; the hand-off costs about this much


class DeviceLock:
    """An exclusive, process-scoped lock on one device, taken without blocking the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    async def acquire(self) -> float:
        """Wait for the device; returns the seconds waited. Cancellable at any point."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        started = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # Polled rather than a blocking flock in a thread: a thread cannot be
                    # cancelled, and one that got the lock after we gave up would keep it.
                    await anyio.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return time.monotonic() - started

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the open file lets go of the flock


def device_id(device: str) -> str:
    """A name for the physical device this process trains on, unique on this host."""
    if device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
        return "cuda-" + re.sub(r"[^A-Za-z0-9_.-]", "_", visible)
    return device


def device_lock_for(device: str) -> DeviceLock | None:
    """This worker's device lock, or None when the gate is off (see the module's docstring)."""
    mode = os.environ.get("ARRL_DEVICE_LOCK", "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"ARRL_DEVICE_LOCK must be auto, on or off, not {mode!r}")
    if mode == "off" or (mode == "auto" and device != "cuda"):
        return None
    return DeviceLock(arrl_home() / "locks" / f"{device_id(device)}.lock")
