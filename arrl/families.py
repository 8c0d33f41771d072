"""Landscape families for pre-training and for held-out evaluation (`FACTORY(seed, space)`).

- `randomized`: the pre-training family. Every seed draws a new `ParametricLandscape` whose priors
  are themselves random: optima anywhere in the middle 90% of each domain (not where train.py's
  priors put them), weights log-uniform over two decades, random asymmetry, 0-10 random
  interactions, 0-4 decoy basins, 0-3 crash edges, noise 0.005-0.03, a gain of 0.1-0.5 bpb. What a
  policy trained on it learns cannot be where the optimum of `cpu_fitted` is, only how to search.
- `anchored`: `randomized` with every numeric optimum near train.py's value instead (its normalised
  position plus a normal draw of sd `ANCHOR_SD`, 0.12): a script that is already nearly tuned, as
  train.py is (the landscape fitted on 64 real runs puts its optima a median 0.09 from train.py's
  values, 0.26 at most). `mixed` is one or the other by the seed's parity: the family the radius
  rule's threshold is fitted on (`scripts/fit_radius_rule.py`), since `randomized` alone almost
  never starts near the optimum.
- `rotated`: a held-out family of another shape, never used for training. The penalty is a dense
  quadratic form `d' R' diag(lam) R d` (a random rotation: every tunable interacts with every other,
  so no tunable can be tuned alone), with a flat direction or two, plus choice offsets, a crash
  half-space across two learning-rate-like tunables, and noise 0.01-0.02; calibrated like
  `cpu_fitted` (baseline 2.641 at train.py's values, 0.2-0.4 to gain).
- `bowl` and `chain`: held-out landscapes as a user would write them in a few lines, never used for
  training: the optimum of every numeric tunable anywhere in its domain (so train.py's values are
  far from it, and runs differ by whole bpb, not hundredths), a plain exponential loss curve, noise
  0.01. `bowl` is separable (a weighted squared distance in normalised units); `chain` couples
  each tunable to the previous one in a random order, as a Rosenbrock valley does.
- `sparse`, `noisy`, `edges`, `crashy` and `twin`: held-out shapes at train.py's scale (baseline
  2.641 at train.py's values, 0.2-0.4 to gain, `ShapeLandscape`), added to see whether results on
  the five above carry over to shapes a user could bring: a weighted bowl around optima in the
  middle 90% of each domain, with only four tunables that matter (`sparse`), noise 0.04 instead
  of 0.01-0.02 (`noisy`), 60% of the optima at an end of their domain (`edges`), runs that crash
  once any of three tunables passes its optimum (or train.py's value) by 0.1 (`crashy`), or a
  second basin elsewhere, slightly shallower (`twin`). Never used for training, and nothing shipped
  was tuned on them.
- `small_scale`, `ripple`, `peaky`, `rotated_bowl` and `plateau` (`FreshShape`): a second held-out
  set, written after the policy, the surrogate and the radius rule were fixed, the way a user
  checking the claim would write one: optima anywhere in each domain, weights over 1.5 decades,
  choice offsets up to 0.04, noise 0.01, and a loss curve that falls as a square (not as train.py's
  do). `small_scale` shrinks the penalty to a fifth, on a base of 1.1 bpb, with noise 0.003;
  `ripple` adds cosine ripples, shallow (0.003 bpb along one tunable, under the noise) but enough
  to make a few local minima along the flattest tunables; `peaky` makes a quarter of the tunables
  narrow Gaussian dips and the rest nearly flat (far from a dip there is no slope to follow);
  `rotated_bowl` rotates the bowl (dense interactions, as `rotated` but at whole-bpb scale);
  `plateau` caps the penalty, so most of the domain is one flat plateau around a basin.
- `wide`: a training family for rules about when the surrogate has no slope to follow (written
  after the second set, for fitting such rules on something other than it): by seed modulo 4,
  `randomized`, `anchored`, or a `NoSlopeShape`, either `capped` (one plateau over most of the
  domain) or `dips` (narrow Gaussian dips on some tunables, the rest nearly flat).
  docs/search.md ("Draws that favour the best runs") fits two such rules on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import numpy as np

from arrl.landscapes import CPU_PARAMS, ParametricLandscape, _key, loss_curve, reference_knobs, unit


def _raw(spec: Mapping[str, Any], u: float) -> Any:
    """The value at normalised position u (the inverse of `unit` for numeric domains)."""
    lo, hi = float(spec["low"]), float(spec["high"])
    x = lo * (hi / lo) ** u if spec["kind"] == "log" else lo + (hi - lo) * u
    return int(round(x)) if spec["kind"] == "int" else x


def _position(spec: Mapping[str, Any], x: Any) -> float:
    """The normalised position of a numeric value (the inverse of `_raw`). `arrl.landscapes.unit` computes
    the same up to the last bit; `FreshShape` keeps this form so that its benchmark in docs/search.md
    reproduces exactly (a last-bit difference, mixed by `rotated_bowl`'s rotation, changes some seeds)."""
    lo, hi = float(spec["low"]), float(spec["high"])
    return math.log(float(x) / lo) / math.log(hi / lo) if spec["kind"] == "log" else (float(x) - lo) / (hi - lo)


def randomized(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape:
    return _random_parametric(seed, space, anchored=False)


def anchored(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape:
    return _random_parametric(seed, space, anchored=True)


def mixed(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape:
    """`anchored` for odd seeds, `randomized` for even ones."""
    return _random_parametric(seed, space, anchored=seed % 2 == 1)


ANCHOR_SD = 0.12  # `anchored`: spread of the optima around train.py's values, in normalised units


def _random_parametric(seed: int, space: Mapping[str, Mapping[str, Any]], anchored: bool) -> ParametricLandscape:
    rng, anchor_rng = np.random.default_rng([seed, 31337]), np.random.default_rng([seed, 31338])
    ref = reference_knobs(space)
    dims = {}
    for name, spec in space.items():
        if spec["kind"] == "choice":
            continue
        u = float(rng.uniform(0.05, 0.95))
        if anchored:  # drawn apart, so a seed's weights and shape are those of `randomized`
            u = min(0.98, max(0.02, unit(spec, ref[name]) + ANCHOR_SD * float(anchor_rng.normal())))
        dims[name] = {"opt": _raw(spec, u), "w": float(10 ** rng.uniform(-1.7, 0.5)),
                      "asym": float(rng.uniform(1.0, 2.5)), "shift": 0.0}
    choices = {name: {_key(c): float(rng.uniform(0.0, 0.1) * rng.random()) for c in spec["choices"]}
               for name, spec in space.items() if spec["kind"] == "choice"}
    gain = float(rng.uniform(0.1, 0.5))
    noise = float(rng.uniform(0.005, 0.03))
    params = {**CPU_PARAMS, "dims": dims, "choices": choices, "interactions": [], "shifts": [], "crashes": [],
              "gain": [gain, gain], "noise": [noise, noise], "weight_jitter": 0.0, "offset_jitter": 0.01,
              "ref_sd": 0.05, "extra_interactions": int(rng.integers(0, 11)), "basins": int(rng.integers(0, 5)),
              "generic_crashes": int(rng.integers(0, 4))}
    return ParametricLandscape(int(rng.integers(2**31)), space, params)


class TrainPyScaled:
    """What `RotatedLandscape` and `ShapeLandscape` share: a penalty P over the normalised tunables,
    scored as base + 2 tanh(k P / 2) with k and base set so that train.py's values score 2.641 and
    the optimum 0.2-0.4 less, choice offsets (the best choice of each tunable at 0), and runs that
    add noise and stream a loss curve shaped like a real `cpu` run."""

    space: dict[str, Mapping[str, Any]]
    numeric: list[str]
    noise_rng: np.random.Generator
    noise: float

    def penalty(self, knobs: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def crashed(self, knobs: Mapping[str, Any]) -> bool:
        return False

    def _choice_offsets(self, rng: np.random.Generator, high: float) -> dict[str, dict[str, float]]:
        offsets = {n: {_key(c): float(rng.uniform(0.0, high)) for c in s["choices"]}
                   for n, s in self.space.items() if s["kind"] == "choice"}
        for offs in offsets.values():
            best = min(offs.values())
            for c in offs:
                offs[c] -= best
        return offsets

    def _calibrate(self, rng: np.random.Generator) -> None:
        gain = float(rng.uniform(0.2, 0.4))
        p_ref = self.penalty(reference_knobs(self.space))
        self.k = 2.0 * math.atanh(gain / 2.0) / p_ref if p_ref > 1e-6 else 1.0
        self.base = 2.641 - gain
        self.curve = dict(CPU_PARAMS["curve"])

    def _u(self, knobs: Mapping[str, Any]) -> np.ndarray:
        return np.array([unit(self.space[n], knobs[n]) for n in self.numeric])

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        return self.base + 2.0 * math.tanh(self.k * self.penalty(knobs) / 2.0)

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        rng, true = self.noise_rng, self.true_val(knobs)
        crashed = self.crashed(knobs)
        val = max(true + float(rng.normal(0.0, self.noise)), 0.3)
        curve = loss_curve(val, budget_s, float(knobs.get("WARMDOWN_FRAC", 0.4)), self.curve, rng,
                           crash_at=rng.uniform(0.1, 0.6) if crashed else None)
        if crashed:
            return {"curve": curve, "val_bpb": math.nan, "status": "crashed", "true_val_bpb": true}
        return {"curve": curve, "val_bpb": val, "status": "ok", "true_val_bpb": true}


class RotatedLandscape(TrainPyScaled):
    """See the module docstring."""

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]]) -> None:
        rng = np.random.default_rng([seed, 4242])
        self.noise_rng = np.random.default_rng([seed, 99991])
        self.space = dict(space)
        self.numeric = [n for n, s in space.items() if s["kind"] != "choice"]
        k = len(self.numeric)
        self.opt = rng.uniform(0.15, 0.85, k)
        q, _ = np.linalg.qr(rng.normal(size=(k, k)))
        lam = 10 ** rng.uniform(-1.5, 0.7, k)
        lam[rng.choice(k, 2, replace=False)] = 1e-3  # flat directions: tunables that trade off
        self.a = q.T @ np.diag(lam) @ q
        self.offsets = self._choice_offsets(rng, 0.08)
        pair = rng.choice(k, 2, replace=False) if k >= 2 else np.array([0, 0])
        self.crash = (pair, float(rng.uniform(1.4, 1.8)))  # crash when u_a + u_b exceeds this
        self.noise = float(rng.uniform(0.01, 0.02))
        self._calibrate(rng)

    def penalty(self, knobs: Mapping[str, Any]) -> float:
        d = self._u(knobs) - self.opt
        return float(d @ self.a @ d) + sum(offs.get(_key(knobs[n]), 0.0) for n, offs in self.offsets.items())

    def crashed(self, knobs: Mapping[str, Any]) -> bool:
        (a, b), edge = self.crash
        u = self._u(knobs)
        return bool(len(u) > 0 and u[a] + u[b] > edge)


def rotated(seed: int, space: Mapping[str, Mapping[str, Any]]) -> RotatedLandscape:
    return RotatedLandscape(seed, space)


class HandWrittenLandscape:
    """The `bowl` and `chain` landscapes of the module docstring."""

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], coupled: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.space = space
        self.numeric = [n for n, s in space.items() if s["kind"] != "choice"]
        self.opt = {n: float(self.rng.uniform(0.0, 1.0)) for n in self.numeric}
        self.weight = {n: float(self.rng.uniform(0.2, 1.0)) for n in self.numeric}
        self.offsets = {n: {repr(c): float(self.rng.uniform(0, 0.05)) for c in s["choices"]}
                        for n, s in space.items() if s["kind"] == "choice"}
        self.coupled = coupled
        self.order = list(self.numeric)
        self.rng.shuffle(self.order)

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        d = {n: unit(self.space[n], knobs[n], self.space[n]["kind"] == "log") - self.opt[n] for n in self.numeric}
        if self.coupled:
            pen = sum(0.5 * self.weight[b] * (d[b] - 0.8 * d[a]) ** 2 + 0.2 * self.weight[a] * d[a] ** 2
                      for a, b in pairwise(self.order))
        else:
            pen = sum(self.weight[n] * d[n] ** 2 for n in self.numeric)
        return 2.2 + pen + sum(self.offsets[n][repr(knobs[n])] for n in self.offsets)

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        val = self.true_val(knobs) + float(self.rng.normal(0, 0.01))
        t = np.linspace(0, budget_s, 60)
        final = val * math.log(2)
        loss = final + (5.5 - final) * np.exp(-t / (0.2 * budget_s)) + self.rng.normal(0, 0.01, t.size)
        return {"curve": [[float(a), float(b)] for a, b in zip(t, loss, strict=True)], "val_bpb": val,
                "status": "ok", "true_val_bpb": self.true_val(knobs)}


def bowl(seed: int, space: Mapping[str, Mapping[str, Any]]) -> HandWrittenLandscape:
    return HandWrittenLandscape(seed, space, coupled=False)


def chain(seed: int, space: Mapping[str, Mapping[str, Any]]) -> HandWrittenLandscape:
    return HandWrittenLandscape(seed, space, coupled=True)


class ShapeLandscape(TrainPyScaled):
    """The `sparse`, `noisy`, `edges`, `crashy` and `twin` landscapes of the module docstring."""

    SHAPES = ("sparse", "noisy", "edges", "crashy", "twin")

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], shape: str) -> None:
        if shape not in self.SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(self.SHAPES)}")
        rng = np.random.default_rng([seed, 555])
        self.noise_rng = np.random.default_rng([seed, 556])
        self.space, self.shape = dict(space), shape
        self.numeric = [n for n, s in space.items() if s["kind"] != "choice"]
        k = len(self.numeric)
        self.opt = rng.uniform(0.05, 0.95, k)
        self.weight = 10 ** rng.uniform(-1.0, 0.3, k)
        if shape == "sparse":  # four tunables matter; the rest barely
            self.weight = np.where(np.isin(np.arange(k), rng.choice(k, min(4, k), replace=False)), self.weight, 1e-3)
        if shape == "edges":
            self.opt = np.where(rng.random(k) < 0.6, np.round(rng.random(k)), self.opt)
        self.opt2 = rng.uniform(0.05, 0.95, k)  # `twin`'s second basin
        self.offsets = self._choice_offsets(rng, 0.03)
        ref = reference_knobs(space)
        self.crash_dims = rng.choice(k, min(3, k), replace=False)
        self.crash_edge = np.maximum(self.opt, self._u(ref))[self.crash_dims] + 0.1  # train.py's values run
        self.noise = 0.04 if shape == "noisy" else float(rng.uniform(0.01, 0.02))
        # How much shallower `twin`'s second basin is: a tenth of train.py's distance from the first.
        self.depth = 0.1 * float(np.sum(self.weight * (self._u(ref) - self.opt) ** 2))
        self._calibrate(rng)

    def penalty(self, knobs: Mapping[str, Any]) -> float:
        u = self._u(knobs)
        pen = float(np.sum(self.weight * (u - self.opt) ** 2))
        if self.shape == "twin":
            pen = min(pen, float(np.sum(self.weight * (u - self.opt2) ** 2)) + self.depth)
        return pen + sum(offs.get(_key(knobs[n]), 0.0) for n, offs in self.offsets.items())

    def crashed(self, knobs: Mapping[str, Any]) -> bool:
        return self.shape == "crashy" and bool(np.any(self._u(knobs)[self.crash_dims] > self.crash_edge))


def sparse(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ShapeLandscape:
    return ShapeLandscape(seed, space, "sparse")


def noisy(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ShapeLandscape:
    return ShapeLandscape(seed, space, "noisy")


def edges(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ShapeLandscape:
    return ShapeLandscape(seed, space, "edges")


def crashy(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ShapeLandscape:
    return ShapeLandscape(seed, space, "crashy")


def twin(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ShapeLandscape:
    return ShapeLandscape(seed, space, "twin")


class FreshShape:
    """The second held-out set of the module docstring: `small_scale`, `ripple`, `peaky`,
    `rotated_bowl` and `plateau`."""

    SHAPES = ("small_scale", "ripple", "peaky", "rotated_bowl", "plateau")

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], shape: str) -> None:
        if shape not in self.SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(self.SHAPES)}")
        self.rng = rng = np.random.default_rng([seed, 99])
        self.space, self.shape = dict(space), shape
        self.numeric = [n for n, s in space.items() if s["kind"] != "choice"]
        k = len(self.numeric)
        self.opt = rng.uniform(0.0, 1.0, k)
        self.weight = 10 ** rng.uniform(-1.0, 0.5, k)
        self.offsets = {n: {repr(c): float(rng.uniform(0.0, 0.04)) for c in s["choices"]}
                        for n, s in space.items() if s["kind"] == "choice"}
        self.scale, self.base, self.noise = (0.2, 1.1, 0.003) if shape == "small_scale" else (1.0, 2.4, 0.01)
        if shape == "peaky":  # a quarter of the tunables are narrow dips; the rest barely matter
            self.weight = np.where(rng.random(k) < 0.25, 20.0, 0.05)
        self.freq = rng.uniform(3.0, 6.0, k)
        self.rotation = np.linalg.qr(rng.normal(size=(k, k)))[0] if shape == "rotated_bowl" else None

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        d = np.array([_position(self.space[n], knobs[n]) for n in self.numeric]) - self.opt
        if self.rotation is not None:
            d = self.rotation @ d
        pen = float(np.sum(self.weight * d ** 2))
        if self.shape == "ripple":
            pen += 0.03 * float(np.sum(1.0 - np.cos(2.0 * math.pi * self.freq * d)) / len(d))
        elif self.shape == "peaky":
            pen = float(np.sum(0.3 * (1.0 - np.exp(-self.weight * d ** 2))))
        elif self.shape == "plateau":
            pen = min(pen, 1.2)
        return self.base + self.scale * (pen + sum(self.offsets[n][repr(knobs[n])] for n in self.offsets))

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        val = self.true_val(knobs) + float(self.rng.normal(0.0, self.noise))
        t = np.linspace(0.0, budget_s, 40)
        final = val * math.log(2)
        loss = final + (4.0 - final) * (1.0 - t / budget_s) ** 2 + self.rng.normal(0.0, 0.02, t.size)
        return {"curve": [[float(a), float(b)] for a, b in zip(t, loss, strict=True)], "val_bpb": val,
                "status": "ok", "true_val_bpb": self.true_val(knobs)}


def small_scale(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FreshShape:
    return FreshShape(seed, space, "small_scale")


def ripple(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FreshShape:
    return FreshShape(seed, space, "ripple")


def peaky(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FreshShape:
    return FreshShape(seed, space, "peaky")


def rotated_bowl(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FreshShape:
    return FreshShape(seed, space, "rotated_bowl")


def plateau(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FreshShape:
    return FreshShape(seed, space, "plateau")


class NoSlopeShape:
    """Training landscapes with little slope to follow (`wide`'s other half): a weighted bowl around
    optima anywhere in the middle 90% of each domain, either capped (`capped`: most of the domain is
    one plateau, at 0.3-1.5 bpb) or with a tenth to a half of the tunables as narrow Gaussian dips
    (sd 0.05-0.15 in normalised units) and the rest nearly flat (`dips`). Every seed draws its own
    scale (0.1-1 bpb per unit of penalty, on a base of 1.0-3.0), noise (0.003-0.03) and weights, and
    the loss curve is train.py's (`loss_curve` with the cpu profile's shape)."""

    KINDS = ("capped", "dips")

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], kind: str) -> None:
        rng = np.random.default_rng([seed, 4242])
        self.run_rng = np.random.default_rng([seed, 4243])
        self.space, self.kind = dict(space), kind
        self.numeric = [n for n, s in space.items() if s["kind"] != "choice"]
        k = len(self.numeric)
        self.opt = rng.uniform(0.05, 0.95, k)
        self.weight = 10 ** rng.uniform(-1.5, 0.5, k)
        self.scale, self.base = float(rng.uniform(0.1, 1.0)), float(rng.uniform(1.0, 3.0))
        self.noise = float(rng.uniform(0.003, 0.03))
        self.cap = float(rng.uniform(0.3, 1.5)) / self.scale  # in penalty units, so the plateau is 0.3-1.5 bpb
        self.dip = rng.random(k) < rng.uniform(0.1, 0.5)
        self.width = rng.uniform(0.05, 0.15, k)
        self.depth = rng.uniform(0.1, 0.5, k)
        self.offsets = {n: {_key(c): float(rng.uniform(0.0, 0.05)) for c in s["choices"]}
                        for n, s in space.items() if s["kind"] == "choice"}

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        d = np.array([unit(self.space[n], knobs[n]) for n in self.numeric]) - self.opt
        if self.kind == "capped":
            pen = min(float(np.sum(self.weight * d ** 2)), self.cap)
        else:
            dips = self.depth * (1.0 - np.exp(-0.5 * (d / self.width) ** 2))
            pen = float(np.sum(np.where(self.dip, dips, 0.02 * self.weight * d ** 2)))
        return self.base + self.scale * pen + sum(self.offsets[n][_key(knobs[n])] for n in self.offsets)

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        true = self.true_val(knobs)
        val = true + float(self.run_rng.normal(0.0, self.noise))
        curve = loss_curve(val, budget_s, 0.4, CPU_PARAMS["curve"], self.run_rng)
        return {"curve": curve, "val_bpb": val, "status": "ok", "true_val_bpb": true}


def wide(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape | NoSlopeShape:
    """A training family for rules about when the surrogate has no slope to follow: by seed modulo
    4, `randomized`, `anchored` (as `mixed`), a `capped` or a `dips` `NoSlopeShape`."""
    if seed % 4 < 2:
        return mixed(seed, space)
    return NoSlopeShape(seed, space, NoSlopeShape.KINDS[seed % 4 - 2])


FRESH = ",".join(f"arrl.families:{name}" for name in FreshShape.SHAPES)
SHAPES = "arrl.families:sparse,arrl.families:noisy,arrl.families:edges,arrl.families:crashy,arrl.families:twin"

__all__ = ["FRESH", "SHAPES", "FreshShape", "HandWrittenLandscape", "NoSlopeShape", "RotatedLandscape", "ShapeLandscape", "TrainPyScaled",
           "anchored", "bowl", "chain", "crashy", "edges", "mixed", "noisy", "peaky", "plateau", "randomized", "ripple",
           "rotated", "rotated_bowl", "small_scale", "sparse", "twin", "wide"]
