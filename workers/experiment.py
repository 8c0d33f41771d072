"""The experiment job that `rq worker gpu` runs: one candidate, start to finish.

`run_experiment(job)` is a plain function (rq calls it in the work horse, a fresh fork per
job) that runs `anyio.run`. It owns the deadline through the frozen runner, streams the
trainer's events to the experiment's Redis stream, honours aborts from the experiment's
control stream, and always publishes a result, whatever happened. Nothing here imports torch:
the parent worker process must never touch CUDA, and the trainer imports torch itself.

Faults: while the job runs it keeps a short-lived lease key alive, so the sweeper learns within
`LEASE_TTL_S` that a job's process died with its worker (rq alone would take minutes). Redis
being unreachable for a while (a restart, a network blip) does not lose the experiment: loss
events are dropped meanwhile (they are only a live view), and the writes that matter (the
result above all) are retried until Redis answers again.

Fairness: a job is refused (status `refused`, with the reason) on a worker whose data
fingerprint or hardware class differs from the campaign's; the first worker's class binds it.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog

from arrl.bus import REDIS_ERRORS, Backoff, Bus
from arrl.campaign import LEASE_RENEW_S, LEASE_TTL_S, QUEUE_NAME, RESULTS, RUNNING, Campaign
from arrl.logs import bind_experiment

log = structlog.get_logger()
T = TypeVar("T")
CONTROL_BLOCK_MS = 500  # a blocking read returns at once when an abort arrives
REDIS_WAIT_S = 120.0  # how long a write that matters (the result) waits for Redis to come back
EVENTS_PAUSE_S = 2.0  # after a failed event publish, drop events this long instead of waiting


def _async_client_like(sync_client):
    """An asyncio client to the same server as rq's own connection (host, socket, auth, db)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    kwargs = sync_client.connection_pool.connection_kwargs
    keep = ("host", "port", "db", "username", "password", "path", "ssl")
    options = {k: kwargs[k] for k in keep if k in kwargs}
    # Short client retries: the job's own loops wait out longer outages (see _retrying).
    common = {"socket_timeout": 30, "socket_connect_timeout": 5,
              "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2)}
    if "path" in options:
        return Redis(unix_socket_path=options.pop("path"), db=options.get("db", 0),
                     password=options.get("password"), **common)
    return Redis(**options, **common)


def workdir_for(campaign_id: str, exp_id: str) -> Path:
    from frozen_env.constants import arrl_home

    return arrl_home() / "work" / campaign_id / exp_id


def local_fingerprint(profile) -> str:
    from frozen_env.data import fingerprint, load_dataset

    return fingerprint(load_dataset().data_sha256, profile)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpu_name() -> str | None:
    """The name of this worker's GPU from `nvidia-smi`: it never initialises CUDA in our process."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [[part.strip() for part in line.split(",", 2)] for line in done.stdout.splitlines() if line.count(",") >= 2]
    if not gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    for index, uuid, name in gpus:
        if visible and visible in (index, uuid):
            return name
    return gpus[0][2]


def hardware_class(device: str) -> str:
    """What results are measured on: the GPU model for a cuda profile, else the CPU model and its
    usable cores (a wall-clock budget buys different work on either)."""
    if device == "cuda":
        return f"cuda:{_gpu_name() or 'unknown'}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu:{_cpu_model()} x{cores}"


def worker_queues(device: str = "") -> list[str]:
    """The queues a worker on this host listens on: its hardware class's own first, then the shared
    one (`arrl.queues`). `device` is the campaign profile's ("cuda" or "cpu"); "" guesses: cuda
    where `nvidia-smi` names a GPU."""
    from arrl.queues import class_queue_name

    device = device or ("cuda" if _gpu_name() else "cpu")
    return [class_queue_name(hardware_class(device)), QUEUE_NAME]


async def _retrying(what: str, call: Callable[[], Awaitable[T]], wait_s: float = REDIS_WAIT_S) -> T:
    """`await call()`, again and again while Redis is unreachable, for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    backoff = Backoff(0.2)
    while True:
        try:
            return await call()
        except REDIS_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("executor.redis_unavailable", what=what, error=repr(exc), retry_in_s=backoff.delay_s)
            await backoff.pause()


async def _keep_lease(bus: Bus, exp_id: str, holder: str, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Renew the job's lease until cancelled; the sweeper reads a missing lease as a dead job."""
    key = bus.lease_key(exp_id)
    started = False
    while True:
        try:
            await bus.redis.set(key, holder, px=int(LEASE_TTL_S * 1000))
        except REDIS_ERRORS as exc:  # Redis away: the lease lasts LEASE_TTL_S; keep trying
            log.warning("executor.lease_not_renewed", error=repr(exc))
        if not started:
            task_status.started()
            started = True
        await anyio.sleep(LEASE_RENEW_S)


def run_experiment(job: dict[str, Any]) -> dict[str, Any]:
    """rq entry point; returns a small plain dict (the full result goes to the results stream)."""
    from rq import get_current_job

    current = get_current_job()
    client = _async_client_like(current.connection) if current is not None else None
    if client is None:
        raise RuntimeError("run_experiment must run inside an rq worker (or pass a client to execute())")
    worker = getattr(current, "worker_name", None) or socket.gethostname()
    # The horse's parent is the worker itself: warm trainers live as long as it does.
    return anyio.run(lambda: execute(client, job, worker=worker, warm_owner=os.getppid()))


async def execute(client, job: dict[str, Any], *, worker: str = "", warm_owner: int | None = None) -> dict[str, Any]:
    """Run one experiment job against `client`; usable directly in tests.

    With `warm_owner` (the worker's pid) and the campaign's `warm_executor` on, the trainer
    prepared during this worker's previous job is adopted, and the next one is started.
    """
    bus = Bus(client, job["campaign_id"], owns_client=True)
    exp_id = job["experiment_id"]
    with bind_experiment(experiment_id=exp_id, stage="executor", campaign_id=job["campaign_id"]):
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(_keep_lease, bus, exp_id, f"{worker}|{socket.gethostname()}|{os.getpid()}")
                try:
                    return await _execute(bus, job, worker, warm_owner)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await bus.aclose()


async def _execute(bus: Bus, job: dict[str, Any], worker: str, warm_owner: int | None) -> dict[str, Any]:
    from frozen_env.gate import device_lock_for
    from frozen_env.runner import RunControl, WarmSlot, run_candidate
    from frozen_env.warm import warm_key

    exp_id = job["experiment_id"]
    campaign = await _retrying("load the campaign", lambda: Campaign.load(bus))
    # Before anything can refuse or fail the job: it no longer waits in the queue, so
    # the proposer must stop counting it as outstanding (or it stalls the campaign).
    await _retrying("mark it started", lambda: campaign.mark_started(exp_id))
    profile = campaign.config.frozen_profile()
    mine_hw = hardware_class(profile.device)
    base = {"experiment_id": exp_id, "proposal": job["proposal"], "candidate_hash": job["candidate_hash"],
            "worker": worker, "host": socket.gethostname(), "started_at": time.time(), "hardware_class": mine_hw}
    reason = ""
    try:
        mine = local_fingerprint(profile)
    except Exception as exc:  # no data prepared on this host: refuse, with the reason
        mine = f"unavailable ({exc})"
    if mine != job["fingerprint"]:
        reason = (f"data fingerprint mismatch: this worker has {mine}, the campaign needs "
                  f"{job['fingerprint']}; run `arrl prepare` with the campaign's data on this host")
    elif campaign.config.hardware_class != "any":
        theirs = await _retrying("bind the hardware class", lambda: campaign.bind_hardware(mine_hw))
        if theirs != mine_hw:
            reason = (f"hardware class mismatch: this worker is {mine_hw!r}, the campaign's results are "
                      f"measured on {theirs!r}; run this worker for another campaign, or start the "
                      f"campaign with --hardware-class any to allow mixing")
    if reason:
        log.error("experiment.refused", reason=reason)
        result = {**base, "status": "refused", "reason": reason, "val_bpb": None, "curve": []}
        await _retrying("publish the result", lambda: bus.publish(RESULTS, "result", result))
        return {"status": "refused", "reason": reason}
    source = await _retrying("load the candidate", lambda: bus.load_source(job["candidate_hash"]))
    if source is None:
        raise LookupError(f"candidate source {job['candidate_hash'][:12]} is missing from Redis")
    workdir = workdir_for(job["campaign_id"], exp_id)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.py").write_text(source)
    # Announced for the self-evaluator, whose consumer group makes sure none is missed.
    await _retrying("announce the start", lambda: bus.publish("started", "started",
                                                                {"experiment_id": exp_id, "budget_s": profile.budget_s,
                                                                 "role": job["proposal"].get("role"),
                                                                 "hardware_class": mine_hw}))
    log.info("experiment.started", worker=worker, workdir=str(workdir), description=job["proposal"].get("description"))
    control = RunControl()
    warm = None
    if warm_owner and campaign.config.warm_executor:
        # Prepare the next trainer while the campaign runs and more jobs will come: one waits in
        # the queue, or the campaign has experiments left to propose (the proposer may simply not
        # have queued the next one yet). Otherwise none is left idle at the campaign's end.
        try:
            limit = campaign.config.max_experiments
            waiting = await campaign.state() == RUNNING and (
                await bus.redis.llen(f"rq:queue:{QUEUE_NAME}") > 0
                or not limit or (await campaign.counters()).get("proposed", 0) < limit)
        except REDIS_ERRORS:
            waiting = False
        warm = WarmSlot(warm_key(worker, profile.name, profile.budget_s), warm_owner, prepare_next=waiting)
    # On a GPU, only one timed training at a time; a second worker on the same GPU prepares
    # (compiles) its candidate meanwhile (frozen_env.gate).
    gate = device_lock_for(profile.device)
    result = await _run_streaming(bus, exp_id, control, lambda on_event: run_candidate(
        workdir / "train.py", profile, workdir, on_event=on_event, control=control, warm=warm, gate=gate))
    result.update(base, finished_at=time.time())
    await _retrying("count busy seconds", lambda: campaign.add_busy_seconds(result["wall_seconds"]))
    finished = {"event": "experiment.finished", "status": result["status"], "val_bpb": result["val_bpb"],
                "reason": result["reason"]}
    await _retrying("announce the end", lambda: bus.publish_event(exp_id, finished))
    await _retrying("publish the result", lambda: bus.publish(RESULTS, "result", result))
    log.info("experiment.finished", status=result["status"], val_bpb=result["val_bpb"],
             reason=result["reason"], training_seconds=result["training_seconds"],
             wall_seconds=result["wall_seconds"])
    tidy_workdir(workdir)
    return {"status": result["status"], "val_bpb": result["val_bpb"]}


def tidy_workdir(workdir: Path) -> None:
    """Keep only the trainer's log (capped by the runner) once the result is published.

    A campaign runs thousands of experiments, and a candidate may write what it likes into its
    working directory (checkpoints, dumps); the script itself is in Redis and the run directory.
    Set ARRL_KEEP_WORKDIRS=1 to keep everything, for debugging.
    """
    if os.environ.get("ARRL_KEEP_WORKDIRS") == "1":
        return
    for entry in workdir.iterdir():
        if entry.name == "train.log":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


async def _run_streaming(bus: Bus, exp_id: str, control, start_run) -> dict[str, Any]:
    """Run the trainer while forwarding its events and watching the control stream."""
    result: dict[str, Any] = {}
    paused_until = 0.0
    dropped = 0

    async def on_event(event: dict[str, Any]) -> None:
        # A live view only: while Redis is away, events are dropped rather than stall the run.
        nonlocal paused_until, dropped
        if time.monotonic() < paused_until:
            dropped += 1
            return
        try:
            await bus.publish_event(exp_id, event)
        except REDIS_ERRORS as exc:
            paused_until = time.monotonic() + EVENTS_PAUSE_S
            dropped += 1
            log.warning("experiment.events_dropped", error=repr(exc), pause_s=EVENTS_PAUSE_S)
        except Exception:  # a malformed event must not end the run either
            dropped += 1
            log.exception("experiment.event_not_published", event=str(event)[:200])

    async def watch_control() -> None:
        nonlocal stop_command
        last = "0"  # from the start: an abort sent before the job began is not lost
        while True:
            try:
                batch = await bus.read_control(exp_id, last, block_ms=CONTROL_BLOCK_MS)
            except REDIS_ERRORS as exc:  # read again when Redis is back: the stream is durable
                log.warning("experiment.control_unavailable", error=repr(exc))
                await anyio.sleep(1.0)
                continue
            for entry_id, message in batch:
                last = entry_id
                if message.get("command") in ("abort", "diverged"):
                    log.info("experiment.abort_received", command=message["command"], reason=message.get("reason"))
                    stop_command = message["command"]
                    control.abort(str(message.get("reason") or "aborted"))
                    return

    stop_command = ""
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_control)
        result = await start_run(on_event)
        tg.cancel_scope.cancel()
    if result["status"] == "aborted" and stop_command == "diverged":
        result["status"] = "diverged"  # the self-evaluator saw the loss explode
    if dropped:
        result["events_dropped"] = dropped
    return result

