"""Pipeline benchmark: worker duty cycle and idle gaps, edge latencies, loss-event throughput.

    python scripts/bench_pipeline.py edges                       # message latency per edge
    python scripts/bench_pipeline.py campaign --profile smoke -n 6   # duty cycle of a real campaign
    python scripts/bench_pipeline.py campaign --run-dir runs/X   # analyse a finished run instead
    python scripts/bench_pipeline.py executors --profile cpu -n 6   # cold against warm executor
    python scripts/bench_pipeline.py executors --profile gpu --budget-s 60 -n 5 --modes cold,warm,gated

The `executors` part runs the same workload in each mode in one go, first with cold trainers
(every experiment starts Python, imports torch and loads data), then warm ones (the next trainer
is prepared while the current one trains), and on a GPU `gated`: warm trainers and two workers on
the one device behind the device gate (frozen_env.gate), so the next candidate is compiled and
warmed up while the current one trains. It prints them side by side. The workload is the
baseline script repeated, so the experiments are identical and their steps per second show the
slowdown that preparing the next one causes in the running one.

Duty cycle: training seconds (the harness's clock) over the wall time from the first experiment's
start to the last one's end, per device. Idle gap: from one experiment's end to the next one's
start on the same worker. Between trainings: from one training clock's stop to the next one's
start on the device. Everything runs against a private redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def duty_cycle(records: list[dict]) -> dict:
    """Per-worker duty cycle and idle gaps from a ledger's executor timestamps."""
    by_worker: dict[str, list[dict]] = {}
    for r in records:
        if r.get("started_at") and r.get("finished_at"):
            by_worker.setdefault(r.get("worker") or "?", []).append(r)
    out = {}
    for worker, runs in by_worker.items():
        runs.sort(key=lambda r: r["started_at"])
        wall = runs[-1]["finished_at"] - runs[0]["started_at"]
        training = sum(float(r.get("training_seconds") or 0.0) for r in runs)
        gaps = [b["started_at"] - a["finished_at"] for a, b in zip(runs, runs[1:], strict=False)]
        overhead = [r["wall_seconds"] - float(r.get("training_seconds") or 0.0) for r in runs if r.get("wall_seconds")]
        out[worker] = {
            "experiments": len(runs), "wall_s": wall, "training_s": training,
            "duty_cycle": training / wall if wall > 0 else float("nan"),
            "idle_gap_median_s": statistics.median(gaps) if gaps else float("nan"),
            "idle_gap_p95_s": percentile(gaps, 95),
            "per_run_overhead_median_s": statistics.median(overhead) if overhead else float("nan"),
        }
    return out


def run_campaign(profile: str, n: int, workers: int, extra: list[str], env: dict[str, str] | None = None) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-")) / "run"
    cmd = [sys.executable, "-m", "arrl.cli", "run", "--profile", profile, "--max-experiments", str(n),
           "--workers", str(workers), "--run-dir", str(run_dir), *extra]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return run_dir


def steps_per_second(records: list[dict]) -> float:
    rates = [r["steps"] / r["training_seconds"] for r in records if r.get("training_seconds") and r.get("steps")]
    return statistics.median(rates) if rates else float("nan")


def device_cycle(records: list[dict], steady: bool = False) -> dict:
    """The device's view, whatever the number of workers: training seconds over the wall time from
    the first experiment's start to the last one's end, and the untimed span between one
    experiment's training clock stopping and the next one's starting (its evaluation, the hand-off,
    and whatever of the next start-up was not hidden).

    `steady` leaves the first experiment out (its trainer always starts cold, its candidate
    compiles from an empty cache): the window then opens when the first one has been evaluated.
    """
    runs = sorted((r for r in records if r.get("training_started_at") and r.get("training_ended_at")),
                  key=lambda r: r["training_started_at"])
    if len(runs) < 2:
        return {"duty_cycle": float("nan"), "between_median_s": float("nan"), "between_p95_s": float("nan")}
    opened = runs[0]["training_ended_at"] if steady else min(r["started_at"] for r in runs)
    counted = runs[1:] if steady else runs
    wall = max(r["finished_at"] for r in runs) - opened
    training = sum(float(r.get("training_seconds") or 0.0) for r in counted)
    between = [b["training_started_at"] - (a["training_started_at"] + float(a.get("training_seconds") or 0.0))
               for a, b in zip(runs, runs[1:], strict=False)]
    return {"duty_cycle": training / wall if wall > 0 else float("nan"),
            "between_median_s": statistics.median(between), "between_p95_s": percentile(between, 95)}


def preparation_slowdown(records: list[dict]) -> float:
    """Steps per second of runs whose training overlapped another run's preparation (start-up,
    compilation, warm-up steps) against runs that trained alone, within one campaign."""
    def preparing(r: dict) -> tuple[float, float]:
        return r["started_at"], r["training_started_at"] - float(r.get("gate_wait_seconds") or 0.0)

    alone, disturbed = [], []
    runs = [r for r in records if r.get("training_started_at") and r.get("steps") and r.get("training_seconds")]
    for r in runs:
        t0, t1 = r["training_started_at"], r["training_started_at"] + r["training_seconds"]
        overlap = any(o is not r and preparing(o)[0] < t1 and preparing(o)[1] > t0 for o in runs)
        (disturbed if overlap else alone).append(r["steps"] / r["training_seconds"])
    if not alone or not disturbed:
        return float("nan")
    return 1 - statistics.median(disturbed) / statistics.median(alone)


# Each mode: (workers, arrl run flags, environment). `gated` is the warm executor with two workers
# on one device behind the device gate (frozen_env.gate): one compiles and warms up its candidate
# while the other trains, and only one trains at a time.
MODES = {
    "cold": (1, ["--no-warm"], {"ARRL_DEVICE_LOCK": "off"}),
    "warm": (1, ["--warm"], {"ARRL_DEVICE_LOCK": "off"}),
    "gated": (2, ["--warm"], {"ARRL_DEVICE_LOCK": "on"}),
}


def cmd_executors(args: argparse.Namespace) -> None:
    budget = ["--budget-s", str(args.budget_s)] if args.budget_s else []
    common = ["--strategy", "random", "--baseline-repeats", str(args.n), "--no-selfeval", *budget]
    rows = {}
    for mode in args.modes.split(","):
        workers, flags, env = MODES[mode]
        run_dir = run_campaign(args.profile, args.n, workers, [*flags, *common], env)
        records = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]
        # Per worker (the idle gap: one job's end to the same worker's next start).
        per_worker = list(duty_cycle(records).values())
        gaps = [s["idle_gap_median_s"] for s in per_worker if s["experiments"] > 1] or [float("nan")]
        device = device_cycle(records)
        steady = device_cycle(records, steady=True)
        rows[mode] = {"workers": workers, "duty_cycle": device["duty_cycle"], "steady_duty_cycle": steady["duty_cycle"],
                      "idle_gap_median_s": statistics.median(gaps),
                      "idle_gap_p95_s": max((s["idle_gap_p95_s"] for s in per_worker if s["experiments"] > 1),
                                            default=float("nan")),
                      "between_trainings_median_s": device["between_median_s"],
                      "between_trainings_p95_s": device["between_p95_s"],
                      "per_run_overhead_median_s": statistics.median(s["per_run_overhead_median_s"] for s in per_worker),
                      "steps_per_s": steps_per_second(records),
                      "slowdown_while_preparing": preparation_slowdown(records), "run_dir": str(run_dir)}
    print(f"profile {args.profile}, {args.n} identical experiments per mode (the baseline, repeated)")
    print(f"{'executor':<8} {'workers':>7} {'duty':>6} {'duty(steady)':>12} {'gap p50':>8} {'gap p95':>8} "
          f"{'between p50':>11} {'between p95':>11} {'steps/s':>8}")
    for mode, s in rows.items():
        print(f"{mode:<8} {s['workers']:>7} {s['duty_cycle']:>6.3f} {s['steady_duty_cycle']:>12.3f} "
              f"{s['idle_gap_median_s']:>8.2f} {s['idle_gap_p95_s']:>8.2f} {s['between_trainings_median_s']:>11.2f} "
              f"{s['between_trainings_p95_s']:>11.2f} {s['steps_per_s']:>8.2f}")
    base = rows.get("cold")
    for mode in rows:
        if base and mode != "cold":
            slowdown = 1 - rows[mode]["steps_per_s"] / base["steps_per_s"]
            print(f"slowdown of the running experiment ({mode} against cold, steps per second): {slowdown:+.1%}")
    for mode, s in rows.items():
        if s["slowdown_while_preparing"] == s["slowdown_while_preparing"]:  # not NaN
            print(f"{mode}: runs that trained while another prepared, against runs that trained alone "
                  f"(same campaign, steps per second): {s['slowdown_while_preparing']:+.1%}")
    print("duty: the device's training seconds over wall seconds (first start to last end); steady: "
          "without the first experiment, from its evaluation's end; gap: a worker's idle time between jobs; "
          "between: from one training clock's stop to the next one's start on the device")
    print(json.dumps(rows, indent=2))


def cmd_campaign(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir) if args.run_dir else run_campaign(args.profile, args.n, args.workers, args.extra)
    records = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]
    stats = duty_cycle(records)
    print(f"run directory: {run_dir}")
    print(f"{'worker':<40} {'runs':>4} {'duty':>6} {'gap p50':>8} {'gap p95':>8} {'overhead/run':>12}")
    for worker, s in stats.items():
        print(f"{worker[-40:]:<40} {s['experiments']:>4} {s['duty_cycle']:>6.3f} {s['idle_gap_median_s']:>8.2f} "
              f"{s['idle_gap_p95_s']:>8.2f} {s['per_run_overhead_median_s']:>12.2f}")
    print(json.dumps({"duty_cycle": stats}, indent=2))


async def _edges(n: int, url: str) -> dict:
    import anyio

    from arrl.bus import Bus

    bus = Bus.from_url(url, "bench")
    reader = Bus.from_url(url, "bench")  # a blocking reader gets its own connection
    results: dict[str, dict] = {}

    # Stage-to-stage stream with a consumer group: publish, then XREADGROUP by a waiting consumer.
    await bus.ensure_group("edge", "g")
    latencies: list[float] = []

    async def consume() -> None:
        got = 0
        while got < n:
            for d in await reader.consume("edge", "g", "c", count=100, block_ms=1000):
                latencies.append(time.perf_counter() - d.message["sent"])
                await reader.ack("edge", "g", d.entry_id)
                got += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for i in range(n):
            await bus.publish("edge", "result", {"experiment_id": f"e{i}", "status": "ok", "sent": time.perf_counter()})
            await anyio.sleep(0.002)  # one message at a time, as the stages send them
    results["stream (proposals/results/transitions)"] = _summary(latencies)

    # Loss events: the executor's XADD per event, read live by a follower (the self-evaluator).
    latencies = []

    async def follow() -> None:
        last = "0"
        got = 0
        while got < n:
            for entry_id, event in await reader.read_events("x1", last, block_ms=1000):
                last = entry_id
                latencies.append(time.perf_counter() - event["sent"])
                got += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        for _ in range(n):
            await bus.publish_event("x1", {"event": "train.step", "sent": time.perf_counter()})
            await anyio.sleep(0.002)
    results["loss events (executor -> follower)"] = _summary(latencies)

    # Control stream: an abort reaches a blocked reader.
    latencies = []
    for i in range(min(n, 200)):
        async with anyio.create_task_group() as tg:
            async def wait_abort(exp: str = f"a{i}") -> None:
                for _entry, message in await reader.read_control(exp, "0", block_ms=2000):
                    latencies.append(time.perf_counter() - float(message["reason"]))

            tg.start_soon(wait_abort)
            await anyio.sleep(0.002)
            await bus.send_control(f"a{i}", "abort", repr(time.perf_counter()))
    results["abort (control stream)"] = _summary(latencies)

    # Throughput of loss events, awaited one by one as the executor does.
    start = time.perf_counter()
    for i in range(n * 5):
        await bus.publish_event("x2", {"event": "train.step", "step": i, "loss": 1.0, "training_seconds": 0.1})
    results["loss-event throughput"] = {"events_per_s": n * 5 / (time.perf_counter() - start)}
    await bus.aclose()
    await reader.aclose()
    return results


def _summary(latencies: list[float]) -> dict:
    ms = [x * 1000 for x in latencies]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": percentile(ms, 99)}


def _rq_edge(url: str, n: int) -> dict:
    """Enqueue -> job start through a real forking `rq worker`, one job at a time (an idle worker)."""
    import redis
    from rq import Queue

    from arrl.serialization import MsgpackSerializer

    conn = redis.Redis.from_url(url)
    queue = Queue("benchq", connection=conn, serializer=MsgpackSerializer)
    worker = subprocess.Popen([str(Path(sys.executable).parent / "rq"), "worker", "benchq", "-S",
                               "arrl.serialization.MsgpackSerializer", "--url", url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies = []
    try:
        time.sleep(2.0)  # let the worker start and block on the queue
        for _ in range(n):
            sent = time.time()
            job = queue.enqueue("time.time")
            while job.get_status() not in ("finished", "failed"):
                time.sleep(0.01)
            started = job.return_value()
            latencies.append(float(started) - sent)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return _summary(latencies)


def cmd_edges(args: argparse.Namespace) -> None:
    import anyio

    from pipeline.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            results = anyio.run(_edges, args.n, server.url)
            results["rq queue gpu (enqueue -> job start, forking worker)"] = _rq_edge(server.url, min(args.n, 50))
        finally:
            server.stop()
    for edge, s in results.items():
        if "median_ms" in s:
            print(f"{edge:<55} median {s['median_ms']:8.2f} ms   p99 {s['p99_ms']:8.2f} ms   (n={s['n']})")
        else:
            print(f"{edge:<55} {s['events_per_s']:10.0f} events/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("edges")
    p.add_argument("-n", type=int, default=500)
    p.set_defaults(func=cmd_edges)
    p = sub.add_parser("campaign")
    p.add_argument("--profile", default="smoke")
    p.add_argument("-n", type=int, default=6)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--run-dir", help="analyse this finished run instead of starting one")
    p.add_argument("extra", nargs="*", help="more `arrl run` options after --")
    p.set_defaults(func=cmd_campaign)
    p = sub.add_parser("executors")
    p.add_argument("--profile", default="cpu")
    p.add_argument("-n", type=int, default=6, help="experiments per mode")
    p.add_argument("--budget-s", type=float, default=0.0, help="override the profile's budget")
    p.add_argument("--modes", default="cold,warm",
                   help="comma-separated, from cold, warm and gated (two workers on one device behind the "
                        "device gate; for a GPU, where the next candidate's compilation is worth hiding)")
    p.set_defaults(func=cmd_executors)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
