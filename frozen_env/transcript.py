"""What the runner reads from a trainer: its log (capped), its signed harness events, its verdict's facts."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import anyio

# The log file keeps at most this much; the rest of the output is read and counted, not stored.
MAX_LOG_BYTES = 8 * 2**20
# A line longer than this is cut: it is no harness event, and it must not exhaust memory.
MAX_LINE_BYTES = 1 << 20
MAX_CURVE_POINTS = 20_000
TAIL_LINES = 40
_SIGNATURE = re.compile(r', "sig": "([0-9a-f]{32})"}$')


def signed_by(key: bytes, line: str) -> bool:
    """Whether `line` ends with the signature the harness computes with `key` (harness.emit)."""
    match = _SIGNATURE.search(line)
    if match is None:
        return False
    expected = hmac.new(key, (line[:match.start()] + "}").encode(), hashlib.sha256).hexdigest()[:32]
    return hmac.compare_digest(expected, match.group(1))


class Transcript:
    """Everything the runner learns from the trainer's output."""

    def __init__(self, log_path: Path, key: bytes | None = None) -> None:
        self.log = log_path.open("wb")
        self.log_bytes = 0
        self.output_bytes = 0
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.curve: list[list[float]] = []
        self.summary: dict[str, Any] | None = None
        self.diverged: str | None = None
        self.ready: dict[str, Any] | None = None
        self.machine_gflops: float | None = None  # the device's speed before the clock started (harness)
        self.last_step: dict[str, Any] | None = None
        self.exit_code: int | None = None  # from a warm trainer's last event (it is not our child)
        self.fakes: list[str] = []  # printed imitations of results
        self.printed_bpb: list[float] = []  # `val_bpb:` lines on the log (the harness prints one)
        self.violations: list[str] = []  # integrity events from the launcher's guard
        self.key = key  # what the harness signs its events with (None: unsigned, by hand)
        self.forged: list[str] = []  # event lines on the harness's channel it did not sign
        self.out_of_memory: str | None = None  # the launcher saw an out-of-memory exception
        # Wall-clock times (epoch seconds) of the training clock's start and of the summary:
        # what a device's duty cycle and hand-off gaps are measured from.
        self.training_started_at: float | None = None
        self.training_ended_at: float | None = None

    def write_log(self, raw: bytes) -> None:
        self.output_bytes += len(raw)
        if self.log_bytes < MAX_LOG_BYTES:
            chunk = raw[: MAX_LOG_BYTES - self.log_bytes]
            self.log.write(chunk)
            self.log_bytes += len(chunk)
            if self.log_bytes >= MAX_LOG_BYTES:
                self.log.write(b"\n[arrl: log truncated here]\n")

    def parse_event(self, line: str) -> dict[str, Any] | None:
        """A line from the harness's own channel: an event, or None if it does not parse or its
        signature is not the harness's (then it is noted as forged: the candidate wrote it)."""
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if not (isinstance(event, dict) and isinstance(event.get("event"), str)):
            return None
        if self.key is not None:
            if not signed_by(self.key, line):
                self.forged.append(str(event["event"])[:80])
                return None
            event.pop("sig", None)
        self._absorb(event)
        return event

    def log_line(self, line: str) -> None:
        """A line the script printed. Imitations of results are noted: they cost the run its credit."""
        self.tail.append(line)
        stripped = line.strip()
        if stripped.startswith("{") and '"event"' in stripped and '"summary"' in stripped:
            self.fakes.append("printed a line posing as the harness's summary")
        elif stripped.startswith("val_bpb:"):
            try:
                self.printed_bpb.append(float(stripped.split(":", 1)[1]))
            except ValueError:
                self.fakes.append(f"printed a malformed val_bpb line: {stripped[:80]}")

    def _absorb(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "train.step":
            loss, t = event.get("loss"), event.get("training_seconds")
            if isinstance(loss, int | float) and isinstance(t, int | float):
                if not math.isfinite(loss):
                    self.diverged = self.diverged or "loss is not finite"
                if len(self.curve) < MAX_CURVE_POINTS:
                    self.curve.append([float(t), float(loss)])
                self.last_step = event
        elif kind == "train.diverged":
            self.diverged = str(event.get("reason", "diverged"))
        elif kind == "summary":
            self.summary = event
            self.training_ended_at = time.time()
        elif kind == "harness.ready":
            self.ready = event
        elif kind == "train.clock_started":
            self.training_started_at = time.time()
            speed = event.get("machine_gflops")
            self.machine_gflops = float(speed) if isinstance(speed, int | float) and math.isfinite(speed) else None
        elif kind == "launcher.exit" and isinstance(event.get("code"), int):
            self.exit_code = event["code"]
        elif kind == "integrity.violation":
            self.violations.append(str(event.get("reason", "integrity violation")))
        elif kind == "trainer.out_of_memory":
            self.out_of_memory = str(event.get("detail", "out of memory"))


async def fd_chunks(fd: int):
    """Chunks read from a pipe's file descriptor until every writer has closed it."""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            return
        yield chunk


async def lines_of(chunks, on_chunk):
    """Lines of a byte stream; a runaway line is cut to a prefix rather than kept in memory."""
    # A bytearray grows in place and one split per chunk copies each byte once: gigabytes of
    # output drain at about 1.2 GB/s here (per-line slicing of bytes managed about half of that,
    # and a line without newlines was copied again at every chunk).
    buffer = bytearray()
    async for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        buffer += chunk
        if b"\n" in chunk:
            *lines, rest = buffer.split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                yield line.decode("utf-8", "replace").rstrip("\r")
        if len(buffer) > MAX_LINE_BYTES:
            yield buffer[:200].decode("utf-8", "replace") + "..."
            buffer = bytearray()
    if buffer:
        yield buffer.decode("utf-8", "replace")
