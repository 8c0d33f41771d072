"""The dashboard's JSON: one state document per refresh, from a run directory or a live campaign.

Two sources build the same document:

* :class:`RunDirSource` reads a campaign's files alone (`ledger.jsonl`, `campaign.json`,
  `logs/<id>.jsonl`): a finished campaign, or one whose Redis is gone. It rebuilds only when the
  ledger changed, so polling a finished run costs nothing.
* :class:`LiveSource` reads the campaign's Redis while it runs: new records of the ledger hash,
  which experiments run (in flight and started, not yet recorded), each running experiment's
  event stream from the last entry id it read, and `arrl.status.snapshot` with `queue_numbers`.

The document (see :func:`document`):

    summary      arrl.status's snapshot: state, counters, best so far, queue depths, workers
    experiments  one row per recorded experiment in campaign order (no diff: see `detail`)
    best         the best val_bpb after each experiment, and the kept edits that set it
    curves       training loss in bits per byte: running experiments with the self-evaluator's
                 latest forecast, the incumbent's and the last few recorded, for comparison
    queue        experiments waiting for a worker
    budget_s     the training budget, the curves' x range

Curves are loss / ln 2 so they share the axis of val_bpb and of the forecast (which is val_bpb:
the self-evaluator adds the incumbent's generalisation gap).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arrl.report import best_so_far

LN2 = math.log(2.0)
MAX_CURVE_POINTS = 600  # per curve in the state document: a 300 s gpu run streams thousands
RECENT_CURVES = 3  # recorded experiments whose curves stay on the chart beside the running ones
ROW_FIELDS = ("status", "kept", "role", "description", "reason", "val_bpb", "forecast_val_bpb", "parent_bpb",
              "reward", "training_seconds", "wall_seconds", "steps", "worker", "strategy", "peak_memory_mb",
              "num_params", "started_at", "recorded_at")


def finite(value: Any) -> float | None:
    """A number the browser's JSON.parse accepts (NaN and infinities are not JSON), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def plain(value: Any) -> Any:
    """`value` with every NaN or infinity (a crashed run's val_bpb, say) replaced by None."""
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def exp_index(exp_id: str) -> int:
    """`e00012` -> 12: the x axis of the per-experiment charts."""
    digits = "".join(c for c in exp_id if c.isdigit())
    return int(digits) if digits else 0


def outcome(record: dict[str, Any]) -> str:
    """The colour of an experiment: keep / discard for finished runs, else the runner's status."""
    status = record.get("status") or "unknown"
    if status == "ok":
        return "keep" if record.get("kept") else "discard"
    return status


def experiment_row(record: dict[str, Any]) -> dict[str, Any]:
    """One ledger record as a table row: the numbers, what happened and why, but not the diff."""
    row: dict[str, Any] = {"id": record["experiment_id"], "index": exp_index(record["experiment_id"]),
                           "outcome": outcome(record)}
    for name in ROW_FIELDS:
        value = record.get(name)
        row[name] = value if isinstance(value, str | bool) or value is None else finite(value)
    val, parent = row["val_bpb"], row["parent_bpb"]
    row["delta"] = val - parent if val is not None and parent is not None else None
    verdict = record.get("selfeval")
    row["selfeval"] = verdict.get("decision") if isinstance(verdict, dict) else None
    row["has_diff"] = bool(record.get("diff"))
    # Which script ran, and the incumbent version a kept run made: what the best line follows.
    row["script"] = (record.get("candidate_hash") or "")[:12] or None
    version = record.get("lead_version")
    row["lead_version"] = version if isinstance(version, int) and not isinstance(version, bool) else None
    return row


def best_series(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The incumbent's val_bpb after each experiment (a step line) and the kept edits (its markers).

    As `arrl.report.best_so_far`: the kept run that took the lead last (by `lead_version`, since
    with several workers the order of recording can differ from the ids'), then its re-runs'
    scores (`remeasure_every`), so the line can step up where a re-run scored worse.
    """
    rows = sorted(rows, key=lambda r: r["index"])
    bests = best_so_far([{**row, "candidate_hash": row.get("script")} for row in rows])
    kept = [{"index": row["index"], "id": row["id"], "val_bpb": row["val_bpb"], "description": row["description"],
             "role": row["role"]} for row in rows if row["kept"] and row["status"] == "ok" and row["val_bpb"] is not None]
    steps = [[row["index"], best] for row, best in zip(rows, bests, strict=True) if best is not None]
    return {"steps": steps, "kept": kept}


@dataclass
class Curve:
    """One experiment's loss curve and the self-evaluator's latest verdict, built event by event."""

    exp_id: str
    last_id: str = "0"  # the event stream's last entry read (live sources follow from here)
    points: list[list[float]] = field(default_factory=list)  # [training seconds, loss / ln 2]
    verdict: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None  # the executor's `experiment.finished` event
    complete: bool = False  # recorded: nothing more will come, keep it as it is

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "train.step":
            t, loss = finite(event.get("training_seconds")), finite(event.get("loss"))
            if t is not None and loss is not None:  # a diverged run's NaN has no place on an axis
                self.points.append([round(t, 4), round(loss / LN2, 5)])
        elif kind == "selfeval.verdict":
            self.verdict = event
        elif kind == "experiment.finished":
            self.finished = event

    def forecast(self) -> dict[str, Any] | None:
        """The latest verdict in the page's terms; its val_bpb is None until there is an incumbent."""
        v = self.verdict
        if not v:
            return None
        return {"val_bpb": finite(v.get("forecast_val_bpb")), "std": finite(v.get("forecast_std")),
                "decision": v.get("decision"), "reason": v.get("reason"), "fraction": finite(v.get("fraction")),
                "p_worse": finite(v.get("p_worse")), "tau": finite(v.get("tau")), "method": v.get("method")}

    def entry(self, role: str, row: dict[str, Any] | None, description: str | None = None) -> dict[str, Any]:
        """The chart's view: `role` is running, best or recent; at most MAX_CURVE_POINTS points."""
        points = self.points
        if len(points) > MAX_CURVE_POINTS:
            stride = math.ceil(len(points) / MAX_CURVE_POINTS)
            points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
        status = (row or {}).get("outcome") or ("finishing" if self.finished else "running")
        return {"id": self.exp_id, "role": role, "status": status,
                "description": (row or {}).get("description") or description or "",
                "val_bpb": (row or {}).get("val_bpb"), "points": len(self.points), "curve": points,
                "forecast": self.forecast()}


def curve_from_log(path: Path, exp_id: str) -> Curve:
    """A recorded experiment's curve from its `logs/<id>.jsonl` (empty when the file is missing)."""
    curve = Curve(exp_id, complete=True)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                curve.add(json.loads(line))
            except ValueError:
                continue
    return curve


def document(summary: dict[str, Any], rows: list[dict[str, Any]], curves: list[dict[str, Any]],
             budget_s: float, source: str, queue: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r["index"])
    return {"generated_at": time.time(), "source": source, "summary": plain(summary), "budget_s": budget_s,
            "experiments": rows, "best": best_series(rows), "curves": curves, "queue": queue or []}


def display_ids(rows: list[dict[str, Any]], best_id: str | None) -> list[tuple[str, str]]:
    """Recorded experiments whose curves the chart shows: (id, role), the incumbent first."""
    recent = sorted(rows, key=lambda r: (r.get("recorded_at") or 0.0, r["index"]))[-RECENT_CURVES:]
    chosen = [(best_id, "best")] if best_id else []
    chosen += [(r["id"], "recent") for r in reversed(recent) if r["id"] != best_id]
    return chosen


def budget_of(config: dict[str, Any]) -> float:
    from frozen_env.constants import get_profile

    try:
        return float(config.get("budget_s") or get_profile(config.get("profile") or "cpu").budget_s)
    except (KeyError, ValueError):
        return 0.0


def detail_of(record: dict[str, Any], curve: Curve | None) -> dict[str, Any]:
    """One experiment in full for the ledger's expanded row: the diff, the record, its curve."""
    from arrl.ledger import for_files

    full = {k: v for k, v in for_files(record).items() if k not in ("diff", "program", "extra")}
    return {"id": record["experiment_id"], "diff": record.get("diff") or "",
            "row": experiment_row(record), "record": plain(full),
            "curve": curve.entry("detail", experiment_row(record)) if curve else None}


def _stat(path: Path) -> tuple[float, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


class RunDirSource:
    """A campaign's state from its run directory alone (no Redis)."""

    def __init__(self, run_dir: Path | str) -> None:
        from arrl.ledger import RunDir

        self.run_dir = RunDir(run_dir)
        self._key: tuple[tuple[float, int] | None, ...] | None = None
        self._state: dict[str, Any] | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._curves: dict[str, Curve] = {}  # recorded experiments' logs never change

    def _changed(self) -> bool:
        """Whether the ledger or campaign.json (its final state is written last) changed."""
        key = tuple(_stat(path) for path in (self.run_dir.ledger, self.run_dir.path / "campaign.json"))
        changed = key != self._key or self._state is None
        self._key = key
        return changed

    def curve(self, exp_id: str) -> Curve:
        if exp_id not in self._curves:
            self._curves[exp_id] = curve_from_log(self.run_dir.logs / f"{exp_id}.jsonl", exp_id)
        return self._curves[exp_id]

    def state(self, source: str = "run directory") -> dict[str, Any]:
        from arrl.status import offline_snapshot

        if self._changed():
            self._records = {r["experiment_id"]: r for r in self.run_dir.records()}
            rows = [experiment_row(r) for r in self._records.values()]
            summary = offline_snapshot(self.run_dir.path)
            by_id = {r["id"]: r for r in rows}
            curves = [self.curve(i).entry(role, by_id.get(i)) for i, role in
                      display_ids(rows, summary.get("best_experiment")) if i in by_id]
            self._state = document(summary, rows, curves, budget_of(self.run_dir.config()), source)
        assert self._state is not None
        return {**self._state, "source": source}

    def detail(self, exp_id: str) -> dict[str, Any] | None:
        if not self._records:
            self.state()
        record = self._records.get(exp_id)
        return None if record is None else detail_of(record, self.curve(exp_id))
