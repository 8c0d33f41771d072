"""The termination oracle: when a campaign should stop proposing.

On stop, proposers stop, in-flight experiments finish and are recorded, then the campaign is
marked stopped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    proposed: int
    recorded: int
    elapsed_s: float
    executor_s: float
    since_improvement: int


def stop_reason(progress: Progress, *, max_experiments: int = 0, max_wall_s: float = 0.0,
                max_gpu_hours: float = 0.0, patience: int = 0) -> str | None:
    """The first limit reached, as a sentence, or None to go on. A zero limit is off."""
    if max_experiments and progress.proposed >= max_experiments:
        return f"max_experiments: {progress.proposed} of {max_experiments} proposed"
    if max_wall_s and progress.elapsed_s >= max_wall_s:
        return f"max_wall_s: {progress.elapsed_s:.0f} s of {max_wall_s:.0f} s elapsed"
    if max_gpu_hours and progress.executor_s / 3600 >= max_gpu_hours:
        return f"max_gpu_hours: {progress.executor_s / 3600:.3f} of {max_gpu_hours} h used"
    if patience and progress.since_improvement >= patience:
        return f"patience: {progress.since_improvement} experiments without improvement"
    return None
