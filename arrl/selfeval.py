"""The self-evaluator's decision rule: continue, abort, or flag a running experiment as diverged.

Aborting a run that will not beat the incumbent frees its remaining budget for another experiment;
aborting one that would have become the new best is the expensive mistake. So the rule is
asymmetric: a run is aborted only when its forecast val_bpb exceeds a threshold `tau` that sits a
noise margin above the best outcome so far, with high probability under the forecast's own
uncertainty, and never before a minimum fraction of the budget (early curves cross too often).
Without an incumbent nothing can be compared, so only divergence stops a run; a run the keep rule
will not compare with the incumbent's score whatever it reaches (`uncompared`: its machine probe says
it runs at another speed than that score's, or, with `stop_unscored_class`, it runs on a hardware
class where the incumbent has no score) is stopped at once.

The rule audits itself. A run it would abort is let run to the end instead while fewer than
`audit_first` such audits have confirmed it, and after that one in `audit_every` (chosen by
experiment id, so a restarted evaluator picks the same ones); the forecast and tau it would have
been aborted on travel with the run's record (`audit_record`). An audited run that ends below that
tau would have been a false abort: the forecaster misjudges this campaign's curves (a
configuration whose loss falls slowly at first and best at the end, say), and every later
forecast's uncertainty grows by the largest such miss (`audit_tally`, `Reference.audit_miss`).
Without audits the rule cannot learn that it is wrong, since it never sees how an aborted run
would have ended; and its mistakes cost twice, because the search takes an aborted run's
forecast for its outcome and steers away from where the best runs are.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum

import numpy as np

from arrl.forecast import (
    FORECASTERS,
    LN2,
    Curve,
    Forecast,
    ForecastOptions,
    Reference,
    curve_arrays,
    forecast_val_bpb,
    window_mean,
)


class Decision(StrEnum):
    CONTINUE = "continue"
    ABORT = "abort"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class Verdict:
    """One decision about a running experiment, with the evidence behind it."""

    decision: Decision
    reason: str
    fraction: float
    forecast: Forecast | None = None
    tau: float | None = None
    p_worse: float | None = None
    """P(final val_bpb > tau) under the normal forecast."""
    llr: float | None = None
    """Log-odds log(p_worse / (1 - p_worse)): the evidence for "worse than tau", SPRT-style."""
    audit: bool = False
    """The rule would abort, but the run is audited: it continues (see the module docstring)."""
    uncompared: dict[str, object] | None = None
    """Why the keep rule will not compare the run, as its record will say it (`decide`)."""

    @property
    def stop(self) -> bool:
        return self.decision is not Decision.CONTINUE


@dataclass(frozen=True)
class SelfEvalConfig:
    """Knobs of the decision rule. val_bpb quantities are in bits per byte.

    The defaults (with `ForecastOptions`'s) gave zero false aborts and a ~1.45x throughput gain
    over 60 synthetic 60-run campaigns; re-check them on real curves with `arrl.selfeval_bench`.
    """

    method: str = "ensemble"
    """Forecaster name, one of `arrl.forecast.FORECASTERS`."""
    alpha: float = 0.25
    """Margin above the best outcome, in units of the spread `sigma` of past outcomes."""
    tolerance: float = 0.0
    """Extra absolute slack (bpb) added to tau, for noise that the spread does not capture."""
    sigma_floor: float = 0.02
    """Floor on sigma (bpb): with few or near-identical past outcomes the MAD is ~0."""
    min_budget_fraction: float = 0.15
    """Never abort before this fraction of the budget: early curves are uninformative."""
    max_budget_fraction: float = 0.85
    """Never abort after this fraction: late aborts save little and forfeit a result."""
    confidence: float = 0.9
    """Abort only when P(final > tau) reaches this. The rule looks every cadence tick, so a run is
    tested ~20 times: per-look 0.95 let too many good runs through on synthetic campaigns."""
    divergence_factor: float = 1.5
    """Diverged when the smoothed loss exceeds this multiple of the initial loss..."""
    divergence_after_fraction: float = 0.1
    """...after this fraction of the budget (early spikes during warmup are tolerated)..."""
    divergence_rise: float = 0.25
    """...or when its last two points have climbed back above its lowest level (a running median
    of three points) by this share of what it had fallen from the start (at least of half its
    start): a loss on its way to exploding. Caught here, the run is recorded as diverged, a crash,
    which the search steers by; the forecast rule would have aborted it with a forecast that reads
    like a slow run. 0: off."""
    audit_first: int = 2
    """Every run the rule would abort runs to the end instead, to check the rule (the module
    docstring says why), until this many such audits have confirmed it..."""
    audit_every: int = 20
    """...and after that one in this many; 0 (and audit_first 0) turns audits off."""
    stop_unscored_class: int = 0
    """1: also stop at once an edit running on a hardware class where the incumbent has no score
    yet (`--hardware-class any`), which the keep rule will not compare either; its record says
    `unscored_class` as if it had run to the end, so the class's re-run still falls due. On
    simulated fleets it saved a sixth to a fifth of the time, ahead by the clock early in a campaign
    and level to behind at its end, where the lost outcomes (they teach the search through the class
    offsets) count (docs/search.md, "Slow spells and the self-evaluator"). 0: such edits run to the
    end."""
    forecast: ForecastOptions = field(default_factory=ForecastOptions)

    def __post_init__(self) -> None:
        # Checked here: `decide` treats a failing forecast as "no evidence", so a misspelt method
        # would otherwise silently switch the evaluator off.
        if self.method not in FORECASTERS:
            raise ValueError(f"unknown forecast method {self.method!r}; choose from {sorted(FORECASTERS)}")
        for f in fields(self):  # `--selfeval-option alpha=abc` would fail in every tick instead
            value = getattr(self, f.name)
            if f.type in ("float", float) and not (isinstance(value, int | float) and not isinstance(value, bool)
                                          and math.isfinite(value) and value >= 0):
                raise ValueError(f"{f.name} must be a number >= 0, not {value!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError("confidence must be in (0, 1)")
        if not 0.0 <= self.min_budget_fraction <= self.max_budget_fraction:
            raise ValueError("need 0 <= min_budget_fraction <= max_budget_fraction")
        for name in ("audit_first", "audit_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a whole number >= 0")
        if self.stop_unscored_class not in (0, 1):
            raise ValueError(f"stop_unscored_class must be 0 or 1, not {self.stop_unscored_class!r}")


def verdict_event(v: Verdict) -> dict[str, object]:
    """A verdict as the `selfeval.verdict` event of the experiment's stream (what the ledger keeps)."""
    fc = v.forecast
    return {"event": "selfeval.verdict", "decision": v.decision.value, "reason": v.reason,
            "fraction": round(v.fraction, 4), "forecast_val_bpb": fc.mean if fc else None,
            "forecast_std": fc.std if fc else None, "method": fc.method if fc else None,
            "tau": v.tau, "p_worse": v.p_worse, "audit": v.audit, "uncompared": v.uncompared}


def audited(campaign_id: str, experiment_id: str, config: SelfEvalConfig, confirmed: int) -> bool:
    """Whether this experiment is one the rule audits rather than aborts: every one until
    `config.audit_first` audits have confirmed the rule (`AuditTally.confirmed`), then one in
    `config.audit_every`, by a hash of the ids (the same answer in every process and after restarts,
    and other experiment numbers in each campaign)."""
    if confirmed < config.audit_first:
        return True
    if config.audit_every <= 0:
        return False
    digest = hashlib.sha256(f"{campaign_id}/{experiment_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % config.audit_every == 0


def audit_record(verdicts: Sequence[Mapping[str, object]]) -> dict[str, object] | None:
    """What a finished run's record keeps of its first audit verdict (the forecast and tau it would
    have been aborted on), from its `selfeval.verdict` events; None when it was not audited."""
    first = next((v for v in verdicts if v.get("audit")), None)
    if first is None:
        return None
    return {k: first.get(k) for k in ("fraction", "forecast_val_bpb", "forecast_std", "tau")}


@dataclass(frozen=True)
class AuditTally:
    """What the campaign's finished audits say about the rule."""

    miss: float = 0.0
    """The largest amount (bpb) by which an audited run's forecast overestimated its outcome, over
    the audited runs that ended below the tau they would have been aborted on (false aborts caught)."""
    confirmed: int = 0
    """Audited runs that ended at or above that tau, or failed: the abort would have been right."""


def audit_tally(records: Sequence[Mapping[str, object]]) -> AuditTally:
    """The `AuditTally` of the campaign's records (each audited one carries `audit_record`)."""
    misses, confirmed = [0.0], 0
    for r in records:
        audit, val = r.get("audit"), r.get("val_bpb")
        if not isinstance(audit, Mapping) or not isinstance(tau := audit.get("tau"), int | float):
            continue
        if r.get("status") != "ok" or not isinstance(val, int | float) or val >= tau:
            confirmed += 1
        elif isinstance(fc := audit.get("forecast_val_bpb"), int | float):
            misses.append(float(fc) - float(val))
    return AuditTally(max(misses), confirmed)


def robust_sigma(values: Sequence[float], floor: float) -> float:
    """Spread of past outcomes: 1.4826 * MAD (a few disasters do not inflate it), floored."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return floor
    mad = float(np.median(np.abs(v - np.median(v))))
    return max(1.4826 * mad, floor)


def gap_spread(finished: Sequence[tuple[float, float]]) -> float:
    """Robust spread (bpb) of val_bpb - final_loss / ln 2 over finished runs given as (val_bpb,
    smoothed final loss); 0 with fewer than 3. Why: a candidate's forecast takes the incumbent's
    gap, so a run whose tunables narrow the gap (it trains slower but generalises better) is
    forecast too high; an abort rule that assumes the gap never moves aborts it."""
    gaps = [v - loss / LN2 for v, loss in finished if math.isfinite(v) and math.isfinite(loss)]
    return robust_sigma(gaps, 0.0) if len(gaps) >= 3 else 0.0


def threshold(
    history_val_bpbs: Sequence[float], reference: Reference | None, config: SelfEvalConfig
) -> tuple[float, float, float]:
    """(best, sigma, tau) with tau = best + alpha * sigma + tolerance; best is inf without outcomes."""
    finite = [v for v in history_val_bpbs if math.isfinite(v)]
    if reference is not None and math.isfinite(reference.val_bpb):
        finite.append(reference.val_bpb)
    best = min(finite) if finite else math.inf
    sigma = robust_sigma(history_val_bpbs, config.sigma_floor)
    return best, sigma, best + config.alpha * sigma + config.tolerance


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def check_divergence(curve: Curve, budget_s: float, config: SelfEvalConfig) -> str | None:
    """Reason string when the run has diverged (non-finite loss, or loss exploded), else None."""
    t, y = curve_arrays(curve)
    if y.size == 0:
        return None
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(t))):
        return "non-finite loss"
    f = float(t[-1]) / budget_s
    if f < config.divergence_after_fraction or y.size < 2:
        return None
    # The start is the median of the first few points: robust to one odd first batch.
    initial = float(np.median(y[: min(5, y.size)]))
    opts = config.forecast
    level = window_mean(t, y, float(t[-1]), opts.window_frac * budget_s, opts.min_points)[0]
    if initial > 0 and level > config.divergence_factor * initial:
        return f"loss exploded: smoothed {level:.3f} > {config.divergence_factor:g} x initial {initial:.3f}"
    if config.divergence_rise > 0 and y.size >= 5:
        low = float(np.min(np.median(np.stack([y[:-4], y[1:-3], y[2:-2]]), axis=0)))
        now = float(np.min(y[-2:]))
        # A run that has barely learnt must climb as far as one that fell by half its start: noise
        # on a flat curve is not a climb.
        if now - low > config.divergence_rise * max(initial - low, initial / 2):
            return (f"loss climbing back: {now:.3f} is {now - low:.3f} above its lowest {low:.3f}, "
                    f"over {config.divergence_rise:g} of its fall from {initial:.3f}")
    return None


def decide(
    curve: Curve,
    budget_s: float,
    reference: Reference | None,
    history_val_bpbs: Sequence[float],
    config: SelfEvalConfig | None = None,
    audit: bool = False,
    uncompared: dict[str, object] | None = None,
) -> Verdict:
    """Decide about a running experiment from its curve prefix.

    `reference` is the incumbent (best completed run) and `history_val_bpbs` the val_bpb of every
    completed run so far (its spread sets the margin). Divergence stops a run at any time; an abort
    needs an incumbent, `min_budget_fraction <= f <= max_budget_fraction`, and
    P(forecast val_bpb > tau) >= confidence. An `audit`ed run (`audited`) that the rule would abort
    continues, with a verdict that says so.

    `uncompared` says why the keep rule will not compare the run with the incumbent's score whatever
    it reaches (`pipeline.evaluator.Evaluator.uncompared`): `{"speed_mismatch": SHIFT}`, a machine
    probe that far from the speed of the score (`arrl.campaign.Campaign.speed_shift`), or
    `{"unscored_class": CLASS}` (`stop_unscored_class`). Such a run is stopped at once, with no forecast, and its record says the same as if it had run to the
    end. Let run, it spent a budget on a run that could not be kept; judged against the score's
    curve on a machine that had slowed down, it was aborted as hopeless anyway and its forecast, a
    slow machine's, misled the search (docs/search.md, "Slow spells and the self-evaluator").
    """
    cfg = config or SelfEvalConfig()
    t, _ = curve_arrays(curve)
    f = float(t[-1]) / budget_s if t.size and math.isfinite(t[-1]) else 0.0
    why = check_divergence(curve, budget_s, cfg)
    if why is not None:
        return Verdict(Decision.DIVERGED, why, f)
    if uncompared and isinstance(cls := uncompared.get("unscored_class"), str):
        return Verdict(Decision.ABORT, f"run on hardware class {cls!r}, where the incumbent has no score yet, "
                                       "so the keep rule would not compare it", f, uncompared=uncompared)
    if uncompared and isinstance(shift := uncompared.get("speed_mismatch"), int | float):
        return Verdict(Decision.ABORT, f"run at another speed: its machine probe is {shift:+.0%} from the "
                                       "incumbent's score's, so the keep rule would not compare it", f,
                       uncompared=uncompared)
    if reference is None:
        return Verdict(Decision.CONTINUE, "no incumbent yet", f)
    if f < cfg.min_budget_fraction:
        return Verdict(Decision.CONTINUE, f"before min fraction {cfg.min_budget_fraction:g}", f)
    _, _, tau = threshold(history_val_bpbs, reference, cfg)
    try:
        fc = forecast_val_bpb(curve, budget_s, reference, cfg.method, cfg.forecast)
    except ValueError as exc:
        return Verdict(Decision.CONTINUE, f"no forecast: {exc}", f, tau=tau)
    if not (math.isfinite(fc.mean) and math.isfinite(fc.std)):
        return Verdict(Decision.CONTINUE, "non-finite forecast", f, forecast=fc, tau=tau)
    p_worse = _normal_sf((tau - fc.mean) / max(fc.std, 1e-9))
    p_clip = min(max(p_worse, 1e-12), 1.0 - 1e-12)
    llr = math.log(p_clip / (1.0 - p_clip))
    detail = f"forecast {fc.mean:.4f}±{fc.std:.4f} vs tau {tau:.4f}, P(worse)={p_worse:.3f}"
    if f > cfg.max_budget_fraction:
        # Still forecast (the verdict is logged), but let the run finish: little left to save.
        detail = f"past max fraction {cfg.max_budget_fraction:g}: " + detail
        return Verdict(Decision.CONTINUE, detail, f, fc, tau, p_worse, llr)
    if p_worse >= cfg.confidence and audit:
        return Verdict(Decision.CONTINUE, "audit: would abort: " + detail, f, fc, tau, p_worse, llr, audit=True)
    if p_worse >= cfg.confidence:
        return Verdict(Decision.ABORT, "worse than incumbent: " + detail, f, fc, tau, p_worse, llr)
    return Verdict(Decision.CONTINUE, detail, f, fc, tau, p_worse, llr)
