"""Reward and the keep decision, in units of the campaign's noise.

Reward for an experiment is the improvement of its val_bpb over its parent's (the incumbent
when it was proposed), divided by the noise unit sigma (the spread of repeated baseline runs),
then clipped, because outcomes of training runs are heavy-tailed: one catastrophic edit must not
dominate a PPO batch.

- ok: (parent - val_bpb) / sigma, clipped to [-CLIP, CLIP].
- aborted by the self-evaluator: the same formula on the forecast val_bpb, clipped at 0 from
  above (a run stopped because it looked worse never earns a positive reward; its forecast is an
  estimate, so it is shrunk by ABORT_SHRINK towards zero).
- crashed, timed out, diverged, invalid: a fixed penalty (wasted GPU time or a broken edit).
- duplicate: a small penalty (no GPU time, but a wasted proposal).

An edit is kept only when it beats the current incumbent by `keep_margin_sigmas * sigma`, so a
lucky seed is not taken for progress.
"""

from __future__ import annotations

import math

CLIP = 5.0
FAILURE_PENALTY = -3.0
DUPLICATE_PENALTY = -0.5
ABORT_SHRINK = 0.5
FAILED = ("crashed", "timed_out", "diverged", "invalid", "refused")


def compute_reward(status: str, val_bpb: float | None, parent_bpb: float | None, sigma: float,
                   forecast_bpb: float | None = None) -> float:
    sigma = max(sigma, 1e-6)
    if status == "ok" and val_bpb is not None and parent_bpb is not None and math.isfinite(val_bpb):
        return max(-CLIP, min(CLIP, (parent_bpb - val_bpb) / sigma))
    if status == "ok":
        return 0.0  # the baseline, or a parent without a score: nothing to compare with
    if status == "aborted":
        if forecast_bpb is None or parent_bpb is None or not math.isfinite(forecast_bpb):
            return FAILURE_PENALTY * ABORT_SHRINK
        return max(-CLIP, min(0.0, ABORT_SHRINK * (parent_bpb - forecast_bpb) / sigma))
    if status == "duplicate":
        return DUPLICATE_PENALTY
    return FAILURE_PENALTY


def beats(val_bpb: float | None, incumbent_bpb: float | None, sigma: float, margin_sigmas: float) -> bool:
    """Whether a finished run should replace the incumbent."""
    if val_bpb is None or not math.isfinite(val_bpb):
        return False
    if incumbent_bpb is None:
        return True
    return val_bpb < incumbent_bpb - margin_sigmas * sigma


def noise_sigma(values: list[float], floor: float = 1e-3) -> float | None:
    """Sample standard deviation of repeated runs of one script, with a floor; None if < 2."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return max(math.sqrt(var), floor)
