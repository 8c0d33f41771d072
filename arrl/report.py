"""`arrl report RUN_DIR`: a self-contained Markdown report of a campaign, with plots beside it.

Everything is computed from the run directory alone (ledger.jsonl, campaign.json, results.tsv and
checkpoints/ppo_updates.jsonl), so it works after the campaign's Redis is gone and while the
campaign is still running: the files are appended to as we read, so a last line without its
newline is a record being written and is skipped, like any line that does not parse.

The numbers in the tables come from `summarize`, which a test recomputes from the ledger. The
conventions, which the report states where they matter:

- experiment index: the order of recording (ledger order), which is the order the incumbent moved;
- best val_bpb: the best kept record (what best_train.py holds); kept means it replaced the
  incumbent, so a run that won by less than `--keep-margin` is not the best;
- delta val_bpb of an edit: its val_bpb minus its parent's, over runs that finished (`ok`);
- an edit program of several atomic edits credits each tunable it touches (the single-edit
  columns show the unconfounded runs alone);
- early aborts: an aborted run cost its wall seconds; without the self-evaluator it would have
  trained for the whole budget, so the estimate charges it `budget_s - training_seconds` more
  and delays every later run on the same worker by as much.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arrl.ledger import leader, remeasures_of, superseded
from arrl.operators import proposed_by
from arrl.report_machines import classes_cell, hardware_classes, machine_speed, speed_cell
from arrl.reward import FAILED, is_edit

UPDATES_FILE = Path("checkpoints") / "ppo_updates.jsonl"


# -- reading a run directory that may still be written ---------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole JSON-object lines of a file being appended to; a torn or garbled line is skipped."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a line still being written
    out = []
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def read_config(path: Path, attempts: int = 5) -> dict[str, Any]:
    """campaign.json, which `arrl run` rewrites in place every few seconds: retry a torn read."""
    for _ in range(attempts):
        try:
            value = json.loads(path.read_text())
            if isinstance(value, dict):
                return value
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    updates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def budget_s(self) -> float:
        if self.config.get("budget_s"):
            return float(self.config["budget_s"])
        from frozen_env.constants import get_profile

        try:
            return float(get_profile(self.config.get("profile", "cpu")).budget_s)
        except (KeyError, ValueError):
            return 0.0


def load_run(run_dir: Path | str) -> Run:
    path = Path(run_dir)
    records = [r for r in read_jsonl(path / "ledger.jsonl") if "experiment_id" in r]
    # A learner restarted mid-update may log a version twice: the last line wins.
    by_version = {u.get("version"): u for u in read_jsonl(path / UPDATES_FILE)}
    updates = sorted(by_version.values(), key=lambda u: u.get("version") or 0)
    return Run(path, read_config(path / "campaign.json"), records, updates)


# -- numbers ----------------------------------------------------------------------------------


def finite_num(value: Any) -> float | None:
    """The value as a float when it is a finite number (not a bool), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None


def ok_val(record: dict[str, Any]) -> float | None:
    return finite_num(record.get("val_bpb")) if record.get("status") == "ok" else None


def kept_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kept") and ok_val(r) is not None]


def best_so_far(records: list[dict[str, Any]], reruns: bool = True) -> list[float | None]:
    """The incumbent's val_bpb after each record (None before the first kept one): the kept run's
    own score, then its re-runs' (`remeasure_every`), as the keep rule saw it. `reruns=False`: the
    lowest own score of a kept run, which compares campaigns with and without re-runs alike (a
    re-run is one more draw of a script already found)."""
    out, best, lead, kept = [], None, None, []
    for r in records:
        val = ok_val(r)
        if not reruns:
            if r.get("kept") and val is not None and (best is None or val < best):
                best = val
        elif r.get("kept") and val is not None:
            if not superseded(r, kept):
                best, lead = val, r
            kept.append(r)
        elif (val is not None and lead is not None and r.get("role") == "remeasure"
              and r.get("candidate_hash") == lead.get("candidate_hash")):
            best = val
        out.append(best)
    return out


def tunables_of(record: dict[str, Any]) -> list[str]:
    """The tunables an edit touched: from its program, else from its description
    ("NAME old -> new; ..."), which is how proposers outside the grammar are credited too."""
    program = record.get("program")
    if isinstance(program, list) and program:
        return [str(e.get("name")) for e in program if isinstance(e, dict) and e.get("name")]
    names = []
    for part in str(record.get("description") or "").split(";"):
        words = part.split()
        if len(words) >= 3 and words[0].isupper() and "->" in words:
            names.append(words[0])
    return names


def delta(record: dict[str, Any]) -> float | None:
    val, parent = ok_val(record), finite_num(record.get("parent_bpb"))
    return None if val is None or parent is None else val - parent


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def tunable_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per tunable that any edit touched, best helpers first."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"tried": 0, "ok": 0, "kept": 0, "aborted": 0,
                                                           "failed": 0, "rewards": [], "deltas": [], "solo": []})
    for r in records:
        if not is_edit(r):
            continue
        names = tunables_of(r)
        for name in names:
            row = rows[name]
            row["tried"] += 1
            status = r.get("status")
            row["ok"] += status == "ok"
            row["kept"] += bool(r.get("kept"))
            row["aborted"] += status == "aborted"
            row["failed"] += status in FAILED
            if finite_num(r.get("reward")) is not None:
                row["rewards"].append(float(r["reward"]))
            d = delta(r)
            if d is not None:
                row["deltas"].append(d)
                if len(names) == 1:
                    row["solo"].append(d)
    out = []
    for name, row in rows.items():
        out.append({"tunable": name, "tried": row["tried"], "ok": row["ok"], "kept": row["kept"],
                    "aborted": row["aborted"], "failed": row["failed"], "mean_reward": _mean(row["rewards"]),
                    "mean_delta": _mean(row["deltas"]), "best_delta": min(row["deltas"]) if row["deltas"] else None,
                    "solo_runs": len(row["solo"]), "solo_mean_delta": _mean(row["solo"])})
    inf = float("inf")
    out.sort(key=lambda x: (-x["kept"], x["mean_delta"] if x["mean_delta"] is not None else inf, x["tunable"]))
    return out


def timelines(run: Run) -> dict[str, Any]:
    """Cumulative experiments against wall-clock hours, as run and without early aborts.

    Only runs that took executor time count (duplicates and refusals have no finish time).
    """
    ran = [r for r in run.records if finite_num(r.get("finished_at")) is not None]
    if not ran:
        return {"actual": [], "without": [], "extra_s": 0.0, "aborted": 0}
    starts = [finite_num(r.get("started_at")) for r in ran]
    t0 = min([s for s in starts if s is not None] + [float(r["finished_at"]) for r in ran])
    budget = run.budget_s
    shift: dict[str, float] = defaultdict(float)
    actual, without = [], []
    for r in sorted(ran, key=lambda r: float(r["finished_at"])):
        t = float(r["finished_at"]) - t0
        if r.get("status") == "aborted":
            shift[str(r.get("worker"))] += max(budget - (finite_num(r.get("training_seconds")) or 0.0), 0.0)
        actual.append(t / 3600)
        without.append((t + shift[str(r.get("worker"))]) / 3600)
    return {"actual": actual, "without": sorted(without), "extra_s": sum(shift.values()),
            "aborted": sum(r.get("status") == "aborted" for r in ran)}


def summarize(run: Run) -> dict[str, Any]:
    records = run.records
    kept = kept_records(records)
    baseline = next((r for r in records if r.get("role") == "baseline" and ok_val(r) is not None), None)
    best = leader(records)
    reruns = remeasures_of(records, best) if best else []
    statuses = Counter(str(r.get("status")) for r in records)
    executor_s = sum(finite_num(r.get("wall_seconds")) or 0.0 for r in records)
    lines = timelines(run)
    span_h = lines["actual"][-1] if lines["actual"] else 0.0
    ran = len(lines["actual"])
    without_h = lines["without"][-1] if lines["without"] else 0.0
    last_keep = max((i for i, r in enumerate(records) if r.get("kept") and is_edit(r)), default=-1)
    baseline_val = ok_val(baseline) if baseline else None
    best_val = ok_val(best) if best else None
    return {
        "campaign": run.config.get("campaign_id", ""),
        "strategy": run.config.get("strategy", ""),
        "profile": run.config.get("profile", ""),
        "budget_s": run.budget_s,
        "state": _state(run),
        "stop_reason": run.config.get("stop_reason", ""),
        "max_experiments": int(run.config.get("max_experiments") or 0),
        "recorded": len(records),
        "statuses": dict(sorted(statuses.items())),
        "verdicts": dict(Counter(_verdict(r) for r in records)),
        "kept_edits": sum(1 for r in kept if is_edit(r)),
        "baseline_val_bpb": baseline_val,
        "best_val_bpb": best_val,
        "best_experiment": best.get("experiment_id") if best else None,
        "best_description": best.get("description") if best else None,
        "best_reruns": reruns,  # its val_bpb re-measured (`remeasure_every`), in order
        "remeasures": sum(r.get("role") == "remeasure" for r in records),
        "remeasures_on_speed": sum(r.get("role") == "remeasure" and (r.get("extra") or {}).get("why") == "speed"
                                   for r in records),
        "machine_speed": machine_speed(records),
        "hardware_classes": hardware_classes(records),
        "improvement": baseline_val - best_val if baseline_val is not None and best_val is not None else None,
        "lowest_val_bpb": min((v for v in map(ok_val, records) if v is not None), default=None),
        "since_improvement": len(records) - 1 - last_keep if records and last_keep >= 0 else len(records),
        "executor_hours": executor_s / 3600,
        "wall_hours": span_h,
        "experiments_run": ran,
        "experiments_per_hour": ran / span_h if span_h > 0 else None,
        "aborted": lines["aborted"],
        "abort_saved_hours": lines["extra_s"] / 3600,
        "wall_hours_without_aborts": without_h,
        "experiments_per_hour_without_aborts": ran / without_h if without_h > 0 else None,
        "ppo_updates": len(run.updates),
    }


def _state(run: Run) -> str:
    """campaign.json's state once `arrl run` has stopped; before that it only holds `last_seen`."""
    cap = int(run.config.get("max_experiments") or 0)
    if run.config.get("state"):
        return str(run.config["state"])
    if cap and len(run.records) >= cap:
        return "stopped"  # every experiment recorded (a simulated campaign writes no state)
    return "running" if run.config.get("last_seen") else "unknown"


def _verdict(record: dict[str, Any]) -> str:
    """results.tsv's verdict for a record (the same rule as arrl.ledger.tsv_row)."""
    status = record.get("status")
    if status == "ok":
        return "keep" if record.get("kept") else "discard"
    return "discard" if status in ("aborted", "duplicate") else "crash"


# -- Markdown ---------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4, signed: bool = False) -> str:
    """A table cell: '-' for missing values, fixed decimals for numbers."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def duration(hours: float | None) -> str:
    """Hours in the unit that reads best: 52 s, 14.3 min, 3.25 h."""
    if hours is None:
        return "-"
    seconds = hours * 3600
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{hours:.2f} h"


def _cell(text: Any) -> str:
    return str(text if text is not None else "-").replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def render_markdown(run: Run, s: dict[str, Any], figures: dict[str, str]) -> str:
    records = run.records
    cap = f" of {s['max_experiments']}" if s["max_experiments"] else ""
    live = s["state"] not in ("stopped",)
    parts = [f"# Campaign report: {s['campaign'] or run.path.name}\n\n",
             f"Run directory `{run.path.name}`, strategy **{s['strategy']}**, profile **{s['profile']}** "
             f"(budget {s['budget_s']:g} s per run). Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from "
             f"{s['recorded']} recorded experiments{cap}"
             + (f"; the campaign is **{s['state']}**, so these numbers are a snapshot.\n" if live else
                f"; stopped ({s['stop_reason'] or 'no reason recorded'}).\n"),
             "\n## Summary\n\n"]
    parts.append(table(["", ""], [
        ["experiments recorded", f"{s['recorded']}{cap}"],
        ["kept edits", s["kept_edits"]],
        ["baseline val_bpb", fmt(s["baseline_val_bpb"])],
        ["best val_bpb", f"{fmt(s['best_val_bpb'])} ({s['best_experiment']}: {s['best_description']})"
         if s["best_val_bpb"] is not None else "-"],
        ["improvement over baseline", fmt(s["improvement"])
         + (f" ({s['improvement'] / s['baseline_val_bpb']:.2%})" if s["improvement"] is not None else "")],
        ["lowest val_bpb measured (kept or not)", fmt(s["lowest_val_bpb"])],
        *([["re-runs of the incumbent", (f"{s['remeasures']}; the best re-run {len(s['best_reruns'])} times, "
            f"latest {fmt(s['best_reruns'][-1])}" if s["best_reruns"] else str(s["remeasures"]))
            + (f" ({s['remeasures_on_speed']} on a shift of the machine's speed)" if s["remeasures_on_speed"] else "")]]
          if s["remeasures"] else []),
        *([["machine speed (GFLOP/s, probed before each run)", speed_cell(s)]] if s["machine_speed"] else []),
        *([["hardware classes", classes_cell(s)]] if s["hardware_classes"] else []),
        ["experiments since the last kept edit", s["since_improvement"]],
        ["executor time", duration(s["executor_hours"])],
        ["wall-clock time (first start to last finish)", duration(s["wall_hours"])],
        ["experiments per hour", fmt(s["experiments_per_hour"], 1)],
        ["PPO updates logged", s["ppo_updates"]],
    ]))
    parts.append("\n### Outcomes\n\n")
    parts.append(table(["status", "count"], [[k, v] for k, v in s["statuses"].items()]))
    parts.append("\nresults.tsv verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(s["verdicts"].items())) + "\n")

    parts.append("\n## Best val_bpb against experiment index\n\n")
    parts.append(f"![best val_bpb]({figures['best']})\n\n")
    kept = [r for r in kept_records(records) if is_edit(r)]
    if kept:
        index = {r["experiment_id"]: i + 1 for i, r in enumerate(records)}
        # `kept` numbers the edits as the plot does; `index` is the experiment index on its x axis.
        parts.append(table(["kept", "index", "experiment", "edit", "val_bpb before", "val_bpb after", "delta",
                            "reward"], [
            [n, index[r["experiment_id"]], r["experiment_id"], r.get("description"), fmt(finite_num(r.get("incumbent_bpb"))),
             fmt(ok_val(r)), fmt(_kept_delta(r), signed=True), fmt(finite_num(r.get("reward")), 2)]
            for n, r in enumerate(kept, start=1)]))
    else:
        parts.append("No edit has been kept yet.\n")

    parts.append("\n## Throughput and early aborts\n\n")
    parts.append(f"![experiments against wall-clock]({figures['throughput']})\n\n")
    if s["aborted"]:
        parts.append(
            f"The self-evaluator aborted {s['aborted']} run{'s' if s['aborted'] != 1 else ''}. "
            f"Charged the full budget instead (the estimate "
            f"in the plot: each aborted run trains `budget_s - training_seconds` longer and later runs on its "
            f"worker start that much later), the {s['experiments_run']} runs would have taken "
            f"{duration(s['wall_hours_without_aborts'])} instead of {duration(s['wall_hours'])}: "
            f"{duration(s['abort_saved_hours'])} of executor time saved, "
            f"{fmt(s['experiments_per_hour'], 1)} instead of {fmt(s['experiments_per_hour_without_aborts'], 1)} "
            f"experiments per hour.\n")
    else:
        parts.append("No run was aborted early, so both curves coincide.\n")

    parts.append("\n## Which edits helped, per tunable\n\n")
    parts.append("A program of several edits credits every tunable it touches; *single-edit* columns count "
                 "only runs that changed that tunable alone. delta val_bpb = run - parent (negative is better), "
                 "over finished runs.\n\n")
    parts.append(table(
        ["tunable", "tried", "ok", "kept", "aborted", "failed", "mean reward", "mean delta val_bpb",
         "best delta val_bpb", "single-edit runs", "single-edit mean delta"],
        [[t["tunable"], t["tried"], t["ok"], t["kept"], t["aborted"], t["failed"], fmt(t["mean_reward"], 3),
          fmt(t["mean_delta"], signed=True), fmt(t["best_delta"], signed=True), t["solo_runs"],
          fmt(t["solo_mean_delta"], signed=True)] for t in tunable_table(records)]) if len(records) > 1
        else "No edits yet.\n")

    parts.append("\n## Reward and policy updates\n\n")
    parts.append(f"![reward, entropy and KL per PPO update]({figures['ppo']})\n\n")
    if run.updates:
        last = run.updates[-1]
        parts.append(table(["update", "samples", "mean reward", "entropy", "approx KL", "clip fraction",
                            "stopped at target KL"], [
            [u.get("version"), u.get("samples"), fmt(finite_num(u.get("reward_mean")), 3), fmt(finite_num(u.get("entropy")), 3),
             fmt(finite_num(u.get("approx_kl")), 4), fmt(finite_num(u.get("clip_fraction")), 3),
             "yes" if u.get("stopped_early") else "no"] for u in run.updates[-10:]]))
        parts.append(f"\nLast {min(10, len(run.updates))} of {len(run.updates)} updates "
                     f"(all in `{UPDATES_FILE.as_posix()}`); the latest policy is version {last.get('version')}.\n")
    else:
        parts.append(f"No PPO update is recorded in `{UPDATES_FILE.as_posix()}` (strategy "
                     f"{s['strategy'] or 'unknown'}, or fewer samples than one batch so far); the plot shows "
                     "the reward of each experiment.\n")
    if rows := proposers(records):
        parts.append("\nWhat proposed the edits (the policy's operator, edit count and radius, or a rule of the "
                     "strategy's):\n\n")
        parts.append(table(["proposer", "edits", "kept", "mean reward"],
                           [[name, n, kept, fmt(mean, 3)] for name, n, kept, mean in rows]))
    parts.append("\n## Files\n\n`ledger.jsonl` (every number above), `results.tsv`, `best_train.py`, `lineage/` "
                 "(`arrl export RUN_DIR --best` writes it as a patch series), `logs/<id>.jsonl`.\n")
    return "".join(parts)


def proposers(records: list[dict[str, Any]]) -> list[list[Any]]:
    """The ppo strategy's edits by what proposed them (`arrl.operators.proposed_by`: the policy's
    action, or a rule), most used first: [proposer, edits, kept, mean reward]. Empty for another
    strategy. A policy that puts nearly every proposal on one action shows it here."""
    rows: dict[str, list[Any]] = {}
    for r in records:
        if is_edit(r) and (name := proposed_by(r.get("extra"))):
            row = rows.setdefault(name, [name, 0, 0, []])
            row[1] += 1
            row[2] += bool(r.get("kept"))
            if (reward := finite_num(r.get("reward"))) is not None:
                row[3].append(reward)
    return [[name, n, kept, _mean(rewards)] for name, n, kept, rewards in
            sorted(rows.values(), key=lambda row: -row[1])]


def _kept_delta(record: dict[str, Any]) -> float | None:
    val, before = ok_val(record), finite_num(record.get("incumbent_bpb"))
    return None if val is None or before is None else val - before


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write report.md, its PNGs and summary.json into `out` (default RUN_DIR/report); returns report.md."""
    from arrl import plots

    run = load_run(run_dir)
    out_dir = Path(out) if out else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summarize(run)
    figures = {"best": "best_val_bpb.png", "throughput": "experiments_vs_time.png", "ppo": "ppo_updates.png"}
    plots.best_curve(run, out_dir / figures["best"])
    plots.throughput(run, timelines(run), out_dir / figures["throughput"])
    plots.ppo(run, out_dir / figures["ppo"])
    (out_dir / "summary.json").write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    # Written whole and renamed: a reader never sees half a report.
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(render_markdown(run, s, figures))
    tmp.replace(out_dir / "report.md")
    return out_dir / "report.md"
