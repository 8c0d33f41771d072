"""The sealed fifth held-out set (`arrl.heldout_fifth`): its interface, its scale and each shape's property.

Nothing here runs a search on these landscapes: they are kept for checking a search claim."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_heldout import (  # the third set's tests' frame
    BASELINE,
    BUDGET_S,
    SPACE,
    check_interface_determinism_and_scale,
    check_noise_and_saturation,
    check_set_lists_its_factories,
    random_knobs,
)
from test_heldout import (
    clipped_at as at,
)

from arrl import heldout_fifth as fifth
from arrl.landscape_loading import load_landscape
from arrl.landscapes import _key, unit

NAMES = ("conditional", "flaky_edge", "one_far", "dead_zone", "drift")


def test_the_fifth_list_names_the_five_factories() -> None:
    check_set_lists_its_factories(fifth, fifth.FIFTH, fifth.FifthShape, NAMES, "two_basins")


@pytest.mark.parametrize("name", NAMES)
def test_interface_determinism_and_scale(name: str) -> None:
    factory = load_landscape(f"arrl.heldout_fifth:{name}")
    check_interface_determinism_and_scale(factory)
    check_noise_and_saturation(factory)


def test_conditional_tunables_matter_only_under_their_gate_value() -> None:
    for seed in range(8):
        land = fifth.conditional(seed, SPACE)
        best, c = land.best_knobs(), land.cond
        gate = c["gate"]
        assert _key(best[gate]) == c["best"] != _key(BASELINE[gate]) == c["ref"]
        own = [land.numeric[i] for i in c["dims"][c["best"]]]
        assert 1 <= len(own) <= 3
        assert sum(len(d) for d in c["dims"].values()) <= len(land.numeric) // 2
        assert all(abs(unit(SPACE[n], best[n]) - unit(SPACE[n], BASELINE[n])) >= 0.25 for n in own)
        ends = [at(BASELINE, **dict.fromkeys(own, e)) for e in (0.0, 0.3, 0.7, 1.0)]
        # Under every other gate value, the best branch's tunables are exactly flat ...
        for value in SPACE[gate]["choices"]:
            if _key(value) != c["best"]:
                vals = {land.true_val({**k, gate: value}) for k in [BASELINE, *ends]}
                assert len(vals) == 1, (seed, value, vals)
        # ... under the best one they matter, and switching the gate alone does not pay: it takes
        # the gate and its tunables moved together.
        switched = {**BASELINE, gate: best[gate]}
        assert max(land.true_val({**k, gate: best[gate]}) for k in ends) - land.true_val(switched) > 0.01
        assert land.true_val(switched) >= land.true_val(BASELINE)
        both = {**switched, **{n: best[n] for n in own}}
        assert land.true_val(both) < land.true_val(BASELINE) - 0.05


def test_flaky_edge_crashes_at_random_past_the_optimum_and_never_at_it() -> None:
    rng = np.random.default_rng(0)
    for seed in range(5):
        land = fifth.flaky_edge(seed, SPACE)
        best, e = land.best_knobs(), land.edge
        n = land.numeric[e["dim"]]
        u_best = unit(SPACE[n], best[n])
        assert SPACE[n]["kind"] == "log" and u_best >= unit(SPACE[n], BASELINE[n]) + 0.1 - 1e-9
        assert 0.01 <= e["start"] - u_best <= 0.03 + 1e-9 and 0.08 <= e["width"] <= 0.2
        assert all(land.run(best, BUDGET_S)["status"] == "ok" for _ in range(40))
        # Halfway up the ramp, the same values run some times and crash others.
        flaky = at(best, **{n: e["start"] + 0.5 * e["width"]})
        outs = [land.run(flaky, BUDGET_S) for _ in range(100)]
        crashed = [o for o in outs if o["status"] == "crashed"]
        assert 25 <= len(crashed) <= 75
        for o in crashed:
            assert math.isnan(o["val_bpb"]) and math.isfinite(o["true_val_bpb"]) and "stability edge" in o["reason"]
            assert o["curve"][-1][0] < 0.75 * BUDGET_S and o["curve"][-1][1] > o["curve"][-3][1] + 1.0
        if e["start"] + e["width"] < 0.99:  # past the ramp, every run crashes
            assert all(land.run(at(best, **{n: 1.0}), BUDGET_S)["status"] == "crashed" for _ in range(10))
        # Overshooting costs far more than undershooting.
        over, under = (land.excess(at(best, **{n: u_best + d})) for d in (0.05, -0.05))
        assert over > 5.0 * under > 0.0
    for name in ("conditional", "one_far", "dead_zone", "drift"):  # only this shape crashes
        land = getattr(fifth, name)(0, SPACE)
        assert not any(land.run(random_knobs(rng), BUDGET_S)["status"] == "crashed" for _ in range(30))


def test_one_far_is_nearly_tuned_but_for_one_tunable() -> None:
    for seed in range(8):
        land = fifth.one_far(seed, SPACE)
        best, f = land.best_knobs(), land.numeric[land.far]
        assert abs(unit(SPACE[f], best[f]) - unit(SPACE[f], BASELINE[f])) >= 0.45
        near = [abs(unit(SPACE[n], best[n]) - unit(SPACE[n], BASELINE[n])) for n in land.numeric if n != f]
        assert max(near) <= 0.3 and float(np.median(near)) <= 0.1
        assert all(best[n] == BASELINE[n] or land.choice_cost({**best, n: BASELINE[n]}) == 0.0 for n in land.choices)
        # Moving the far tunable alone takes 75-90% of the numeric penalty away; any other alone, little.
        ref = land.excess(BASELINE)
        assert 0.1 * ref <= land.excess({**BASELINE, f: best[f]}) <= 0.25 * ref + 1e-9
        assert all(land.excess({**BASELINE, n: best[n]}) >= 0.75 * ref for n in land.numeric if n != f)


def test_dead_zone_is_flat_around_train_py_and_falls_past_its_threshold() -> None:
    for seed in range(6):
        land = fifth.dead_zone(seed, SPACE)
        best = land.best_knobs()
        assert 2 <= len(land.dead) <= 3
        ref = land.true_val(BASELINE)
        for i, s, t, x_star, c in land.dead:
            n = land.numeric[i]
            u_ref, u_best = unit(SPACE[n], BASELINE[n]), unit(SPACE[n], best[n])
            assert SPACE[n]["kind"] != "int" and 0.1 <= s * (t - u_ref) <= 0.2 + 1e-9 and x_star >= 0.15
            assert u_best == pytest.approx(t + s * x_star)
            # Anywhere in the zone (from the threshold to the domain's end on train.py's side): flat.
            zone = np.linspace(t, 1.0 if s < 0 else 0.0, 9)
            assert max(abs(land.true_val(at(BASELINE, **{n: u})) - ref) for u in zone) <= 1e-12
            # Past the threshold the score falls to the optimum, and rises beyond it.
            path = [land.excess(at(BASELINE, **{n: t + s * x})) for x in np.linspace(0.0, x_star, 6)]
            assert all(b < a for a, b in zip(path, path[1:], strict=False))
            assert path[0] - path[-1] == pytest.approx(land.k * c)
            beyond = t + s * 1.5 * x_star
            if 0.0 <= beyond <= 1.0:
                assert land.excess(at(BASELINE, **{n: beyond})) > path[-1]
        share = sum(land.k * c for *_, c in land.dead) / (land.k * land.penalty(BASELINE))
        assert 0.5 - 1e-9 <= share <= 0.8 + 1e-9


def lag1(x: np.ndarray) -> float:
    return float(np.corrcoef(x[:-1], x[1:])[0, 1])


def test_drift_makes_consecutive_runs_alike_and_distant_ones_not() -> None:
    for seed in range(4):
        land, calm = fifth.drift(seed, SPACE), fifth.one_far(seed, SPACE)
        assert 0.9 <= land.drift["phi"] <= 0.98 and max(0.01, 1.5 * land.noise) <= land.drift["sd"] <= 0.03
        res = {}
        for label, shape in (("drift", land), ("calm", calm)):
            best = shape.best_knobs()
            res[label] = np.array([(o := shape.run(best, BUDGET_S))["val_bpb"] - o["true_val_bpb"] for _ in range(400)])
        assert lag1(res["drift"]) > 0.35 and abs(lag1(res["calm"])) < 0.15
        r = res["drift"]
        assert np.mean(np.abs(r[100:] - r[:-100])) > 1.3 * np.mean(np.abs(np.diff(r)))
        assert np.std(r) > 1.3 * land.noise  # the wander shows through the noise of one run
