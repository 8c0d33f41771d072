"""A landscape on a shared machine whose speed changes: for studying the incumbent's re-runs.

`shared_machine(seed, space)` (a `FACTORY` for `arrl run --executor sim --landscape`) runs the
`cpu_fitted` landscape on a machine that alternates between quiet and busy spells, as a machine
shared with other tenants does. A run's budget is wall-clock time, so in a busy spell every run
trains fewer steps: its loss curve is the quiet machine's curve slowed down (the loss it reaches at
t is the one the quiet machine reached at `speed * t`) and its val_bpb rises by as much as that
curve's end does. Each run also reports `machine_gflops`, the machine's speed with the probe's
noise, as the real harness does (`frozen_env.harness.machine_gflops`).

`shared_machine_uniform` is the same machine but for one thing: a busy run's val_bpb rises by one
amount per seed (what the slowdown costs train.py's own values), whatever its configuration. A small
model that converges early may lose less to a slowdown than a big one (here the cost differs by
about 0.01 bpb between them); this variant removes any such difference, to tell whether re-running
the incumbent costs through it (a campaign that keeps edits in a busy spell climbing toward the slow
machine's optimum) or through something else (docs/search.md, "Where that cost comes from").

`shared_machine_noisy` is the same machine with a busy tenant whose load comes and goes within a
spell, as on one core shared with a busy loop: each busy run trains at a speed that varies by about
10% around the spell's, and its probe, read in 0.2 s, spreads by about 30% (log standard deviation
0.3), as the probes of a real campaign under a busy loop did (37-67 GFLOP/s, docs/search.md).

`mixed_fleet` is a fleet of two hardware classes, one faster than the other, sharing a campaign
(`--hardware-class any`, `arrl.scores`): each run lands on either class at random and says which.
`mixed_fleet_three` has three: a fast one and two slow ones, at two paces.

`true_val_bpb` stays the quiet machine's noise-free value, so `--metric true` scores what a
campaign found, not when it ran. On this machine the same unmodified train.py trained 146 and 88
steps of one 30 s budget an hour apart, and scored 2.89 and 3.21 (docs/search.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from arrl.landscapes import cpu_fitted, reference_knobs

QUIET_GFLOPS = 100.0
SLOW_CLASS, FAST_CLASS = "sim:slow", "sim:fast"  # `MixedFleet`'s two hardware classes


class SharedMachine:
    """`inner` (a landscape) run on a machine that switches between quiet (speed 1) and busy
    (`busy_speed`, drawn per seed) with probability `p_switch` before each run. With `uniform`, a busy
    run's val_bpb rises by what the slowdown costs the reference configuration, whatever its own."""

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]],
                 inner: Callable[[int, Mapping[str, Mapping[str, Any]]], Any] = cpu_fitted,
                 p_switch: float = 0.06, busy: tuple[float, float] = (0.4, 0.7), probe_sd: float = 0.05,
                 uniform: bool = False, busy_probe_sd: float | None = None, busy_speed_sd: float = 0.0) -> None:
        self.inner = inner(seed, space)
        self.rng = np.random.default_rng([seed, 7919])
        self.p_switch, self.probe_sd = p_switch, probe_sd
        self.busy_probe_sd = probe_sd if busy_probe_sd is None else busy_probe_sd
        self.busy_speed_sd = busy_speed_sd
        self.busy_speed = float(self.rng.uniform(*busy))
        self.busy = False
        # A second instance runs the reference, so the campaign's own runs draw the same noise either way.
        self.reference = (inner(seed, space), reference_knobs(space)) if uniform else None
        self.uniform_cost: float | None = None

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        if self.rng.random() < self.p_switch:
            self.busy = not self.busy
        if not self.busy:
            return self._run_at(knobs, budget_s, 1.0)
        if self.busy_probe_sd == self.probe_sd and not self.busy_speed_sd:  # no draws: seeds run as before
            return self._run_at(knobs, budget_s, self.busy_speed)
        jitter = math.exp(self.busy_speed_sd * float(self.rng.standard_normal()))
        return self._run_at(knobs, budget_s, min(1.0, self.busy_speed * jitter), self.busy_probe_sd)

    def _run_at(self, knobs: Mapping[str, Any], budget_s: float, speed: float,
                probe_sd: float | None = None) -> dict[str, Any]:
        out = dict(self.inner.run(knobs, budget_s))
        if speed < 1.0 and out.get("curve"):
            curve = [[float(t), float(y)] for t, y in out["curve"]]
            out["curve"] = [[t, _loss_at(curve, speed * t)] for t, _ in curve]
            if out["status"] == "ok" and out.get("val_bpb") is not None:
                if self.reference is None:
                    cost = _slowdown_cost(curve, speed)
                else:
                    if self.uniform_cost is None:
                        landscape, knobs0 = self.reference
                        self.uniform_cost = _slowdown_cost(landscape.run(knobs0, budget_s)["curve"], speed)
                    cost = self.uniform_cost
                out["val_bpb"] = float(out["val_bpb"]) + cost
        sd = self.probe_sd if probe_sd is None else probe_sd
        out["machine_gflops"] = QUIET_GFLOPS * speed * math.exp(sd * float(self.rng.standard_normal()))
        return out


class MixedFleet(SharedMachine):
    """`inner` run by workers of `classes` hardware classes (`--hardware-class any`): each run goes to
    any of them at random, as workers pulling jobs from one queue do, but for a re-run meant for one
    class (`for_class`), which waits in that class's queue for its worker (`arrl.queues`). The fast
    class trains at full pace, the first slow one at `busy_speed`, any further one at a pace drawn
    from the same range; every run reports its class as `hardware_class`."""

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], classes: int = 2, **options: Any) -> None:
        super().__init__(seed, space, **options)
        slow = [SLOW_CLASS] + [f"{SLOW_CLASS}{i + 2}" for i in range(classes - 2)]
        self.classes = [*slow, FAST_CLASS]
        self.speeds = [self.busy_speed, *(float(self.rng.uniform(0.4, 0.7)) for _ in slow[1:]), 1.0]

    def run(self, knobs: Mapping[str, Any], budget_s: float, for_class: str | None = None) -> dict[str, Any]:
        # Drawn either way, so that a routed run leaves the later draws as they were.
        pick = min(int(self.rng.random() * len(self.classes)), len(self.classes) - 1)
        if for_class in self.classes:
            pick = self.classes.index(for_class)
        out = self._run_at(knobs, budget_s, self.speeds[pick])
        out["hardware_class"] = self.classes[pick]
        return out


def _slowdown_cost(curve: list[list[float]], speed: float) -> float:
    """How much higher (bpb) the curve ends when the machine runs at `speed` of its quiet pace."""
    curve = [[float(t), float(y)] for t, y in curve]
    end = max(t for t, _ in curve)
    return (_loss_at(curve, speed * end) - _loss_at(curve, end)) / math.log(2)


def _loss_at(curve: list[list[float]], t: float, window: float = 1.0) -> float:
    """The curve's mean loss within `window` seconds of `t`: the curve is noisy step by step."""
    near = [y for x, y in curve if abs(x - t) <= window]
    if near:
        return sum(near) / len(near)
    return min(curve, key=lambda p: abs(p[0] - t))[1]


def shared_machine(seed: int, space: Mapping[str, Mapping[str, Any]]) -> SharedMachine:
    return SharedMachine(seed, space)


def shared_machine_noisy(seed: int, space: Mapping[str, Mapping[str, Any]]) -> SharedMachine:
    return SharedMachine(seed, space, busy_probe_sd=0.3, busy_speed_sd=0.1)


def shared_machine_uniform(seed: int, space: Mapping[str, Mapping[str, Any]]) -> SharedMachine:
    return SharedMachine(seed, space, uniform=True)


def mixed_fleet(seed: int, space: Mapping[str, Mapping[str, Any]]) -> MixedFleet:
    return MixedFleet(seed, space)


def mixed_fleet_three(seed: int, space: Mapping[str, Mapping[str, Any]]) -> MixedFleet:
    return MixedFleet(seed, space, classes=3)


__all__ = ["MixedFleet", "SharedMachine", "mixed_fleet", "mixed_fleet_three", "shared_machine", "shared_machine_noisy",
           "shared_machine_uniform"]
