"""Built-in landscapes for the simulator: what a candidate's tunables would score, without training.

A landscape factory has the signature `FACTORY(seed: int, space: dict) -> obj`, where `space` is
`arrl.edits.search_space(...)` of the campaign's script, and `obj.run(knobs, budget_s)` returns
`{"curve": [[t, loss], ...], "val_bpb": float, "status": "ok" | "crashed"}` (see `arrl.sim`).

The parametric model (`ParametricLandscape`), per seed:

    val_bpb = base + S * tanh(k * P / S) + noise,   P = sum_i pen_i(u_i) + sum_ij c_ij d_i d_j + offsets

with `u` each numeric tunable normalised to [0, 1] (in log space for log domains), `d = u - opt`,
`pen_i = w_i d^2` (steeper on one side: too high a learning rate hurts more than too low), offsets
for categorical choices, a few pairwise interactions `c_ij` (kept small enough that P >= 0, so the
optimum is where the priors say), optimum shifts conditioned on choices (adamw wants a ~10x lower
matrix LR than muon), crash regions (learning rates above a threshold that adamw, no gradient
clipping or no soft cap lower), and Gaussian noise. `S` saturates hopeless configurations at base + 2 (~4.3 bpb), like
real runs that learn little more than byte frequencies. Every seed shifts the optima, jitters
weights and offsets, and rescales P (`k`) so that the reference configuration (train.py's
baseline) scores `ref_bpb` and the optimum `ref_bpb - gain`, the gain drawn from `params["gain"]`.

Calibration (`CPU_PARAMS`): weights, choice offsets, the baseline (2.641), the curve's gap and
per-step noise were fitted by `fit_landscape` to docs/data/curves_cpu_64.jsonl, 64 real `cpu`-
profile runs of target/train.py (a random-search campaign; none crashed; its best beat the
baseline by 0.118, and random search on `cpu_fitted` finds a median 0.14 in 64 experiments). The
curve shape was fitted to a real 30 s run: loss from ln 256 with an onset delay of ~0.8 s,
`a (1 + t/tau)^-b` with tau = B/60 and b = 0.8, a warmdown drop of ~0.2 nats over the last
WARMDOWN_FRAC of the budget (concave: most of it early), ending ~0.063 nats below val_bpb * ln 2
(less with dropout), with ~0.043 nats of per-step noise. Refit when more runs exist:
`python -m arrl.landscapes fit runs.jsonl` prints the params.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LN2 = math.log(2.0)
L0 = math.log(256.0)  # byte-level vocabulary: the loss of a uniform model, where every run starts

# target/train.py's hyperparameters when the priors were set: the reference point of calibration.
BASELINE_KNOBS: dict[str, Any] = {
    "DEPTH": 3, "N_EMBD": 128, "N_HEAD": 4, "MLP_RATIO": 3, "ACTIVATION": "relu2", "QK_NORM": True,
    "TIE_EMBEDDINGS": False, "ROPE_BASE": 10000.0, "LOGIT_SOFTCAP": 15.0, "BATCH_SIZE": 16,
    "MATRIX_OPTIMIZER": "muon", "MATRIX_LR": 0.02, "EMBED_LR": 0.01, "UNEMBED_LR": 0.004,
    "MUON_MOMENTUM": 0.95, "ADAM_BETA1": 0.8, "ADAM_BETA2": 0.95, "WEIGHT_DECAY": 0.0, "GRAD_CLIP": 1.0,
    "WARMUP_FRAC": 0.02, "WARMDOWN_FRAC": 0.4, "FINAL_LR_FRAC": 0.0, "DROPOUT": 0.0, "INIT_SCALE": 1.0,
}

# Numeric tunables: optimum (raw value), weight (bpb per unit^2 of normalised distance), asym (the
# high side's weight multiplier), shift (per-seed sd of the optimum, normalised units), log (an int
# domain normalised in log space). Optima are priors (a 30 s CPU budget favours small, fast models);
# weights and choice offsets were fitted to docs/data/curves_cpu_64.jsonl (64 real `cpu` runs of a
# random-search campaign) by `fit_landscape`, ridge-shrunk towards the priors.
CPU_DIMS: dict[str, dict[str, Any]] = {
    "DEPTH": {"opt": 2, "w": 0.39, "asym": 1.3, "shift": 0.08},
    "MLP_RATIO": {"opt": 3, "w": 0.14, "asym": 1.5, "shift": 0.1},
    "ROPE_BASE": {"opt": 3000.0, "w": 0.105, "shift": 0.15},
    "LOGIT_SOFTCAP": {"opt": 15.0, "w": 0.17, "shift": 0.1},
    "BATCH_SIZE": {"opt": 8, "w": 0.82, "asym": 1.2, "shift": 0.1, "log": True},
    "MATRIX_LR": {"opt": 0.04, "w": 5.2, "asym": 2.5, "shift": 0.05},
    "EMBED_LR": {"opt": 0.03, "w": 0.33, "asym": 2.0, "shift": 0.06},
    "UNEMBED_LR": {"opt": 0.006, "w": 0.1, "asym": 2.0, "shift": 0.06},
    "MUON_MOMENTUM": {"opt": 0.9, "w": 0.6, "shift": 0.12},
    "ADAM_BETA1": {"opt": 0.8, "w": 0.24, "shift": 0.1},
    "ADAM_BETA2": {"opt": 0.95, "w": 0.11, "shift": 0.1},
    "WEIGHT_DECAY": {"opt": 0.03, "w": 0.095, "asym": 1.5, "shift": 0.08},
    "GRAD_CLIP": {"opt": 1.0, "w": 0.1, "shift": 0.08},
    "WARMUP_FRAC": {"opt": 0.03, "w": 0.047, "asym": 1.5, "shift": 0.05},
    "WARMDOWN_FRAC": {"opt": 0.6, "w": 1.02, "shift": 0.1},
    "FINAL_LR_FRAC": {"opt": 0.05, "w": 0.17, "shift": 0.1},
    "DROPOUT": {"opt": 0.0, "w": 0.91, "shift": 0.03},
    "INIT_SCALE": {"opt": 0.8, "w": 0.18, "shift": 0.08},
}
CPU_CHOICES: dict[str, dict[str, float]] = {
    "N_EMBD": {"64": 0.038, "96": 0.024, "128": 0.0, "192": 0.084, "256": 0.134},
    "N_HEAD": {"1": 0.026, "2": 0.0, "4": 0.011, "8": 0.022},
    "ACTIVATION": {"relu2": 0.025, "gelu": 0.018, "silu": 0.0, "swiglu": 0.014},
    "QK_NORM": {"True": 0.0, "False": 0.009},
    "TIE_EMBEDDINGS": {"False": 0.05, "True": 0.0},
    "MATRIX_OPTIMIZER": {"muon": 0.0, "adamw": 0.08},
}
CPU_PARAMS: dict[str, Any] = {
    "dims": CPU_DIMS,
    "choices": CPU_CHOICES,
    # [a, b, c]: c * d_a * d_b. Bigger and deeper is slower per step; LR optimum grows with batch.
    "interactions": [["DEPTH", "N_EMBD", 0.8], ["MATRIX_LR", "BATCH_SIZE", -1.0],
                     ["WARMDOWN_FRAC", "FINAL_LR_FRAC", 0.4], ["MATRIX_LR", "EMBED_LR", -0.8],
                     ["DEPTH", "MATRIX_LR", 0.8]],
    # Optimum shifts (normalised units) under a choice: adamw wants a 10x lower matrix LR.
    "shifts": [["MATRIX_OPTIMIZER", "adamw", "MATRIX_LR", -0.30], ["QK_NORM", "False", "MATRIX_LR", -0.03]],
    # Crash (divergence) above a raw value, lowered (normalised units) under the listed choices. None
    # of the 64 real runs crashed (MATRIX_LR 0.2 with muon, even without QK_NORM, and adamw at 0.02
    # only scored badly), so crashes need the risky combinations: adamw with a muon-sized learning
    # rate, no gradient clipping, no soft cap.
    "crashes": [
        {"dim": "MATRIX_LR", "above": 0.25, "lower": [["QK_NORM", "False", 0.03], ["MATRIX_OPTIMIZER", "adamw", 0.2],
                                                       ["GRAD_CLIP", "0.0", 0.06]]},
        {"dim": "EMBED_LR", "above": 0.28, "lower": [["QK_NORM", "False", 0.03]]},
        {"dim": "UNEMBED_LR", "above": 0.08, "lower": [["LOGIT_SOFTCAP", "0.0", 0.08]]},
    ],
    # Gain: the best of the 64 real runs beat the baseline by 0.118; see GAIN_OVER_BEST.
    "ref_bpb": 2.641, "ref_sd": 0.02, "gain": [0.19, 0.285], "noise": [0.01, 0.02], "saturation": 2.0,
    "weight_jitter": 0.3, "offset_jitter": 0.02, "shift_scale": 1.0, "crash_jitter": 0.03,
    "extra_interactions": 0, "basins": 0, "generic_crashes": 0,
    # Shape from a real run (module docstring); gap and noise from the corpus: dropout makes the
    # training loss exceed the evaluation loss, so the gap shrinks by gap_dropout * DROPOUT.
    "curve": {"tau_frac": 1 / 60, "b": 0.8, "bend": 0.2, "bend_q": 3.0, "onset_frac": 0.027,
              "point_sd": 0.043, "gap": 0.063, "gap_sd": 0.022, "gap_dropout": 0.55, "points_per_s": 4.0},
}
# More of everything that makes search hard: random extra interactions, decoy basins (a local
# optimum per chosen dim, 0.05-0.15 worse), larger optimum shifts, random crash edges, more noise.
HARD_PARAMS: dict[str, Any] = {**CPU_PARAMS, "gain": [0.25, 0.45], "noise": [0.015, 0.025], "shift_scale": 2.0,
                               "weight_jitter": 0.5, "extra_interactions": 8, "basins": 4, "generic_crashes": 2}
# The tiny test landscape: a plain quadratic bowl, no interactions, crashes or saturation.
TINY_PARAMS: dict[str, Any] = {**CPU_PARAMS, "dims": {}, "choices": {}, "interactions": [], "shifts": [],
                               "crashes": [], "noise": [0.003, 0.003], "gain": None, "saturation": 0.0}


def _key(value: Any) -> str:
    return str(value)


def unit(spec: Mapping[str, Any], value: Any, log: bool = False) -> float:
    """A tunable's value in [0, 1]: log domains (and ints marked log) in log space; choices by index."""
    if spec["kind"] == "choice":
        keys = [_key(c) for c in spec["choices"]]
        return keys.index(_key(value)) / max(len(keys) - 1, 1) if _key(value) in keys else 0.0
    lo, hi, x = float(spec["low"]), float(spec["high"]), float(value)
    if (spec["kind"] == "log" or log) and lo > 0:
        return (math.log(max(x, lo)) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (x - lo) / (hi - lo)


def reference_knobs(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """train.py's baseline where the space has those names; elsewhere the domain's (log) middle."""
    out: dict[str, Any] = {}
    for name, spec in space.items():
        if name in BASELINE_KNOBS:
            out[name] = BASELINE_KNOBS[name]
        elif spec["kind"] == "choice":
            out[name] = spec["choices"][0]
        elif spec["kind"] == "log":
            out[name] = math.sqrt(spec["low"] * spec["high"])
        else:
            out[name] = (spec["low"] + spec["high"]) / 2
    return out


class ParametricLandscape:
    """See the module docstring; `params` is one of the *_PARAMS dicts or `fit_landscape`'s output."""

    def __init__(self, seed: int, space: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> None:
        self.space = dict(space)
        self.params = params
        self.curve = dict(params["curve"])
        rng = np.random.default_rng([seed, 7919])
        self.noise_rng = np.random.default_rng([seed, 104729])  # outcome noise, drawn run by run
        self.numeric = [n for n, s in space.items() if s["kind"] != "choice"]
        self.dims: dict[str, dict[str, float]] = {}
        for name in self.numeric:
            spec, prior = space[name], params["dims"].get(name)
            if prior is None:  # a tunable the priors do not know: a random bowl
                prior = {"opt": None, "w": float(rng.lognormal(math.log(0.5), 0.5)),
                         "asym": float(rng.uniform(1.0, 2.0)), "shift": 0.0}
            opt = rng.uniform(0.2, 0.8) if prior["opt"] is None else unit(spec, prior["opt"], prior.get("log", False))
            opt += rng.normal(0.0, prior.get("shift", 0.05) * params["shift_scale"])
            w = prior["w"] * float(rng.lognormal(0.0, params["weight_jitter"]))
            self.dims[name] = {"opt": float(np.clip(opt, 0.0, 1.0)), "w": w, "asym": prior.get("asym", 1.0),
                               "log": bool(prior.get("log", False))}
        self.offsets: dict[str, dict[str, float]] = {}
        for name, spec in space.items():
            if spec["kind"] != "choice":
                continue
            known = params["choices"].get(name, {})
            raw = {_key(c): known.get(_key(c), float(rng.uniform(0.0, 0.06))) + rng.normal(0, params["offset_jitter"])
                   for c in spec["choices"]}
            best = min(raw.values())  # the best choice costs nothing, so the optimum has P = 0
            self.offsets[name] = {c: float(v - best) for c, v in raw.items()}
        self.interactions = [(a, b, float(c) * float(rng.lognormal(0.0, 0.2)))
                             for a, b, c in params["interactions"] if a in space and b in space]
        pool = [n for n in self.numeric if self.dims[n]["w"] > 0.05]
        for _ in range(params["extra_interactions"] if len(pool) >= 2 else 0):
            a, b = rng.choice(pool, 2, replace=False)
            self.interactions.append((str(a), str(b), float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.5))))
        self._keep_psd()
        self.shifts = [(n, _key(c), d, float(by)) for n, c, d, by in params["shifts"] if n in space and d in self.dims]
        self.basins = {}
        for name in rng.permutation(pool)[: params["basins"]]:
            opt = self.dims[str(name)]["opt"]
            far = opt + (0.45 if opt < 0.5 else -0.45)  # a decoy on the other side of the domain
            self.basins[str(name)] = (float(np.clip(far, 0, 1)), float(rng.uniform(0.05, 0.15)))
        self.crashes = []
        for rule in params["crashes"]:
            if rule["dim"] in self.dims:
                thr = unit(space[rule["dim"]], rule["above"]) + rng.normal(0, params["crash_jitter"])
                self.crashes.append((rule["dim"], float(thr), [(n, _key(c), by) for n, c, by in rule["lower"]]))
        for name in rng.permutation(pool)[: params["generic_crashes"]]:
            self.crashes.append((str(name), float(rng.uniform(0.85, 0.95)), []))
        self._calibrate(rng)

    def _keep_psd(self) -> None:
        """Scale interactions so the quadratic form stays positive (Gershgorin on the scaled matrix):
        then P >= 0 everywhere and the optimum is the one the priors place."""
        load = {n: 0.0 for n in self.space}
        for a, b, c in self.interactions:
            if a in self.dims and b in self.dims:
                r = abs(c) / (2 * math.sqrt(self.dims[a]["w"] * self.dims[b]["w"]))
                load[a] += r
                load[b] += r
        scaled = []
        for a, b, c in self.interactions:
            worst = max(load.get(a, 0.0), load.get(b, 0.0))
            scaled.append((a, b, c * min(1.0, 0.9 / worst) if worst > 0 else c))
        self.interactions = scaled

    def _calibrate(self, rng: np.random.Generator) -> None:
        p, sat = self.params, self.params["saturation"]
        self.noise = float(rng.uniform(*p["noise"]))
        if p["gain"] is None:  # uncalibrated (the tiny landscape): P is the excess over 1.0 bpb
            self.k, self.base = 1.0, 1.0
            return
        ref_bpb = p["ref_bpb"] + float(rng.normal(0.0, p["ref_sd"]))
        gain = min(float(rng.uniform(*p["gain"])), 0.95 * sat)
        ref_p = self.penalty(reference_knobs(self.space))
        self.k = sat * math.atanh(gain / sat) / ref_p if ref_p > 1e-6 else 1.0
        self.base = ref_bpb - gain if ref_p > 1e-6 else ref_bpb

    def penalty(self, knobs: Mapping[str, Any]) -> float:
        """P: zero at the optimum, growing with the normalised distance from it."""
        d: dict[str, float] = {}
        shift = {n: 0.0 for n in self.dims}
        for cond, choice, dim, by in self.shifts:
            if _key(knobs.get(cond)) == choice:
                shift[dim] += by
        total = 0.0
        for name, dim in self.dims.items():
            d[name] = u = unit(self.space[name], knobs[name], bool(dim["log"])) - dim["opt"] - shift[name]
            pen = dim["w"] * u * u * (dim["asym"] if u > 0 else 1.0)
            if name in self.basins:  # the decoy: a second, shallower-by-depth valley
                far, depth = self.basins[name]
                v = u + dim["opt"] + shift[name] - far
                pen = min(pen, depth + dim["w"] * v * v)
            total += pen
        for name, offsets in self.offsets.items():
            total += offsets.get(_key(knobs[name]), 0.0)
        for a, b, c in self.interactions:
            da = d.get(a, unit(self.space[a], knobs[a]) - 0.5)  # an ordinal choice by its index
            db = d.get(b, unit(self.space[b], knobs[b]) - 0.5)
            total += c * da * db
        return max(total, 0.0)

    def true_val(self, knobs: Mapping[str, Any]) -> float:
        p = self.k * self.penalty(knobs)
        sat = self.params["saturation"]
        return self.base + (sat * math.tanh(p / sat) if sat > 0 else p)

    def crash_probability(self, knobs: Mapping[str, Any]) -> float:
        worst = 0.0
        for dim, thr, lower in self.crashes:
            edge = thr - sum(by for n, c, by in lower if _key(knobs.get(n)) == c)
            x = (unit(self.space[dim], knobs[dim], bool(self.dims[dim]["log"])) - edge) / 0.015
            worst = max(worst, 1.0 / (1.0 + math.exp(-min(max(x, -50.0), 50.0))))
        return worst

    def run(self, knobs: Mapping[str, Any], budget_s: float) -> dict[str, Any]:
        rng = self.noise_rng
        true = self.true_val(knobs)
        crashed = rng.random() < self.crash_probability(knobs)
        val = max(true + float(rng.normal(0.0, self.noise)), 0.3)
        warmdown, dropout = float(knobs.get("WARMDOWN_FRAC", 0.4)), float(knobs.get("DROPOUT", 0.0))
        curve = loss_curve(val, budget_s, warmdown, self.curve, rng, crash_at=rng.uniform(0.1, 0.6) if crashed else None,
                           dropout=dropout)
        if crashed:
            return {"curve": curve, "val_bpb": math.nan, "status": "crashed", "true_val_bpb": true,
                    "reason": "simulated divergence: learning rate past the stability edge"}
        return {"curve": curve, "val_bpb": val, "status": "ok", "true_val_bpb": true}


def loss_curve(val_bpb: float, budget_s: float, warmdown: float, shape: Mapping[str, float],
               rng: np.random.Generator, crash_at: float | None = None, dropout: float = 0.0) -> list[list[float]]:
    """Training loss at ~points_per_s steps per second, shaped like a real `cpu` run (module doc)."""
    n = max(int(budget_s * shape["points_per_s"]), 8)
    t = np.linspace(0.0, budget_s, n + 1)
    gap = shape["gap"] - shape.get("gap_dropout", 0.0) * dropout + rng.normal(0.0, shape["gap_sd"])
    final = val_bpb * LN2 - gap
    tau, onset = shape["tau_frac"] * budget_s, shape["onset_frac"] * budget_s
    bend = shape["bend"] * math.sqrt(max(warmdown, 0.0) / 0.4)
    g = (1.0 + np.maximum(t - onset, 0.0) / tau) ** -shape["b"]
    a = max(L0 - final - bend, 0.05) / (1.0 - g[-1])
    u = np.clip((t - (1.0 - warmdown) * budget_s) / max(warmdown * budget_s, 1e-9), 0.0, 1.0)
    y = L0 - a * (1.0 - g) - bend * (1.0 - (1.0 - u) ** shape["bend_q"])
    y = y + rng.normal(0.0, shape["point_sd"], y.size) * (t > 0)
    if crash_at is not None:  # divergence: the loss explodes for a few seconds, then the run dies
        tc = crash_at * budget_s
        blow = np.exp(np.clip((t - tc) / (0.02 * budget_s), 0.0, 6.0)) - 1.0
        y = np.where(t > tc, y + 0.3 * blow, y)
        keep = t <= tc + 0.08 * budget_s
        t, y = t[keep], y[keep]
    return [[round(float(a_), 4), round(float(b_), 5)] for a_, b_ in zip(t, y, strict=True)]


def cpu_fitted(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape:
    """train.py on the `cpu` profile: baseline ~2.64, optimum 0.19-0.29 lower, noise 0.01-0.02."""
    return ParametricLandscape(seed, space, CPU_PARAMS)


def cpu_fitted_hard(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape:
    """As `cpu_fitted`, with 8 extra interactions, 4 decoy basins, 2 more crash edges, larger optimum
    shifts, more noise and more to gain (0.25-0.45)."""
    return ParametricLandscape(seed, space, HARD_PARAMS)


def tiny(seed: int, space: Mapping[str, Mapping[str, Any]]) -> ParametricLandscape:
    """For tests: val_bpb = 1 + sum_i w_i (u_i - opt_i)^2 + choice offsets, noise 0.003."""
    return ParametricLandscape(seed, space, TINY_PARAMS)


# -- calibration ---------------------------------------------------------------------------------
def record_knobs(record: Mapping[str, Any], baseline: Mapping[str, Any] = BASELINE_KNOBS) -> dict[str, Any]:
    """A record's tunables: its `knobs`, else the baseline with its description's `A x -> y` applied."""
    if isinstance(record.get("knobs"), Mapping):
        return {**baseline, **record["knobs"]}
    knobs = dict(baseline)
    for part in str(record.get("description") or "").split(";"):
        name, _, change = part.strip().partition(" ")
        if "->" in change and name in knobs:
            text = change.split("->", 1)[1].strip()
            try:
                knobs[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                knobs[name] = text
    return knobs


def lineage_knobs(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every record's tunables, replaying a campaign in order: each description (`A x -> y`) edits
    the incumbent of its time, which keep-if-better replaces. Records with `knobs` are taken as is."""
    incumbent, best, out = dict(BASELINE_KNOBS), math.inf, []
    for record in records:
        knobs = record_knobs(record, incumbent)
        out.append(knobs)
        val = record.get("val_bpb")
        if record.get("status", "ok") == "ok" and isinstance(val, int | float) and val < best:
            incumbent, best = knobs, float(val)
    return out


def _train_space() -> dict[str, dict[str, Any]]:
    from pathlib import Path

    from arrl.edits import parse_tunables, search_space

    return search_space(parse_tunables((Path(__file__).resolve().parents[1] / "target" / "train.py").read_text()))


def _q(spec: Mapping[str, Any], prior: Mapping[str, Any], x: Any) -> float:
    """A numeric tunable's penalty per unit weight under its prior (optimum, asymmetry)."""
    log = bool(prior.get("log", False))
    u = unit(spec, x, log) - unit(spec, prior["opt"], log)
    return u * u * (prior.get("asym", 1.0) if u > 0 else 1.0)


# The optimum's gain over the baseline, as multiples of the best improvement a campaign of random
# edits found: on these landscapes 64 random experiments find about half of what there is.
GAIN_OVER_BEST = (1.6, 2.4)


def fit_landscape(records: Sequence[Mapping[str, Any]], prior: Mapping[str, Any] = CPU_PARAMS,
                  ridge: float = 5.0) -> dict[str, Any]:
    """Refit `prior` to real runs: `[{"val_bpb", "status", "knobs" or "description", "curve"?}, ...]`.

    - records in campaign order: descriptions edit the incumbent of their time (`lineage_knobs`);
    - ref_bpb and noise from the baseline repeats (records equal to the baseline);
    - weights and choice offsets by ridge regression of val_bpb - ref_bpb on the per-tunable penalty
      features, shrunk towards the prior (64 runs cannot pin 40 parameters on their own; `ridge` is
      the residual sd in units of 0.01 bpb);
    - the gain range from the best improvement seen (the optimum lies beyond the best few edits);
    - the curve's gap, per-step noise and warmdown depth from the recorded curves.
    """
    params = copy.deepcopy(dict(prior))
    rows = [(k, float(r["val_bpb"])) for k, r in zip(lineage_knobs(records), records, strict=True)
            if r.get("status", "ok") == "ok" and isinstance(r.get("val_bpb"), int | float) and math.isfinite(r["val_bpb"])]
    base = [v for k, v in rows if all(_key(k[n]) == _key(BASELINE_KNOBS[n]) for n in BASELINE_KNOBS)]
    if base:
        params["ref_bpb"] = float(np.median(base))
    if len(base) >= 2:
        sd = float(np.std(base, ddof=1))
        params["noise"] = [max(0.5 * sd, 0.003), max(1.5 * sd, 0.005)]
    ref = params["ref_bpb"]
    edits = [(k, v) for k, v in rows if v < ref + 0.8]  # beyond that the model saturates
    if len(edits) >= 8:
        space = _train_space()
        dims = {n: d for n, d in params["dims"].items() if n in space}
        choices = {n: offs for n, offs in params["choices"].items() if n in space}
        cols = [(n, None) for n in dims] + [(n, c) for n, offs in choices.items() for c in offs]
        prior_theta = np.array([dims[n]["w"] if c is None else choices[n][c] for n, c in cols])

        def features(knobs: Mapping[str, Any]) -> np.ndarray:
            return np.array([_q(space[n], dims[n], knobs[n]) - _q(space[n], dims[n], BASELINE_KNOBS[n]) if c is None
                             else float(_key(knobs[n]) == c) - float(_key(BASELINE_KNOBS[n]) == c) for n, c in cols])

        x = np.stack([features(k) for k, _ in edits])
        y = np.array([v - ref for _, v in edits])
        # Ridge towards the prior, per column in units of its prior uncertainty: a weight may move
        # by about half itself, a choice offset by about 0.03 bpb, against residuals of ~`ridge` x 0.01.
        tau = np.array([0.5 * dims[n]["w"] if c is None else 0.03 for n, c in cols])
        lam = np.diag((0.01 * ridge / tau) ** 2)
        theta = np.linalg.solve(x.T @ x + lam, x.T @ y + lam @ prior_theta)
        for (n, c), value, p0 in zip(cols, theta, prior_theta, strict=True):
            if c is None:
                params["dims"][n]["w"] = float(max(value, 0.05 * p0))
            else:
                params["choices"][n][c] = float(value)
        for name, offs in params["choices"].items():
            best = min(offs.values())
            params["choices"][name] = {c: v - best for c, v in offs.items()}
        best_gain = ref - min(v for _, v in edits)
        if best_gain > 0.05:
            params["gain"] = [round(GAIN_OVER_BEST[0] * best_gain, 3), round(GAIN_OVER_BEST[1] * best_gain, 3)]
    curves = [(np.asarray(r["curve"], dtype=float), float(r["val_bpb"]), float(k.get("DROPOUT", 0.0)))
              for k, r in zip(lineage_knobs(records), records, strict=True)
              if r.get("curve") and r.get("status", "ok") == "ok" and isinstance(r.get("val_bpb"), int | float)]
    if len(curves) >= 3:
        from arrl.forecast import noise_sigma, smoothed_final

        budget = float(max(c[-1, 0] for c, _, _ in curves))
        gaps = np.array([v * LN2 - smoothed_final(c, budget) for c, v, _ in curves])
        drop = np.array([d for _, _, d in curves])
        slope = float(np.polyfit(drop, gaps, 1)[0]) if np.ptp(drop) > 0 else 0.0
        resid = gaps - slope * drop
        params["curve"] = {**params["curve"], "gap": float(np.median(resid)), "gap_dropout": max(-slope, 0.0),
                           "gap_sd": float(1.4826 * np.median(np.abs(resid - np.median(resid)))),
                           "point_sd": float(np.median([noise_sigma(c[c[:, 0] > 0.1 * budget, 1]) for c, _, _ in curves]))}
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m arrl.landscapes fit RUNS.jsonl`: print the refitted params as JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "fit":
        print("usage: python -m arrl.landscapes fit RUNS.jsonl", file=sys.stderr)
        return 2
    with open(args[1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    print(json.dumps(fit_landscape(records), indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
