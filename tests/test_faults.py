"""Faults survived: killed workers, killed stages, a Redis restart, a killed `arrl run`.

Every scenario runs a real campaign (smoke profile: 3 s of training per experiment) with a real
redis-server (append-only file on), the real stage processes and real `rq worker gpu` processes,
injects its fault, and then checks the one property that matters: every proposed experiment is
recorded exactly once (nothing lost, nothing counted twice) and the campaign still stops.

Lease, claim and takeover times are shortened through the environment the stages inherit, so a
dead job is noticed in seconds; the code paths are the production ones.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from envfixtures import TRAIN_PY, prepared_data, redis_url  # noqa: F401
from rq.job import Job
from waiting import wait_until

from arrl.bus import MESSAGE_FIELD
from arrl.campaign import PROPOSALS, RESULTS, STOPPED, CampaignConfig
from arrl.ledger import TSV_HEADER, RunDir
from arrl.messages import decode
from arrl.serialization import MsgpackSerializer
from pipeline.applier import job_id
from pipeline.launcher import LocalCampaign, new_campaign, worker_command
from pipeline.procs import alive, children, kill9, processes_mentioning
from workers.experiment import hardware_class

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Inherited by every stage and worker started here: a dead job's lease is gone in ~6 s, a
# crashed consumer's messages are re-claimed after 1.5 s, an abandoned reservation after 3 s.
FAST_RECOVERY = {"ARRL_LEASE_TTL_S": "6", "ARRL_CLAIM_IDLE_MS": "1500", "ARRL_ABANDONED_AFTER_S": "3"}
CAMPAIGN_TIMEOUT_S = 150.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- one campaign on this machine, its processes started and killed by hand --------------------------


class Cluster:
    """A campaign with its own redis-server (AOF), stages and workers, all killable one by one."""

    def __init__(self, base: Path, experiments: int, selfeval: bool = True) -> None:
        self.local = LocalCampaign(base / "run", workers=0, out=io.StringIO())
        self.url = self.local.start_redis()
        self.config = CampaignConfig(profile="smoke", max_experiments=experiments, strategy="random",
                                     selfeval=selfeval, seed=7)

        async def create() -> None:
            campaign = await new_campaign(self.url, self.config, TRAIN_PY)
            await campaign.bus.aclose()

        anyio.run(create)
        self.cid = self.config.campaign_id
        self.run_dir = RunDir(base / "run")
        self.run_dir.init(self.config.to_dict(), TRAIN_PY.read_text())
        self.sync = redis.Redis.from_url(self.url)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.local.processes

    def start_stages(self) -> None:
        for name, command in self.local.stage_commands(self.url, self.config).items():
            self.local.spawn(name, command)

    def start_worker(self, name: str) -> str:
        worker_name = f"{self.cid}-{name}"
        self.local.spawn(name, worker_command(self.url, worker_name))
        return worker_name

    def restart(self, name: str) -> None:
        self.local.spawn(name, self.local.stage_commands(self.url, self.config)[name])

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def key(self, *parts: str) -> str:
        return ":".join(("arrl", self.cid, *parts))

    def events(self, exp_id: str) -> list[dict[str, Any]]:
        entries = self.sync.xrange(self.key("exp", exp_id, "events"))
        return [decode(fields[MESSAGE_FIELD], "loss_event")["event"] for _, fields in entries]

    def training(self, exp_id: str) -> bool:
        return any(e.get("event") == "train.step" for e in self.events(exp_id))

    def attempts(self, exp_id: str) -> int:
        """How many trainers ran the experiment: each announces itself once."""
        return [e.get("event") for e in self.events(exp_id)].count("harness.ready")

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.sync.hgetall(self.key("counters")).items()}

    def pending(self, stream: str, group: str) -> int:
        try:
            return int(self.sync.xpending(self.key(stream), group)["pending"])
        except redis.ResponseError:
            return 0

    def job(self, exp_id: str) -> Job:
        return Job.fetch(job_id(self.cid, exp_id), connection=self.sync, serializer=MsgpackSerializer)

    def stopped(self) -> bool:
        return self.sync.get(self.key("state")) == STOPPED.encode()

    def wait_stopped(self, timeout_s: float = CAMPAIGN_TIMEOUT_S) -> None:
        try:
            wait_until(self.stopped, timeout_s, "the campaign to stop", interval_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; counters {self.counters()}\n{self.log_tails()}") from None

    def log_tails(self) -> str:
        logs = self.run_dir.path / "processes"
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1200:]}" for p in sorted(logs.glob("*.log")))

    def close(self) -> None:
        self.local.stop_all(hard=True)
        # Orphans of killed workers (their job processes, trainers) mention the URL or the campaign.
        kill9(*processes_mentioning(self.url, f"/{self.cid}/"))
        self.sync.close()


@pytest.fixture
def cluster_factory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                    prepared_data) -> Iterator:  # noqa: F811
    for name, value in FAST_RECOVERY.items():
        monkeypatch.setenv(name, value)
    made: list[Cluster] = []

    def make(experiments: int, **options: Any) -> Cluster:
        made.append(Cluster(tmp_path_factory.mktemp("faults"), experiments, **options))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def check_nothing_lost_or_doubled(cluster: Cluster, n: int) -> dict[str, dict[str, Any]]:
    """Ledger rows == proposals: every id once in Redis, ledger.jsonl, results.tsv and its log."""
    expected = [f"e{i:05d}" for i in range(1, n + 1)]
    counters = cluster.counters()
    assert counters["proposed"] == counters["recorded"] == n, counters
    assert sum(v for k, v in counters.items() if k.startswith("status_")) == n, counters
    assert sorted(k.decode() for k in cluster.sync.hkeys(cluster.key("ledger"))) == expected
    records = cluster.run_dir.records()
    assert sorted(r["experiment_id"] for r in records) == expected, "ledger.jsonl: an id lost or written twice"
    rows = (cluster.run_dir.path / "results.tsv").read_text()[len(TSV_HEADER):].splitlines()
    assert sorted(row.split("\t")[4].split()[0] for row in rows) == expected, "results.tsv: a row lost or doubled"
    for exp_id in expected:
        lines = [json.loads(line) for line in (cluster.run_dir.logs / f"{exp_id}.jsonl").read_text().splitlines()]
        assert [line["event"] for line in lines].count("experiment.recorded") == 1, exp_id
    assert cluster.sync.hlen(cluster.key("inflight")) == 0
    assert cluster.sync.hlen(cluster.key("reserved")) == 0
    return {r["experiment_id"]: r for r in records}


# -- a worker killed ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_its_job_finishes_or_is_rerun_never_lost(cluster_factory) -> None:
    """kill -9 of a worker's parent alone: its job process finishes the experiment and publishes.
    kill -9 of a worker with its job process and trainer: the lease lapses, the sweeper requeues
    the job once, a new worker runs it. Either way every experiment is recorded once."""
    cluster = cluster_factory(3)
    cluster.start_stages()
    name_a = cluster.start_worker("worker-a")
    wait_until(lambda: cluster.training("e00001"), 90, "e00001 to train")
    [horse_a] = children(cluster.procs["worker-a"].pid)
    cluster.kill("worker-a")  # the parent only: its horse goes on
    assert alive(horse_a)
    name_b = cluster.start_worker("worker-b")
    def b_trains_e2() -> bool:
        try:
            return cluster.job("e00002").worker_name == name_b and cluster.training("e00002")
        except Exception:  # noqa: BLE001 - not enqueued yet
            return False

    wait_until(b_trains_e2, 90, "worker-b to train e00002")
    [horse_b] = children(cluster.procs["worker-b"].pid)
    # The whole worker: job process, its process group (a cold trainer) and any adopted trainer.
    os.killpg(horse_b, signal.SIGKILL)
    kill9(*processes_mentioning(f"/{cluster.cid}/e00002/"))
    cluster.kill("worker-b")
    killed_at = time.monotonic()
    cluster.start_worker("worker-c")
    wait_until(lambda: cluster.job("e00002").retries_left == 0, 60, "the sweeper to requeue e00002")
    requeued_after = time.monotonic() - killed_at
    cluster.wait_stopped()

    records = check_nothing_lost_or_doubled(cluster, 3)
    # The orphaned job process of worker-a finished e00001 itself: recorded once, not re-run.
    assert records["e00001"]["worker"] == name_a and records["e00001"]["status"] != "crashed", records["e00001"]
    assert cluster.attempts("e00001") == 1
    # e00002 ran twice (killed, then re-run by worker-c) and was recorded once.
    assert cluster.attempts("e00002") == 2
    assert records["e00002"]["worker"] == f"{cluster.cid}-worker-c", records["e00002"]
    assert requeued_after < 30, f"the dead job was requeued only after {requeued_after:.0f} s"
    assert not alive(horse_a)


# -- each stage killed mid-message --------------------------------------------------------------------


EXPERIMENTS = 6  # results enough for the reward computer to be caught holding one (below)


@pytest.mark.slow
def test_each_stage_killed_mid_message_and_restarted(cluster_factory) -> None:
    """SIGKILL of the reward computer, the applier, the self-evaluator and the proposer, each while
    it holds an unacknowledged message where possible: the restarted copy re-claims it (consumer
    group, XAUTOCLAIM), and no effect happens twice (one job per experiment, one record, one row)."""
    cluster = cluster_factory(EXPERIMENTS)
    cluster.start_stages()
    cluster.start_worker("worker")
    mid_message: dict[str, bool] = {}  # stage -> caught holding a message in at least one of its kills

    def kill_when_pending(stage: str, stream: str, group: str, timeout_s: float) -> None:
        try:
            wait_until(lambda: cluster.pending(stream, group) > 0, timeout_s, f"{stage} to hold a message",
                       interval_s=0.002)
            mid_message[stage] = True
        except AssertionError:
            # Killed all the same, between messages. The reward computer is killed twice, and on a
            # loaded machine one kill can miss its few milliseconds of holding: one catch is enough.
            mid_message.setdefault(stage, False)
        cluster.kill(stage)
        cluster.restart(stage)

    # The evaluator's wait is short: a miss must not outlast the campaign, whose later results are the
    # reward computer's chances to be caught mid-message.
    kill_when_pending("applier", PROPOSALS, "applier", 20)
    kill_when_pending("evaluator", "started", "evaluator", 15)
    kill_when_pending("reward", RESULTS, "reward", 30)
    wait_until(lambda: cluster.counters().get("proposed", 0) >= 3, 60, "a third proposal")
    cluster.kill("proposer")
    cluster.restart("proposer")
    # Its hold lasts milliseconds, so a poll can miss it: try again on each later result until one is
    # caught or the campaign is over (every try kills and restarts it; nothing may be lost either way).
    while not mid_message.get("reward") and not cluster.stopped():
        kill_when_pending("reward", RESULTS, "reward", 10)
    cluster.wait_stopped()

    records = check_nothing_lost_or_doubled(cluster, EXPERIMENTS)
    assert mid_message.get("reward"), "the reward computer was never caught holding a result"
    for exp_id, record in records.items():
        # One job per experiment: a redelivered proposal was not enqueued again.
        ran = cluster.attempts(exp_id)
        assert ran == (0 if record["status"] in ("invalid", "duplicate") else 1), (exp_id, ran, record["status"])
    # Every stage that was killed was running again (and exited cleanly when the campaign stopped).
    stages = ("proposer", "applier", "reward", "evaluator")
    wait_until(lambda: all(cluster.procs[n].poll() is not None for n in stages), 30, "the stages to exit")
    assert {n: cluster.procs[n].returncode for n in stages} == dict.fromkeys(stages, 0), cluster.log_tails()
    print("killed holding a message:", mid_message)


# -- Redis restarted mid-campaign, a worker cut off from it meanwhile -----------------------------------


@pytest.mark.slow
def test_redis_restart_mid_experiment_loses_nothing(cluster_factory) -> None:
    """Redis stopped (its append-only file flushed) for several seconds while an experiment trains,
    then started again: the worker running it goes on, publishes its result when Redis is back,
    every stage rides out the outage, and the campaign finishes with nothing lost."""
    cluster = cluster_factory(3)
    cluster.start_stages()
    worker = cluster.start_worker("worker")
    wait_until(lambda: cluster.training("e00002"), 90, "e00002 to train")
    server = cluster.local.server
    assert server is not None
    server.stop()
    time.sleep(7)  # longer than the job's lease and the clients' own retries
    server.start()
    cluster.wait_stopped()

    records = check_nothing_lost_or_doubled(cluster, 3)
    cut_off = records["e00002"]
    # The worker that was cut off finished the experiment itself and published it: not re-run.
    assert cut_off["worker"] == worker and cut_off["status"] in ("ok", "aborted"), cut_off
    assert cluster.attempts("e00002") == 1
    # Nobody exited during the outage: every process was still the first one started.
    wait_until(lambda: all(p.poll() is not None for n, p in cluster.procs.items() if n != "worker"), 30,
               "the stages to exit")
    assert {n: p.returncode for n, p in cluster.procs.items() if n != "worker"} == dict.fromkeys(
        ("reward", "applier", "proposer", "evaluator"), 0), cluster.log_tails()
    assert cluster.procs["worker"].poll() is None, "the rq worker quit during the outage"
    # Fairness: the campaign's hardware class was bound by the first job, and every record has it.
    mine = hardware_class("cpu")
    assert cluster.sync.get(cluster.key("hardware_class")) == mine.encode()
    assert {r.get("hardware_class") for r in records.values() if r["status"] not in ("invalid", "duplicate")} == {mine}


# -- the whole `arrl run` killed, then resumed -------------------------------------------------------


def start_smoke_run(tmp_path: Path, out_name: str) -> tuple[subprocess.Popen, Path]:
    """`arrl run` of a three-experiment smoke campaign (random strategy) in the background, its
    output in `tmp_path/out_name`; returns it and its run directory."""
    run_dir = tmp_path / "run"
    command = [str(BIN / "arrl"), "run", "--profile", "smoke", "--strategy", "random", "--max-experiments", "3",
               "--run-dir", str(run_dir)]
    with (tmp_path / out_name).open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL), run_dir


def reap_run(proc: subprocess.Popen, url: str) -> None:
    """A test's `arrl run` and whatever still uses its Redis, killed if they are still there."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if url:
        kill9(*processes_mentioning(url))


def test_arrl_run_terminated_stops_every_process_and_records_where_it_stopped(
    tmp_path: Path, prepared_data,  # noqa: F811
) -> None:
    """SIGTERM (`kill`, a service manager) stops `arrl run` as a second Ctrl-C does: in order, so
    its run directory says where the campaign stopped and no worker outlives its Redis."""
    proc, run_dir = start_smoke_run(tmp_path, "run.out")
    url = ""
    try:
        url = wait_until(lambda: redis_url(run_dir), 60, "campaign.json with the redis url")
        wait_until(lambda: (run_dir / "processes" / "proposer.log").exists(), 90, "the proposer to start")
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    finally:
        reap_run(proc, url)
    output = (tmp_path / "run.out").read_text()
    assert returncode == 128 + signal.SIGTERM, output[-3000:]  # as a shell reports a process it stopped
    assert '"stopped_by_signal": "SIGTERM"' in output
    saved = json.loads((run_dir / "campaign.json").read_text())
    assert saved["state"] in ("running", "stopping"), saved  # written on the way out, not by a poll
    assert processes_mentioning(url) == [] and processes_mentioning(str(run_dir)) == []


@pytest.mark.slow
def test_arrl_run_killed_then_resumed_repeats_and_loses_nothing(tmp_path: Path, monkeypatch, prepared_data) -> None:  # noqa: F811
    for name, value in FAST_RECOVERY.items():
        monkeypatch.setenv(name, value)
    first, run_dir = start_smoke_run(tmp_path, "first.out")
    old_url = ""
    try:
        old_url = wait_until(lambda: redis_url(run_dir), 60, "campaign.json with the redis url")
        sync = redis.Redis.from_url(old_url)
        cid = json.loads((run_dir / "campaign.json").read_text())["campaign_id"]

        def training_e2() -> bool:
            entries = sync.xrange(f"arrl:{cid}:exp:e00002:events")
            return any(decode(f[MESSAGE_FIELD], "loss_event")["event"].get("event") == "train.step" for _, f in entries)

        wait_until(training_e2, 120, "e00002 to train")
        sync.close()
        first.send_signal(signal.SIGKILL)
        first.wait()
        port = old_url.rsplit(":", 1)[-1].split("/")[0]
        # Its redis-server flushes the append-only file and exits (it was told so at start).
        wait_until(lambda: not processes_mentioning(f"--port {port}"), 20, "the first redis-server to exit")
        resumed = subprocess.run([str(BIN / "arrl"), "run", "--resume", str(run_dir)], cwd=ROOT, capture_output=True,
                                 text=True, timeout=CAMPAIGN_TIMEOUT_S)
    finally:
        reap_run(first, old_url)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = json.loads(resumed.stdout[resumed.stdout.rfind("\n{\n") + 1:])
    assert final["state"] == STOPPED and final["proposed"] == final["recorded"] == 3, final
    records = RunDir(run_dir).records()
    assert sorted(r["experiment_id"] for r in records) == ["e00001", "e00002", "e00003"]
    rows = (run_dir / "results.tsv").read_text()[len(TSV_HEADER):].splitlines()
    assert sorted(row.split("\t")[4].split()[0] for row in rows) == ["e00001", "e00002", "e00003"]
    assert processes_mentioning(str(run_dir)) == []
