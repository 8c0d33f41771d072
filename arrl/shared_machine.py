"""A landscape on a shared machine whose speed changes: for studying the incumbent's re-runs.

`shared_machine(seed, space)` (a `FACTORY` for `arrl run --executor sim --landscape`) runs the
`cpu_fitted` landscape on a machine that alternates between quiet and busy spells, as a machine
shared with other tenants does. A run's budget is wall-clock time, so in a busy spell every run
trains fewer steps: its loss curve is the quiet machine's curve slowed down (the loss it reaches at
t is the one the quiet machine reached at `speed * t`) and its val_bpb rises by as much as that
curve's end does. Each run also reports `machine_gflops`, the machine's speed with the probe's
noise, as the real harness does (`frozen_env.harness.machine_gflops`).

`true_val_bpb` stays the quiet machine's noise-free value, so `--metric true` scores what a
campaign found, not when it ran. On this machine the same unmodified train.py trained 146 and 88
steps of one 30 s budget an hour apart, and scored 2.89 and 3.21 (docs/search.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from arrl.landscapes import cpu_fitted

QUIET_GFLOPS = 100.0


class SharedMachine:
    """`inner` (a landscape) run on a machine that switches between quiet (speed 1) and busy
    (`busy_speed`, drawn per seed) with probability `p_switch` before each run."""

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]],
                 inner: Callable[[int, Mapping[str, Mapping[str, Any]]], Any] = cpu_fitted,
                 p_switch: float = 0.06, busy: tuple[float, float] = (0.4, 0.7), probe_sd: float = 0.05) -> None:
        self.inner = inner(seed, space)
        self.rng = np.random.default_rng([seed, 7919])
        self.p_switch, self.probe_sd = p_switch, probe_sd
        self.busy_speed = float(self.rng.uniform(*busy))
        self.busy = False

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        if self.rng.random() < self.p_switch:
            self.busy = not self.busy
        speed = self.busy_speed if self.busy else 1.0
        out = dict(self.inner.run(knobs, budget_s))
        if speed < 1.0 and out.get("curve"):
            curve = [[float(t), float(y)] for t, y in out["curve"]]
            out["curve"] = [[t, _loss_at(curve, speed * t)] for t, _ in curve]
            if out["status"] == "ok" and out.get("val_bpb") is not None:
                end = max(t for t, _ in curve)
                out["val_bpb"] = float(out["val_bpb"]) + (_loss_at(curve, speed * end) - _loss_at(curve, end)) / math.log(2)
        out["machine_gflops"] = QUIET_GFLOPS * speed * math.exp(self.probe_sd * float(self.rng.standard_normal()))
        return out


def _loss_at(curve: list[list[float]], t: float, window: float = 1.0) -> float:
    """The curve's mean loss within `window` seconds of `t`: the curve is noisy step by step."""
    near = [y for x, y in curve if abs(x - t) <= window]
    if near:
        return sum(near) / len(near)
    return min(curve, key=lambda p: abs(p[0] - t))[1]


def shared_machine(seed: int, space: Mapping[str, Mapping[str, Any]]) -> SharedMachine:
    return SharedMachine(seed, space)


__all__ = ["SharedMachine", "shared_machine"]
