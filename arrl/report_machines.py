"""The report's rows on the machines a campaign ran on (`arrl.report`): the speed each run probed
before its clock started, the runs made in slow spells or on a contended machine, the edits not
compared for their speed, and with workers of several hardware classes, what each class ran."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any

from arrl.scores import CONTENDED_SPREAD, SPREAD_WINDOW, class_of, probe_spread


def _probe(record: dict[str, Any]) -> float | None:
    """A run's `machine_gflops` when it is a usable probe (a finite number above 0), else None."""
    v = record.get("machine_gflops")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 else None


def machine_speed(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The spread of the runs' `machine_gflops` (the device's speed before each run's clock
    started), how many ran below three quarters of their hardware class's median (runs that
    trained in a slow spell scored worse for it), and the edits the keep rule did not compare for
    their speed (`speed_mismatch`), of them those the self-evaluator stopped at once. None without
    probes (older runs, a landscape that reports none)."""
    by_class: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if (v := _probe(r)) is not None:
            by_class[class_of(r)].append(v)
    if not by_class:
        return None
    speeds = sorted(v for vs in by_class.values() for v in vs)
    medians = {c: statistics.median_low(vs) for c, vs in by_class.items()}
    return {"median": statistics.median_low(speeds), "low": speeds[0], "high": speeds[-1], "runs": len(speeds),
            "slow": sum(v < 0.75 * medians[c] for c, vs in by_class.items() for v in vs),
            "contended": contended_runs(records),
            "other_speed": sum(r.get("speed_mismatch") is not None for r in records),
            "other_speed_stopped": sum(r.get("speed_mismatch") is not None and r.get("status") == "aborted"
                                       for r in records),
            **({"by_class": dict(sorted(medians.items()))} if len(medians) > 1 else {})}


def contended_runs(records: list[dict[str, Any]]) -> int:
    """The runs recorded while their class's probes, up to them, spread like a contended machine's
    (`arrl.scores.probe_spread` at `CONTENDED_SPREAD` or more)."""
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    count = 0
    for r in records:
        if _probe(r) is None:
            continue
        runs = by_class[class_of(r)]
        runs.append(r)
        count += (probe_spread(runs[-SPREAD_WINDOW:]) or 0.0) >= CONTENDED_SPREAD
    return count


def hardware_classes(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With workers of several hardware classes (`arrl.scores`): the runs each class trained, the
    edits left uncompared for want of the incumbent's score on their class, and the re-runs of the
    incumbent queued for one. None on one class."""
    trained = Counter(str(r["hardware_class"]) for r in records
                      if r.get("hardware_class") and r.get("status") not in ("refused", "invalid"))
    if len(trained) < 2:
        return None
    return {"runs": dict(sorted(trained.items())),
            "uncompared": sum(r.get("unscored_class") is not None for r in records),
            "reruns": sum(r.get("role") == "remeasure" and (r.get("extra") or {}).get("why") == "class" for r in records)}


def speed_cell(s: dict[str, Any]) -> str:
    """The report's row on the machine's speed: its probes' spread, the runs in slow spells or on a
    contended machine, and the edits not compared for their speed."""
    m = s["machine_speed"]
    return (f"median {m['median']:.1f}, {m['low']:.1f}-{m['high']:.1f}; "
            f"{m['slow']} of {m['runs']} runs below three quarters of the median"
            + (" of their hardware class" if "by_class" in m else "")
            + (f"; {m['contended']} runs on a contended machine (the probes of the runs up to them spread by "
               f"{CONTENDED_SPREAD:.0%} or more)" if m.get("contended") else "")
            + (f"; {m['other_speed']} edits at a speed the incumbent's score was not measured at, not compared "
               f"({m['other_speed_stopped']} stopped at once)" if m.get("other_speed") else ""))


def classes_cell(s: dict[str, Any]) -> str:
    """The report's row on a campaign shared by workers of several hardware classes."""
    classes, speeds = s["hardware_classes"], (s["machine_speed"] or {}).get("by_class") or {}
    runs = "; ".join(f"{c} {n} runs" + (f" at {speeds[c]:.1f} GFLOP/s" if c in speeds else "")
                     for c, n in classes["runs"].items())
    return (f"{runs}; {classes['uncompared']} edits uncompared for want of a score on their class, "
            f"{classes['reruns']} re-runs of the incumbent for one")
