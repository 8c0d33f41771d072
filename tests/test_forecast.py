"""Forecasting loss curves: power-law fitting, reference matching, smoothing, val_bpb mapping."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from arrl.forecast import (
    LN2,
    Forecast,
    Reference,
    combine,
    fit_power_law,
    forecast_powerlaw,
    forecast_powerlaw_ref,
    forecast_refmatch,
    forecast_val_bpb,
    get_forecaster,
    smoothed_final,
)

BUDGET = 30.0
START = math.log(256)


def clean_curve(
    t: np.ndarray, final: float, *, b: float = 0.6, t0: float = 0.7, bend: float = 0.15, warmdown: float = 0.4
) -> np.ndarray:
    """Noise-free training curve: starts at ln 256, falls fast, then slowly as c + a (t + t0)^-b, and
    bends down by `bend` nats over the last `warmdown` of the budget; ends exactly at `final`."""
    r = (t0 / (BUDGET + t0)) ** b
    c = (final + bend - START * r) / (1 - r)
    a = (START - c) * t0**b
    u = np.clip((t - (1 - warmdown) * BUDGET) / (warmdown * BUDGET), 0.0, 1.0)
    return np.asarray(c + a * (t + t0) ** (-b) - bend * u)


def noisy(rng: np.random.Generator, clean: np.ndarray, sd: float = 0.05) -> np.ndarray:
    return clean + rng.normal(0.0, sd, clean.size)


def prefix(t: np.ndarray, y: np.ndarray, fraction: float) -> np.ndarray:
    n = int(np.searchsorted(t, fraction * BUDGET, side="right"))
    return np.stack([t[:n], y[:n]], axis=1)


T = np.linspace(BUDGET / 600, BUDGET, 600)  # 20 steps/s


def test_power_law_fit_recovers_asymptote_and_noise() -> None:
    rng = np.random.default_rng(0)
    clean = 1.9 + 3.0 * T ** (-0.6)
    fit = fit_power_law(T, noisy(rng, clean, 0.05))
    assert abs(fit.c - 1.9) < 0.1
    assert abs(fit.b - 0.6) < 0.15
    assert 0.035 < fit.sigma < 0.07  # the per-point noise, not the bin noise
    assert abs(fit.predict(BUDGET) - clean[-1]) < 0.02


def test_power_law_fit_ignores_loss_spikes() -> None:
    rng = np.random.default_rng(1)
    y = noisy(rng, 1.9 + 3.0 * T ** (-0.6), 0.05)
    y[rng.choice(T.size, 12, replace=False)] += 2.0  # a dozen bad batches
    fit = fit_power_law(T, y)
    assert abs(fit.c - 1.9) < 0.12
    assert abs(fit.predict(BUDGET) - (1.9 + 3.0 * BUDGET ** (-0.6))) < 0.04


def test_power_law_fit_rejects_too_little_data() -> None:
    with pytest.raises(ValueError):
        fit_power_law([1.0, 2.0, 3.0], [3.0, 2.5, 2.2])


def test_power_law_forecast_std_shrinks_with_more_data() -> None:
    rng = np.random.default_rng(2)
    clean = 1.9 + 3.0 * T ** (-0.6)
    y = noisy(rng, clean, 0.05)
    forecasts = [forecast_powerlaw(prefix(T, y, f), BUDGET, None) for f in (0.3, 0.6, 0.9)]
    stds = [fc.std for fc in forecasts]
    assert stds[0] > stds[1] > stds[2]
    assert [fc.fraction_seen for fc in forecasts] == pytest.approx([0.3, 0.6, 0.9], abs=0.01)
    assert abs(forecasts[-1].mean - clean[-1]) < 0.03


def test_smoothed_final_beats_the_last_point() -> None:
    rng = np.random.default_rng(3)
    clean = clean_curve(T, 2.0)
    errors_smooth, errors_last = [], []
    for _ in range(40):
        y = noisy(rng, clean, 0.06)
        errors_smooth.append(smoothed_final(np.stack([T, y], 1), BUDGET) - 2.0)
        errors_last.append(y[-1] - 2.0)
    assert np.std(errors_smooth) < 0.5 * np.std(errors_last)
    assert abs(np.mean(errors_smooth)) < 0.03  # the window's lag on a bending curve is small


def make_reference(
    rng: np.random.Generator, final: float = 2.0, gap: float = 0.04, **shape: float
) -> Reference:
    y = noisy(rng, clean_curve(T, final, **shape))
    return Reference.from_curve(np.stack([T, y], 1), BUDGET, final / LN2 + gap, run_id="ref")


def test_reference_holds_final_loss_and_gap() -> None:
    ref = make_reference(np.random.default_rng(4), final=2.0, gap=0.04)
    assert abs(ref.final_loss - 2.0) < 0.03
    assert ref.gap == pytest.approx(ref.val_bpb - ref.final_loss / LN2)
    assert abs(ref.gap - 0.04) < 0.05


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_reference_matching_predicts_a_shifted_reference(fraction: float) -> None:
    errors: dict[str, list[float]] = {"refmatch": [], "powerlaw_ref": []}
    for seed in range(8):
        rng = np.random.default_rng(10 + seed)
        ref = make_reference(rng, final=2.0)
        # The same run shifted up by 0.1 nats everywhere, with its own noise.
        run = prefix(T, noisy(rng, clean_curve(T, 2.0) + 0.1), fraction)
        for forecaster in (forecast_refmatch, forecast_powerlaw_ref):
            fc = forecaster(run, BUDGET, ref)
            assert abs(fc.mean - 2.1) < 2.5 * fc.std, fc  # the stated uncertainty covers the miss
            errors[fc.method].append(abs(fc.mean - 2.1))
    # Plain matching only pays the noise of the two levels; the power-law variant also that of two
    # extrapolated fits, which matters early.
    assert np.mean(errors["refmatch"]) < 0.04
    assert np.mean(errors["powerlaw_ref"]) < (0.12 if fraction < 0.4 else 0.05)


def test_reference_carries_the_warmdown_bend_that_a_power_law_misses() -> None:
    rng = np.random.default_rng(6)
    ref = make_reference(rng, final=2.0, bend=0.2)
    y = noisy(rng, clean_curve(T, 2.05, bend=0.2))
    run = prefix(T, y, 0.5)
    raw = forecast_powerlaw(run, BUDGET, None)
    matched = forecast_refmatch(run, BUDGET, ref)
    assert raw.mean - 2.05 > 0.1  # the bend is still to come, and a power law cannot know it
    assert abs(matched.mean - 2.05) < 0.08


def test_powerlaw_ref_follows_a_slow_starter_better_than_plain_matching() -> None:
    # A run that starts slower (larger t0) but ends level with the reference: plain matching sees
    # it far behind at 30% and predicts it stays behind; the run's own fit sees the steeper decay.
    errs_plain, errs_pl = [], []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        ref = make_reference(rng, final=2.0, t0=0.6)
        run = prefix(T, noisy(rng, clean_curve(T, 2.0, t0=1.6)), 0.3)
        errs_plain.append(forecast_refmatch(run, BUDGET, ref).mean - 2.0)
        errs_pl.append(forecast_powerlaw_ref(run, BUDGET, ref).mean - 2.0)
    assert np.mean(errs_plain) > 0.1
    assert np.mean(np.abs(errs_pl)) < 0.5 * np.mean(np.abs(errs_plain))


def test_val_bpb_forecast_uses_the_reference_gap() -> None:
    rng = np.random.default_rng(7)
    ref = make_reference(rng, final=2.0, gap=0.05)
    y = noisy(rng, clean_curve(T, 2.0))
    for method in ("refmatch", "refmatch_ratio", "powerlaw_ref", "ensemble"):
        fc = forecast_val_bpb(prefix(T, y, 0.6), BUDGET, ref, method)
        assert abs(fc.mean - ref.val_bpb) < 0.1, (method, fc)  # 0.1 bpb: ~3 sd of the level noise
        loss_fc = get_forecaster(method)(prefix(T, y, 0.6), BUDGET, ref)
        assert fc.std > loss_fc.std / LN2  # the gap's own spread is added


def test_val_bpb_forecast_widens_with_the_campaigns_gap_spread() -> None:
    rng = np.random.default_rng(9)
    ref = make_reference(rng, final=2.0, gap=0.05)
    run = prefix(T, noisy(rng, clean_curve(T, 2.0)), 0.6)
    plain = forecast_val_bpb(run, BUDGET, ref, "ensemble")
    wide = forecast_val_bpb(run, BUDGET, dataclasses.replace(ref, gap_spread=0.08), "ensemble")
    narrow = forecast_val_bpb(run, BUDGET, dataclasses.replace(ref, gap_spread=0.001), "ensemble")
    assert wide.mean == plain.mean and narrow.std == plain.std  # never narrower than the default
    loss_sd = get_forecaster("ensemble")(run, BUDGET, ref).std / LN2
    assert wide.std == pytest.approx(math.hypot(loss_sd, 0.08))


def test_forecasters_without_reference_fall_back_to_power_law() -> None:
    rng = np.random.default_rng(8)
    run = prefix(T, noisy(rng, clean_curve(T, 2.0)), 0.5)
    fc = forecast_refmatch(run, BUDGET, None)
    assert fc.method.startswith("refmatch")
    assert math.isfinite(fc.mean) and fc.std > 0


def test_combine_weights_by_inverse_variance_and_keeps_disagreement() -> None:
    sharp, wide = Forecast(2.0, 0.05, "a", 0.5), Forecast(2.2, 0.2, "b", 0.5)
    both = combine([sharp, wide], "ens", rho=0.0)
    assert 2.0 < both.mean < 2.05
    agree = combine([Forecast(2.0, 0.1, "a", 0.5), Forecast(2.0, 0.1, "b", 0.5)], "ens", rho=1.0)
    assert agree.std == pytest.approx(0.1)  # perfectly correlated members add no information
    split = combine([Forecast(1.0, 0.1, "a", 0.5), Forecast(2.0, 0.1, "b", 0.5)], "ens", rho=0.5)
    assert split.mean == pytest.approx(1.5) and split.std >= 0.5


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown forecast method"):
        get_forecaster("crystal_ball")
