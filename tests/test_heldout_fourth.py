"""The sealed fourth held-out set (`arrl.heldout_fourth`): its interface, its scale and each shape's property.

Nothing here runs a search on these landscapes: they are kept for checking a search claim."""

from __future__ import annotations

import math
from typing import Any

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

from arrl import heldout_fourth as fourth
from arrl.families import _raw
from arrl.heldout import SATURATION
from arrl.landscape_loading import load_landscape
from arrl.landscapes import LN2, unit

NAMES = ("scaling_rule", "compute_tradeoff", "two_basins", "late_bloomer", "quantised")


def test_the_fourth_list_names_the_five_factories() -> None:
    check_set_lists_its_factories(fourth, fourth.FOURTH, fourth.FourthShape, NAMES, "ridge")


@pytest.mark.parametrize("name", NAMES)
def test_interface_determinism_and_scale(name: str) -> None:
    factory = load_landscape(f"arrl.heldout_fourth:{name}")
    check_interface_determinism_and_scale(factory)
    check_noise_and_saturation(factory)


def test_scaling_rule_moves_the_best_learning_rate_with_its_partner_as_a_power_law() -> None:
    grid = np.linspace(0.0, 1.0, 401)
    for seed in range(5):
        land = fourth.scaling_rule(seed, SPACE)
        best = land.best_knobs()
        assert len(land.rules) >= 2
        for a, b, alpha, _, _ in land.rules:
            na = land.numeric[a]
            spec = SPACE[na]
            assert spec["kind"] == "log" and 0.5 <= abs(alpha) <= 1.0

            def best_a(knobs_: dict[str, Any], land: fourth.FourthShape = land, na: str = na) -> float:
                return float(grid[np.argmin([land.true_val(at(knobs_, **{na: u})) for u in grid])])

            # A's best at two values of B, against the power law A* = A*_opt (B / B_opt)^alpha.
            if SPACE[b]["kind"] == "choice":
                lo, hi = min(SPACE[b]["choices"]), max(SPACE[b]["choices"])
            else:
                lo, hi = _raw(SPACE[b], 0.2), _raw(SPACE[b], 0.8)
            law = [float(np.clip(unit(spec, best[na]) + alpha * math.log(x / best[b]) / math.log(spec["high"] / spec["low"]),
                                 0.0, 1.0)) for x in (lo, hi)]
            found = [best_a({**best, b: x}) for x in (lo, hi)]
            assert found == pytest.approx(law, abs=0.003)
            assert abs(law[1] - law[0]) > 0.03
            # train.py's A is off the rule at train.py's B.
            assert abs(best_a(BASELINE) - unit(spec, BASELINE[na])) >= 0.1 - 0.003


def test_compute_tradeoff_has_an_interior_size_steeper_on_the_big_side_and_runs_out_of_memory() -> None:
    rng = np.random.default_rng(0)
    crashes = runs = 0
    for seed in range(6):
        land = fourth.compute_tradeoff(seed, SPACE)
        best, sizes = land.best_knobs(), [land.numeric[i] for i in land.sizes["dims"]]
        assert 2 <= len(sizes) <= 3 and all(SPACE[n]["low"] > 0 for n in sizes)
        s_opt = land.size(best)
        assert 0.1 <= s_opt <= 0.75 and land.tradeoff(s_opt) == pytest.approx(0.0, abs=1e-12)
        assert land.tradeoff(s_opt + 0.15) > 1.5 * land.tradeoff(s_opt - 0.15) > 0
        assert land.tradeoff(s_opt + 0.3) > 2.5 * land.tradeoff(s_opt - 0.3) > 0
        # The memory limit: 2 or more times the optimum's product, over train.py's (which runs).
        log_product = lambda k, sizes=sizes: sum(math.log(k[n]) for n in sizes)
        assert log_product(best) + math.log(2.0) <= land.sizes["limit"] + 1e-9
        assert log_product(BASELINE) + math.log(1.2) <= land.sizes["limit"] + 1e-9
        for _ in range(60):
            k = random_knobs(rng)
            out = land.run(k, BUDGET_S)
            runs += 1
            assert (out["status"] == "crashed") == (log_product(k) > land.sizes["limit"])
            if out["status"] == "crashed":
                crashes += 1
                assert math.isnan(out["val_bpb"]) and math.isfinite(out["true_val_bpb"]) and "memory" in out["reason"]
                assert out["curve"][-1][0] < 0.75 * BUDGET_S and out["curve"][-1][1] > out["curve"][-3][1] + 1.0
    assert 0.1 * runs <= crashes <= 0.9 * runs
    for name in ("scaling_rule", "two_basins", "late_bloomer", "quantised"):  # only this shape crashes
        land = getattr(fourth, name)(0, SPACE)
        assert not any(land.run(random_knobs(rng), BUDGET_S)["status"] == "crashed" for _ in range(30))


def test_two_basins_keeps_train_py_in_a_local_basin_behind_a_ridge() -> None:
    rng = np.random.default_rng(0)
    for seed in range(6):
        land = fourth.two_basins(seed, SPACE)
        best, local = land.best_knobs(), land.local_knobs()
        names = [land.numeric[i] for i in land.basin["dims"]]
        assert 3 <= len(names) <= 6
        assert all(abs(unit(SPACE[n], local[n]) - unit(SPACE[n], best[n])) >= 0.25 - 1e-9 for n in names)
        assert all(abs(unit(SPACE[n], local[n]) - unit(SPACE[n], BASELINE[n])) <= 0.2 for n in names)
        floor = land.true_val(local)
        assert 0.1 - 0.01 <= floor - land.base <= 0.4  # the optimum's basin is 0.1-0.4 deeper
        assert floor - land.base == pytest.approx(SATURATION * math.tanh(land.basin["drop"] / SATURATION))
        # The local floor is a local minimum ...
        for _ in range(20):
            moved = at(local, **{n: unit(SPACE[n], local[n]) + rng.choice([-0.06, 0.06]) for n in names})
            assert land.true_val(moved) >= floor - 1e-12
        # ... and the straight paths to the optimum, from it and from train.py's values, climb a ridge first.
        for start, margin in ((local, 0.05), (BASELINE, 0.02)):
            path = [land.true_val(at(start, **{n: (1 - t) * unit(SPACE[n], start[n]) + t * unit(SPACE[n], best[n])
                                                for n in names})) for t in np.linspace(0.0, 1.0, 41)]
            assert max(path) > path[0] + margin and path[-1] < path[0]


def test_late_bloomer_starts_slow_near_the_optimum_and_ends_best() -> None:
    for seed in range(6):
        land = fourth.late_bloomer(seed, SPACE)
        best = land.best_knobs()
        late = [land.numeric[i] for i in land.late["dims"]]
        assert all(abs(unit(SPACE[n], best[n]) - unit(SPACE[n], BASELINE[n])) >= 0.3 for n in late)
        halfway = at(best, **{n: (unit(SPACE[n], best[n]) + unit(SPACE[n], BASELINE[n])) / 2 for n in late})
        curves = {}
        for label, k in (("best", best), ("halfway", halfway), ("train.py", BASELINE)):
            out = land.run(k, BUDGET_S)
            assert out["status"] == "ok"
            curves[label] = np.array(out["curve"])
            assert curves[label][-1, 1] == pytest.approx(out["val_bpb"] * LN2, abs=0.1)
        t = curves["best"][:, 0]
        early = int(np.searchsorted(t, 0.2 * BUDGET_S))
        # The best run is behind train.py's a fifth of the way in, and ahead at the end.
        assert curves["best"][early, 1] > curves["train.py"][early, 1] + 0.1
        assert curves["best"][-1, 1] < curves["train.py"][-1, 1]
        assert curves["halfway"][early, 1] > curves["train.py"][early, 1]  # moving towards it slows the start
        assert land.pace(BASELINE) < 0.05 < 0.2 < land.pace(best)


def test_quantised_ints_cost_a_step_off_their_multiples() -> None:
    for seed in range(8):
        land = fourth.quantised(seed, SPACE)
        best = land.best_knobs()
        assert 1 <= len(land.steps) <= 3
        for i, m, cost in land.steps:
            n, spec = land.numeric[i], SPACE[land.numeric[i]]
            assert spec["kind"] == "int" and 0.03 <= cost <= 0.15 and best[n] % m == 0
            excess = {x: land.excess({**best, n: x}) for x in range(int(spec["low"]), int(spec["high"]) + 1)}
            off = [x for x in excess if x % m]
            assert min(excess[x] for x in off) >= cost - 1e-12  # no value off the multiples is near the best
            # Next to a multiple, a value off them is a bump over its neighbours that a smooth model fills in.
            bumps = [excess[x] - (excess[x - 1] + excess[x + 1]) / 2 for x in off
                     if x - 1 in excess and x + 1 in excess and ((x - 1) % m == 0 or (x + 1) % m == 0)]
            assert bumps and min(bumps) >= 0.3 * cost
