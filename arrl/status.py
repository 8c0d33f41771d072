"""A campaign's state at a glance, for `arrl status` and the live line of `arrl run`."""

from __future__ import annotations

import time
from typing import Any

from arrl.campaign import Campaign
from arrl.scores import CONTENDED_SPREAD, class_of, probe_spread


def queue_numbers(sync_redis) -> dict[str, int]:
    """Depths of the gpu queue and the class queues together (`arrl.queues`), and the number of
    live workers (every worker listens on gpu) (blocking rq calls)."""
    from rq import Worker

    from arrl.queues import all_queues

    queues = all_queues(sync_redis)
    return {
        "queued": sum(q.count for q in queues),
        "running": sum(q.started_job_registry.count for q in queues),
        "failed_jobs": sum(q.failed_job_registry.count for q in queues),
        "workers": Worker.count(queue=queues[0]),
    }


def contended(records: list[dict[str, Any]]) -> float | None:
    """The spread of one probe on the class of the latest probed run (`arrl.scores.probe_spread`)
    when it is a contended machine's (`CONTENDED_SPREAD` or more), else None."""
    probed = [r for r in records if isinstance(r.get("machine_gflops"), int | float)]
    if not probed:
        return None
    spread = probe_spread([r for r in probed if class_of(r) == class_of(probed[-1])])
    return spread if spread is not None and spread >= CONTENDED_SPREAD else None


async def snapshot(campaign: Campaign, queues: dict[str, int] | None = None) -> dict[str, Any]:
    counters = await campaign.counters()
    incumbent = await campaign.bus.get_incumbent() or {}
    elapsed = max(time.time() - campaign.config.created_at, 1e-9)
    recorded = counters.get("recorded", 0)
    return {
        "campaign": campaign.bus.campaign_id,
        "state": await campaign.state(),
        "stop_reason": await campaign.stop_reason(),
        "profile": campaign.config.profile,
        "strategy": campaign.config.strategy,
        "proposed": counters.get("proposed", 0),
        "recorded": recorded,
        "max_experiments": campaign.config.max_experiments,
        "statuses": {k.removeprefix("status_"): v for k, v in counters.items() if k.startswith("status_")},
        "best_val_bpb": incumbent.get("val_bpb"),
        "best_experiment": incumbent.get("experiment_id"),
        "best_description": incumbent.get("description"),
        # With workers of several hardware classes, the incumbent's score on each (`arrl.scores`).
        **({"best_by_class": {cls: e["val_bpb"] for cls, e in sorted(scores.items())}}
           if len(scores := incumbent.get("scores") or {}) > 1 else {}),
        "since_improvement": counters.get("since_improvement", 0),
        "experiments_per_hour": recorded / elapsed * 3600,
        "executor_hours": await campaign.busy_seconds() / 3600,
        # Scores move with the load of a contended machine: why edits may stop being compared.
        **({"machine_contended": round(spread, 3)}
           if (spread := contended(await campaign.recent_records(32))) is not None else {}),
        **(queues or {}),
    }


def offline_snapshot(run_dir) -> dict[str, Any]:
    """The same summary from a run directory alone, when its Redis is no longer running."""
    from collections import Counter

    from arrl.ledger import RunDir, leader, remeasures_of
    from arrl.reward import is_edit

    rd = RunDir(run_dir)
    saved = rd.config()
    records = rd.records()
    best = leader(records) or {}
    rerun = remeasures_of(records, best) if best else []
    last_keep = max((i for i, r in enumerate(records) if r.get("kept") and is_edit(r)), default=-1)
    return {
        "campaign": saved.get("campaign_id"),
        "state": saved.get("state", "stopped"),
        "stop_reason": saved.get("stop_reason", ""),
        "profile": saved.get("profile"),
        "strategy": saved.get("strategy"),
        "proposed": len(records),
        "recorded": len(records),
        "max_experiments": saved.get("max_experiments", 0),
        "statuses": dict(Counter(r.get("status") for r in records)),
        "best_val_bpb": rerun[-1] if rerun else best.get("val_bpb"),  # as the live incumbent: its latest score
        "best_experiment": best.get("experiment_id"),
        "best_description": best.get("description"),
        "since_improvement": len(records) - 1 - last_keep if records else 0,
        "experiments_per_hour": 0.0,
        "executor_hours": sum(r.get("wall_seconds") or 0.0 for r in records) / 3600,
        "source": "run directory (its Redis is not running)",
    }


def one_line(s: dict[str, Any]) -> str:
    best = f"{s['best_val_bpb']:.4f} ({s['best_experiment']}: {s['best_description']})" if s["best_val_bpb"] else "-"
    if s.get("best_by_class"):
        best += " [" + ", ".join(f"{cls} {v:.4f}" for cls, v in s["best_by_class"].items()) + "]"
    cap = f"/{s['max_experiments']}" if s["max_experiments"] else ""
    return (f"[{s['state']}] done {s['recorded']}{cap}  proposed {s['proposed']}  queued {s.get('queued', '?')}  "
            f"running {s.get('running', '?')}  workers {s.get('workers', '?')}  best {best}  "
            f"{s['experiments_per_hour']:.0f}/h"
            + (f"  machine contended (probes spread {s['machine_contended']:.0%})" if s.get("machine_contended") else ""))
