"""Forecast the final loss (and val_bpb) of a running training job from its streamed loss curve.

Runs train for a fixed wall-clock budget and stream `(training_seconds, loss)` points. The
self-evaluator (`arrl.selfeval`) aborts a run only when it is confidently worse than the incumbent,
so it needs forecasts *with honest uncertainty*. All forecasters share the signature
`forecast(curve, budget_s, reference) -> Forecast` (loss units; `forecast_val_bpb` maps to bpb):

* `powerlaw`: `a * t^-b + c` fitted to the run and extrapolated. The LR warmdown over the last
  ~40% of the budget bends every curve below any power law, so this is biased high: a baseline,
  and the fallback while there is no incumbent.
* reference matching: the run's smoothed loss now, minus the incumbent's remaining drop from the
  same budget fraction (warmdown bend included): as is (`refmatch`), scaled by the level ratio
  (`refmatch_ratio`), or corrected by how differently power-law fits of the two prefixes say they
  still have to fall (`powerlaw_ref`: the bend comes from the incumbent, the run's own shape, such
  as a slow start, from its fit). `ensemble` combines `refmatch` and `powerlaw_ref`.

On synthetic campaigns `powerlaw_ref` had the best-calibrated tails and saved the most compute at
zero false aborts; `arrl.selfeval_bench` re-measures that on recorded curves. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

LN2 = math.log(2.0)
FloatArray = npt.NDArray[np.float64]
# A curve is a sequence of (t, loss) pairs, or an (n, 2) array (the replay passes array slices so
# that it never copies a run's curve once per check).
Curve = Sequence[tuple[float, float]] | Sequence[Sequence[float]] | FloatArray


@dataclass(frozen=True)
class ForecastOptions:
    """Tunables shared by the forecasters; the defaults were set on synthetic campaigns."""

    window_frac: float = 0.03
    """Trailing smoothing window, as a fraction of the budget (0.9 s of a 30 s run)."""
    min_points: int = 8
    """The smoothing window is widened until it holds at least this many points."""
    skip_frac: float = 0.05
    """The first 5% of the budget (warmup, the initial collapse from ln 256) is not power-law."""
    refmatch_shape_k: float = 0.3
    """Relative uncertainty of the incumbent's remaining drop when transplanted onto another run."""
    powerlaw_misspec: float = 0.3
    """Extrapolation error (nats) of a raw power law at fraction 0, shrinking linearly to 0 at 1."""
    powerlaw_ref_k: float = 0.5
    """`powerlaw_ref`: relative uncertainty of its shape correction..."""
    powerlaw_drop_k: float = 0.15
    """...and of its remaining drop (less than refmatch's: the run's own fit covers its shape)."""
    fit_max_frac: float = 0.6
    """`powerlaw_ref` fits only this much of the budget: a warmdown bend is not a power law."""
    schedule_sd: float = 0.07
    """Nats of uncertainty from schedule differences (a run's warmdown may start or end unlike the
    reference's), flat until `schedule_span` of the budget is left, then shrinking linearly to 0."""
    schedule_span: float = 0.2
    ensemble_rho: float = 0.8
    """Assumed error correlation of the ensemble members: both are anchored on the same two levels."""
    gap_std: float = 0.01
    """Run-to-run spread (bpb) of the generalisation gap val_bpb - final_loss / ln 2, at least; the
    campaign's own finished runs can say it is wider (`Reference.gap_spread`): on train.py's 64 real
    `cpu` runs it is 0.05, as the tunables move the gap, not only the training loss."""


DEFAULT_OPTIONS = ForecastOptions()


@dataclass(frozen=True)
class Forecast:
    """A normal forecast of a run's final smoothed loss (or its val_bpb, see `forecast_val_bpb`)."""

    mean: float
    std: float
    method: str
    fraction_seen: float


def curve_arrays(curve: Curve) -> tuple[FloatArray, FloatArray]:
    """(t, loss) arrays sorted by t; non-finite values are kept (divergence checks need them)."""
    arr = np.asarray(curve, dtype=np.float64)
    if arr.size == 0:
        return np.empty(0), np.empty(0)
    arr = arr.reshape(-1, 2)
    t, y = arr[:, 0], arr[:, 1]
    if t.size > 1 and np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, y = t[order], y[order]
    return t, y


def finite_only(t: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    mask = np.isfinite(t) & np.isfinite(y)
    return t[mask], y[mask]


def noise_sigma(y: FloatArray) -> float:
    """Per-point noise from first differences: the trend cancels, the MAD ignores loss spikes."""
    if y.size < 3:
        return 0.0
    d = np.diff(y)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def window_mean(
    t: FloatArray, y: FloatArray, t_end: float, window_s: float, min_points: int = 8
) -> tuple[float, int]:
    """Robust mean loss over `(t_end - window_s, t_end]`, widened to `min_points` points; (mean, n).

    A trailing mean rather than the last point: single steps are noisy (std 0.03-0.08 nats). It lags
    the curve by about half a window, but every consumer compares runs at the same fraction with
    the same window, so the lag cancels.
    """
    hi = int(np.searchsorted(t, t_end, side="right"))
    lo = int(np.searchsorted(t, t_end - window_s, side="right"))
    lo = max(0, min(lo, hi - min_points))
    if hi <= lo:
        return math.nan, 0
    # Clipped at 3 robust sigmas around the median: one bad batch (+2 nats) in a window of 20
    # points would otherwise move the level by 0.1 nats, as much as a real difference between runs.
    w = y[lo:hi]
    med = float(np.median(w))
    spread = 3.0 * 1.4826 * float(np.median(np.abs(w - med)))
    return float(np.mean(np.clip(w, med - spread, med + spread))) if spread > 0 else med, hi - lo


def smoothed_final(curve: Curve, budget_s: float, opts: ForecastOptions = DEFAULT_OPTIONS) -> float:
    """A finished run's final loss: mean of its last `window_frac` of the budget (not the last point)."""
    t, y = finite_only(*curve_arrays(curve))
    if t.size == 0:
        return math.nan
    return window_mean(t, y, float(t[-1]), opts.window_frac * budget_s, opts.min_points)[0]


@dataclass(frozen=True, eq=False)
class PowerLawFit:
    """`L(t) = a * t^-b + c`, with `sigma` the per-point residual std and `cov` the (a, b, c) covariance."""

    a: float
    b: float
    c: float
    sigma: float
    n_points: int
    cov: FloatArray = field(repr=False)

    def predict(self, t: float) -> float:
        return float(self.a * t ** (-self.b) + self.c)

    def _grad(self, t: float) -> FloatArray:
        x = t ** (-self.b)
        return np.array([x, -self.a * math.log(t) * x, 1.0])

    def predict_std(self, t: float) -> float:
        """Delta-method std of the fitted curve at `t` (parameter uncertainty only)."""
        g = self._grad(t)
        return math.sqrt(max(float(g @ self.cov @ g), 0.0))

    def drop(self, t1: float, t2: float) -> tuple[float, float]:
        """Fitted drop L(t1) - L(t2) and its delta-method std (errors in a, b, c partly cancel)."""
        g = self._grad(t1) - self._grad(t2)
        return self.predict(t1) - self.predict(t2), math.sqrt(max(float(g @ self.cov @ g), 0.0))


# Exponents searched: 4% steps are finer than b's own uncertainty on a 30 s curve, so no refinement.
_B_GRID = np.geomspace(0.02, 3.0, 128)


def _ls_given_b(
    tb: FloatArray, yb: FloatArray, w: FloatArray, bs: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Closed-form weighted least squares for (a, c) at every b, with a, c >= 0; returns a, c, SSE."""
    x = tb[None, :] ** (-bs[:, None])
    sw, sy, syy = w.sum(), w @ yb, w @ (yb * yb)
    sx, sxx, sxy = x @ w, (x * x) @ w, (x * yb) @ w
    det = sw * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(det > 0, (sw * sxy - sx * sy) / det, 0.0)
        c = (sy - a * sx) / sw
        # Active constraints: a < 0 means "flat", c < 0 means "pure power law through 0".
        neg_a = a < 0
        a = np.where(neg_a, 0.0, a)
        c = np.where(neg_a, sy / sw, c)
        neg_c = c < 0
        a = np.where(neg_c, np.maximum(sxy / sxx, 0.0), a)
        c = np.where(neg_c, 0.0, c)
    sse = syy - 2 * a * sxy - 2 * c * sy + a * a * sxx + 2 * a * c * sx + c * c * sw
    return a, c, sse


def fit_power_law(
    t: Sequence[float] | FloatArray,
    loss: Sequence[float] | FloatArray,
    *,
    skip_frac: float = 0.05,
    t_skip: float | None = None,
    n_bins: int = 40,
    huber_k: float = 1.5,
    n_iter: int = 3,
) -> PowerLawFit:
    """Robust fit of `a * t^-b + c` (a, b, c >= 0) to a loss curve.

    The curve is binned in time (bin means weighted by their counts) so the cost does not grow with
    the step rate, points before `t_skip` (default `skip_frac` of the last time) are dropped, b is
    searched on a log grid with (a, c) in closed form for each b, and the bins are reweighted with
    Huber weights so that what survives of loss spikes does not drag the asymptote.
    Raises ValueError with fewer than 4 usable bins.
    """
    tt, yy = finite_only(np.asarray(t, dtype=np.float64), np.asarray(loss, dtype=np.float64))
    if tt.size == 0:
        raise ValueError("empty curve")
    cut = skip_frac * float(tt.max()) if t_skip is None else t_skip
    keep = tt > max(cut, 0.0)
    tt, yy = tt[keep], yy[keep]
    if tt.size < 4:
        raise ValueError("need at least 4 points after the skipped prefix")
    sigma_pt = max(noise_sigma(yy), 1e-6)
    if yy.size >= 9:
        # Clip loss spikes to 4 sigma around a 9-point running median before binning: a spike
        # shifts its bin's mean by far more than the Huber weights below can fully undo.
        med = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(yy, 4, mode="edge"), 9), axis=1)
        yy = np.clip(yy, med - 4 * sigma_pt, med + 4 * sigma_pt)
    edges = np.linspace(float(tt.min()), float(tt.max()), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, tt, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    filled = counts > 0
    tb = np.bincount(idx, tt, n_bins)[filled] / counts[filled]
    yb = np.bincount(idx, yy, n_bins)[filled] / counts[filled]
    counts = counts[filled]
    if tb.size < 4:
        raise ValueError("need at least 4 time bins")
    w = counts.copy()
    for _ in range(max(n_iter, 1)):
        a_s, c_s, sse = _ls_given_b(tb, yb, w, _B_GRID)
        i = int(np.argmin(sse))
        a, b, c = float(a_s[i]), float(_B_GRID[i]), float(c_s[i])
        # Huber weights on residuals standardised by the bin's expected noise.
        r = (yb - (a * tb ** (-b) + c)) / (sigma_pt / np.sqrt(counts))
        u = np.abs(r) / huber_k
        w = counts * np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
    resid = yb - (a * tb ** (-b) + c)
    dof = max(tb.size - 3, 1)
    # Per-point residual std: model misfit makes it exceed the pure noise `sigma_pt`.
    sigma = max(math.sqrt(float(w @ (resid * resid)) / dof), sigma_pt)
    x = tb ** (-b)
    jac = np.stack([x, -a * np.log(tb) * x, np.ones_like(tb)], axis=1)
    cov = np.asarray(sigma**2 * np.linalg.pinv(jac.T @ (jac * w[:, None])), dtype=np.float64)
    return PowerLawFit(a=a, b=b, c=c, sigma=sigma, n_points=int(tt.size), cov=cov)


@dataclass(frozen=True, eq=False)
class Reference:
    """The incumbent: its full curve, final smoothed loss and val_bpb (the mapping to val_bpb)."""

    t: FloatArray = field(repr=False)
    y: FloatArray = field(repr=False)
    budget_s: float
    final_loss: float
    val_bpb: float
    noise: float
    run_id: str = ""
    gap_spread: float = 0.0
    """Spread (bpb) of the gap val_bpb - final_loss / ln 2 over the campaign's finished runs
    (`arrl.selfeval.gap_spread`); forecasts take the larger of this and `ForecastOptions.gap_std`."""
    audit_miss: float = 0.0
    """How far (bpb) the self-evaluator's audits caught a forecast overestimating a run it would have
    aborted wrongly (`arrl.selfeval.audit_tally`); added to every forecast's uncertainty."""
    # Power-law fits of the reference prefix, keyed by fraction in 1/200 (and skip): every candidate
    # asks for about the same fractions, and the fit is the expensive part.
    _fits: dict[tuple[int, float], PowerLawFit | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_curve(
        cls,
        curve: Curve,
        budget_s: float,
        val_bpb: float,
        *,
        run_id: str = "",
        opts: ForecastOptions = DEFAULT_OPTIONS,
    ) -> Reference:
        """Build with the `opts` the forecasts will use: the final loss uses its smoothing window."""
        t, y = finite_only(*curve_arrays(curve))
        if t.size < 2:
            raise ValueError("reference curve needs at least 2 finite points")
        final = window_mean(t, y, float(t[-1]), opts.window_frac * budget_s, opts.min_points)[0]
        return cls(t, y, budget_s, final, val_bpb, noise_sigma(y), run_id)

    @property
    def gap(self) -> float:
        """Generalisation gap in bpb: val_bpb - final_loss / ln 2."""
        return self.val_bpb - self.final_loss / LN2

    def level_at(self, fraction: float, opts: ForecastOptions = DEFAULT_OPTIONS) -> tuple[float, int]:
        """Smoothed loss at `fraction` of the reference's own budget, with the run's window rule."""
        return window_mean(
            self.t, self.y, fraction * self.budget_s, opts.window_frac * self.budget_s, opts.min_points
        )

    def prefix_fit(self, fraction: float, opts: ForecastOptions = DEFAULT_OPTIONS) -> PowerLawFit | None:
        """Power-law fit of the reference's curve up to `fraction` (None when too short), cached."""
        key = (int(round(fraction * 200)), opts.skip_frac)
        if key not in self._fits:
            n = int(np.searchsorted(self.t, key[0] / 200 * self.budget_s, side="right"))
            try:
                fit = fit_power_law(self.t[:n], self.y[:n], t_skip=opts.skip_frac * self.budget_s)
            except ValueError:
                fit = None
            self._fits[key] = fit
        return self._fits[key]


Forecaster = Callable[[Curve, float, Reference | None], Forecast]


def _prepare(curve: Curve, budget_s: float) -> tuple[FloatArray, FloatArray, float]:
    t, y = finite_only(*curve_arrays(curve))
    if t.size == 0:
        raise ValueError("curve has no finite points")
    return t, y, float(min(t[-1] / budget_s, 1.0))


def _fallback(
    t: FloatArray, y: FloatArray, budget_s: float, f: float, opts: ForecastOptions, method: str
) -> Forecast:
    """Too little data to fit anything: the current level, with a wide std that shrinks with f."""
    level = window_mean(t, y, float(t[-1]), opts.window_frac * budget_s, opts.min_points)[0]
    return Forecast(mean=level, std=max(1.0 - f, 0.05), method=method + ":fallback", fraction_seen=f)


def forecast_powerlaw(
    curve: Curve, budget_s: float, reference: Reference | None, *, opts: ForecastOptions = DEFAULT_OPTIONS
) -> Forecast:
    """Raw power-law extrapolation of the run's own curve. Ignores the reference, so it cannot see
    the warmdown bend and is biased high: a baseline, and the fallback without an incumbent."""
    t, y, f = _prepare(curve, budget_s)
    try:
        fit = fit_power_law(t, y, t_skip=opts.skip_frac * budget_s)
    except ValueError:
        return _fallback(t, y, budget_s, f, opts, "powerlaw")
    # The target is a trailing-window mean, whose centre sits half a window before the budget.
    t_end = budget_s * (1.0 - opts.window_frac / 2)
    std = math.hypot(fit.predict_std(t_end), opts.powerlaw_misspec * (1.0 - f))
    return Forecast(mean=float(fit.predict(t_end)), std=std, method="powerlaw", fraction_seen=f)


def _refmatch(
    curve: Curve, budget_s: float, reference: Reference | None, opts: ForecastOptions, mode: str
) -> Forecast:
    """Reference matching (`mode`: add, ratio or powerlaw, see the module docstring). Levels of run
    and reference are taken at the same budget fraction with the same trailing window, so the
    window's lag cancels."""
    name = {"add": "refmatch", "ratio": "refmatch_ratio", "powerlaw": "powerlaw_ref"}[mode]
    if reference is None:
        fc = forecast_powerlaw(curve, budget_s, None, opts=opts)
        return Forecast(fc.mean, fc.std, name + ":powerlaw", fc.fraction_seen)
    t, y, f = _prepare(curve, budget_s)
    window = opts.window_frac * budget_s
    level, n_run = window_mean(t, y, float(t[-1]), window, opts.min_points)
    ref_level, n_ref = reference.level_at(f, opts)
    if not (math.isfinite(level) and math.isfinite(ref_level)):
        return _fallback(t, y, budget_s, f, opts, name)
    drop = ref_level - reference.final_loss
    extra_var = 0.0
    shape_k = opts.powerlaw_drop_k if mode == "powerlaw" else opts.refmatch_shape_k
    if mode == "ratio":
        # A run that is 10% higher now is assumed to stay 10% higher: its drop scales with its level.
        drop *= level / ref_level if ref_level > 0 else 1.0
    elif mode == "powerlaw":
        fit_f = min(f, opts.fit_max_frac)
        ref_fit = reference.prefix_fit(fit_f, opts)
        n_fit = int(np.searchsorted(t, fit_f * budget_s, side="right"))
        try:
            run_fit = fit_power_law(t[:n_fit], y[:n_fit], t_skip=opts.skip_frac * budget_s)
        except ValueError:
            run_fit = None
        if run_fit is not None and ref_fit is not None:
            # Both drops run from the centre of the trailing window to the centre of the final one.
            half = opts.window_frac / 2
            d_run, sd_run = run_fit.drop(max(t[-1] - window / 2, 1e-3), budget_s * (1 - half))
            d_ref, sd_ref = ref_fit.drop(
                reference.budget_s * max(f - half, 1e-3), reference.budget_s * (1 - half)
            )
            shape = d_run - d_ref
            drop += shape
            extra_var = sd_run**2 + sd_ref**2 + (opts.powerlaw_ref_k * shape) ** 2
        else:
            name += ":add"
            shape_k = opts.refmatch_shape_k
    se_run = noise_sigma(y[-max(n_run, 3) :]) / math.sqrt(max(n_run, 1))
    se_ref = reference.noise / math.sqrt(max(n_ref, 1))
    # Level noise of both runs, the shape term (two runs fall differently from here) and the
    # schedule term (their warmdowns may differ), which both vanish at the end of the budget.
    schedule = opts.schedule_sd * min(1.0, (1.0 - f) / opts.schedule_span)
    var = se_run**2 + 2 * se_ref**2 + extra_var + (shape_k * drop) ** 2 + schedule**2
    return Forecast(mean=float(level - drop), std=math.sqrt(var), method=name, fraction_seen=f)


def forecast_refmatch(
    curve: Curve, budget_s: float, reference: Reference | None, *, opts: ForecastOptions = DEFAULT_OPTIONS
) -> Forecast:
    """Run's level now minus the reference's remaining drop from the same fraction (additive)."""
    return _refmatch(curve, budget_s, reference, opts, "add")


def forecast_refmatch_ratio(
    curve: Curve, budget_s: float, reference: Reference | None, *, opts: ForecastOptions = DEFAULT_OPTIONS
) -> Forecast:
    """Like `refmatch`, with the reference's drop scaled by the run/reference level ratio."""
    return _refmatch(curve, budget_s, reference, opts, "ratio")


def forecast_powerlaw_ref(
    curve: Curve, budget_s: float, reference: Reference | None, *, opts: ForecastOptions = DEFAULT_OPTIONS
) -> Forecast:
    """Reference matching with a power-law shape correction (see `_refmatch`)."""
    return _refmatch(curve, budget_s, reference, opts, "powerlaw")


def combine(forecasts: Sequence[Forecast], method: str, rho: float = 0.5) -> Forecast:
    """Inverse-variance weighted mean; the std assumes pairwise error correlation `rho` (members that
    share a reference are not independent) and widens by the members' disagreement."""
    stds = np.array([max(fc.std, 1e-9) for fc in forecasts])
    means = np.array([fc.mean for fc in forecasts])
    w = 1.0 / stds**2
    w = w / w.sum()
    mean = float(w @ means)
    corr = np.full((stds.size, stds.size), rho)
    np.fill_diagonal(corr, 1.0)
    var = float((w * stds) @ corr @ (w * stds)) + float(w @ (means - mean) ** 2)
    f = max(fc.fraction_seen for fc in forecasts)
    return Forecast(mean=mean, std=math.sqrt(var), method=method, fraction_seen=f)


def forecast_ensemble(
    curve: Curve, budget_s: float, reference: Reference | None, *, opts: ForecastOptions = DEFAULT_OPTIONS
) -> Forecast:
    """Inverse-variance combination of `refmatch` and `powerlaw_ref`."""
    members = [fn(curve, budget_s, reference, opts=opts) for fn in (forecast_refmatch, forecast_powerlaw_ref)]
    return combine(members, "ensemble", opts.ensemble_rho)


FORECASTERS: dict[str, Callable[..., Forecast]] = {
    "powerlaw": forecast_powerlaw,
    "powerlaw_ref": forecast_powerlaw_ref,
    "refmatch": forecast_refmatch,
    "refmatch_ratio": forecast_refmatch_ratio,
    "ensemble": forecast_ensemble,
}


def get_forecaster(method: str, opts: ForecastOptions = DEFAULT_OPTIONS) -> Forecaster:
    """The named forecaster bound to `opts`, with the plain `(curve, budget_s, reference)` signature."""
    if method not in FORECASTERS:
        raise ValueError(f"unknown forecast method {method!r}; choose from {sorted(FORECASTERS)}")
    fn = FORECASTERS[method]

    def bound(curve: Curve, budget_s: float, reference: Reference | None) -> Forecast:
        return fn(curve, budget_s, reference, opts=opts)

    return bound


def forecast_val_bpb(
    curve: Curve,
    budget_s: float,
    reference: Reference | None,
    method: str = "powerlaw_ref",
    opts: ForecastOptions = DEFAULT_OPTIONS,
) -> Forecast:
    """Forecast in val_bpb: final_loss / ln 2 plus the reference's gap val_bpb - final_loss / ln 2
    (taken as 0 without a reference), with the run-to-run spread of that gap added to the std: the
    campaign's measured spread (`Reference.gap_spread`) where it exceeds `opts.gap_std`, and the
    miss the self-evaluator's audits caught (`Reference.audit_miss`)."""
    fc = get_forecaster(method, opts)(curve, budget_s, reference)
    gap = reference.gap if reference is not None else 0.0
    spread = max(opts.gap_std, reference.gap_spread) if reference is not None else opts.gap_std
    miss = reference.audit_miss if reference is not None else 0.0
    std = math.hypot(fc.std / LN2, spread, miss)
    return Forecast(mean=fc.mean / LN2 + gap, std=std, method=fc.method, fraction_seen=fc.fraction_seen)
