"""`arrl run`: a whole campaign on one machine, every stage a child process.

With no Redis URL it starts a private redis-server inside the run directory (append-only file
on, so `--resume` finds everything again); then the stages and N `rq worker gpu` processes.
The first Ctrl-C stops proposing and lets in-flight experiments finish and be recorded; a
second one, or SIGTERM, stops everything at once (`--resume` re-runs what was interrupted).
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

from arrl.bus import REDIS_ERRORS, Bus
from arrl.campaign import QUEUE_NAME, RUNNING, STOPPED, STOPPING, Campaign, CampaignConfig
from arrl.ledger import RunDir
from arrl.status import one_line, queue_numbers, snapshot
from arrl.terminal import LiveDisplay, live_details
from frozen_env.warm import listening
from pipeline.redis_server import RedisServer

SERIALIZER = "arrl.serialization.MsgpackSerializer"
# A stage or worker that exits is started again, unless it exited this often within the window.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
# How long the first trainers may take to get ready before jobs are proposed anyway.
PREWARM_WAIT_S = 60.0
# How long the other stages may take to start up before the proposer is started anyway.
STAGES_READY_WAIT_S = 60.0


def _die_with_parent() -> None:
    # Its own process group: a Ctrl-C at the terminal reaches `arrl run` alone, which decides
    # (first: stop proposing and let in-flight experiments finish; second: stop everything).
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans if we are killed
    except (OSError, AttributeError):
        pass


def worker_command(url: str, name: str, queues: list[str] | None = None) -> list[str]:
    # `python -m` keeps every child on this interpreter, whatever PATH holds. A short
    # maintenance interval notices a dead worker's jobs within a minute, not ten.
    return [sys.executable, "-m", "rq.cli", "worker", *(queues or [QUEUE_NAME]), "-S", SERIALIZER, "--url", url,
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


class CannotResume(RuntimeError):
    """`arrl run --resume` found no campaign to continue."""


@dataclass
class LocalCampaign:
    run_dir: Path
    redis_url: str | None = None
    workers: int = 1
    out: object = sys.stdout
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    server: RedisServer | None = None
    restarts: dict[str, list[float]] = field(default_factory=dict)

    @staticmethod
    def worker_queues(config: CampaignConfig) -> list[str]:
        # Its class's queue too: other hosts' workers may share this campaign's Redis (`arrl.queues`).
        from workers.experiment import worker_queues

        return worker_queues(config.frozen_profile().device)

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

    async def spawn_all(self, url: str, campaign: Campaign) -> None:
        config = campaign.config
        keys = []
        for i in range(self.workers):
            worker_name = f"{config.campaign_id}-w{i}-{os.getpid()}"
            self.spawn(f"worker-{i}", worker_command(url, worker_name, self.worker_queues(config)))
            if config.warm_executor:
                keys.append(self.prewarm(worker_name, self.processes[f"worker-{i}"].pid, config))
        # Jobs are proposed once the first trainers are ready, or the first ones would start cold.
        deadline = time.monotonic() + PREWARM_WAIT_S
        while keys and not all(map(listening, keys)) and time.monotonic() < deadline:
            await anyio.sleep(0.1)
        stages = self.stage_commands(url, config)
        proposer = stages.pop("proposer")
        for name, command in stages.items():
            self.spawn(name, command)
        # The proposer comes last, once the others have started up. Started all at once on two
        # cores, the first run's speed probe (the speed its score, the baseline's, is compared at)
        # read 0.50-0.77 of the next runs' while the learner loaded its weights, and the keep rule
        # then compared no edit with that score until a re-run (docs/search.md).
        await self.wait_ready(campaign, [self.processes[name] for name in stages])
        self.spawn("proposer", proposer)

    @staticmethod
    async def wait_ready(campaign: Campaign, procs: list[subprocess.Popen]) -> None:
        """Until every one of `procs` has marked itself ready (`Campaign.mark_ready`), one has
        exited (`restart_dead` sees to it later), or `STAGES_READY_WAIT_S` has passed."""
        deadline = time.monotonic() + STAGES_READY_WAIT_S
        while time.monotonic() < deadline and all(proc.poll() is None for proc in procs):
            try:
                if {proc.pid for proc in procs} <= await campaign.ready_pids():
                    return
            except REDIS_ERRORS:
                pass  # restarting: the deadline bounds the wait
            await anyio.sleep(0.1)

    def prewarm(self, worker_name: str, worker_pid: int, config: CampaignConfig) -> str:
        """Start the trainer for a new worker's first job, as each job does for the next one, so
        the first experiment starts warm too; returns its key. It exits with the worker."""
        from frozen_env.runner import trainer_env
        from frozen_env.warm import spawn_warm, warm_key

        profile = config.frozen_profile()
        env = {k: v for k, v in trainer_env(profile).items() if k != "ARRL_T0"}
        key = warm_key(worker_name, profile.name, profile.budget_s)
        spawn_warm(key, worker_pid, env, self.run_dir / "processes" / f"{worker_name}-first-trainer.log")
        return key

    def stage_commands(self, url: str, config: CampaignConfig) -> dict[str, list[str]]:
        return stage_commands(url, config.campaign_id, self.run_dir, config.selfeval, config.strategy == "ppo",
                              config.policy_checkpoint)

    def restart_redis_if_dead(self) -> None:
        """The private redis-server died: start it again, same port and directory (the AOF)."""
        if self.server is not None and (self.server.process is None or self.server.process.poll() is not None):
            try:
                self.server.start()
            except RuntimeError as exc:
                print(f"\nredis-server did not restart: {exc}", file=self.out, flush=True)

    def restart_dead(self, url: str, config: CampaignConfig) -> list[str]:
        """Start again every stage or worker that exited while the campaign runs (a crash, a kill, a
        Redis outage a worker gave up on); returns those that died too often to keep trying."""
        now = time.monotonic()
        given_up = []
        for name, proc in list(self.processes.items()):
            if proc.poll() is None:
                continue
            recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                given_up.append(name)
                continue
            self.restarts[name] = [*recent, now]
            print(f"\n{name} exited with {proc.returncode}; starting it again", file=self.out, flush=True)
            if name.startswith("worker"):
                # A fresh name: the dead worker's may stay registered in Redis for a while.
                count = sum(len(v) for v in self.restarts.values())
                self.spawn(name, worker_command(url, f"{config.campaign_id}-{name}-{os.getpid()}-r{count}",
                                                self.worker_queues(config)))
            else:
                self.spawn(name, self.stage_commands(url, config)[name])
        return given_up

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


async def requeue_orphans(url: str, campaign: Campaign, respect_leases: bool = False) -> list[str]:
    """Jobs left 'started' by workers of an earlier, killed `arrl run` go back to the queue.

    With a private Redis (a new port on every start) no earlier worker can reach it any more,
    so every such job is an orphan. On a shared Redis (`respect_leases`) a job whose lease is
    still renewed has a live process somewhere; the sweeper requeues it if that one dies.
    """
    from rq.job import Job, JobStatus

    from arrl.queues import queue
    from arrl.serialization import MsgpackSerializer
    from pipeline.applier import job_id

    def work() -> list[str]:
        sync = redis.Redis.from_url(url)
        try:
            done = []
            for exp_id in inflight:
                try:
                    job = Job.fetch(job_id(campaign.bus.campaign_id, exp_id), connection=sync,
                                    serializer=MsgpackSerializer)
                except Exception:  # noqa: BLE001 - no job: the sweeper records it after its grace
                    continue
                if job.get_status() != JobStatus.STARTED:
                    continue
                if respect_leases and sync.exists(campaign.bus.lease_key(exp_id)):
                    continue
                # rq 3's started registry holds executions (`StartedJobRegistry.remove` is not
                # implemented there): drop this job's, then queue it again.
                origin = queue(sync, job.origin)  # a class's queue, or the shared one
                with sync.pipeline() as pipe:
                    origin.started_job_registry.remove_executions(job, pipeline=pipe)
                    origin._enqueue_job(job, pipeline=pipe, at_front=True)
                    pipe.execute()
                done.append(exp_id)
            return done
        finally:
            sync.close()

    inflight = await campaign.inflight()
    return await anyio.to_thread.run_sync(work)


async def _final_snapshot(campaign: Campaign, local: LocalCampaign) -> dict:
    for _ in range(20):  # Redis may be restarting right now
        try:
            return await snapshot(campaign)
        except REDIS_ERRORS:
            local.restart_redis_if_dead()
            await anyio.sleep(0.5)
    return await snapshot(campaign)


async def run_local(local: LocalCampaign, config: CampaignConfig | None, target: Path | None,
                    resume: bool = False, interval_s: float = 2.0) -> dict:
    """Start or resume a campaign and supervise it until it stops; returns the final status."""
    url = local.start_redis()
    run_dir = RunDir(local.run_dir)
    if resume:
        saved = run_dir.config()
        try:
            campaign = await Campaign.load(Bus.from_url(url, saved["campaign_id"]))
        except LookupError:
            local.stop_all()
            where = "its Redis data (redis/ in the run directory) is gone" if local.redis_url is None else \
                f"the Redis at {url} does not hold it"
            raise CannotResume(f"{local.run_dir}: campaign {saved['campaign_id']} cannot be resumed: {where}. "
                               "Its recorded experiments stay in ledger.jsonl; start a new campaign") from None
        if config is not None and config.max_experiments:  # a resumed campaign may be extended
            campaign.config.max_experiments = config.max_experiments
            await campaign.bus.put_obj("config", campaign.config.to_dict())
        paused = time.time() - float(saved.get("last_seen", time.time()))
        await campaign.bus.redis.incrbyfloat(campaign.bus.key("paused_s"), max(paused, 0.0))
        if await campaign.state() in (STOPPING, STOPPED):
            counters = await campaign.counters()
            if not campaign.config.max_experiments or counters.get("proposed", 0) < campaign.config.max_experiments:
                await campaign.set_state(RUNNING)
        requeued = await requeue_orphans(url, campaign, respect_leases=local.redis_url is not None)
        if requeued:
            print(f"requeued {len(requeued)} experiment(s) interrupted by the earlier stop: {', '.join(requeued)}",
                  file=local.out, flush=True)
    else:
        assert config is not None and target is not None
        campaign = await new_campaign(url, config, target)
        baseline = await campaign.bus.load_source(campaign.config.baseline_hash) or ""
        run_dir.init(campaign.config.to_dict(), baseline)
    meta = {**campaign.config.to_dict(), "redis_url": url}
    sync = redis.Redis.from_url(url)
    await local.spawn_all(url, campaign)
    interrupts, given_up, stopped_by = 0, [], signal.SIGINT

    def on_sigint(*_: object) -> None:
        nonlocal interrupts
        interrupts += 1

    def on_sigterm(*_: object) -> None:
        # `kill`, a service manager, a CI timeout: stop now, as a second Ctrl-C does, but in order
        # (the run directory says where the campaign stopped, no worker outlives its Redis).
        nonlocal interrupts, stopped_by
        interrupts, stopped_by = max(interrupts, 2), signal.SIGTERM

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    # A progress bar and table redrawn in place on a terminal, plain lines elsewhere; other messages
    # go through it so that they print above the live view instead of being drawn over.
    display = LiveDisplay(local.out)
    local.out = display
    try:
        while True:
            if interrupts >= 2:
                break
            try:
                if interrupts == 1 and await campaign.state() == RUNNING:
                    print("\nstopping: no new proposals; in-flight experiments finish (Ctrl-C again to stop now)",
                          file=local.out, flush=True)
                    await campaign.set_state(STOPPING, "interrupted by the user")
                status = await snapshot(campaign, await anyio.to_thread.run_sync(queue_numbers, sync))
                status.update(await live_details(campaign))
            except (*REDIS_ERRORS, redis.RedisError) as exc:
                print(f"\nredis unavailable ({exc!r}); waiting", file=local.out, flush=True)
                local.restart_redis_if_dead()
                await anyio.sleep(interval_s)
                continue
            display.draw(status)
            (local.run_dir / "campaign.json").write_text(json.dumps({**meta, "last_seen": time.time()}, indent=2))
            if status["state"] == STOPPED:
                break
            given_up = local.restart_dead(url, campaign.config)
            if given_up:
                print(f"\nstage(s) keep exiting: {', '.join(given_up)}; see {local.run_dir}/processes/",
                      file=local.out, flush=True)
                break
            await anyio.sleep(interval_s)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        display.release()  # the last view stays on screen, the summary prints below it
        local.out = display.out
        final = await _final_snapshot(campaign, local)
        if given_up:
            final["stages_exiting"] = given_up
        if interrupts >= 2:
            final["stopped_by_signal"] = stopped_by.name  # in-flight experiments were cut short
        (local.run_dir / "campaign.json").write_text(json.dumps(
            {**meta, "last_seen": time.time(), "state": final["state"], "stop_reason": final["stop_reason"]}, indent=2))
        await campaign.bus.aclose()
        local.stop_all(hard=interrupts >= 2)
    print("\n" + one_line(final), file=local.out, flush=True)
    return final
