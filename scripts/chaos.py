"""Chaos: a real campaign while faults are injected at random moments; nothing may be lost or doubled.

    python scripts/chaos.py                          # 5 minutes, >= 30 faults, 3 workers, smoke profile
    python scripts/chaos.py --minutes 10 --faults 60 --workers 2 --seed 3
    python scripts/chaos.py --run-kills 0            # skip the `arrl run` kill-and-resume phase

Phase 1 starts a private redis-server (append-only file, fsync always), the stages and N
`rq worker gpu` processes of one campaign, and for `--minutes` injects faults of every kind:

    horse           kill -9 of a worker's job process (rq retries the job once)
    worker          kill -9 of a worker's parent process alone (its job process finishes the job)
    worker+horse    kill -9 of a whole worker, job process and trainer included (the sweeper requeues)
    proposer, applier, reward, evaluator
                    kill -9 of a stage, where possible while it holds an unacknowledged message
    redis-restart   redis-server stopped (AOF flushed) for 0.5-5 s, then started again
    redis-crash     redis-server killed with SIGKILL, then started again (fsync always: nothing lost)

Whatever was killed is started again at once (a worker under a new name). Then the campaign is
told to stop, in-flight experiments finish, and the numbers are read back from Redis and the run
directory. Phase 2 (`--run-kills`) runs a small campaign with `arrl run`, kills the whole command
with SIGKILL at random moments, and resumes it with `arrl run --resume` until it finishes.

Printed at the end: faults injected by kind, experiments proposed, recorded, lost (proposed but
never recorded) and duplicated (an id recorded twice anywhere: Redis, ledger.jsonl,
results.tsv, its log); the exit status is 1 if anything was lost or duplicated, or too few faults
were injected. Everything started here is killed before it exits.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgpack
import redis

from arrl.bus import MESSAGE_FIELD
from arrl.campaign import PROPOSALS, RESULTS, STOPPED, STOPPING, TRANSITIONS, CampaignConfig
from arrl.ledger import TSV_HEADER, RunDir
from arrl.messages import decode
from pipeline.launcher import LocalCampaign, new_campaign, worker_command
from pipeline.procs import children, kill9, processes_mentioning
from pipeline.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "target" / "train.py"
STAGE_INPUT = {"applier": (PROPOSALS, "applier"), "reward": (RESULTS, "reward"),
               "evaluator": ("started", "evaluator"), "learner": (TRANSITIONS, "learner")}


def say(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# -- phase 1: one campaign, faults of every kind ----------------------------------------------------------

class Chaos:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.base = base
        (base / "redis").mkdir(parents=True, exist_ok=True)
        self.server = RedisServer(base / "redis", appendonly=True, fsync="always").start()
        self.url = self.server.url
        self.config = CampaignConfig(profile=args.profile, strategy=args.strategy, seed=args.seed,
                                     selfeval=not args.no_selfeval)
        self.local = LocalCampaign(base / "run", redis_url=self.url, workers=args.workers, out=io.StringIO())
        self.sync = redis.Redis.from_url(self.url, socket_timeout=10)
        self.faults: collections.Counter[str] = collections.Counter()
        self.collateral: collections.Counter[str] = collections.Counter()
        self.spawned = 0
        self.expected_dead: set[int] = set()  # pids chaos killed (not collateral)

    # -- set-up and bookkeeping -----------------------------------------------------------------
    def start(self) -> None:
        async def create() -> None:
            campaign = await new_campaign(self.url, self.config, TARGET)
            await campaign.bus.aclose()

        anyio.run(create)
        self.cid = self.config.campaign_id
        RunDir(self.local.run_dir).init(self.config.to_dict(), TARGET.read_text())
        for i in range(self.args.workers):
            self.start_worker(f"worker-{i}")
        for name, command in self.local.stage_commands(self.url, self.config).items():
            self.local.spawn(name, command)

    def start_worker(self, name: str) -> None:
        self.spawned += 1
        self.local.spawn(name, worker_command(self.url, f"{self.cid}-{name}-{self.spawned}"))

    def restart(self, name: str) -> None:
        if name.startswith("worker"):
            self.start_worker(name)
        else:
            self.local.spawn(name, self.local.stage_commands(self.url, self.config)[name])

    def key(self, *parts: str) -> str:
        return ":".join(("arrl", self.cid, *parts))

    def redis_up(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def revive(self) -> None:
        """Start again whatever died without being killed by us (a collateral exit)."""
        if not self.redis_up():
            self.server.start()
        for name, proc in list(self.local.processes.items()):
            if proc.poll() is not None:
                if proc.pid not in self.expected_dead and not self.stopped():
                    self.collateral[name.split("-")[0]] += 1
                    say(f"collateral: {name} exited with {proc.returncode}; starting it again")
                    self.restart(name)

    def stopped(self) -> bool:
        try:
            return self.sync.get(self.key("state")) == STOPPED.encode()
        except redis.RedisError:
            return False

    def pending(self, stream: str, group: str) -> int:
        try:
            return int(self.sync.xpending(self.key(stream), group)["pending"])
        except redis.RedisError:
            return 0

    # -- faults ----------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        kinds = ["horse", "worker", "worker+horse", "proposer", "applier", "reward", "redis-restart",
                 "redis-crash"]
        if "evaluator" in self.local.processes:
            kinds.append("evaluator")
        if "learner" in self.local.processes:
            kinds.append("learner")
        return kinds

    def busy_workers(self) -> list[tuple[str, int]]:
        out = []
        for name, proc in self.local.processes.items():
            if name.startswith("worker") and proc.poll() is None:
                horses = children(proc.pid)
                if horses:
                    out.append((name, horses[0]))
        return out

    def inject(self, kind: str) -> bool:
        """One fault; False when it cannot be injected now (no busy worker)."""
        if kind in ("horse", "worker", "worker+horse"):
            busy = self.busy_workers()
            if not busy:
                return False
            name, horse = self.rng.choice(busy)
            proc = self.local.processes[name]
            if kind in ("horse", "worker+horse"):
                try:
                    os.killpg(horse, signal.SIGKILL)  # the job process and a cold trainer (its group)
                except ProcessLookupError:
                    pass
            if kind in ("worker", "worker+horse"):
                self.expected_dead.add(proc.pid)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                self.restart(name)
        elif kind in ("proposer", "applier", "reward", "evaluator", "learner"):
            if kind in STAGE_INPUT:  # catch it holding a message if one comes within 3 s
                deadline = time.monotonic() + 3
                while self.pending(*STAGE_INPUT[kind]) == 0 and time.monotonic() < deadline:
                    time.sleep(0.002)
            proc = self.local.processes[kind]
            self.expected_dead.add(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            time.sleep(self.rng.uniform(0, 2))
            self.restart(kind)
        elif kind == "redis-restart":
            self.server.stop()
            time.sleep(self.rng.uniform(0.5, 5))
            self.server.start()
        elif kind == "redis-crash":
            self.server.stop(hard=True)
            time.sleep(self.rng.uniform(0.2, 2))
            self.server.start()
        self.faults[kind] += 1
        return True

    def run(self) -> dict[str, Any]:
        args = self.args
        self.start()
        say(f"phase 1: campaign {self.cid}, {args.workers} workers, profile {args.profile}, strategy "
            f"{args.strategy}, run dir {self.local.run_dir}")
        window = args.minutes * 60
        began = time.monotonic()
        mean_gap = window / (args.faults * 1.5)  # aim above the minimum: some faults take seconds
        todo = self.kinds()
        self.rng.shuffle(todo)  # every kind once first, then at random
        next_at = began + min(15.0, mean_gap)  # let the first experiment start
        while True:
            elapsed = time.monotonic() - began
            # The window, stretched by at most half if the minimum number of faults is not reached.
            if elapsed >= window and (sum(self.faults.values()) >= args.faults or elapsed >= 1.5 * window):
                break
            self.revive()
            if time.monotonic() >= next_at:
                kind = todo.pop() if todo else self.rng.choice(self.kinds())
                if self.inject(kind):
                    say(f"fault {sum(self.faults.values()):3d}: {kind}")
                    # On a schedule, not after the fault: a Redis outage or a wait for a message
                    # must not thin the faults out.
                    next_at = max(time.monotonic() + 0.5, next_at + self.rng.uniform(0.3, 1.7) * mean_gap)
                else:
                    todo.append(kind)
                    next_at = time.monotonic() + 1.0
            time.sleep(0.2)
        say(f"faults over; stopping the campaign and letting in-flight experiments finish "
            f"(at most {args.drain_s:.0f} s)")
        self.sync.set(self.key("stop_reason"), "chaos: time is up")
        self.sync.set(self.key("state"), STOPPING)
        deadline = time.monotonic() + args.drain_s
        while not self.stopped() and time.monotonic() < deadline:
            self.revive()
            time.sleep(0.5)
        return self.count()

    # -- counting ----------------------------------------------------------------------------------
    def count(self) -> dict[str, Any]:
        counters = {k.decode(): int(v) for k, v in self.sync.hgetall(self.key("counters")).items()}
        reserved = counters.get("proposed", 0)
        published = collections.Counter(
            decode(f[MESSAGE_FIELD], "proposal")["experiment_id"] for _, f in self.sync.xrange(self.key(PROPOSALS)))
        in_redis = {k.decode() for k in self.sync.hkeys(self.key("ledger"))}
        statuses = collections.Counter(
            msgpack.unpackb(v, raw=False)["status"] for v in self.sync.hvals(self.key("ledger")))
        run_dir = RunDir(self.local.run_dir)
        rows = collections.Counter(r["experiment_id"] for r in run_dir.records())
        tsv = collections.Counter(line.split("\t")[4].split()[0] for line in
                                  (run_dir.path / "results.tsv").read_text()[len(TSV_HEADER):].splitlines())
        logs = {p.stem: [json.loads(x)["event"] for x in p.read_text().splitlines()].count("experiment.recorded")
                for p in run_dir.logs.glob("*.jsonl")}
        proposed = {f"e{i:05d}" for i in range(1, reserved + 1)}
        recorded_everywhere = {i for i in proposed if i in in_redis and rows[i] and tsv[i]}
        duplicated = {i for i in proposed if published[i] > 1 or rows[i] > 1 or tsv[i] > 1 or logs.get(i, 0) > 1}
        attempts = {}
        for exp_id in proposed:
            entries = self.sync.xrange(self.key("exp", exp_id, "events"))
            events = [decode(f[MESSAGE_FIELD], "loss_event")["event"].get("event") for _, f in entries]
            attempts[exp_id] = events.count("harness.ready")
        dead = {s: self.sync.xlen(self.key(s, "dead")) for s in (PROPOSALS, RESULTS, "started")}
        return {"campaign": self.cid, "state": (self.sync.get(self.key("state")) or b"").decode(),
                "proposed": len(proposed), "published": len(published), "recorded": len(recorded_everywhere),
                "lost": sorted(proposed - recorded_everywhere), "duplicated": sorted(duplicated),
                "statuses": dict(statuses), "rerun": sorted(i for i, n in attempts.items() if n > 1),
                "dead_letters": {k: v for k, v in dead.items() if v}, "faults": dict(self.faults),
                "collateral": dict(self.collateral)}

    def close(self) -> None:
        try:
            self.local.stop_all(hard=True)
        finally:
            kill9(*processes_mentioning(self.url, f"/{getattr(self, 'cid', '-')}/"))
            self.sync.close()
            self.server.stop()


# -- phase 2: the whole `arrl run` killed, then resumed --------------------------------------------------

def run_kills(args: argparse.Namespace, base: Path, rng: random.Random) -> dict[str, Any]:
    run_dir = base / "arrl-run"
    arrl = str(Path(sys.executable).parent / "arrl")
    n = args.run_experiments
    first = [arrl, "run", "--profile", args.profile, "--strategy", "random", "--max-experiments", str(n),
             "--workers", "2", "--run-dir", str(run_dir)]
    resume = [arrl, "run", "--resume", str(run_dir)]
    kills, urls, final = 0, set(), None
    deadline = time.monotonic() + args.run_phase_s
    say(f"phase 2: `arrl run` of {n} experiments, killed {args.run_kills} time(s) with SIGKILL and resumed")
    command = first
    while time.monotonic() < deadline:
        with (base / f"arrl-run-{kills}.out").open("wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        command = resume
        try:
            if kills < args.run_kills:
                # Kill at a random moment while experiments run: once a growing number of them has
                # been recorded (so every kill interrupts different work), a few seconds later.
                target = (kills + 1) * n // (args.run_kills + 1)
                while len(RunDir(run_dir).records()) < target and proc.poll() is None \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(rng.uniform(0.5, 4))
                if proc.poll() is None:
                    url = ""
                    try:
                        url = json.loads((run_dir / "campaign.json").read_text())["redis_url"]
                        urls.add(url)
                    except (OSError, ValueError, KeyError):
                        pass
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    say(f"fault: arrl run killed ({kills})")
                    # Its redis-server flushes the AOF and exits (SIGTERM from the kernel); the
                    # resumed run must not open the same files before that.
                    port = url.rsplit(":", 1)[-1].split("/")[0] if url else "?"
                    until = time.monotonic() + 30
                    while processes_mentioning(f"127.0.0.1:{port}", f"--port {port}") and time.monotonic() < until:
                        time.sleep(0.2)
                    continue
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            final = proc.returncode
            break
        except subprocess.TimeoutExpired:
            break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    try:
        urls.add(json.loads((run_dir / "campaign.json").read_text())["redis_url"])
    except (OSError, ValueError, KeyError):
        pass
    kill9(*processes_mentioning(str(run_dir), *urls))
    records = collections.Counter(r["experiment_id"] for r in RunDir(run_dir).records())
    tsv_path = run_dir / "results.tsv"
    tsv = collections.Counter(line.split("\t")[4].split()[0] for line in
                              (tsv_path.read_text()[len(TSV_HEADER):].splitlines() if tsv_path.exists() else []))
    expected = {f"e{i:05d}" for i in range(1, n + 1)}
    return {"kills": kills, "finished": final == 0, "proposed": n,
            "recorded": len({i for i in expected if records[i] and tsv[i]}),
            "lost": sorted(i for i in expected if not (records[i] and tsv[i])),
            "duplicated": sorted(i for i in expected if records[i] > 1 or tsv[i] > 1)}


# -- the report ----------------------------------------------------------------------------------------

def report(one: dict[str, Any], two: dict[str, Any] | None, minimum: int) -> int:
    faults = collections.Counter(one["faults"])
    if two is not None:
        faults["arrl-run-kill"] = two["kills"]
    total = sum(faults.values())
    lost = list(one["lost"]) + ([f"arrl-run:{i}" for i in two["lost"]] if two else [])
    duplicated = list(one["duplicated"]) + ([f"arrl-run:{i}" for i in two["duplicated"]] if two else [])
    print()
    print(f"faults injected: {total}")
    for kind, count in sorted(faults.items()):
        print(f"  {kind:<15} {count}")
    print(f"experiments proposed: {one['proposed']}" + (f" (+{two['proposed']} in phase 2)" if two else ""))
    # "duplicate" is the applier's status for a script identical to an earlier one (no GPU time).
    statuses = ", ".join(f"{'same-script' if k == 'duplicate' else k} {v}" for k, v in sorted(one["statuses"].items()))
    print(f"experiments recorded: {one['recorded']}" + (f" (+{two['recorded']} in phase 2)" if two else "")
          + f"  [{statuses}]")
    print(f"lost: {len(lost)}" + (f"  {lost}" if lost else ""))
    print(f"duplicated: {len(duplicated)}" + (f"  {duplicated}" if duplicated else ""))
    print(f"re-run after a kill (recorded once): {len(one['rerun'])}")
    print(f"campaign state at the end: {one['state']}" + (
        f"; phase 2 finished: {two['finished']}" if two else ""))
    if one["dead_letters"]:
        print(f"dead letters: {one['dead_letters']}")
    if one["collateral"]:
        print(f"collateral exits (started again): {one['collateral']}")
    ok = (not lost and not duplicated and total >= minimum and one["state"] == STOPPED
          and (two is None or two["finished"]))
    print("result:", "PASS" if ok else "FAIL" + ("" if total >= minimum else f" (only {total} faults)"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="how long faults are injected in phase 1 (up to half again if --faults is not reached "
                             "by then); draining and phase 2 add at most --drain-s and --run-phase-s")
    parser.add_argument("--faults", type=int, default=30, help="at least this many faults (phase 1 aims above)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--strategy", default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-selfeval", action="store_true", help="do not run the self-evaluator stage")
    parser.add_argument("--drain-s", type=float, default=240.0, help="at most this long for in-flight work at the end")
    parser.add_argument("--run-kills", type=int, default=2, help="phase 2: kills of `arrl run` (0: skip phase 2)")
    parser.add_argument("--run-experiments", type=int, default=6, help="phase 2: experiments of the small campaign")
    parser.add_argument("--run-phase-s", type=float, default=300.0, help="phase 2: at most this long")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary one)")
    args = parser.parse_args(argv)
    # Quick recovery, inherited by every process started here: a dead job's lease lapses in 8 s,
    # a killed stage's messages are re-claimed after 3 s, a lost proposal after 5 s.
    os.environ.setdefault("ARRL_LEASE_TTL_S", "8")
    os.environ.setdefault("ARRL_CLAIM_IDLE_MS", "3000")
    os.environ.setdefault("ARRL_ABANDONED_AFTER_S", "5")
    tmp = None
    if args.keep:
        base = args.keep
        base.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="arrl-chaos-")
        base = Path(tmp.name)
    started = time.monotonic()
    chaos = Chaos(args, base / "phase1")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        one = chaos.run()
    finally:
        chaos.close()
        signal.signal(signal.SIGTERM, previous)
    two = run_kills(args, base, random.Random(args.seed + 1)) if args.run_kills else None
    say(f"done in {(time.monotonic() - started) / 60:.1f} min")
    status = report(one, two, args.faults)
    if tmp is not None:
        tmp.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
