"""Offline replay of the self-evaluator over recorded campaigns: the evidence that it pays off.

Input: full, unaborted curve records in campaign order (one JSON object per line):
`{"id": ..., "budget_s": ..., "curve": [[t, loss], ...], "val_bpb": ..., "status": ...}`.
`replay` walks them as if live. It keeps the incumbent (best val_bpb among runs the evaluator let
finish, and its curve as the Reference), feeds each run's curve prefix to `decide` every
`cadence_s` seconds of training time, and charges an aborted run only the time it used (plus a
fixed per-run overhead); an aborted run's outcome stays unknown, so it can never become the
incumbent or enter the history. Without the evaluator every run costs its full time. Audits
(`SelfEvalConfig.audit_every`, chosen by the run's id) run as live: an audited run the rule would
abort is charged in full, counted in `n_audited`, and a miss it catches widens later forecasts.

False aborts: an aborted run counts as a false abort when its recorded val_bpb would have been
`<= best + margin` with `best` the incumbent known to the evaluator at that moment (inf before the
first completed run) and `margin = margin_alpha * sigma`, sigma the MAD spread of the outcomes it
had seen (the same noise margin as the rule's tau, without `tolerance`). `false_abort_rate` divides
the count by the number of runs in the stream; `missed_best` counts the subset that would have
been a strictly new best.

Compute: experiments per compute-hour is n_runs / total compute hours in both cases (the time
aborts save buys more experiments); `speedup` is their ratio. Choosing a method on real curves:
run `compare_methods` (zero false aborts first, then speed-up) and check `forecast_accuracy` with
`near_best`: z_std near or below 1 and a small `over_rate` mean the stated uncertainty is honest.

CLI: `python -m arrl.selfeval_bench runs.jsonl [--cadence 1] [--overhead 0]` (or `arrl
bench-selfeval`) prints the method comparison and the forecast-accuracy tables; records come from
`arrl export-curves`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from arrl.forecast import (
    FORECASTERS,
    FloatArray,
    Reference,
    curve_arrays,
    forecast_val_bpb,
    smoothed_final,
)
from arrl.selfeval import (
    Decision,
    SelfEvalConfig,
    audit_record,
    audit_tally,
    audited,
    decide,
    gap_spread,
    robust_sigma,
    verdict_event,
)


@dataclass(frozen=True, eq=False)
class CurveRecord:
    """One recorded run: its full curve (sorted by t), val_bpb (nan when it has none) and status."""

    id: str
    budget_s: float
    curve: FloatArray
    val_bpb: float
    status: str

    @property
    def has_outcome(self) -> bool:
        return math.isfinite(self.val_bpb)

    @property
    def full_cost_s(self) -> float:
        """Training seconds of the unaborted run: the budget if it produced a val_bpb, otherwise
        wherever its curve stopped (a crashed run ended there anyway)."""
        if self.has_outcome or self.curve.size == 0:
            return self.budget_s
        return float(min(self.curve[-1, 0], self.budget_s))


RecordLike = CurveRecord | Mapping[str, Any]


def parse_record(raw: RecordLike) -> CurveRecord:
    if isinstance(raw, CurveRecord):
        return raw
    t, y = curve_arrays(raw.get("curve") or [])
    curve = np.stack([t, y], axis=1) if t.size else np.empty((0, 2))
    budget = raw.get("budget_s")
    budget_s = float(budget) if budget else float(t[-1]) if t.size else 0.0
    vb = raw.get("val_bpb")
    val = float(vb) if isinstance(vb, (int, float)) else math.nan
    return CurveRecord(
        id=str(raw.get("id", "")),
        budget_s=budget_s,
        curve=curve,
        val_bpb=val,
        status=str(raw.get("status", "")),
    )


def load_records(path: str | Path) -> list[CurveRecord]:
    """Records from a JSONL file, in file (= campaign) order; blank lines are skipped."""
    lines = Path(path).read_text().splitlines()
    return [parse_record(json.loads(line)) for line in lines if line.strip()]


@dataclass(frozen=True)
class RunOutcome:
    """What the replay did with one run; `best_before` and `margin` are the evaluator's view then."""

    id: str
    decision: Decision
    fraction_used: float
    cost_s: float
    val_bpb: float
    best_before: float
    margin: float
    false_abort: bool
    missed_best: bool
    reason: str


@dataclass(frozen=True)
class BenchReport:
    """One replay's summary; compute is training seconds plus the per-run overhead."""

    label: str
    n_runs: int
    n_aborted: int
    """Runs stopped by the evaluator (ABORT or DIVERGED)."""
    n_diverged: int
    n_audited: int
    """Runs the rule would have aborted, let finish as audits."""
    abort_rate: float
    mean_abort_fraction: float
    """Mean fraction of the budget the stopped runs had used (nan when none were stopped)."""
    compute_hours_with: float
    compute_hours_without: float
    exp_per_hour_with: float
    exp_per_hour_without: float
    speedup: float
    """compute_hours_without / compute_hours_with = ratio of experiments per compute-hour."""
    n_false_aborts: int
    false_abort_rate: float
    """n_false_aborts / n_runs (see the module docstring for the definition)."""
    n_missed_best: int
    best_with: float
    best_without: float
    outcomes: tuple[RunOutcome, ...]

    @property
    def regret(self) -> float:
        """How much worse the best val_bpb found with the evaluator is (0 when nothing was lost)."""
        return self.best_with - self.best_without


def replay(
    records: Sequence[RecordLike],
    config: SelfEvalConfig,
    *,
    label: str | None = None,
    cadence_s: float = 1.0,
    overhead_s: float = 0.0,
    margin_alpha: float | None = None,
) -> BenchReport:
    """Replay `records` in order with the evaluator `config` (see the module docstring).

    `margin_alpha` sets the false-abort noise margin (default: `config.alpha`); pass the same value
    for every config when comparing methods so that they are judged by the same yardstick.
    """
    recs = [parse_record(r) for r in records]
    m_alpha = config.alpha if margin_alpha is None else margin_alpha
    reference: Reference | None = None
    history: list[float] = []
    best = math.inf
    outcomes: list[RunOutcome] = []
    finished: list[tuple[float, float]] = []  # (val_bpb, final loss): the gap spread, as the evaluator has it
    audits: list[dict[str, Any]] = []  # the finished audited runs' records, as the evaluator reads them
    for rec in recs:
        margin = m_alpha * robust_sigma(history, config.sigma_floor)
        spread = gap_spread(finished)
        tally = audit_tally(audits)
        ref = replace(reference, gap_spread=spread, audit_miss=tally.miss) if reference is not None else None
        audit = audited("replay", rec.id, config, tally.confirmed)
        verdict, audit_verdict = None, None
        t = rec.curve[:, 0]
        k = 1
        # Decide at every cadence tick that the run reached (a crashed run stops being checked
        # where its curve ends), on the prefix streamed so far.
        while k * cadence_s < rec.budget_s - 1e-9 and t.size and k * cadence_s <= t[-1]:
            n = int(np.searchsorted(t, k * cadence_s, side="right"))
            verdict = decide(rec.curve[:n], rec.budget_s, ref, history, config, audit=audit) if n else None
            if verdict is not None and verdict.audit and audit_verdict is None:
                audit_verdict = verdict_event(verdict)
            if verdict is not None and verdict.stop:
                break
            verdict, k = None, k + 1
        stopped = verdict is not None
        used = min(k * cadence_s, rec.budget_s) if stopped else rec.full_cost_s
        known = stopped and rec.has_outcome
        outcomes.append(
            RunOutcome(
                id=rec.id,
                decision=verdict.decision if verdict else Decision.CONTINUE,
                fraction_used=used / rec.budget_s if rec.budget_s > 0 else 1.0,
                cost_s=used + overhead_s,
                val_bpb=rec.val_bpb,
                best_before=best,
                margin=margin,
                false_abort=known and rec.val_bpb <= best + margin,
                missed_best=known and rec.val_bpb < best,
                reason=verdict.reason if verdict else "audited: would have aborted" if audit_verdict else "completed",
            )
        )
        if stopped:
            continue  # its outcome stays unknown: it cannot become the incumbent
        if audit_verdict is not None:
            audits.append({"status": "ok" if rec.has_outcome else "crashed", "val_bpb": rec.val_bpb,
                           "audit": audit_record([audit_verdict])})
        if rec.has_outcome:
            history.append(rec.val_bpb)
            finished.append((rec.val_bpb, smoothed_final(rec.curve, rec.budget_s, config.forecast)))
            if rec.val_bpb < best and rec.curve.shape[0] >= 2:
                best = rec.val_bpb
                reference = Reference.from_curve(
                    rec.curve, rec.budget_s, rec.val_bpb, run_id=rec.id, opts=config.forecast
                )
    return _summarise(label or config.method, recs, outcomes, overhead_s)


def _summarise(
    label: str, recs: list[CurveRecord], outcomes: list[RunOutcome], overhead_s: float
) -> BenchReport:
    n = len(outcomes)
    stopped = [o for o in outcomes if o.decision is not Decision.CONTINUE]
    with_s = sum(o.cost_s for o in outcomes)
    without_s = sum(r.full_cost_s + overhead_s for r in recs)
    finite_all = [r.val_bpb for r in recs if r.has_outcome]
    finite_kept = [
        o.val_bpb for o in outcomes if o.decision is Decision.CONTINUE and math.isfinite(o.val_bpb)
    ]
    n_false = sum(o.false_abort for o in outcomes)
    n_audited = sum(o.reason.startswith("audit") for o in outcomes)
    return BenchReport(
        label=label,
        n_runs=n,
        n_aborted=len(stopped),
        n_diverged=sum(o.decision is Decision.DIVERGED for o in outcomes),
        n_audited=n_audited,
        abort_rate=len(stopped) / n if n else 0.0,
        mean_abort_fraction=float(np.mean([o.fraction_used for o in stopped])) if stopped else math.nan,
        compute_hours_with=with_s / 3600,
        compute_hours_without=without_s / 3600,
        exp_per_hour_with=n / (with_s / 3600) if with_s > 0 else math.nan,
        exp_per_hour_without=n / (without_s / 3600) if without_s > 0 else math.nan,
        speedup=without_s / with_s if with_s > 0 else math.nan,
        n_false_aborts=n_false,
        false_abort_rate=n_false / n if n else 0.0,
        n_missed_best=sum(o.missed_best for o in outcomes),
        best_with=min(finite_kept, default=math.nan),
        best_without=min(finite_all, default=math.nan),
        outcomes=tuple(outcomes),
    )


def compare_methods(
    records: Sequence[RecordLike],
    configs: Mapping[str, SelfEvalConfig] | Sequence[SelfEvalConfig],
    *,
    cadence_s: float = 1.0,
    overhead_s: float = 0.0,
    margin_alpha: float | None = None,
) -> list[BenchReport]:
    """One replay per config on the same records, all judged with the same false-abort margin
    (`margin_alpha`, default: the first config's alpha). Labels are the mapping's keys, or the
    method names. Print with `format_comparison`."""
    recs = [parse_record(r) for r in records]
    items = list(configs.items()) if isinstance(configs, Mapping) else [(c.method, c) for c in configs]
    if not items:
        return []
    m_alpha = items[0][1].alpha if margin_alpha is None else margin_alpha
    return [
        replay(recs, cfg, label=name, cadence_s=cadence_s, overhead_s=overhead_s, margin_alpha=m_alpha)
        for name, cfg in items
    ]


def default_configs(base: SelfEvalConfig | None = None) -> dict[str, SelfEvalConfig]:
    """`base` with each forecaster in turn: the grid to run on real campaigns."""
    cfg = base or SelfEvalConfig()
    return {name: replace(cfg, method=name) for name in FORECASTERS}


def format_report(report: BenchReport) -> str:
    r = report
    return "\n".join(
        [
            f"self-evaluator replay [{r.label}]: {r.n_runs} runs",
            f"  aborted      {r.n_aborted} ({r.abort_rate:.1%}), {r.n_diverged} as diverged; "
            f"mean budget fraction used by aborted runs {r.mean_abort_fraction:.2f}; "
            f"{r.n_audited} more let finish as audits",
            f"  compute      {r.compute_hours_with:.3f} h with vs {r.compute_hours_without:.3f} h without",
            f"  throughput   {r.exp_per_hour_with:.1f} vs {r.exp_per_hour_without:.1f} experiments/compute-hour "
            f"(speed-up x{r.speedup:.2f})",
            f"  false aborts {r.n_false_aborts} ({r.false_abort_rate:.1%} of runs), of which new best {r.n_missed_best}",
            f"  best val_bpb {r.best_with:.4f} with vs {r.best_without:.4f} without (regret {r.regret:+.4f})",
        ]
    )


def format_comparison(reports: Sequence[BenchReport]) -> str:
    head = f"{'method':<16}{'abort%':>8}{'frac':>7}{'speedup':>9}{'false':>7}{'missed':>8}{'best_with':>11}{'regret':>9}"
    rows = [
        f"{r.label:<16}{r.abort_rate:>8.1%}{r.mean_abort_fraction:>7.2f}{r.speedup:>9.2f}{r.n_false_aborts:>7d}"
        f"{r.n_missed_best:>8d}{r.best_with:>11.4f}{r.regret:>+9.4f}"
        for r in reports
    ]
    return "\n".join([head, *rows])


@dataclass(frozen=True)
class AccuracyRow:
    """Forecast error of one method at one budget fraction, in val_bpb (forecast - actual)."""

    method: str
    fraction: float
    n: int
    bias: float
    mae: float
    rmse: float
    z_std: float
    """Std of (forecast - actual) / forecast std: ~1 when the stated uncertainty is honest."""
    over_rate: float
    """Share with z > 1.645: forecasts confidently too pessimistic, the ones that cause false aborts."""


def forecast_accuracy(
    records: Sequence[RecordLike],
    methods: Sequence[str] | None = None,
    fractions: Sequence[float] = (0.25, 0.4, 0.6, 0.8),
    config: SelfEvalConfig | None = None,
    near_best: float | None = None,
) -> list[AccuracyRow]:
    """Calibration of each forecaster against recorded outcomes, the incumbent at each run being the
    best earlier run of the unaborted campaign. Use it to choose the method and its std tunables.
    `near_best` keeps only runs that ended within that many bpb of the incumbent: their forecasts
    are the ones that decide false aborts, and clearly bad runs would dominate the averages."""
    recs = [parse_record(r) for r in records]
    names = list(methods or FORECASTERS)
    opts = (config or SelfEvalConfig()).forecast
    errors: dict[tuple[str, float], list[tuple[float, float]]] = {
        (m, f): [] for m in names for f in fractions
    }
    reference: Reference | None = None
    for rec in recs:
        near = reference is not None and (
            near_best is None or abs(rec.val_bpb - reference.val_bpb) <= near_best
        )
        if reference is not None and near and rec.has_outcome and np.all(np.isfinite(rec.curve)):
            t = rec.curve[:, 0]
            for f in fractions:
                n = int(np.searchsorted(t, f * rec.budget_s, side="right"))
                if n < 8:
                    continue
                for m in names:
                    fc = forecast_val_bpb(rec.curve[:n], rec.budget_s, reference, m, opts)
                    errors[(m, f)].append((fc.mean - rec.val_bpb, fc.std))
        if (
            rec.has_outcome
            and (reference is None or rec.val_bpb < reference.val_bpb)
            and rec.curve.shape[0] >= 2
        ):
            reference = Reference.from_curve(rec.curve, rec.budget_s, rec.val_bpb, run_id=rec.id, opts=opts)
    rows: list[AccuracyRow] = []
    for (m, f), pairs in errors.items():
        if not pairs:
            continue
        e = np.array([p[0] for p in pairs])
        z = e / np.maximum(np.array([p[1] for p in pairs]), 1e-9)
        rmse = float(np.sqrt((e * e).mean()))
        bias, mae = float(e.mean()), float(np.abs(e).mean())
        rows.append(AccuracyRow(m, f, e.size, bias, mae, rmse, float(z.std()), float((z > 1.645).mean())))
    return rows


def format_accuracy(rows: Sequence[AccuracyRow]) -> str:
    head = f"{'method':<16}{'frac':>6}{'n':>5}{'bias':>9}{'mae':>8}{'rmse':>8}{'z_std':>7}{'over%':>7}"
    lines = [
        f"{r.method:<16}{r.fraction:>6.2f}{r.n:>5d}{r.bias:>+9.4f}{r.mae:>8.4f}{r.rmse:>8.4f}{r.z_std:>7.2f}{r.over_rate:>7.1%}"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay the self-evaluator over recorded curves (JSONL).")
    parser.add_argument("path", help="JSONL file of full curve records in campaign order")
    parser.add_argument("--cadence", type=float, default=1.0, help="seconds of training time between checks")
    parser.add_argument("--overhead", type=float, default=0.0, help="fixed seconds per run (startup, eval)")
    parser.add_argument(
        "--near", type=float, default=0.15, help="bpb window for the near-best accuracy table"
    )
    args = parser.parse_args(argv)
    records = load_records(args.path)
    reports = compare_methods(records, default_configs(), cadence_s=args.cadence, overhead_s=args.overhead)
    print(format_comparison(reports))
    print("\nforecast accuracy in val_bpb, all runs with an incumbent:")
    print(format_accuracy(forecast_accuracy(records)))
    print(f"\nforecast accuracy, runs within {args.near:g} bpb of the incumbent (these decide false aborts):")
    print(format_accuracy(forecast_accuracy(records, near_best=args.near)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
