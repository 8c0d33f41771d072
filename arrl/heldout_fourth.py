"""A fourth held-out set of landscapes (`FACTORY(seed, space)`), sealed: written before any search
change it is meant to check (the claim that the pre-trained `ppo` search at 50 experiments reaches,
in median, what Optuna TPE reaches at 100, and beats random and greedy search at every horizon), by
someone trying to check that claim rather than to pass it. No search strategy, benchmark or
campaign was run on these landscapes while writing them, and no number here was tuned on one; the
tests only check their interface, scale and shape.

The shapes are what tuning a small GPT under a fixed wall-clock budget looks like, and none of
them is in the earlier sets. Their frame is the third set's (`arrl.heldout.SealedShape`, whose
scoring, loss curve and crashed runs they reuse): in normalised units (log domains in log space),
every seed draws optima anywhere in the middle 90% of each domain (an int's snapped to one of its
values), weights log-uniform over 1.5 decades, choice offsets up to 0.02 bpb, a base of 1.5-3.0
bpb at the optimum, Gaussian noise of sd 0.005-0.02, and a gain of 0.2-1.0 bpb from train.py's
values to the optimum. A score is `base + 2.5 tanh(E / 2.5)`, with `E = k P + C + Q` (P the
numeric penalty, scaled by k to give that gain; C the choices' cost and Q the steps' cost in bpb),
so hopeless configurations level off 2.5 bpb above the base. Each shape changes P (or E):

- `scaling_rule`: two or three pairs (A, B), A a log-domain (learning rate-like) tunable, B a
  positive int or a choice of positive numbers (batch size, width): A's best value follows B as a
  power law, `A* = A*_opt (B / B_opt)^alpha`, |alpha| 0.5-1.0 (+ as the learning rate grows with
  the batch, - as it shrinks with the width), so each pair interacts multiplicatively in log space.
  A costs 2-6 times its squared distance to its rule (no cost of its own; where the rule leaves
  A's domain, the end is the best that runs), a numeric B 0.5-2 times its own squared distance;
  train.py's A is 0.1 or more off the rule at train.py's B. (Without such pairs: a plain bowl.)
- `compute_tradeoff`: two or three positive tunables (ints first: depth, MLP ratio, batch size) are
  sizes, and their product sets the compute per step. With s the normalised log of that product
  (0 at every low end, 1 at every high end) and x = s - s*, the penalty adds
  `W (2 / (a b)) ((b e^(-a x) + a e^(b x)) / (a + b) - 1)`, about W x^2 near s*: a bigger model
  learns more per step (a 1-2.5) but takes fewer steps in the budget (b 8-14), so the cost grows
  exponentially on the big side (W 3-8). Each size's optimum is drawn in the middle 10-70% of its
  log domain (redrawn until s* is in 0.1-0.75: interior), and each size keeps a mild bowl (weight
  0.1-0.4) of its own, the shape at a given size. Runs whose product passes a memory limit, the
  larger of 2-6 times the optimum's and 1.2-2 times train.py's (which runs), crash 10-60% into the
  budget, out of memory.
- `two_basins`: in 3-6 numeric tunables, a local basin around train.py's values (its floor drawn
  at sd 0.05 from them, an int's snapped) and the optimum's basin elsewhere, 0.25 or more away in
  each of them; these tunables cost `min(k P_far, k P_near + D)`, both weighted squared distances
  (weights 1-3 near, times 1-3 far: the deeper basin is the narrower), D 0.1-0.4 bpb, the local
  floor's excess over the optimum. The instance (with the gain) is redrawn until D is at most 70%
  of the gain less the choices' cost (before saturation), train.py's values are in the local
  basin, and the straight path from its floor to the optimum climbs 0.05 bpb or more above the
  floor: a ridge. The other tunables keep one bowl for both basins.
- `late_bloomer`: a learning rate-like (log) tunable, and with odds 0.7 a linear one (warmup-
  like), have optima 0.3 or more from train.py's values and hold 40-70% of the numeric penalty at
  train.py's values; the nearer a run is to their optima (r, the mean fraction of the way from
  train.py's values, clipped to [0, 1.5]), the slower its loss falls early: the curve's time
  constant is `tau_fast (tau_slow / tau_fast)^r`, tau_fast 0.02-0.04 and tau_slow 0.2-0.35 of the
  budget. The best runs are then worse than train.py's for a good part of the budget and best at
  its end; the curve still ends at val_bpb.
- `quantised`: one to three int tunables (of those with two or more multiples and two or more
  non-multiples of some m in 2, 3, 4, 8, 16) cost Q = 0.03-0.15 bpb each off the multiples of
  their own m (hardware tiles, paired layers), on top of a bowl (weight 0.5-2) around a multiple.
  The instance (with the gain) is redrawn until each step cost is four times or more the bowl's
  second difference over one value, so that a value off the multiples next to one is a bump over
  its neighbours that a smooth model would fill in, and until Q and C at train.py's values take
  70% of the gain or less (before saturation). The other numeric tunables keep the common bowl.
  (Without such ints: a plain bowl.)

A run's loss curve falls from ln 256 as a power law (`SealedShape._curve`: time constant 0.02-0.08
of the budget but for `late_bloomer`'s, power 0.6-1.2) to val_bpb * ln 2; a crashed run's curve
blows up and stops early, with val_bpb NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from arrl.families import _raw
from arrl.heldout import SATURATION, SealedShape
from arrl.landscapes import reference_knobs, unit


def _positive_choice(spec: Mapping[str, Any]) -> bool:
    """A choice among positive numbers (a width, a head count), whose value can enter a power law."""
    return spec["kind"] == "choice" and all(isinstance(c, int | float) and not isinstance(c, bool) and c > 0
                                            for c in spec["choices"])


class FourthShape(SealedShape):
    """The landscapes of the module docstring, on `SealedShape`'s frame: `best_knobs()` is the optimum,
    `true_val` the noise-free score, `excess` its distance to the base before saturation, `gain` what
    train.py's values leave on the table."""

    SHAPES = ("scaling_rule", "compute_tradeoff", "two_basins", "late_bloomer", "quantised")

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], shape: str) -> None:
        # Streams of their own, so that no instance shares draws with the third set's of the same seed;
        # the third set's shapes all off (its scoring reads them).
        rng = self._frame(seed, space, shape, stream=4061981, offset_max=0.02)
        # This set's: (A, B, alpha, weight, B's best value) per rule; sizes; basins; late tunables; steps.
        self.rules: list[tuple[int, str, float, float, float]] = []
        self.sizes: dict[str, Any] | None = None
        self.basin: dict[str, Any] | None = None
        self.late: dict[str, Any] | None = None
        self.steps: list[tuple[int, int, float]] = []  # quantised: (tunable, m, cost off its multiples)
        self._settle_choices()
        self.k = 1.0
        getattr(self, f"_draw_{shape}")(rng)
        self._calibrate()

    # -- the shapes ----------------------------------------------------------------------------
    def _draw_scaling_rule(self, rng: np.random.Generator) -> None:
        logs = [i for i, n in enumerate(self.numeric) if self.space[n]["kind"] == "log"]
        partners = [n for n, s in self.space.items() if _positive_choice(s)
                    or (s["kind"] == "int" and s["low"] > 0)]
        m = min(len(logs), len(partners), int(rng.integers(2, 4)))
        ref = reference_knobs(self.space)
        best = self.best_knobs()
        for a, b in zip(rng.choice(logs, m, replace=False), rng.choice(partners, m, replace=False), strict=True):
            a, b = int(a), str(b)
            alpha = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0))
            if b in self.numeric:
                self.weight[self.numeric.index(b)] = rng.uniform(0.5, 2.0)
            self.weight[a] = 0.0  # A's cost is its distance to the rule
            self.rules.append((a, b, alpha, float(rng.uniform(2.0, 6.0)), float(best[b])))
            u_ref = unit(self.space[self.numeric[a]], ref[self.numeric[a]])
            for _ in range(100):  # train.py's A is off the rule at train.py's B, as a hand-set script can be
                self.opt[a] = rng.uniform(0.05, 0.95)
                if abs(np.clip(self.rule_opt(len(self.rules) - 1, ref), 0.0, 1.0) - u_ref) >= 0.1:
                    break

    def rule_opt(self, j: int, knobs: Mapping[str, Any]) -> float:
        """`scaling_rule`: A's best normalised value given B's value in `knobs`, in the j-th rule (may
        fall outside [0, 1], where the domain's end is the best that can be run)."""
        a, b, alpha, _, b_best = self.rules[j]
        spec = self.space[self.numeric[a]]
        return float(self.opt[a] + alpha * math.log(float(knobs[b]) / b_best) / math.log(spec["high"] / spec["low"]))

    def _draw_compute_tradeoff(self, rng: np.random.Generator) -> None:
        positive = [i for i, n in enumerate(self.numeric) if self.space[n]["low"] > 0]
        ints = [i for i in positive if self.space[self.numeric[i]]["kind"] == "int"]
        pool = ints if len(ints) >= 2 else positive
        if not pool:
            return  # no positive tunable to be a size: a plain bowl
        dims = [int(i) for i in rng.choice(pool, min(len(pool), int(rng.integers(2, 4))), replace=False)]
        self.sizes = {"dims": dims, "a": float(rng.uniform(1.0, 2.5)), "b": float(rng.uniform(8.0, 14.0)),
                      "w": float(rng.uniform(3.0, 8.0)), "s_opt": 0.0, "limit": math.inf}
        for _ in range(100):  # the sizes' optima, in log space; redrawn until the best size is interior
            for i, z in zip(dims, rng.uniform(0.1, 0.7, len(dims)), strict=True):
                spec = self.space[self.numeric[i]]
                x = spec["low"] * (spec["high"] / spec["low"]) ** z
                self.opt[i] = unit(spec, round(x) if spec["kind"] == "int" else x)
            if 0.1 <= self.size(self.best_knobs()) <= 0.75:
                break
        self.weight[dims] = rng.uniform(0.1, 0.4, len(dims))  # the shape at a given size: mild
        best, ref = self.best_knobs(), reference_knobs(self.space)
        self.sizes["s_opt"] = self.size(best)
        # The memory limit leaves the optimum room, and train.py's values run, as they do in reality.
        self.sizes["limit"] = max(self.log_product(best) + math.log(rng.uniform(2.0, 6.0)),
                                  self.log_product(ref) + math.log(rng.uniform(1.2, 2.0)))

    def log_product(self, knobs: Mapping[str, Any]) -> float:
        """`compute_tradeoff`: the log of the sizes' product (what memory grows with)."""
        return sum(math.log(float(knobs[self.numeric[i]])) for i in self.sizes["dims"])

    def size(self, knobs: Mapping[str, Any]) -> float:
        """`compute_tradeoff`: the sizes' product, normalised in log space to [0, 1]."""
        lows = [self.space[self.numeric[i]] for i in self.sizes["dims"]]
        lo = sum(math.log(s["low"]) for s in lows)
        return (self.log_product(knobs) - lo) / (sum(math.log(s["high"]) for s in lows) - lo)

    def tradeoff(self, s: float) -> float:
        """`compute_tradeoff`: the penalty of size s, zero at the best size and about w (s - s*)^2 near it."""
        a, b, w, x = self.sizes["a"], self.sizes["b"], self.sizes["w"], s - self.sizes["s_opt"]
        return w * 2.0 / (a * b) * ((b * math.exp(-a * x) + a * math.exp(b * x)) / (a + b) - 1.0)

    def _draw_two_basins(self, rng: np.random.Generator) -> None:
        k, ref = len(self.numeric), reference_knobs(self.space)
        u_ref, opt0, weight0 = self._u(ref), self.opt.copy(), self.weight.copy()
        for _ in range(200):  # redraw until the basins are as the docstring says
            self.opt, self.weight = opt0.copy(), weight0.copy()  # undo the last draw's tunables
            dims = [int(i) for i in rng.choice(k, min(k, int(rng.integers(3, 7))), replace=False)]
            near = np.array([self._snap(i, float(np.clip(u_ref[i] + rng.normal(0.0, 0.05), 0.0, 1.0))) for i in dims])
            far = near.copy()
            for j, i in enumerate(dims):
                while abs(far[j] - near[j]) < 0.25:
                    far[j] = self._snap(i, rng.uniform(0.05, 0.95))
            w_near = rng.uniform(1.0, 3.0, len(dims))
            self.gain = float(rng.uniform(0.2, 1.0))
            self.opt[dims], self.weight[dims] = far, 0.0  # their cost is the basins'
            self.basin = {"dims": dims, "near": near, "w_near": w_near, "w_far": w_near * rng.uniform(1.0, 3.0, len(dims)),
                          "drop": float(rng.uniform(0.1, 0.4))}
            target = SATURATION * math.atanh(self.gain / SATURATION) - self.choice_cost(ref)
            if self.basin["drop"] > 0.7 * target:
                continue
            self._calibrate()
            p_near, p_far = self.basin_penalties(ref)
            if self.k * p_far > self.k * p_near + self.basin["drop"] and self.ridge() >= self.basin["drop"] + 0.05:
                return
        raise RuntimeError("two_basins: no draw met the shape's conditions")  # not reached on a sane space

    def basin_penalties(self, knobs: Mapping[str, Any]) -> tuple[float, float]:
        """`two_basins`: the squared distances, weighted, to the local basin's floor and to the optimum's."""
        u = self._u(knobs)[self.basin["dims"]]
        return (float(np.sum(self.basin["w_near"] * (u - self.basin["near"]) ** 2)),
                float(np.sum(self.basin["w_far"] * (u - self.opt[self.basin["dims"]]) ** 2)))

    def local_knobs(self) -> dict[str, Any]:
        """`two_basins`: the local basin's floor (the optimum elsewhere)."""
        names = [self.numeric[i] for i in self.basin["dims"]]
        return {**self.best_knobs(), **{n: _raw(self.space[n], float(u)) for n, u in zip(names, self.basin["near"], strict=True)}}

    def ridge(self, start: Mapping[str, Any] | None = None) -> float:
        """`two_basins`: the highest excess on the straight path (in the basins' tunables) from `start`
        (the local floor by default) to the optimum."""
        start = self.local_knobs() if start is None else start
        names = [self.numeric[i] for i in self.basin["dims"]]
        u0, u1 = self._u(start), self.opt
        path = ({**start, **{n: _raw(self.space[n], float((1 - t) * u0[self.numeric.index(n)] + t * u1[self.numeric.index(n)]))
                             for n in names}} for t in np.linspace(0.0, 1.0, 81))
        return max(self.excess(kn) for kn in path)

    def _draw_late_bloomer(self, rng: np.random.Generator) -> None:
        kinds = [self.space[n]["kind"] for n in self.numeric]
        logs = [i for i, kd in enumerate(kinds) if kd == "log"] or list(range(len(kinds)))
        dims = [int(rng.choice(logs))]
        lins = [i for i, kd in enumerate(kinds) if kd == "linear" and i not in dims]
        if lins and rng.random() < 0.7:
            dims.append(int(rng.choice(lins)))
        u_ref = self._u(reference_knobs(self.space))
        for i in dims:
            while abs(self.opt[i] - u_ref[i]) < 0.3:
                self.opt[i] = self._snap(i, rng.uniform(0.05, 0.95))
        # The late tunables hold a share of the numeric penalty at train.py's values, so the gain is
        # mostly behind a slow start (all of it where they are the only numeric tunables).
        d2 = self.weight * (u_ref - self.opt) ** 2
        rest = float(np.sum(np.delete(d2, dims)))
        share = rng.uniform(0.4, 0.7)
        if rest > 0.0:
            self.weight[dims] *= share / (1.0 - share) * rest / max(float(np.sum(d2[dims])), 1e-12)
        self.late = {"dims": dims, "ref": u_ref[dims], "fast": float(rng.uniform(0.02, 0.04)),
                     "slow": float(rng.uniform(0.2, 0.35))}

    def pace(self, knobs: Mapping[str, Any]) -> float:
        """`late_bloomer`: the run's loss-curve time constant, as a fraction of the budget."""
        dims, ref, fast, slow = self.late["dims"], self.late["ref"], self.late["fast"], self.late["slow"]
        r = float(np.clip(np.mean((self._u(knobs)[dims] - ref) / (self.opt[dims] - ref)), 0.0, 1.5))
        return fast * (slow / fast) ** r

    def _draw_quantised(self, rng: np.random.Generator) -> None:
        eligible: dict[int, list[int]] = {}
        for i, n in enumerate(self.numeric):
            spec = self.space[n]
            if spec["kind"] != "int":
                continue
            values = range(math.ceil(spec["low"]), math.floor(spec["high"]) + 1)
            ms = [m for m in (2, 3, 4, 8, 16) if 2 <= sum(x % m == 0 for x in values) <= len(values) - 2]
            if ms:
                eligible[i] = ms
        if not eligible:
            return  # no int with steps: a plain bowl
        ref = reference_knobs(self.space)
        for _ in range(200):  # redraw until the steps show and leave the numeric tunables a share
            dims = [int(i) for i in rng.choice(list(eligible), min(len(eligible), int(rng.integers(1, 4))), replace=False)]
            self.steps = []
            for i in dims:
                spec = self.space[self.numeric[i]]
                m = int(rng.choice(eligible[i]))
                multiples = [x for x in range(math.ceil(spec["low"]), math.floor(spec["high"]) + 1) if x % m == 0]
                self.opt[i] = unit(spec, int(rng.choice(multiples)))
                self.weight[i] = rng.uniform(0.5, 2.0)
                self.steps.append((i, m, float(rng.uniform(0.03, 0.15))))
            self.gain = float(rng.uniform(0.2, 1.0))
            target = SATURATION * math.atanh(self.gain / SATURATION)
            if self.choice_cost(ref) + self.step_cost(ref) > 0.7 * target:
                continue
            self._calibrate()
            if all(c >= 4.0 * 2.0 * self.k * self.weight[i] / self._span(i) ** 2 for i, _, c in self.steps):
                return
        raise RuntimeError("quantised: no draw met the shape's conditions")  # not reached on a sane space

    def _span(self, i: int) -> float:
        return float(self.space[self.numeric[i]]["high"] - self.space[self.numeric[i]]["low"])

    def step_cost(self, knobs: Mapping[str, Any]) -> float:
        """`quantised`: the cost in bpb of the ints off their multiples."""
        return sum(c for i, m, c in self.steps if round(float(knobs[self.numeric[i]])) % m != 0)

    # -- scoring ---------------------------------------------------------------------------------
    def penalty(self, knobs: Mapping[str, Any]) -> float:
        """The numeric part, before k scales it: the common bowl, the rules, the trade-off; zero at the optimum."""
        pen = super().penalty(knobs)
        if self.rules:
            u = self._u(knobs)
            pen += sum(w * (u[a] - self.rule_opt(j, knobs)) ** 2 for j, (a, _, _, w, _) in enumerate(self.rules))
        if self.sizes is not None:
            pen += self.tradeoff(self.size(knobs))
        return pen

    def excess(self, knobs: Mapping[str, Any]) -> float:
        """The score's distance to the base in bpb, before saturation: zero at the optimum."""
        e = self.k * self.penalty(knobs) + self.choice_cost(knobs) + self.step_cost(knobs)
        if self.basin is not None:
            p_near, p_far = self.basin_penalties(knobs)
            e += min(self.k * p_far, self.k * p_near + self.basin["drop"])
        return e

    def _calibrate(self) -> None:
        """k such that train.py's values score `gain` above the base (in the local basin, for two_basins)."""
        ref = reference_knobs(self.space)
        fixed, scaled = self.choice_cost(ref) + self.step_cost(ref), self.penalty(ref)
        if self.basin is not None:
            fixed += self.basin["drop"]
            scaled += self.basin_penalties(ref)[0]
        self.k = (SATURATION * math.atanh(self.gain / SATURATION) - fixed) / max(scaled, 1e-9)

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        return self.base + SATURATION * math.tanh(self.excess(knobs) / SATURATION)

    def crashed(self, knobs: Mapping[str, Any]) -> bool:
        return self.sizes is not None and self.log_product(knobs) > self.sizes["limit"]

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        if self.late is not None:
            self.tau_frac = self.pace(knobs)  # SealedShape's curve, at this run's pace
        out = super().run(knobs, budget_s)
        if out["status"] == "crashed":
            out["reason"] = "simulated out of memory: the sizes' product is past the limit"
        return out


def scaling_rule(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FourthShape:
    return FourthShape(seed, space, "scaling_rule")


def compute_tradeoff(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FourthShape:
    return FourthShape(seed, space, "compute_tradeoff")


def two_basins(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FourthShape:
    return FourthShape(seed, space, "two_basins")


def late_bloomer(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FourthShape:
    return FourthShape(seed, space, "late_bloomer")


def quantised(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FourthShape:
    return FourthShape(seed, space, "quantised")


FOURTH = ",".join(f"arrl.heldout_fourth:{name}" for name in FourthShape.SHAPES)

__all__ = ["FOURTH", "FourthShape", "compute_tradeoff", "late_bloomer", "quantised", "scaling_rule", "two_basins"]
