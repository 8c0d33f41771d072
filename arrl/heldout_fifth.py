"""A fifth held-out set of landscapes (`FACTORY(seed, space)`), sealed: written before any search is
run on it, to check the claim that the `ppo` search generalises to landscapes it has never seen, by
someone trying to check that claim rather than to pass it. No search strategy, benchmark or
campaign was run on these landscapes while writing them, and no number here was tuned on one; the
tests only check their interface, scale and shape.

The shapes are what tuning a small GPT under a fixed wall-clock budget looks like, and none of
them is in the earlier sets. Their frame is the third set's (`arrl.heldout.SealedShape`, whose
scoring and loss curve they reuse), at the fourth set's scale: in normalised units (log domains in
log space), every seed draws optima anywhere in the middle 90% of each domain (an int's snapped
to one of its values), weights log-uniform over 1.5 decades, choice offsets up to 0.02 bpb, a
base of 1.5-3.0 bpb at the optimum, Gaussian noise of sd 0.005-0.02, and a gain of 0.2-1.0 bpb
from train.py's values to the optimum. A score is `base + 2.5 tanh(E / 2.5)`, with `E = k P + C + D`
(P the numeric penalty, scaled by k to give that gain; C the choices' cost and D a branch's floor
in bpb), so hopeless configurations level off 2.5 bpb above the base. Each shape changes P, D or
how a run's outcome is drawn:

- `conditional`: a categorical gate (as the matrix optimizer: muon or adamw) whose values have
  1-3 numeric tunables of their own (disjoint sets, as Adam's betas for adamw and the momentum for
  muon; half the numeric tunables at most, so with many gate values only the first ones drawn,
  the best's and train.py's always among them): they cost nothing, and so are exactly flat,
  unless the gate takes their value. The best gate value is not train.py's; its own tunables'
  optima are 0.25 or more from train.py's values.
  Each other gate value's branch has a floor D above the optimum's: train.py's D_ref is 30-60% of
  the gain's excess less the choices' cost, the others' 0.5-1.5 times D_ref. Switching the gate
  alone, with its tunables at train.py's values, costs 1.0-1.5 times what train.py's branch costs
  (its own tunables and D_ref), as adamw run with muon's settings does: the gain needs the gate
  and its tunables moved together. The other numeric tunables keep the common bowl.
- `flaky_edge`: a learning rate-like (log) tunable whose optimum is 0.1 or more above train.py's
  value, near a stability edge: the penalty is 10-30 times steeper above the optimum than below,
  and a run diverges (crashes) at random, with probability rising linearly from 0 at 0.01-0.03
  above the optimum to 1 at 0.08-0.2 beyond that. The same configuration near the edge can run
  once and crash the next time, as real runs do across seeds; the optimum itself never crashes.
  The tunable holds 40-70% of the numeric penalty at train.py's values.
- `one_far`: train.py's values are nearly tuned, but for one numeric tunable, as a script tuned by
  hand but for one learning rate left at a copied value. Every other numeric optimum is train.py's
  normalised value plus a normal draw of sd 0.05 (clipped to the middle 90%, an int's snapped),
  train.py's choices are the best ones (its offsets zero), and the far tunable's optimum is 0.45 or
  more from train.py's value and holds 75-90% of the numeric penalty at train.py's values.
- `dead_zone`: two or three continuous tunables are inactive on one side of a threshold (a clip
  above the gradients' norm, a softcap above the largest logit, a weight decay too small to
  matter): there they cost a constant c and are exactly flat. train.py's value is in the dead
  zone, 0.1-0.2 short of its threshold; past the threshold the cost falls as `c (1 - x / x*)^2`
  (x the distance past it) to zero at the optimum, x* = 0.15 or more past, and rises beyond. The
  dead-zone tunables hold 50-80% of the numeric penalty at train.py's values; the rest keep the
  common bowl.
- `drift`: a plain bowl, but run outcomes drift in time, as on a shared machine whose throughput
  wanders (a slower period trains fewer steps in the same budget): each run adds a level that
  follows an AR(1) process, `d_{t+1} = phi d_t + sqrt(1 - phi^2) sd e`, phi 0.9-0.98, stationary
  sd 0.01-0.03 bpb and 1.5 times the noise's or more (the first run's level drawn from the
  stationary law), on top of the usual noise. Two runs far apart in time are not comparable to
  within the noise, two close ones are.

A run's loss curve falls from ln 256 as a power law (`SealedShape._curve`: time constant 0.02-0.08
of the budget, power 0.6-1.2) to val_bpb * ln 2; a crashed run's curve blows up and stops early,
with val_bpb NaN. Only `flaky_edge` crashes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from arrl.heldout import SATURATION, SealedShape
from arrl.landscapes import _key, reference_knobs, unit


class FifthShape(SealedShape):
    """The landscapes of the module docstring, on `SealedShape`'s frame: `best_knobs()` is the optimum,
    `true_val` the noise-free score, `excess` its distance to the base before saturation, `gain` what
    train.py's values leave on the table."""

    SHAPES = ("conditional", "flaky_edge", "one_far", "dead_zone", "drift")

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], shape: str) -> None:
        # Streams of their own, so that no instance shares draws with the earlier sets' of the same seed;
        # the third set's shapes all off (its scoring reads them).
        rng = self._frame(seed, space, shape, stream=5170523, offset_max=0.02)
        # This set's: the gate's branches; the stability edge; the far tunable; dead zones; the drift.
        self.cond: dict[str, Any] | None = None
        self.edge: dict[str, Any] | None = None
        self.far: int | None = None
        self.dead: list[tuple[int, float, float, float, float]] = []  # (tunable, side, threshold, x*, cost)
        self.drift: dict[str, Any] | None = None
        self._settle_choices()
        self.k = 1.0
        getattr(self, f"_draw_{shape}")(rng)
        self._calibrate()
        if self.cond is not None:
            self._price_switch()

    # -- the shapes ----------------------------------------------------------------------------
    def _draw_conditional(self, rng: np.random.Generator) -> None:
        ref = reference_knobs(self.space)
        gates = [n for n in self.choices if len(self.space[n]["choices"]) >= 2]
        k = len(self.numeric)
        if not gates or k < 3:
            return  # nothing to gate: a plain bowl
        gate = str(rng.choice(gates))
        values, ref_v = [_key(c) for c in self.space[gate]["choices"]], _key(ref[gate])
        best_v = str(rng.choice([v for v in values if v != ref_v]))
        # 1-3 tunables per gate value, disjoint, half the numeric tunables at most (the rest keep the
        # common bowl); the best branch's and train.py's get theirs first.
        per = max(1, min(int(rng.integers(1, 4)), (k // 2) // len(values)))
        order = [int(i) for i in rng.permutation(k)]
        firsts = [best_v, ref_v, *(v for v in values if v not in (best_v, ref_v))]
        dims = {v: order[j * per:(j + 1) * per] for j, v in enumerate(firsts) if (j + 1) * per <= k // 2 or j < 2}
        u_ref = self._u(ref)
        for i in dims.get(best_v, []):  # the best branch's tunables are off train.py's values
            while abs(self.opt[i] - u_ref[i]) < 0.25:
                self.opt[i] = self._snap(i, rng.uniform(0.05, 0.95))
        self.offsets[gate] = dict.fromkeys(values, 0.0)  # the branches' floors replace the gate's offsets
        target = SATURATION * math.atanh(self.gain / SATURATION) - self.choice_cost(ref)
        d_ref = float(rng.uniform(0.3, 0.6)) * target
        floor = {v: (0.0 if v == best_v else d_ref if v == ref_v else d_ref * float(rng.uniform(0.5, 1.5))) for v in values}
        w = {v: rng.uniform(0.5, 2.0, len(d)) for v, d in dims.items()}
        for d in dims.values():
            self.weight[d] = 0.0  # their cost is their branch's
        self.cond = {"gate": gate, "best": best_v, "ref": ref_v, "dims": dims, "w": w, "floor": floor,
                     "switch": float(rng.uniform(1.0, 1.5))}

    def _price_switch(self) -> None:
        """`conditional`: scale the best branch's weights so that switching the gate alone costs `switch`
        times train.py's branch (k is set by then: the best branch's tunables are flat at train.py's gate)."""
        c, ref = self.cond, reference_knobs(self.space)
        if c["best"] not in c["dims"]:
            return
        here = self.k * self.branch_penalty(ref, c["ref"]) + c["floor"][c["ref"]]
        there = self.k * self.branch_penalty(ref, c["best"])
        c["w"][c["best"]] = c["w"][c["best"]] * c["switch"] * here / max(there, 1e-12)

    def branch_penalty(self, knobs: Mapping[str, Any], value: str | None = None) -> float:
        """`conditional`: the penalty, before k, of the gate value's own tunables (the gate's value in
        `knobs` by default); the other branches' tunables do not enter it."""
        c = self.cond
        v = _key(knobs[c["gate"]]) if value is None else value
        if v not in c["dims"]:
            return 0.0
        d = self._u(knobs)[c["dims"][v]] - self.opt[c["dims"][v]]
        return float(np.sum(c["w"][v] * d * d))

    def _draw_flaky_edge(self, rng: np.random.Generator) -> None:
        u_ref = self._u(reference_knobs(self.space))
        kinds = [self.space[n]["kind"] for n in self.numeric]
        room = [i for i in range(len(kinds)) if u_ref[i] <= 0.8]  # room above train.py's value
        logs = [i for i in room if kinds[i] == "log"] or room
        if not logs:
            return  # no tunable with room above it: a plain bowl
        a = int(rng.choice(logs))
        self.opt[a] = self._snap(a, rng.uniform(u_ref[a] + 0.1, 0.92))
        self.asym[a] = rng.uniform(10.0, 30.0)  # overshooting costs far more than undershooting
        # The edge tunable holds a share of the numeric penalty at train.py's values (below its optimum,
        # where the gentle side's weight applies).
        d2 = self.weight * (u_ref - self.opt) ** 2
        rest, share = float(np.sum(np.delete(d2, a))), float(rng.uniform(0.4, 0.7))
        if rest > 0.0:
            self.weight[a] *= share / (1.0 - share) * rest / max(float(d2[a]), 1e-12)
        self.edge = {"dim": a, "start": float(self.opt[a] + rng.uniform(0.01, 0.03)), "width": float(rng.uniform(0.08, 0.2))}

    def crash_prob(self, knobs: Mapping[str, Any]) -> float:
        """`flaky_edge`: the chance that a run of these values diverges."""
        if self.edge is None:
            return 0.0
        u = unit(self.space[self.numeric[self.edge["dim"]]], knobs[self.numeric[self.edge["dim"]]])
        return float(np.clip((u - self.edge["start"]) / self.edge["width"], 0.0, 1.0))

    def _draw_one_far(self, rng: np.random.Generator) -> None:
        ref = reference_knobs(self.space)
        u_ref = self._u(ref)
        k = len(self.numeric)
        for i in range(k):  # nearly tuned: every optimum close to train.py's value ...
            self.opt[i] = self._snap(i, float(np.clip(u_ref[i] + rng.normal(0.0, 0.05), 0.05, 0.95)))
        for n in self.choices:  # ... and train.py's choices the best
            self.offsets[n][_key(ref[n])] = 0.0
        far = [i for i in range(k) if max(abs(0.05 - u_ref[i]), abs(0.95 - u_ref[i])) >= 0.5]
        if not far:
            return  # no tunable can be far: a nearly tuned bowl
        f = self.far = int(rng.choice(far))
        while abs(self.opt[f] - u_ref[f]) < 0.45:  # ... but for one
            self.opt[f] = self._snap(f, rng.uniform(0.05, 0.95))
        d2 = self.weight * (u_ref - self.opt) ** 2
        rest, share = float(np.sum(np.delete(d2, f))), float(rng.uniform(0.75, 0.9))
        if rest > 0.0:
            self.weight[f] *= share / (1.0 - share) * rest / max(float(d2[f]), 1e-12)

    def _draw_dead_zone(self, rng: np.random.Generator) -> None:
        u_ref = self._u(reference_knobs(self.space))
        sides: dict[int, list[float]] = {}
        for i, n in enumerate(self.numeric):  # continuous tunables with room for the zone's edge and the dip
            if self.space[n]["kind"] != "int":
                ok = [s for s in (1.0, -1.0) if (0.95 - u_ref[i] if s > 0 else u_ref[i] - 0.05) >= 0.35]
                if ok:
                    sides[i] = ok
        if not sides:
            return  # no room for a dead zone: a plain bowl
        dims = [int(i) for i in rng.choice(list(sides), min(len(sides), int(rng.integers(2, 4))), replace=False)]
        for i in dims:
            s = float(rng.choice(sides[i]))
            end = 0.95 if s > 0 else 0.05
            g = float(rng.uniform(0.1, 0.2))
            x_star = float(rng.uniform(0.15, abs(end - u_ref[i]) - g))
            threshold = float(u_ref[i] + s * g)
            self.opt[i] = threshold + s * x_star
            self.dead.append((i, s, threshold, x_star, float(rng.uniform(0.5, 2.0))))
            self.weight[i] = 0.0  # its cost is the dead zone's
        rest = float(np.sum(self.weight * (u_ref - self.opt) ** 2))
        share = float(rng.uniform(0.5, 0.8))
        total = sum(c for *_, c in self.dead)
        scale = share / (1.0 - share) * rest / total if rest > 0.0 else 1.0
        self.dead = [(i, s, t, x, c * scale) for i, s, t, x, c in self.dead]

    def dead_penalty(self, knobs: Mapping[str, Any]) -> float:
        """`dead_zone`: c in the zone (flat), `c (1 - x / x*)^2` x past its threshold."""
        u = self._u(knobs)
        pen = 0.0
        for i, s, t, x_star, c in self.dead:
            x = s * (u[i] - t)
            pen += c if x <= 0.0 else c * (1.0 - x / x_star) ** 2
        return pen

    def _draw_drift(self, rng: np.random.Generator) -> None:
        # At least 1.5 times the noise's sd, so that the wander shows through the noise of one run.
        sd = max(float(rng.uniform(0.01, 0.03)), 1.5 * self.noise)
        self.drift = {"phi": float(rng.uniform(0.9, 0.98)), "sd": sd, "level": None}

    # -- scoring ---------------------------------------------------------------------------------
    def penalty(self, knobs: Mapping[str, Any]) -> float:
        """The numeric part, before k scales it: the common bowl, the gate's branch, the dead zones."""
        pen = super().penalty(knobs)
        if self.cond is not None:
            pen += self.branch_penalty(knobs)
        return pen + self.dead_penalty(knobs)

    def branch_floor(self, knobs: Mapping[str, Any]) -> float:
        """`conditional`: the gate's branch's floor in bpb (zero in the best branch and elsewhere)."""
        return 0.0 if self.cond is None else self.cond["floor"][_key(knobs[self.cond["gate"]])]

    def excess(self, knobs: Mapping[str, Any]) -> float:
        """The score's distance to the base in bpb, before saturation: zero at the optimum."""
        return self.k * self.penalty(knobs) + self.choice_cost(knobs) + self.branch_floor(knobs)

    def _calibrate(self) -> None:
        """k such that train.py's values score `gain` above the base."""
        ref = reference_knobs(self.space)
        fixed = self.choice_cost(ref) + self.branch_floor(ref)
        self.k = (SATURATION * math.atanh(self.gain / SATURATION) - fixed) / max(self.penalty(ref), 1e-9)

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        return self.base + SATURATION * math.tanh(self.excess(knobs) / SATURATION)

    def best_knobs(self) -> dict[str, Any]:
        best = super().best_knobs()
        if self.cond is not None:
            gate = self.cond["gate"]
            best[gate] = next(c for c in self.space[gate]["choices"] if _key(c) == self.cond["best"])
        return best

    def crashed(self, knobs: Mapping[str, Any]) -> bool:
        """Whether a run of these values can crash at all (`flaky_edge` draws it, see `crash_prob`)."""
        return self.crash_prob(knobs) > 0.0

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        rng, true = self.noise_rng, self.true_val(knobs)
        val = true + float(rng.normal(0.0, self.noise))
        if self.drift is not None:  # the machine's slow wander, shared by consecutive runs
            d = self.drift
            d["level"] = (float(rng.normal(0.0, d["sd"])) if d["level"] is None else
                          d["phi"] * d["level"] + math.sqrt(1.0 - d["phi"] ** 2) * float(rng.normal(0.0, d["sd"])))
            val += d["level"]
        if self.edge is not None and float(rng.random()) < self.crash_prob(knobs):
            curve = self._curve(val, budget_s, rng, crash_at=float(rng.uniform(0.1, 0.6)))
            return {"curve": curve, "val_bpb": math.nan, "status": "crashed", "true_val_bpb": true,
                    "reason": "simulated divergence: the learning rate is past the stability edge on this run"}
        return {"curve": self._curve(val, budget_s, rng), "val_bpb": val, "status": "ok", "true_val_bpb": true}


def conditional(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FifthShape:
    return FifthShape(seed, space, "conditional")


def flaky_edge(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FifthShape:
    return FifthShape(seed, space, "flaky_edge")


def one_far(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FifthShape:
    return FifthShape(seed, space, "one_far")


def dead_zone(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FifthShape:
    return FifthShape(seed, space, "dead_zone")


def drift(seed: int, space: Mapping[str, Mapping[str, Any]]) -> FifthShape:
    return FifthShape(seed, space, "drift")


FIFTH = ",".join(f"arrl.heldout_fifth:{name}" for name in FifthShape.SHAPES)

__all__ = ["FIFTH", "FifthShape", "conditional", "dead_zone", "drift", "flaky_edge", "one_far"]
