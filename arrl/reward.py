"""Reward and the keep decision, in units of the campaign's noise.

Reward for an experiment is the improvement of its val_bpb over its parent's (the incumbent
when it was proposed), divided by the noise unit sigma (the spread of repeated baseline runs):

- ok: max(0, (parent - val_bpb) / sigma), capped at CLIP. Only improvement earns; a worse run
  earns 0, not a negative amount. With a graded penalty for worse runs, re-proposing an already
  tried script (a small fixed penalty) became the cheapest move and a pre-trained policy learned to
  do that 20-63% of the time; with this shape it searches (median best val_bpb after 50 simulated
  experiments 2.35-2.37 against 2.53 for the graded reward, `arrl pretrain` on cpu_fitted).
  Outcomes of training runs are heavy-tailed, so the cap keeps one lucky run from dominating a
  PPO batch.
- aborted by the self-evaluator: 0. The run was stopped because its forecast was worse; the
  forecast is an estimate, so it earns neither credit nor blame.
- crashed, timed out, diverged, invalid, duplicate: FAILURE_PENALTY (wasted GPU time, a broken
  edit, or a wasted proposal).
- refused (a worker with other data): 0, since it says nothing about the edit.

An edit is kept only when it beats the current incumbent by `keep_margin_sigmas * sigma`, so a
lucky seed is not taken for progress; with `CampaignConfig.remeasure_on_speed` F, only when it ran
at a machine speed within F of the speed the incumbent's score was measured at (`speed_mismatch`),
and an edit that did not earns 0 whatever it scored. With workers of several hardware classes, the
score an edit is kept and rewarded against is the incumbent's on the edit's own class, and an edit
on a class where the incumbent has none yet earns 0 too (`arrl.scores`).

Two kinds of run measure instead of search, earn 0 and are never kept: the `baseline` repeats
(the noise floor) and, every `CampaignConfig.remeasure_every` experiments, a `remeasure` of the
incumbent, whose outcome becomes the incumbent's val_bpb from then on. The kept run's own score was
picked for being the lowest (it is low by luck as much as by merit), and on a machine whose speed
drifts it grows stale: without the re-run an edit that is better now can lose to a lucky or a
fast-period score and nothing is kept again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

CLIP = 5.0
FAILURE_PENALTY = -1.0
DUPLICATE_PENALTY = FAILURE_PENALTY
DEFAULT_SIGMA = 0.01  # the val_bpb noise unit until the baseline repeats measure one (CampaignConfig.noise_sigma)
FAILED = ("crashed", "timed_out", "diverged", "invalid", "refused")
MEASUREMENTS = ("baseline", "remeasure")  # roles of runs of an unmodified script; every other run is an edit


def is_edit(record: dict) -> bool:
    """Whether a record is a proposed edit, rather than a run that measures an unmodified script."""
    return record.get("role") not in MEASUREMENTS


def compute_reward(status: str, val_bpb: float | None, parent_bpb: float | None, sigma: float,
                   forecast_bpb: float | None = None) -> float:
    """The reward of one experiment; `forecast_bpb` is kept for callers that log it."""
    sigma = max(sigma, 1e-6)
    if status == "ok":
        if val_bpb is None or parent_bpb is None or not math.isfinite(val_bpb):
            return 0.0  # the baseline, or a parent without a score: nothing to compare with
        return max(0.0, min(CLIP, (parent_bpb - val_bpb) / sigma))
    if status in ("aborted", "refused"):
        return 0.0
    return FAILURE_PENALTY


def beats(val_bpb: float | None, incumbent_bpb: float | None, sigma: float, margin_sigmas: float) -> bool:
    """Whether a finished run should replace the incumbent."""
    if val_bpb is None or not math.isfinite(val_bpb):
        return False
    if incumbent_bpb is None:
        return True
    return val_bpb < incumbent_bpb - margin_sigmas * sigma


def speed_mismatch(run_gflops: object, score_gflops: object, threshold: float) -> float | None:
    """How far a run's machine speed (`machine_gflops`) is from the speed the incumbent's score was
    measured at, as a fraction, when that is `threshold` or more (else None, as when either is
    unknown or `threshold` is 0). Such a run is not compared with that score: on a machine that
    slowed down an edit loses to a score measured fast whatever it is worth, and once the machine
    is quick again any edit beats a score measured slow. Simulated on a machine with busy spells,
    re-runs of the incumbent alone kept edits that were worse (docs/search.md)."""
    if threshold <= 0:
        return None
    if not isinstance(run_gflops, int | float) or not isinstance(score_gflops, int | float):
        return None
    if run_gflops <= 0 or score_gflops <= 0:
        return None
    shift = run_gflops / score_gflops - 1.0
    return shift if abs(shift) >= threshold else None


def noise_sigma(values: list[float], floor: float = 1e-3) -> float | None:
    """Sample standard deviation of repeated runs of one script, with a floor; None if < 2."""
    return pooled_noise_sigma([values], floor)


def pooled_noise_sigma(groups: Iterable[list[float]], floor: float = 1e-3) -> float | None:
    """The noise of repeated runs of one script measured in groups that may differ by a constant
    (runs on several hardware classes): the pooled within-group standard deviation, with a floor;
    None while no group has two runs."""
    squares, freedom = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            mean = sum(values) / len(values)
            squares += sum((v - mean) ** 2 for v in values)
            freedom += len(values) - 1
    return max(math.sqrt(squares / freedom), floor) if freedom else None
