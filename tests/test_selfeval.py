"""The self-evaluator's decision rule and its offline replay benchmark."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arrl.forecast import LN2, Reference, forecast_val_bpb
from arrl.selfeval import (
    AuditTally,
    Decision,
    SelfEvalConfig,
    audit_record,
    audit_tally,
    audited,
    decide,
    gap_spread,
    robust_sigma,
    threshold,
    verdict_event,
)
from arrl.selfeval_bench import (
    compare_methods,
    forecast_accuracy,
    format_accuracy,
    format_comparison,
    format_report,
    load_records,
    replay,
)

BUDGET = 30.0
START = math.log(256)
NO_AUDITS = {"audit_first": 0, "audit_every": 0}  # the bare rule, for the tests of the rule itself


def clean_curve(
    t: np.ndarray,
    final: float,
    *,
    b: float = 0.6,
    t0: float = 0.7,
    bend: float = 0.15,
    warmdown: float = 0.4,
    p: float = 1.0,
) -> np.ndarray:
    """Noise-free curve from ln 256: fast drop, slow power-law decay, then a warmdown bend of `bend`
    nats over the last `warmdown` of the budget (shaped by `p`); ends exactly at `final`."""
    r = (t0 / (BUDGET + t0)) ** b
    c = (final + bend - START * r) / (1 - r)
    a = (START - c) * t0**b
    u = np.clip((t - (1 - warmdown) * BUDGET) / (warmdown * BUDGET), 0.0, 1.0)
    return np.asarray(c + a * (t + t0) ** (-b) - bend * u**p)


def times(rng: np.random.Generator, steps_per_s: float = 20.0) -> np.ndarray:
    t = np.sort(rng.uniform(0.0, BUDGET, int(BUDGET * steps_per_s)))
    t[-1] = BUDGET
    return t


def random_run(
    rng: np.random.Generator, final: float, *, slow_start: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """A realistic run with randomised shape, schedule, noise and step rate; returns t, loss, clean final."""
    t = times(rng, rng.uniform(10, 30))
    clean = clean_curve(
        t,
        final,
        b=rng.uniform(0.55, 0.65),
        t0=rng.uniform(1.2, 1.8) if slow_start else rng.uniform(0.5, 1.0),
        bend=rng.uniform(0.1, 0.2),
        warmdown=float(rng.choice([0.3, 0.4, 0.4, 0.5])),
        p=rng.uniform(0.8, 1.6),
    )
    return t, clean + rng.normal(0.0, rng.uniform(0.03, 0.08), t.size), float(clean[-1])


def as_curve(t: np.ndarray, y: np.ndarray, fraction: float = 1.0) -> list[list[float]]:
    n = int(np.searchsorted(t, fraction * BUDGET, side="right"))
    rows: list[list[float]] = np.stack([t[:n], y[:n]], axis=1).tolist()
    return rows


def make_reference(rng: np.random.Generator, final: float = 2.0) -> Reference:
    t = times(rng)
    y = clean_curve(t, final) + rng.normal(0.0, 0.05, t.size)
    return Reference.from_curve(as_curve(t, y), BUDGET, final / LN2 + 0.03, run_id="inc")


# -- decide -------------------------------------------------------------------------------------


def test_nan_loss_is_diverged_at_once_even_without_incumbent() -> None:
    rng = np.random.default_rng(0)
    t = times(rng)
    y = clean_curve(t, 2.0) + rng.normal(0, 0.05, t.size)
    y[40:] = np.nan  # 2 s in: before min_budget_fraction and before the explosion check
    v = decide(as_curve(t, y, 0.1), BUDGET, None, [])
    assert v.decision is Decision.DIVERGED and v.stop
    assert "non-finite" in v.reason


def test_exploding_loss_is_diverged() -> None:
    rng = np.random.default_rng(1)
    t = times(rng)
    y = clean_curve(t, 2.0) + rng.normal(0, 0.05, t.size)
    blowup = t > 4.0
    y[blowup] += 3.0 * (t[blowup] - 4.0)  # from ~3 nats up past 9
    # At 0.15 the loss (~4.7) is under 1.5 x its start (5.5), but it has climbed back most of its fall.
    early = decide(as_curve(t, y, 0.15), BUDGET, None, [])
    assert early.decision is Decision.DIVERGED and "climbing back" in early.reason
    no_rise = SelfEvalConfig(divergence_rise=0.0)
    assert decide(as_curve(t, y, 0.15), BUDGET, None, [], no_rise).decision is Decision.CONTINUE
    v = decide(as_curve(t, y, 0.3), BUDGET, make_reference(rng), [2.9], no_rise)
    assert v.decision is Decision.DIVERGED and "exploded" in v.reason


def test_one_bad_batch_or_a_slow_run_is_not_climbing_back() -> None:
    """The rise test reads the last two points against a running median of three: one wild batch
    is not a divergence, nor is a curve that only flattens."""
    rng = np.random.default_rng(5)
    t = times(rng)
    y = clean_curve(t, 2.0) + rng.normal(0, 0.08, t.size)
    for f in (0.2, 0.5, 0.9):
        spiked = as_curve(t, y, f)
        spiked[-3][1] += 2.0  # one bad batch just before the end
        spiked[-1][1] += 2.0  # and the very last
        assert decide(spiked, BUDGET, None, []).decision is Decision.CONTINUE
    slow = START - 0.5 * (1.0 - np.exp(-t / BUDGET)) + rng.normal(0, 0.05, t.size)
    assert decide(as_curve(t, slow, 0.8), BUDGET, None, []).decision is Decision.CONTINUE


def test_healthy_run_is_not_diverged() -> None:
    rng = np.random.default_rng(2)
    t = times(rng)
    y = clean_curve(t, 2.0) + rng.normal(0, 0.08, t.size)
    for f in (0.05, 0.12, 0.5, 1.0):
        assert decide(as_curve(t, y, f), BUDGET, None, []).decision is Decision.CONTINUE


def test_never_aborts_before_min_fraction_or_without_incumbent() -> None:
    rng = np.random.default_rng(3)
    ref = make_reference(rng)
    t = times(rng)
    stuck = START - 0.3 + rng.normal(0, 0.05, t.size)  # learns almost nothing: hopeless
    config = SelfEvalConfig(min_budget_fraction=0.25)
    early = decide(as_curve(t, stuck, 0.2), BUDGET, ref, [ref.val_bpb], config)
    assert early.decision is Decision.CONTINUE and "min fraction" in early.reason
    assert decide(as_curve(t, stuck, 0.6), BUDGET, None, [], config).decision is Decision.CONTINUE
    late = decide(as_curve(t, stuck, 0.3), BUDGET, ref, [ref.val_bpb], config)
    assert late.decision is Decision.ABORT
    assert late.p_worse is not None and late.p_worse >= config.confidence
    assert late.llr is not None and late.llr > 0
    assert late.forecast is not None and late.tau is not None and late.forecast.mean > late.tau


def test_clearly_bad_run_is_aborted_and_good_run_is_not() -> None:
    rng = np.random.default_rng(4)
    ref = make_reference(rng, final=2.0)
    history = [ref.val_bpb, ref.val_bpb + 0.2, ref.val_bpb + 0.5]
    config = SelfEvalConfig()
    bad_t, bad_y, _ = random_run(rng, final=2.35)
    good_t, good_y, _ = random_run(rng, final=1.95)
    fractions = np.arange(1, 30) / 30
    bad = [decide(as_curve(bad_t, bad_y, f), BUDGET, ref, history, config).decision for f in fractions]
    assert Decision.ABORT in bad
    first_abort = fractions[bad.index(Decision.ABORT)]
    assert config.min_budget_fraction <= first_abort <= 0.5  # caught early: that is the saving
    good = [decide(as_curve(good_t, good_y, f), BUDGET, ref, history, config) for f in fractions]
    assert all(v.decision is Decision.CONTINUE for v in good)
    assert good[-1].forecast is not None and good[-1].forecast.mean < ref.val_bpb


def test_threshold_sits_a_robust_spread_above_the_best() -> None:
    history = [3.0, 3.1, 3.2, 3.3, 9.0]  # one disaster must not widen the margin
    sigma = robust_sigma(history, floor=0.01)
    assert sigma == pytest.approx(1.4826 * 0.1)
    assert robust_sigma([3.0], floor=0.02) == 0.02
    assert robust_sigma([3.0, 3.0, 3.0], floor=0.02) == 0.02
    best, s, tau = threshold(history, None, SelfEvalConfig(alpha=0.5, sigma_floor=0.01, tolerance=0.01))
    assert best == 3.0 and s == pytest.approx(sigma)
    assert tau == pytest.approx(3.0 + 0.5 * sigma + 0.01)


def test_config_rejects_unknown_method_and_bad_bounds() -> None:
    with pytest.raises(ValueError, match="unknown forecast method"):
        SelfEvalConfig(method="powerlaw-ref")
    with pytest.raises(ValueError):
        SelfEvalConfig(confidence=1.0)
    with pytest.raises(ValueError):
        SelfEvalConfig(min_budget_fraction=0.9, max_budget_fraction=0.5)


# -- replay -------------------------------------------------------------------------------------


def synthetic_campaign(seed: int, n: int = 60) -> list[dict[str, Any]]:
    """A campaign in order: mostly clearly worse proposals, some close calls, slow starters that end
    level with the best, genuine improvements, and a few runs that diverge (NaN or explosion)."""
    rng = np.random.default_rng(seed)
    best = 2.25
    records: list[dict[str, Any]] = []
    for i in range(n):
        u = rng.uniform()
        slow, delta = False, 0.0
        if i == 0:
            delta = 0.0
        elif u < 0.15:
            delta = rng.uniform(-0.06, -0.005)  # improvement
        elif u < 0.35:
            delta = rng.uniform(0.0, 0.06)  # close call
        elif u < 0.45:
            delta, slow = rng.uniform(-0.03, 0.03), True  # slow starter, ends level
        elif u < 0.95:
            delta = rng.uniform(0.1, 0.5)  # clearly worse
        t, y, final = random_run(rng, best + delta, slow_start=slow)
        val: float | None = final / LN2 + rng.normal(0.03, 0.005)
        status = "ok"
        if u >= 0.95 and i > 0:
            k = int(t.size * rng.uniform(0.15, 0.5))
            y[k:] = np.nan if rng.uniform() < 0.5 else y[k:] + np.linspace(0.0, 8.0, t.size - k)
            val, status = None, "diverged"
        elif delta < 0:
            best = best + delta
        curve = np.stack([t, y], axis=1).tolist()
        records.append(
            {"id": f"r{i:02d}", "budget_s": BUDGET, "curve": curve, "val_bpb": val, "status": status}
        )
    return records


@pytest.fixture(scope="module")
def campaign() -> list[dict[str, Any]]:
    return synthetic_campaign(seed=1234)


def test_replay_saves_compute_without_false_aborts(campaign: list[dict[str, Any]]) -> None:
    report = replay(campaign, SelfEvalConfig())
    assert report.n_runs == 60
    assert report.speedup > 1.3
    assert report.n_false_aborts == 0 and report.false_abort_rate == 0.0 and report.n_missed_best == 0
    assert report.best_with == pytest.approx(report.best_without)  # the best run was never aborted
    assert 0.3 < report.abort_rate < 0.9
    assert report.mean_abort_fraction < 0.6
    assert report.exp_per_hour_without == pytest.approx(60 / (60 * BUDGET / 3600))
    assert report.exp_per_hour_with == pytest.approx(report.speedup * report.exp_per_hour_without)
    # Every run that diverged in the record was stopped, as diverged or as hopeless.
    stopped = {o.id for o in report.outcomes if o.decision is not Decision.CONTINUE}
    assert {r["id"] for r in campaign if r["status"] == "diverged"} <= stopped
    text = format_report(report)
    assert "speed-up" in text and "false aborts 0" in text


def test_replay_counts_false_aborts_and_overhead() -> None:
    # A reckless rule (abort on any evidence, from the first check) must show up as false aborts:
    # run 1 would have been the new best, run 3 nearly as good as the best.
    rng = np.random.default_rng(7)
    finals = [2.2, 2.0, 2.5, 2.21]
    records, vals = [], []
    for i, final in enumerate(finals):
        t, y, clean = random_run(rng, final)
        vals.append(clean / LN2 + 0.03)
        records.append({"id": f"r{i}", "budget_s": BUDGET, "curve": as_curve(t, y), "val_bpb": vals[-1]})
    reckless = SelfEvalConfig(min_budget_fraction=0.0, confidence=0.01, alpha=0.0, sigma_floor=0.05, **NO_AUDITS)
    report = replay(records, reckless, overhead_s=5.0, margin_alpha=1.0)
    decisions = [o.decision for o in report.outcomes]
    assert decisions[0] is Decision.CONTINUE  # no incumbent yet: nothing to compare with
    assert decisions[1:] == [Decision.ABORT] * 3
    flags = [(o.false_abort, o.missed_best) for o in report.outcomes]
    assert flags == [(False, False), (True, True), (False, False), (True, False)]
    assert report.n_false_aborts == 2 and report.false_abort_rate == pytest.approx(2 / 4)
    assert report.n_missed_best == 1
    assert report.best_without == pytest.approx(vals[1])
    assert report.regret == pytest.approx(vals[0] - vals[1])
    # The per-run overhead is charged with and without the evaluator.
    assert report.compute_hours_without == pytest.approx(4 * (BUDGET + 5.0) / 3600)
    used = [o.fraction_used for o in report.outcomes[1:]]
    assert report.compute_hours_with == pytest.approx(
        (BUDGET + 5.0 + sum(u * BUDGET + 5.0 for u in used)) / 3600
    )


def test_compare_methods_and_accuracy_tables(campaign: list[dict[str, Any]]) -> None:
    records = campaign[:20]
    base = SelfEvalConfig()
    reports = compare_methods(records, {"refmatch": replace(base, method="refmatch"), "powerlaw_ref": base})
    assert [r.label for r in reports] == ["refmatch", "powerlaw_ref"]
    table = format_comparison(reports)
    assert "refmatch" in table and "powerlaw_ref" in table
    rows = forecast_accuracy(records, ["refmatch", "powerlaw_ref"], fractions=(0.3, 0.6))
    assert {(r.method, r.fraction) for r in rows} == {
        (m, f) for m in ("refmatch", "powerlaw_ref") for f in (0.3, 0.6)
    }
    assert all(r.n > 5 and r.rmse >= r.mae >= abs(r.bias) for r in rows)
    late = {r.method: r.rmse for r in rows if r.fraction == 0.6}
    early = {r.method: r.rmse for r in rows if r.fraction == 0.3}
    assert sum(late.values()) < sum(early.values())  # forecasts sharpen as the run goes on
    assert "z_std" in format_accuracy(rows)
    near = forecast_accuracy(records, ["powerlaw_ref"], fractions=(0.3,), near_best=0.1)
    assert 0 < near[0].n < next(r.n for r in rows if r.method == "powerlaw_ref" and r.fraction == 0.3)


def test_load_records_reads_jsonl(tmp_path: Path, campaign: list[dict[str, Any]]) -> None:
    path = tmp_path / "curves.jsonl"
    lines = [json.dumps(r) for r in campaign[:3]]
    lines.append(
        json.dumps(
            {
                "id": "crashed",
                "budget_s": BUDGET,
                "curve": [[0.5, 5.5], [1.0, float("nan")]],
                "val_bpb": None,
                "status": "crashed",
            }
        )
    )
    path.write_text("\n".join(lines) + "\n\n")
    records = load_records(path)
    assert [r.id for r in records] == ["r00", "r01", "r02", "crashed"]
    assert records[0].has_outcome and not records[3].has_outcome
    assert records[3].full_cost_s == pytest.approx(1.0)  # it ended there
    assert replay(records, SelfEvalConfig()).n_runs == 4


def test_gap_spread_is_the_robust_spread_of_finished_runs_gaps() -> None:
    assert gap_spread([(2.7, 1.8), (2.8, 1.9)]) == 0.0  # too few to say
    finished = [(g + loss / LN2, loss) for g, loss in [(0.0, 1.8), (0.1, 1.9), (0.2, 1.85), (5.0, 1.7)]]
    assert gap_spread(finished) == pytest.approx(1.4826 * 0.1)  # the MAD ignores the outlier


# -- audits -------------------------------------------------------------------------------------


def late_bloomer(rng: np.random.Generator, final: float, tau_s: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """A run whose loss falls slowly (time constant `tau_s`, not train.py's fraction of a second)
    and still ends at `final`: the shape a forecast from the incumbent's curve misjudges."""
    t = times(rng)
    return t, final + (START - final) * np.exp(-t / tau_s) + rng.normal(0.0, 0.03, t.size)


def test_an_audited_run_continues_where_the_rule_would_abort_and_says_so() -> None:
    rng = np.random.default_rng(4)
    ref = make_reference(rng, final=2.0)
    history = [ref.val_bpb, ref.val_bpb + 0.2, ref.val_bpb + 0.5]
    t, y, _ = random_run(rng, final=2.35)
    prefix = as_curve(t, y, 0.4)
    bare = decide(prefix, BUDGET, ref, history, SelfEvalConfig())
    audit = decide(prefix, BUDGET, ref, history, SelfEvalConfig(), audit=True)
    assert bare.decision is Decision.ABORT and not bare.audit
    assert audit.decision is Decision.CONTINUE and audit.audit and audit.reason.startswith("audit: would abort")
    assert audit.forecast == bare.forecast and audit.tau == bare.tau
    # An audited run the rule would let go on is an ordinary verdict.
    t, y, _ = random_run(rng, final=1.95)
    assert not decide(as_curve(t, y, 0.4), BUDGET, ref, history, SelfEvalConfig(), audit=True).audit
    event = verdict_event(audit)
    assert event["audit"] is True and event["decision"] == "continue"
    assert audit_record([verdict_event(bare), event, verdict_event(audit)]) == {
        "fraction": event["fraction"], "forecast_val_bpb": event["forecast_val_bpb"],
        "forecast_std": event["forecast_std"], "tau": event["tau"]}
    assert audit_record([verdict_event(bare)]) is None


def test_audits_run_first_until_confirmed_then_one_in_every() -> None:
    cfg = SelfEvalConfig(audit_first=2, audit_every=20)
    ids = [f"e{i:05d}" for i in range(4000)]
    assert all(audited("c1", i, cfg, confirmed) for i in ids[:50] for confirmed in (0, 1))
    share = sum(audited("c1", i, cfg, 2) for i in ids) / len(ids)
    assert 0.035 < share < 0.07  # one in 20
    # The same answer every time (a restarted evaluator audits the same runs), other runs elsewhere.
    assert [audited("c1", i, cfg, 2) for i in ids] == [audited("c1", i, cfg, 5) for i in ids]
    assert [audited("c1", i, cfg, 2) for i in ids] != [audited("c2", i, cfg, 2) for i in ids]
    off = SelfEvalConfig(**NO_AUDITS)
    assert not any(audited("c1", i, off, 0) for i in ids)
    for bad in ({"audit_every": -1}, {"audit_first": 1.5}):
        with pytest.raises(ValueError, match="whole number"):
            SelfEvalConfig(**bad)  # type: ignore[arg-type]


def test_audit_tally_counts_caught_misses_and_confirmations() -> None:
    audit = {"fraction": 0.3, "forecast_val_bpb": 3.4, "forecast_std": 0.05, "tau": 2.9}
    records = [
        {"status": "ok", "val_bpb": 2.7, "audit": audit},  # would have been a false abort: 0.7 missed
        {"status": "ok", "val_bpb": 2.85, "audit": {**audit, "forecast_val_bpb": 3.0}},  # 0.15 missed
        {"status": "ok", "val_bpb": 3.1, "audit": audit},  # the abort would have been right
        {"status": "crashed", "val_bpb": None, "audit": audit},  # so would this one
        {"status": "ok", "val_bpb": 2.5, "audit": None},  # not audited
        {"status": "aborted", "val_bpb": None, "forecast_val_bpb": 3.5},
    ]
    tally = audit_tally(records)
    assert tally.miss == pytest.approx(0.7) and tally.confirmed == 2
    assert audit_tally(records[2:]) == AuditTally(0.0, 2)
    assert audit_tally([]) == AuditTally()


def test_a_caught_miss_widens_the_forecast_so_a_late_bloomer_is_not_aborted() -> None:
    rng = np.random.default_rng(11)
    ref = make_reference(rng, final=2.0)
    t, y = late_bloomer(rng, final=1.9)  # ends better than the incumbent, but starts slowly
    prefix = as_curve(t, y, 0.3)
    cfg = SelfEvalConfig()
    plain = forecast_val_bpb(prefix, BUDGET, ref, cfg.method, cfg.forecast)
    widened = forecast_val_bpb(prefix, BUDGET, replace(ref, audit_miss=0.8), cfg.method, cfg.forecast)
    assert widened.mean == plain.mean and widened.std == pytest.approx(math.hypot(plain.std, 0.8))
    assert decide(prefix, BUDGET, ref, [ref.val_bpb], cfg).decision is Decision.ABORT
    assert decide(prefix, BUDGET, replace(ref, audit_miss=0.8), [ref.val_bpb], cfg).decision is Decision.CONTINUE


def test_replay_audits_a_would_be_abort_and_stops_the_false_aborts_of_late_bloomers() -> None:
    # An incumbent with train.py's curve, then runs whose loss falls slowly and ends lower: the bare
    # rule aborts every one of them; the first audit catches the miss and the rest run.
    rng = np.random.default_rng(3)
    t = times(rng)
    y = clean_curve(t, 2.0) + rng.normal(0.0, 0.04, t.size)
    records = [{"id": "r00", "budget_s": BUDGET, "curve": as_curve(t, y), "val_bpb": 2.0 / LN2 + 0.03}]
    for i in range(1, 7):
        final = 1.9 - 0.01 * i
        t, y = late_bloomer(rng, final)
        records.append({"id": f"r{i:02d}", "budget_s": BUDGET, "curve": as_curve(t, y), "val_bpb": final / LN2 + 0.03})
    bare = replay(records, SelfEvalConfig(**NO_AUDITS))
    assert bare.n_false_aborts == 6 and bare.n_audited == 0 and bare.best_with == pytest.approx(records[0]["val_bpb"])
    audits = replay(records, SelfEvalConfig(audit_first=1, audit_every=0))
    assert [o.reason for o in audits.outcomes][1] == "audited: would have aborted"
    assert audits.n_aborted == 0 and audits.n_false_aborts == 0 and audits.n_audited == 1
    assert audits.best_with == pytest.approx(records[-1]["val_bpb"])
    assert "1 more let finish as audits" in format_report(audits)


def test_audits_cost_some_of_the_saving_on_an_ordinary_campaign(campaign: list[dict[str, Any]]) -> None:
    bare = replay(campaign, SelfEvalConfig(**NO_AUDITS))
    audits = replay(campaign, SelfEvalConfig())
    assert audits.n_audited >= 2  # the first two would-be aborts at least
    assert audits.n_false_aborts == 0 and audits.n_aborted < bare.n_aborted
    assert 1.2 < audits.speedup < bare.speedup
