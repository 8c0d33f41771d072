"""The experiment job that `rq worker gpu` runs: one candidate, start to finish.

`run_experiment(job)` is a plain function (rq calls it in the work horse, a fresh fork per
job) that runs `anyio.run`. It owns the deadline through the frozen runner, streams the
trainer's events to the experiment's Redis stream, honours aborts from the experiment's
control stream, and always publishes a result, whatever happened. Nothing here imports torch:
the parent worker process must never touch CUDA, and the trainer imports torch itself.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from arrl.bus import Bus
from arrl.campaign import RESULTS, RUNNING, Campaign
from arrl.logs import bind_experiment

log = structlog.get_logger()
CONTROL_BLOCK_MS = 500  # a blocking read returns at once when an abort arrives


def _async_client_like(sync_client):
    """An asyncio client to the same server as rq's own connection (host, socket, auth, db)."""
    from redis.asyncio import Redis

    kwargs = sync_client.connection_pool.connection_kwargs
    keep = ("host", "port", "db", "username", "password", "path", "ssl")
    options = {k: kwargs[k] for k in keep if k in kwargs}
    if "path" in options:
        return Redis(unix_socket_path=options.pop("path"), db=options.get("db", 0),
                     password=options.get("password"), socket_timeout=30)
    return Redis(**options, socket_timeout=30)


def workdir_for(campaign_id: str, exp_id: str) -> Path:
    from frozen_env.constants import arrl_home

    return arrl_home() / "work" / campaign_id / exp_id


def local_fingerprint(profile) -> str:
    from frozen_env.data import fingerprint, load_dataset

    return fingerprint(load_dataset().data_sha256, profile)


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
    from frozen_env.runner import RunControl, WarmSlot, run_candidate
    from frozen_env.warm import warm_key

    bus = Bus(client, job["campaign_id"], owns_client=True)
    exp_id = job["experiment_id"]
    with bind_experiment(experiment_id=exp_id, stage="executor", campaign_id=job["campaign_id"]):
        try:
            campaign = await Campaign.load(bus)
            # Before anything can refuse or fail the job: it no longer waits in the queue, so
            # the proposer must stop counting it as outstanding (or it stalls the campaign).
            await campaign.mark_started(exp_id)
            base = {"experiment_id": exp_id, "proposal": job["proposal"], "candidate_hash": job["candidate_hash"],
                    "worker": worker, "host": socket.gethostname(), "started_at": time.time()}
            try:
                mine = local_fingerprint(campaign.config.frozen_profile())
            except Exception as exc:  # no data prepared on this host: refuse, with the reason
                mine = f"unavailable ({exc})"
            if mine != job["fingerprint"]:
                reason = (f"data fingerprint mismatch: this worker has {mine}, the campaign needs "
                          f"{job['fingerprint']}; run `arrl prepare` with the campaign's data on this host")
                log.error("experiment.refused", reason=reason)
                result = {**base, "status": "refused", "reason": reason, "val_bpb": None, "curve": []}
                await bus.publish(RESULTS, "result", result)
                return {"status": "refused", "reason": reason}
            source = await bus.load_source(job["candidate_hash"])
            if source is None:
                raise LookupError(f"candidate source {job['candidate_hash'][:12]} is missing from Redis")
            workdir = workdir_for(job["campaign_id"], exp_id)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "train.py").write_text(source)
            profile = campaign.config.frozen_profile()
            # Announced for the self-evaluator, whose consumer group makes sure none is missed.
            await bus.publish("started", "started", {"experiment_id": exp_id, "budget_s": profile.budget_s})
            log.info("experiment.started", worker=worker, workdir=str(workdir), description=job["proposal"].get("description"))
            control = RunControl()
            warm = None
            if warm_owner and campaign.config.warm_executor:
                warm = WarmSlot(warm_key(worker, profile.name, profile.budget_s), warm_owner,
                                prepare_next=await campaign.state() == RUNNING)
            result = await _run_streaming(bus, exp_id, control, lambda on_event: run_candidate(
                workdir / "train.py", profile, workdir, on_event=on_event, control=control, warm=warm))
            result.update(base, finished_at=time.time())
            await campaign.add_busy_seconds(result["wall_seconds"])
            await bus.publish_event(exp_id, {"event": "experiment.finished", "status": result["status"],
                                             "val_bpb": result["val_bpb"], "reason": result["reason"]})
            await bus.publish(RESULTS, "result", result)
            log.info("experiment.finished", status=result["status"], val_bpb=result["val_bpb"],
                     reason=result["reason"], training_seconds=result["training_seconds"],
                     wall_seconds=result["wall_seconds"])
            return {"status": result["status"], "val_bpb": result["val_bpb"]}
        finally:
            with anyio.CancelScope(shield=True):
                await bus.aclose()


async def _run_streaming(bus: Bus, exp_id: str, control, start_run) -> dict[str, Any]:
    """Run the trainer while forwarding its events and watching the control stream."""
    result: dict[str, Any] = {}

    async def on_event(event: dict[str, Any]) -> None:
        await bus.publish_event(exp_id, event)

    async def watch_control() -> None:
        nonlocal stop_command
        last = "0"  # from the start: an abort sent before the job began is not lost
        while True:
            for entry_id, message in await bus.read_control(exp_id, last, block_ms=CONTROL_BLOCK_MS):
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
    return result

