"""The frozen runner: executes one candidate script as a subprocess and decides its status.

The runner, not the candidate, owns the deadline (budget plus grace), the log, and the verdict.
Statuses: ok, crashed, timed_out, diverged, aborted, invalid. It never hangs and never leaves a
process behind: the trainer runs in its own process group, which is killed whatever happens.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from frozen_env import containment
from frozen_env.constants import Profile, arrl_home, get_profile
from frozen_env.gate import DeviceLock
from frozen_env.transcript import Transcript, fd_chunks, lines_of
from frozen_env.warm import AdoptedProcess, adopt, spawn_warm

STATUSES = ("ok", "crashed", "timed_out", "diverged", "aborted", "invalid")
# SIGTERM first so the trainer can flush; SIGKILL if it has not gone after this long.
TERMINATE_GRACE_S = 0.5

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class RunControl:
    """Lets another task abort a running candidate (the self-evaluator, `arrl abort`)."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reason = ""
        self.requested_at: float | None = None

    def abort(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason, self.requested_at = reason, time.monotonic()
            self.event.set()


@dataclass(frozen=True)
class WarmSlot:
    """Where this worker's warm trainer waits, and whether to prepare the next one."""

    key: str
    owner_pid: int
    prepare_next: bool = True


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def trainer_command(script: Path) -> list[str]:
    return [sys.executable, "-u", "-m", "frozen_env.launch", str(script)]


def trainer_env(profile: Profile, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ARRL_BUDGET_S", None)
    if profile.budget_s != get_profile(profile.name).budget_s:
        env["ARRL_BUDGET_S"] = repr(profile.budget_s)
    env.update(
        ARRL_PROFILE=profile.name,
        ARRL_HOME=str(arrl_home()),
        ARRL_T0=repr(time.time()),
        ARRL_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
    )
    # OpenMP threads that spin while waiting lose badly when anything else shares the cores
    # (measured on 2 cores with one other busy process: 39 steps in 30 s instead of 133).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


async def run_candidate(
    script: Path | str,
    profile: Profile | str,
    workdir: Path | str,
    *,
    on_event: EventHandler | None = None,
    control: RunControl | None = None,
    env: dict[str, str] | None = None,
    deadline_s: float | None = None,
    warm: WarmSlot | None = None,
    gate: DeviceLock | None = None,
    memory_cap_mb: int | None = None,
) -> dict[str, Any]:
    """Run `script` under `profile` in `workdir`; return the result as a plain dict.

    `on_event` is awaited for every harness event as it arrives (streaming to Redis);
    `control.abort()` stops the trainer within about TERMINATE_GRACE_S. With `warm`, a trainer
    prepared earlier is adopted when one waits (else it starts cold), and the next one is started.
    With `gate`, the candidate prepares (compiles, warms up) at once but starts its timed training
    only once it holds the device lock (frozen_env.gate); the deadline grows by the wait.
    `memory_cap_mb` (default: containment.memory_cap_mb(), 0 for none) caps the memory of the
    trainer and everything it starts; past it the run is `crashed`, "out of memory: ...".
    """
    profile = get_profile(profile) if isinstance(profile, str) else profile
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = Path(script).resolve()
    control = control or RunControl()
    deadline = profile.deadline_s if deadline_s is None else deadline_s
    # The harness signs its events with this run's key; a line without the signature was written
    # by the candidate itself and gets no credit.
    events_key = secrets.token_hex(16)
    transcript = Transcript(workdir / "train.log", bytes.fromhex(events_key))
    started = time.monotonic()
    timed_out = False
    stopped_at: float | None = None

    # The harness's events travel on their own pipe: what the candidate prints is only its log,
    # so a printed imitation of a result is never taken for one.
    events_read, events_write = os.pipe()
    gate_read, gate_write = os.pipe() if gate is not None else (None, None)
    # Every process the trainer starts inherits this token, whatever session it moves to; the
    # cap is enforced by a watchdog and, on CPU, by RLIMIT_DATA with headroom (frozen_env.containment).
    token = containment.new_token()
    cap = containment.memory_cap_mb() if memory_cap_mb is None else (memory_cap_mb or None)
    if cap and profile.device == "cpu":
        env = {**(env or {}), containment.DATA_LIMIT_VAR: str(containment.data_limit_mb(cap))}
    disk_cap = containment.disk_cap_mb()
    if disk_cap:
        env = {**(env or {}), containment.FILE_LIMIT_VAR: str(disk_cap)}
    process: Any = None
    if warm is not None:
        adopted = await anyio.to_thread.run_sync(adopt, warm.key, script, workdir, trainer_env(profile, env),
                                                 events_write, gate_read, events_key)
        if adopted is not None:
            process = AdoptedProcess(*adopted)
            token = containment.token_of(process.pid) or token  # tagged when it was started
    mode = "warm" if process is not None else "cold"
    if process is None:
        key_read, key_write = os.pipe()  # the key goes through a pipe the launcher reads and closes
        os.write(key_write, events_key.encode())
        os.close(key_write)
        fds = {"ARRL_EVENTS_FD": events_write, "ARRL_KEY_FD": key_read, **({"ARRL_GATE_FD": gate_read} if gate_read is not None else {})}
        try:
            process = await anyio.open_process(
                trainer_command(script), cwd=workdir,
                env=containment.tag(trainer_env(profile, {**(env or {}), **{k: str(v) for k, v in fds.items()}}), token),
                stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,  # one ordered stream for the log
                start_new_session=True,  # its own process group, so grandchildren die with it
                pass_fds=tuple(fds.values()),
            )
        finally:
            os.close(key_read)
    os.close(events_write)
    if gate_read is not None:
        os.close(gate_read)
    pid = process.pid
    watchdog = containment.MemoryWatchdog(pid, token, cap, workdir, disk_cap)
    next_pending = warm is not None and warm.prepare_next

    def prepare_next() -> None:
        """The next experiment's trainer gets ready while this one trains: started once this one's
        clock has started (or it ended before that), so that its start-up (importing torch,
        loading the data) does not share the CPU with this run's warm-up and speed probe
        (`frozen_env.harness.machine_gflops`); a 30 s budget leaves it ample time."""
        nonlocal next_pending
        if next_pending and warm is not None:
            next_pending = False
            spawn_warm(warm.key, warm.owner_pid, {k: v for k, v in trainer_env(profile, env).items() if k != "ARRL_T0"},
                       workdir / "next-trainer.log")

    async def stop() -> None:
        nonlocal stopped_at
        # Shielded: the trainer exiting on its own meanwhile cancels the other tasks, and a
        # half-done stop would leave the abort's latency unmeasured.
        with anyio.CancelScope(shield=True):
            _kill_group(pid, signal.SIGTERM)
            with anyio.move_on_after(TERMINATE_GRACE_S):
                await process.wait()
            _kill_group(pid, signal.SIGKILL)
            await process.wait()
            stopped_at = time.monotonic()  # the trainer is gone: what an abort's latency measures

    async def read_log() -> None:
        async for line in lines_of(process.stdout, transcript.write_log):
            transcript.log_line(line)

    gate_wait_s: float | None = None
    gate_requested = False

    async def open_gate() -> None:
        nonlocal gate_wait_s
        # Waiting for the device is not the candidate's time: its deadline stops meanwhile. The
        # wait is bounded all the same, by the deadline of the run that holds the device.
        remaining = deadline_scope.deadline - anyio.current_time()
        deadline_scope.deadline = math.inf
        gate_wait_s = await gate.acquire()
        deadline_scope.deadline = anyio.current_time() + remaining
        os.write(gate_write, b"g")

    async def read_events(tasks: anyio.abc.TaskGroup) -> None:
        nonlocal gate_requested
        async for line in lines_of(fd_chunks(events_read), None):
            event = transcript.parse_event(line)
            if event is not None:
                transcript.write_log((line + "\n").encode())  # the log keeps the whole story
                if gate is not None and event["event"] == "train.gate" and not gate_requested:
                    gate_requested = True
                    tasks.start_soon(open_gate)
                elif gate is not None and event["event"] == "summary":
                    gate.release()  # evaluated: the next candidate may start its clock
                if event["event"] == "train.clock_started":
                    prepare_next()
                if on_event is not None:
                    await on_event(event)

    async def read_output() -> None:
        async with anyio.create_task_group() as both:
            both.start_soon(read_log)
            both.start_soon(read_events, both)

    async def watch_abort(scope: anyio.CancelScope) -> None:
        await control.event.wait()
        await stop()
        scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_abort, tg.cancel_scope)
            tg.start_soon(watchdog.run)
            with anyio.move_on_after(deadline) as deadline_scope:
                async with anyio.create_task_group() as reading:
                    reader_done = anyio.Event()

                    async def read_all() -> None:
                        await read_output()
                        reader_done.set()

                    reading.start_soon(read_all)
                    await process.wait()
                    # The trainer has exited; whatever it left behind may hold the pipe open, so
                    # drain briefly, then kill the group and stop reading.
                    with anyio.move_on_after(1.0):
                        await reader_done.wait()
                    _kill_group(pid, signal.SIGKILL)
                    watchdog.kill_escaped()  # those that left the group may hold the pipe
                    with anyio.move_on_after(1.0):
                        await reader_done.wait()
                    reading.cancel_scope.cancel()
            if deadline_scope.cancelled_caught:
                timed_out = True
                await stop()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            _kill_group(pid, signal.SIGKILL)  # whatever the candidate spawned goes too
            watchdog.kill_escaped()  # and whatever left the group (setsid, double fork)
            if process.returncode is None:
                with anyio.move_on_after(5):
                    await process.wait()
            await process.aclose()
            os.close(events_read)
            transcript.log.close()
            if gate is not None:
                gate.release()
                os.close(gate_write)
            prepare_next()  # a run that ended before its clock started

    wall = time.monotonic() - started
    returncode = process.returncode if mode == "cold" else transcript.exit_code
    result = _verdict(transcript, profile, returncode, wall, timed_out, control, stopped_at, workdir,
                      exit_unknown_ok=mode == "warm")
    result["trainer"] = mode
    out_of_memory = watchdog.exceeded or (transcript.out_of_memory and containment.oom_reason(
        transcript.out_of_memory, cap, profile.device))
    if out_of_memory and result["status"] != "aborted":
        result.update(status="crashed", reason=out_of_memory, val_bpb=None)
        if "log_tail" in result:
            result["traceback"] = result.pop("log_tail")
    result["memory_cap_mb"] = cap
    result["memory_peak_mb"] = round(watchdog.peak_mb, 1)  # the whole tree's, as the watchdog sampled it
    result["gate_wait_seconds"] = None if gate_wait_s is None else round(gate_wait_s, 4)
    result["training_started_at"] = transcript.training_started_at
    result["training_ended_at"] = transcript.training_ended_at
    result["startup_seconds"] = (transcript.ready or {}).get("startup_seconds")
    result["machine_gflops"] = transcript.machine_gflops
    return result


def overrun_allowed(profile: Profile) -> float:
    """How far past its budget a run may train: the step under way when time is up finishes."""
    return max(2.0, 0.1 * profile.budget_s)


def _verdict(t: Transcript, profile: Profile, returncode: int | None, wall: float, timed_out: bool,
             control: RunControl, stopped_at: float | None, workdir: Path,
             exit_unknown_ok: bool = False) -> dict[str, Any]:
    summary = t.summary or {}
    last = t.last_step or {}
    result: dict[str, Any] = {
        "status": "crashed",
        "reason": "",
        "val_bpb": None,
        "profile": profile.name,
        "budget_s": profile.budget_s,
        "training_seconds": summary.get("training_seconds", last.get("training_seconds", 0.0)),
        "total_seconds": summary.get("total_seconds"),
        "wall_seconds": round(wall, 3),
        "steps": summary.get("num_steps", (last.get("step", -1) + 1) if last else 0),
        "tokens": summary.get("total_tokens", last.get("tokens", 0)),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "num_params": summary.get("num_params"),
        "device": summary.get("device") or (t.ready or {}).get("device"),
        "fingerprint": (t.ready or {}).get("fingerprint"),
        "exit_code": returncode,
        "curve": t.curve,
        "output_bytes": t.output_bytes,
        "log_path": str(workdir / "train.log"),
        "log_tail": "\n".join(t.tail),
    }
    val_bpb = summary.get("val_bpb")
    if control.event.is_set():
        latency = None if stopped_at is None or control.requested_at is None else stopped_at - control.requested_at
        result.update(status="aborted", reason=control.reason, abort_latency_s=latency)
    elif timed_out:
        result.update(status="timed_out", reason=f"no exit within the deadline of {wall:.0f} s (budget plus grace)")
    elif t.diverged:
        result.update(status="diverged", reason=t.diverged)
    elif t.summary is not None and not (isinstance(val_bpb, int | float) and math.isfinite(val_bpb)):
        result.update(status="diverged", reason=f"val_bpb is {val_bpb}")
    elif t.violations:
        result.update(status="invalid", reason=f"integrity: {t.violations[0]}")
    elif t.forged:
        kinds = ", ".join(sorted(set(t.forged)))
        result.update(status="invalid", reason=f"fake result: wrote unsigned lines on the harness's channel ({kinds})")
    elif t.fakes and t.summary is None:
        result.update(status="invalid", reason=f"fake result: {t.fakes[0]}")
    elif t.summary is not None and (returncode == 0 or (returncode is None and exit_unknown_ok)):
        if t.fakes or any(abs(v - float(val_bpb)) > 1e-5 for v in t.printed_bpb):
            why = t.fakes[0] if t.fakes else f"printed val_bpb {t.printed_bpb[0]} but the harness measured {val_bpb:.6f}"
            result.update(status="invalid", reason=f"fake result: {why}")
        elif summary.get("causal") is False:
            result.update(status="invalid", reason="the model's predictions depend on future tokens")
        elif summary.get("profile") != profile.name:
            result.update(status="invalid", reason="the summary is for another profile")
        elif float(summary.get("training_seconds") or 0.0) > profile.budget_s + overrun_allowed(profile):
            result.update(status="invalid", reason=(
                f"trained {float(summary['training_seconds']):.1f} s, over the budget of {profile.budget_s:g} s "
                f"(the last step may overrun it by {overrun_allowed(profile):.1f} s)"))
        else:
            result.update(status="ok", val_bpb=float(val_bpb))
    else:
        last_line = next((line for line in reversed(t.tail) if line.strip()), "")
        why = last_line.strip() if last_line else "no output"
        if t.summary is not None:
            why = f"exit code {returncode} after the summary: {why}"
        elif returncode == 0:
            why = "exited without calling harness.finish()"
        result.update(status="crashed", reason=why[:500], traceback=result.pop("log_tail"))
    return result
