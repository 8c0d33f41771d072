"""`arrl run`: a whole campaign on one machine, every stage a child process.

With no Redis URL it starts a private redis-server inside the run directory (append-only file
on, so `--resume` finds everything again); then the stages and N `rq worker gpu` processes.
The first Ctrl-C stops proposing and lets in-flight experiments finish and be recorded; a
second one stops everything at once (`--resume` re-runs what was interrupted).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import redis

from arrl.bus import Bus
from arrl.campaign import QUEUE_NAME, RUNNING, STOPPED, STOPPING, Campaign, CampaignConfig
from arrl.ledger import RunDir
from arrl.status import one_line, queue_numbers, snapshot
from pipeline.redis_server import RedisServer

SERIALIZER = "arrl.serialization.MsgpackSerializer"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans if we are killed
    except (OSError, AttributeError):
        pass


def worker_command(url: str, name: str) -> list[str]:
    # `python -m` keeps every child on this interpreter, whatever PATH holds. A short
    # maintenance interval notices a dead worker's jobs within a minute, not ten.
    return [sys.executable, "-m", "rq.cli", "worker", QUEUE_NAME, "-S", SERIALIZER, "--url", url,
            "--name", name, "--maintenance-interval", "30"]


def stage_commands(url: str, campaign_id: str, run_dir: Path, selfeval: bool = False, learner: bool = False,
                   checkpoint: str = "") -> dict[str, list[str]]:
    common = ["--redis-url", url, "--campaign", campaign_id]
    stage = [sys.executable, "-m", "pipeline.stages"]
    stages = {
        "reward": [*stage, "reward", *common, "--run-dir", str(run_dir)],
        "applier": [*stage, "applier", *common],
        "proposer": [*stage, "proposer", *common],
    }
    if selfeval:
        stages["evaluator"] = [*stage, "evaluator", *common]
    if learner:
        stages["learner"] = [sys.executable, "-m", "pipeline.learner", *common, "--run-dir", str(run_dir)]
        if checkpoint:
            stages["learner"] += ["--checkpoint", checkpoint]
    return stages


async def new_campaign(bus_url: str, config: CampaignConfig, target: Path) -> Campaign:
    from arrl.patch import check_candidate, content_hash
    from frozen_env.data import fingerprint, load_dataset

    source = target.read_text()
    check_candidate(source)
    config.fingerprint = fingerprint(load_dataset().data_sha256, config.frozen_profile())
    bus = Bus.from_url(bus_url, config.campaign_id)
    return await Campaign.create(bus, config, source, content_hash(source))


@dataclass
class LocalCampaign:
    run_dir: Path
    redis_url: str | None = None
    workers: int = 1
    out: object = sys.stdout
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    server: RedisServer | None = None

    def start_redis(self) -> str:
        if self.redis_url:
            return self.redis_url
        self.server = RedisServer(self.run_dir / "redis", appendonly=True, fsync="everysec", die_with_parent=True)
        (self.run_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.server.start()
        return self.server.url

    def spawn(self, name: str, command: list[str]) -> None:
        log_dir = self.run_dir / "processes"
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def spawn_all(self, url: str, config: CampaignConfig) -> None:
        campaign_id = config.campaign_id
        for i in range(self.workers):
            self.spawn(f"worker-{i}", worker_command(url, f"{campaign_id}-w{i}-{os.getpid()}"))
        stages = stage_commands(url, campaign_id, self.run_dir, config.selfeval, config.strategy == "ppo",
                                config.policy_checkpoint)
        for name, command in stages.items():
            self.spawn(name, command)

    def stop_all(self, hard: bool = False) -> None:
        # rq: SIGTERM is a warm shutdown (finish the job), a second signal a cold one.
        for name, proc in self.processes.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if name.startswith("worker") else signal.SIGTERM)
                if hard and name.startswith("worker"):
                    time.sleep(0.1)
                    proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + (10 if hard else 60)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.server is not None:
            self.server.stop()


async def requeue_orphans(url: str, campaign: Campaign) -> list[str]:
    """Jobs left 'started' by workers of an earlier, killed `arrl run` go back to the queue."""
    from rq import Queue
    from rq.job import Job
    from rq.registry import StartedJobRegistry

    from arrl.serialization import MsgpackSerializer
    from pipeline.applier import job_id

    def work() -> list[str]:
        sync = redis.Redis.from_url(url)
        queue = Queue(QUEUE_NAME, connection=sync, serializer=MsgpackSerializer)
        started = StartedJobRegistry(queue=queue)
        ids = set(started.get_job_ids())
        done = []
        for exp_id in inflight:
            jid = job_id(campaign.bus.campaign_id, exp_id)
            if jid in ids:
                job = Job.fetch(jid, connection=sync, serializer=MsgpackSerializer)
                started.remove(job)
                queue.enqueue_job(job)
                done.append(exp_id)
        return done

    inflight = await campaign.inflight()
    return await anyio.to_thread.run_sync(work)


async def run_local(local: LocalCampaign, config: CampaignConfig | None, target: Path | None,
                    resume: bool = False, interval_s: float = 2.0) -> dict:
    """Start or resume a campaign and supervise it until it stops; returns the final status."""
    url = local.start_redis()
    run_dir = RunDir(local.run_dir)
    if resume:
        saved = run_dir.config()
        campaign = await Campaign.load(Bus.from_url(url, saved["campaign_id"]))
        if config is not None and config.max_experiments:  # a resumed campaign may be extended
            campaign.config.max_experiments = config.max_experiments
            await campaign.bus.put_obj("config", campaign.config.to_dict())
        paused = time.time() - float(saved.get("last_seen", time.time()))
        await campaign.bus.redis.incrbyfloat(campaign.bus.key("paused_s"), max(paused, 0.0))
        if await campaign.state() in (STOPPING, STOPPED):
            counters = await campaign.counters()
            if not campaign.config.max_experiments or counters.get("proposed", 0) < campaign.config.max_experiments:
                await campaign.set_state(RUNNING)
        await requeue_orphans(url, campaign)
    else:
        assert config is not None and target is not None
        campaign = await new_campaign(url, config, target)
        baseline = await campaign.bus.load_source(campaign.config.baseline_hash) or ""
        run_dir.init(campaign.config.to_dict(), baseline)
    meta = {**campaign.config.to_dict(), "redis_url": url}
    sync = redis.Redis.from_url(url)
    local.spawn_all(url, campaign.config)
    interrupts = 0

    def on_sigint(*_: object) -> None:
        nonlocal interrupts
        interrupts += 1

    previous = signal.signal(signal.SIGINT, on_sigint)
    tty = hasattr(local.out, "isatty") and local.out.isatty()
    try:
        while True:
            if interrupts == 1 and await campaign.state() == RUNNING:
                print("\nstopping: no new proposals; in-flight experiments finish (Ctrl-C again to stop now)",
                      file=local.out, flush=True)
                await campaign.set_state(STOPPING, "interrupted by the user")
            if interrupts >= 2:
                break
            status = await snapshot(campaign, await anyio.to_thread.run_sync(queue_numbers, sync))
            print(("\r" if tty else "") + one_line(status) + ("" if tty else "\n"), end="", file=local.out, flush=True)
            (local.run_dir / "campaign.json").write_text(json.dumps({**meta, "last_seen": time.time()}, indent=2))
            if status["state"] == STOPPED:
                break
            dead = [n for n, p in local.processes.items() if p.poll() is not None and not n.startswith("worker")]
            if dead:
                print(f"\nstage(s) exited unexpectedly: {', '.join(dead)}; see {local.run_dir}/processes/",
                      file=local.out, flush=True)
                break
            await anyio.sleep(interval_s)
    finally:
        signal.signal(signal.SIGINT, previous)
        final = await snapshot(campaign)
        (local.run_dir / "campaign.json").write_text(json.dumps(
            {**meta, "last_seen": time.time(), "state": final["state"], "stop_reason": final["stop_reason"]}, indent=2))
        await campaign.bus.aclose()
        local.stop_all(hard=interrupts >= 2)
    print("\n" + one_line(final), file=local.out, flush=True)
    return final
