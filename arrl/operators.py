"""Proposal operators for the hyper-heuristic policy (`arrl.hyper`): each turns the campaign's own
history into one edit program of the incumbent.

The policy does not pick tunables and values itself; it picks *how* to propose (which operator,
how many edits, how far), and these operators do the rest:

    model      a cheap surrogate fitted on the campaign's history (Bayesian ridge regression of
               val_bpb on an additive quadratic in each numeric tunable's normalised position plus a
               one-hot per choice, then level offsets of the ints on what that leaves (`Encoder`),
               on the runs that did not crash), sampled once (Thompson sampling, so it explores
               where it is unsure), then the `n` tunables whose move inside the trust radius the
               sample predicts to gain most are set to that sample's best value; no move goes
               past halfway to a value that crashed near the incumbent, or that crashed again
               elsewhere (`Surrogate.nearby_crashes`)
    mutate     `n` random tunables of the incumbent moved by a Gaussian step of the radius (choices
               flipped at random)
    recombine  up to `n` of the differences between the incumbent and one of the best other runs
    random     the grammar's own uniformly random program (what random search does)

Before the policy's first choice, `Operators.design` runs the campaign's opening design: every
numeric tunable moved once by `DESIGN_STEP`, three to an experiment (`HyperAgent.scripted` says why,
and when the design's least-losing experiment is split into single probes). `Operators.extend`
makes a pattern move: a step of one tunable that won, taken again, longer.

Every operator emits `set` edits that `resolve_program` accepts, and avoids configurations already
run (the applier would drop them as duplicates, which costs a proposal and is penalised).

`model` also leaves alone the tunables that proposals still waiting for their outcome have moved
(`avoid`): the pipeline proposes one experiment ahead so the GPU never waits, and the surrogate,
not knowing the pending outcome yet, would mostly propose the same move again; the information in
the pending run comes anyway, so the next run asks about other tunables.

`Memory` rebuilds the history from what a proposer sees: the incumbent (its tunables are the
context's) and the window of records, whose `extra["knobs"]` says what each run of this strategy
really ran. It accumulates across proposals, so the surrogate sees the whole campaign, not only
the last 32 records. With workers of several hardware classes it puts every run on one class's
scale, by the offsets the incumbent's scores on two classes show (`arrl.scores.ClassOffsets`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from arrl.edits import (
    SIG_DIGITS,
    GrammarError,
    Tunable,
    knobs_after,
    random_program,
    resolve_program,
    same_value,
)
from arrl.scores import ClassOffsets, measured_by

OPERATORS = ("model", "mutate", "recombine", "random")
RADII = (0.05, 0.15, 0.35)  # trust radius / step size, in normalised units of each domain
PRIOR_PRECISION = 4.0  # ridge on the surrogate's coefficients: effects of about 0.5 bpb are plausible
LEVEL_PRECISION = 16.0  # ridge on an int tunable's level offsets (below): about 0.25 bpb
LEVELS_MAX = 8  # ints with up to this many values get an offset per value; wider ones per power of two
POW2_CLASSES = 5  # odd, 2 x odd, 4 x odd, 8 x odd, a multiple of 16
MIN_POINTS = 4  # below this the surrogate is the prior: it proposes like `mutate`
TEMPERATURE = 1.0  # scale of the posterior draw (Thompson sampling); 0 would always exploit the mean
WINSOR_MIN = 0.3  # runs worse than the best by more than this (bpb) ...
WINSOR_SPREAD = 3.0  # ... and than this many times the median's distance from the best count as that
CRASH_NEAR = 3  # a crashed run differing from the incumbent in at most this many tunables bounds its moves
CRASH_REPEAT = 2  # ... as do crashes farther away once this many set a tunable at or short of one value
DESIGN_EDITS = 3  # tunables probed per experiment of the opening design (the grammar's most)
DESIGN_STEP = 0.35  # how far each is moved, in normalised units (the largest of RADII)
DESIGN_INWARD = 0.7  # how often toward the middle of its domain rather than away from it
EXTEND_GROWTH = 2.0  # a pattern move takes the winning step again, this many times as long (`Operators.extend`)


RULES = {"design": "opening design", "split": "design split", "extend": "pattern move"}


def proposed_by(extra: Mapping[str, Any] | None) -> str | None:
    """What made a ppo proposal, from its record's `extra` (`HyperAgent.extra`): the policy's action,
    as "model x3 r0.15" (operator, edit count, the radius it meant), or a rule's name; None for a
    record of another strategy (the edit policy's records carry an action but no radius), or of no
    proposal (a baseline, a re-run)."""
    extra = extra or {}
    rule = next((name for key, name in RULES.items() if extra.get(key)), None)
    action, radius = extra.get("action"), extra.get("radius")
    if rule or not (isinstance(action, list) and len(action) == 3 and isinstance(radius, int | float)):
        return rule
    op, edits = int(action[0]), int(action[1]) + 1
    return f"{OPERATORS[op] if 0 <= op < len(OPERATORS) else op} x{edits} r{radius:g}"


class Encoder:
    """Numeric tunables <-> positions in [0, 1] (log domains in log space); choices by index.

    An int tunable also gets level offsets on top of its quadratic: one per value where it has at
    most `LEVELS_MAX` values (a depth, a ratio), else one per power of two dividing the value (a
    batch size, a width: hardware tiles favour multiples of 8 or 64). A smooth quadratic alone fills
    in a step between neighbouring values; the offsets, shrunk harder toward zero than the quadratic
    (`LEVEL_PRECISION`), let the campaign's runs show one where there is one."""

    def __init__(self, space: Mapping[str, Mapping[str, Any]]) -> None:
        self.space = {n: dict(s) for n, s in space.items()}
        self.numeric = [n for n, s in self.space.items() if s["kind"] != "choice"]
        self.choice = [n for n, s in self.space.items() if s["kind"] == "choice"]
        self.n_base = k = 2 * len(self.numeric) + sum(len(self.space[n]["choices"]) for n in self.choice)
        self.level_start: dict[str, int] = {}  # int tunable -> index of its first level offset
        self.per_value: set[str] = set()  # the ints with an offset per value (the rest: per power of two)
        for n in self.numeric:
            count = int(self.space[n]["high"]) - int(self.space[n]["low"]) + 1
            if self.space[n]["kind"] == "int" and count > 1:  # a one-value int has nothing to offset
                if count <= LEVELS_MAX:
                    self.per_value.add(n)
                self.level_start[n], k = k, k + (count if count <= LEVELS_MAX else POW2_CLASSES)
        self.n_features = k
        self.precision = np.full(k, PRIOR_PRECISION)
        self.precision[self.n_base:] = LEVEL_PRECISION

    def level(self, name: str, value: Any) -> int:
        """Which of the int tunable's level offsets `value` takes (see the class docstring)."""
        s, x = self.space[name], int(round(float(value)))
        if name in self.per_value:
            return min(max(x - int(s["low"]), 0), int(s["high"]) - int(s["low"]))
        if x == 0:
            return POW2_CLASSES - 1
        twos = 0
        while x % 2 == 0 and twos < POW2_CLASSES - 1:
            x //= 2
            twos += 1
        return twos

    def unit(self, name: str, value: Any) -> float:
        s = self.space[name]
        lo, hi, x = float(s["low"]), float(s["high"]), float(value)
        if s["kind"] == "log":
            return min(1.0, max(0.0, math.log(max(x, lo) / lo) / math.log(hi / lo)))
        return min(1.0, max(0.0, (x - lo) / (hi - lo))) if hi > lo else 0.0

    def value(self, name: str, u: float) -> Any:
        """The value at position u, snapped as the grammar writes it (ints round, 4 digits)."""
        s = self.space[name]
        lo, hi, u = float(s["low"]), float(s["high"]), min(1.0, max(0.0, u))
        x = lo * (hi / lo) ** u if s["kind"] == "log" else lo + (hi - lo) * u
        if s["kind"] == "int":
            return int(min(max(round(x), int(lo)), int(hi)))
        return float(min(max(float(f"{x:.{SIG_DIGITS}g}"), lo), hi))

    def choice_index(self, name: str, value: Any) -> int:
        return next((i for i, c in enumerate(self.space[name]["choices"]) if same_value(c, value)), 0)

    def features(self, knobs: Mapping[str, Any]) -> np.ndarray:
        """Regressors of the surrogate: u and u^2 per numeric tunable, one-hot per choice, one-hot
        level offsets per int tunable."""
        out = np.zeros(self.n_features)
        for i, n in enumerate(self.numeric):
            u = self.unit(n, knobs[n])
            out[2 * i], out[2 * i + 1] = u, u * u
            if n in self.level_start:
                out[self.level_start[n] + self.level(n, knobs[n])] = 1.0
        k = 2 * len(self.numeric)
        for n in self.choice:
            out[k + self.choice_index(n, knobs[n])] = 1.0
            k += len(self.space[n]["choices"])
        return out


def config_key(knobs: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(f"{k}={v!r}" for k, v in sorted(knobs.items()))


@dataclass
class Point:
    knobs: dict[str, Any]
    val: float | None  # None: crashed (or otherwise failed); on the reference class's scale (`Memory`)
    measured: float | None = None  # as its run scored it, on its own hardware class
    hardware_class: str = ""


def _valid(tunables: Mapping[str, Tunable], program: list[dict[str, Any]]) -> bool:
    try:
        resolve_program(tunables, program)
    except GrammarError:
        return False
    return bool(program)


class Memory:
    """The campaign's runs as (tunables, val_bpb), keyed by experiment id (see the module doc)."""

    def __init__(self) -> None:
        self.points: dict[str, Point] = {}
        # With workers of several hardware classes, each class's offset in val_bpb, taken off its
        # runs' scores (`arrl.scores.ClassOffsets`): a run's class is no effect of its tunables.
        self.classes = ClassOffsets()
        self.keys: set[tuple[str, ...]] = set()  # configurations run or proposed: never proposed again
        self.recorded: set[tuple[str, ...]] = set()  # configurations whose outcome is recorded

    def _add(self, exp_id: str, knobs: Mapping[str, Any], val: float | None, cls: str = "") -> None:
        if exp_id not in self.points:
            self.points[exp_id] = Point(dict(knobs), None if val is None else val - self.classes.of(cls), val, cls)
            self.keys.add(config_key(knobs))

    def observe(self, tunables: Mapping[str, Tunable], incumbent: Mapping[str, Any] | None,
                recent: Sequence[Mapping[str, Any]]) -> None:
        inc = incumbent or {}
        if self.classes.learn(inc):
            for p in self.points.values():
                if p.measured is not None:
                    p.val = p.measured - self.classes.of(p.hardware_class)
        val = inc.get("val_bpb")
        if inc.get("experiment_id") and isinstance(val, int | float) and math.isfinite(val):
            # A re-run of the incumbent (`measured_by`) is one more point at the same tunables.
            self._add(measured_by(inc), {n: t.value for n, t in tunables.items()},
                      float(val), str(inc.get("hardware_class") or ""))
        for r in recent:
            extra = r.get("extra")
            knobs = extra.get("knobs") if isinstance(extra, Mapping) else None
            if not isinstance(knobs, Mapping) or not r.get("experiment_id"):
                continue
            self.recorded.add(config_key(knobs))
            status, v, cls = r.get("status"), r.get("val_bpb"), str(r.get("hardware_class") or "")
            if status == "ok" and isinstance(v, int | float) and math.isfinite(v):
                self._add(str(r["experiment_id"]), knobs, float(v), cls)
            elif status == "aborted" and isinstance(r.get("forecast_val_bpb"), int | float):
                self._add(str(r["experiment_id"]), knobs, float(r["forecast_val_bpb"]), cls)
            elif status in ("crashed", "timed_out", "diverged"):
                self._add(str(r["experiment_id"]), knobs, None)
            elif status == "aborted":
                # Worse than the incumbent, or stopped as run at another machine speed (no forecast):
                # not again either way (a second run of edits left uncompared was level, docs/search.md).
                self.keys.add(config_key(knobs))

    def scored(self) -> list[Point]:
        return [p for p in self.points.values() if p.val is not None]

    def take(self, tunables: Mapping[str, Tunable], program: list[dict[str, Any]]) -> bool:
        """Whether `program` is a valid edit of `tunables` (not empty, no no-op) leading to a
        configuration not run or proposed yet; if so it counts as proposed from now on: the next
        proposal is made before this one's outcome is recorded."""
        if not _valid(tunables, program) or (key := config_key(knobs_after(tunables, program))) in self.keys:
            return False
        self.keys.add(key)
        return True


def _ridge(x: np.ndarray, y: np.ndarray, precision: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and a square root of the covariance of a Bayesian ridge regression."""
    d = x.shape[1]
    # A prior mean of positive curvature (bowls) was tried: no better than this zero-mean ridge.
    a = x.T @ x / noise + np.diag(precision)
    cov = np.linalg.inv(a)
    mean = cov @ x.T @ y / noise
    try:
        return mean, np.linalg.cholesky(cov + 1e-12 * np.eye(d))
    except np.linalg.LinAlgError:
        # Near-repeats of one configuration with little noise make `a` ill-conditioned, and the
        # inverse's rounding can leave `cov` slightly indefinite. The precision's own Cholesky
        # factor L always exists (the prior keeps `a` positive definite): inv(L') is a square
        # root of the covariance. Kept as the fallback so that draws elsewhere stay as they were.
        return mean, np.linalg.solve(np.linalg.cholesky(a).T, np.eye(d))


class Surrogate:
    """Bayesian ridge regression of val_bpb on `Encoder.features` (see the module docstring)."""

    def __init__(self, enc: Encoder, points: Sequence[Point], sigma: float) -> None:
        self.enc = enc
        self.n = sum(p.val is not None for p in points)
        self.ok = self.n >= MIN_POINTS
        d = enc.n_features
        self.mean, self.cov_chol = np.zeros(d), np.diag(1.0 / np.sqrt(enc.precision))
        self.y0, self.resid, self.y = 0.0, 0.0, np.zeros(0)  # y: the targets as fitted (winsorised)
        # Crashes bound the moves (`nearby_crashes`) instead of entering the fit: counted as the worst run,
        # one crash past a learning rate's stability edge bent the quadratic back to the incumbent,
        # and the search never climbed toward the edge, where the best runs are.
        self.crashes = [p.knobs for p in points if p.val is None]
        points = [p for p in points if p.val is not None]
        if not self.ok:
            return
        x = np.stack([enc.features(p.knobs) for p in points])
        y = np.array([p.val for p in points], dtype=float)
        # Hopeless runs (saturated, near byte-frequency loss) would bend a quadratic: winsorise them,
        # but relative to the spread of the typical run, so a landscape whose runs differ by whole
        # bpb is not flattened into a plateau (a fixed cap of 0.3 lost most of the gain there).
        self.y = y = np.minimum(y, y.min() + max(WINSOR_MIN, WINSOR_SPREAD * (float(np.median(y)) - y.min())))
        self.y0 = float(y.mean())
        noise = max(sigma, 0.01 * float(np.std(y)), 1e-3) ** 2
        # Two stages, so that the level offsets (cheap to fit, one per value) take only what the
        # smooth part cannot explain: fitted jointly they absorbed the quadratic's signal, and on
        # landscapes whose runs differ by whole bpb the search lost 0.06-0.13 bpb at 50 experiments.
        b = enc.n_base
        mean_s, chol_s = _ridge(x[:, :b], y - self.y0, enc.precision[:b], noise)
        mean_l, chol_l = (_ridge(x[:, b:], y - self.y0 - x[:, :b] @ mean_s, enc.precision[b:], noise) if d > b
                          else (np.zeros(0), np.zeros((0, 0))))
        self.mean = np.concatenate([mean_s, mean_l])
        self.cov_chol = np.zeros((d, d))
        self.cov_chol[:b, :b], self.cov_chol[b:, b:] = chol_s, chol_l
        fit = x @ self.mean + self.y0
        self.resid = float(np.sqrt(np.mean((fit - y) ** 2)))

    def sample(self, rng: np.random.Generator | None) -> np.ndarray:
        if rng is None:
            return self.mean
        return self.mean + TEMPERATURE * (self.cov_chol @ rng.standard_normal(self.mean.size))

    def nearby_crashes(self, name: str, knobs: Mapping[str, Any]) -> list[Any]:
        """The values of `name` in crashed runs near `knobs` (`CRASH_NEAR` tunables apart or fewer,
        `name` among them), or in crashed runs anywhere once a numeric value has crashed
        `CRASH_REPEAT` times on its side of `knobs`, no nearer than it (`_repeated`): a move goes at
        most halfway to such a value, so the search closes in on a crash edge by halving the
        distance instead of stepping over it again."""
        out = []
        for crash in self.crashes:
            if name in crash and not same_value(crash[name], knobs[name]) \
                    and (sum(not same_value(crash.get(k), v) for k, v in knobs.items()) <= CRASH_NEAR
                         or self._repeated(name, knobs[name], crash[name])):
                out.append(crash[name])
        return out

    def _repeated(self, name: str, here: Any, crashed: Any) -> bool:
        """Whether `CRASH_REPEAT` crashed runs set `name` between `here` and `crashed` (that one
        included). Why: a single crash far from the incumbent may have been caused by the other
        tunables it changed (a crash edge along a sum of tunables), so it says nothing here; but
        one value or a nearer one crashing again in other company points at this tunable. On
        `flaky_edge`, without this, a traced campaign ran the learning rate's top value into a
        crash five times, each time the incumbent had moved on (docs/search.md)."""
        if CRASH_REPEAT <= 0 or name not in self.enc.numeric:
            return False
        u0, uc = self.enc.unit(name, here), self.enc.unit(name, crashed)
        between = 0
        for crash in self.crashes:
            if name in crash:
                u = self.enc.unit(name, crash[name])
                between += u0 < u <= uc if uc > u0 else uc <= u < u0
        return between >= CRASH_REPEAT

    def moves(self, theta: np.ndarray, knobs: Mapping[str, Any], radius: float) -> list[tuple[float, str, Any]]:
        """(predicted gain, tunable, new value) of the best single move of each tunable, within the
        trust radius and short of nearby crashes (`nearby_crashes`)."""
        enc, out = self.enc, []
        for i, name in enumerate(enc.numeric):
            a, c = theta[2 * i], theta[2 * i + 1]
            u0 = enc.unit(name, knobs[name])
            lo, hi = 0.0, 1.0
            for crashed in self.nearby_crashes(name, knobs):
                uc = enc.unit(name, crashed)
                lo, hi = (lo, min(hi, (u0 + uc) / 2)) if uc > u0 else (max(lo, (u0 + uc) / 2), hi)
            grid = np.clip(u0 + radius * np.linspace(-1.0, 1.0, 9), lo, hi)
            if name in enc.level_start:  # every int inside the radius, scored where it lies, with its offset
                start = enc.level_start[name]
                values = list(range(enc.value(name, float(grid[0])), enc.value(name, float(grid[-1])) + 1))
                values += [] if knobs[name] in values else [knobs[name]]
                us = np.array([enc.unit(name, v) for v in values])
                f = a * us + c * us * us + np.array([theta[start + enc.level(name, v)] for v in values])
                here = f[values.index(knobs[name])]
                best = int(np.argmin(f))
                if values[best] != knobs[name]:
                    out.append((float(here - f[best]), name, values[best]))
                continue
            f = a * grid + c * grid * grid
            best = int(np.argmin(f))
            new = enc.value(name, float(grid[best]))
            if not same_value(new, knobs[name]):
                out.append((float(a * u0 + c * u0 * u0 - f[best]), name, new))
        k = 2 * len(enc.numeric)
        for name in enc.choice:
            choices = enc.space[name]["choices"]
            offs = theta[k:k + len(choices)]
            k += len(choices)
            cur = enc.choice_index(name, knobs[name])
            crashed = {enc.choice_index(name, v) for v in self.nearby_crashes(name, knobs)}
            best = min((j for j in range(len(choices)) if j not in crashed), key=lambda j: offs[j], default=cur)
            if best != cur:
                out.append((float(offs[cur] - offs[best]), name, choices[best]))
        out.sort(key=lambda m: -m[0])
        return out


class Operators:
    """The operators of the module docstring on one campaign's memory."""

    def __init__(self, space: Mapping[str, Mapping[str, Any]]) -> None:
        self.enc = Encoder(space)

    def propose(self, op: int, n: int, radius: float, tunables: Mapping[str, Tunable], memory: Memory,
                surrogate: Surrogate, rng: random.Random, np_rng: np.random.Generator,
                avoid: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """A valid, not yet run program from operator `op` (falls back to mutate, then random);
        `model` leaves the tunables in `avoid` alone (see the module docstring)."""
        knobs = {name: t.value for name, t in tunables.items()}
        for attempt in range(8):
            name = OPERATORS[op] if attempt < 4 else "mutate" if attempt < 7 else "random"
            if name == "model" and surrogate.ok:
                moves = [m for m in surrogate.moves(surrogate.sample(np_rng), knobs, radius) if m[1] not in avoid]
                program = [{"op": "set", "name": m[1], "value": m[2]} for m in moves[:n] if m[0] > 0]
                if not program:  # the sample sees nothing to gain: explore like mutate
                    program = self._mutate(knobs, n, radius, rng)
            elif name == "recombine":
                program = self._recombine(knobs, n, memory, rng)
            elif name == "random":
                program = random_program(tunables, rng)
            else:
                program = self._mutate(knobs, n, radius, rng)
            if memory.take(tunables, program):
                return program
        return program if _valid(tunables, program) else random_program(tunables, rng)

    def design(self, knobs: Mapping[str, Any], tunables: Mapping[str, Tunable], probed: set[str], memory: Memory,
               rng: random.Random) -> list[dict[str, Any]] | None:
        """The next program of the campaign's opening design, or None once every numeric tunable has
        been probed: up to `DESIGN_EDITS` tunables not probed yet, each moved by `DESIGN_STEP` of its
        domain, toward the middle of the domain more often than not (`DESIGN_INWARD`)."""
        enc = self.enc
        todo = [name for name in enc.numeric if name not in probed]
        for _ in range(4):
            if not todo:
                return None
            picked = rng.sample(todo, min(DESIGN_EDITS, len(todo)))
            probed.update(picked)
            todo = [name for name in todo if name not in picked]
            program = []
            for name in sorted(picked):
                u0 = enc.unit(name, knobs[name])
                inward = 1.0 if u0 < 0.5 else -1.0
                step = DESIGN_STEP * (inward if rng.random() < DESIGN_INWARD else -inward)
                if not 0.0 <= u0 + step <= 1.0:
                    step = -step
                new = enc.value(name, u0 + step)
                if not same_value(new, knobs[name]):
                    program.append({"op": "set", "name": name, "value": new})
            if memory.take(tunables, program):
                return program
        return None

    def extend(self, before: Mapping[str, Any], after: Mapping[str, Any], tunables: Mapping[str, Tunable],
               memory: Memory) -> list[dict[str, Any]] | None:
        """The pattern move after a win that moved one numeric tunable from `before` to `after`: the
        same direction again, `EXTEND_GROWTH` times as far (clipped to its domain), so a run of wins
        walks toward a far optimum in steps that double. None where the win moved no numeric tunable
        or more than one (extending three moves at once, where often one paid and two cost, lost on
        the training family `wide`), where the step would change nothing, or where it has run."""
        enc = self.enc
        moved = [n for n in enc.numeric if n in before and not same_value(before[n], after[n])]
        if len(moved) != 1:
            return None
        name = moved[0]
        u = enc.unit(name, after[name])
        new = enc.value(name, u + EXTEND_GROWTH * (u - enc.unit(name, before[name])))
        program = [{"op": "set", "name": name, "value": new}]
        return program if memory.take(tunables, program) else None

    def _mutate(self, knobs: Mapping[str, Any], n: int, radius: float, rng: random.Random) -> list[dict[str, Any]]:
        enc, program = self.enc, []
        for name in rng.sample(sorted(enc.space), min(n, len(enc.space))):
            if name in enc.choice:
                others = [c for c in enc.space[name]["choices"] if not same_value(c, knobs[name])]
                if others:
                    program.append({"op": "set", "name": name, "value": rng.choice(others)})
                continue
            u0 = enc.unit(name, knobs[name])
            for _ in range(4):  # a step that rounds back to the same value (ints) is no edit
                new = enc.value(name, u0 + rng.gauss(0.0, radius))
                if not same_value(new, knobs[name]):
                    program.append({"op": "set", "name": name, "value": new})
                    break
        return program

    def _recombine(self, knobs: Mapping[str, Any], n: int, memory: Memory,
                   rng: random.Random) -> list[dict[str, Any]]:
        ranked = sorted(memory.scored(), key=lambda p: p.val)  # type: ignore[arg-type, return-value]
        others = [p for p in ranked[:6] if config_key(p.knobs) != config_key(knobs)]
        if not others:
            return []
        donor = rng.choice(others[:3])
        diffs = [name for name in sorted(knobs) if not same_value(donor.knobs.get(name, knobs[name]), knobs[name])]
        return [{"op": "set", "name": name, "value": donor.knobs[name]}
                for name in rng.sample(diffs, min(n, len(diffs)))]
