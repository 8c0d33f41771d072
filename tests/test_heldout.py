"""The sealed third held-out set (`arrl.heldout`): its interface, its scale and each shape's property.

Nothing here runs a search on these landscapes: they are kept for checking a search claim."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arrl import heldout
from arrl.edits import knobs, parse_tunables, search_space
from arrl.families import _raw
from arrl.heldout import SATURATION
from arrl.landscape_loading import LandscapeError, load_landscape
from arrl.landscapes import L0, LN2, unit

TRAIN_PY = Path(__file__).resolve().parents[1] / "target" / "train.py"
SPACE = search_space(parse_tunables(TRAIN_PY.read_text()))
BASELINE = knobs(parse_tunables(TRAIN_PY.read_text()))
BUDGET_S = 30.0
NAMES = ("ridge", "cliff", "heavy_noise", "few_choices", "log_bowl")


def at(land: heldout.SealedShape, knobs_: dict[str, Any], **u: float) -> dict[str, Any]:
    """`knobs_` with the named numeric tunables moved to normalised positions."""
    return {**knobs_, **{n: _raw(SPACE[n], v) for n, v in u.items()}}


def random_knobs(rng: np.random.Generator) -> dict[str, Any]:
    return {n: s["choices"][int(rng.integers(len(s["choices"])))] if s["kind"] == "choice" else _raw(s, float(rng.random()))
            for n, s in SPACE.items()}


def test_the_sealed_list_names_the_five_factories() -> None:
    assert heldout.SEALED == ",".join(f"arrl.heldout:{n}" for n in NAMES)
    assert [load_landscape(spec) for spec in heldout.SEALED.split(",")] == [getattr(heldout, n) for n in NAMES]
    with pytest.raises(ValueError, match="unknown shape"):
        heldout.SealedShape(0, SPACE, "bowl")


def clipped_at(knobs_: dict[str, Any], **u: float) -> dict[str, Any]:
    """`knobs_` with the named numeric tunables moved to normalised positions (clipped to the domain)."""
    return {**knobs_, **{n: _raw(SPACE[n], float(np.clip(v, 0.0, 1.0))) for n, v in u.items()}}


def check_set_lists_its_factories(module: Any, listing: str, shape_cls: Any, names: tuple[str, ...],
                                  foreign: str) -> None:
    """A later sealed set: its comma-separated list (`FOURTH`, `FIFTH`) names its five factories in
    order, its shape class refuses another set's shape (`foreign`), and it has no `bowl`."""
    short = module.__name__
    assert listing == ",".join(f"{short}:{n}" for n in names)
    assert [load_landscape(spec) for spec in listing.split(",")] == [getattr(module, n) for n in names]
    with pytest.raises(ValueError, match=f"unknown shape '{foreign}'; choose one of {names[0]}, "):
        shape_cls(0, SPACE, foreign)
    with pytest.raises(LandscapeError, match="'bowl' is not a callable"):
        load_landscape(f"{short}:bowl")


def check_noise_and_saturation(factory: Any) -> None:
    """A later sealed set's noise (sd 0.005-0.02) and its hopeless settings levelling off."""
    for seed in range(8):
        land = factory(seed, SPACE)
        best = land.best_knobs()
        assert 0.005 <= land.noise <= 0.02
        hopeless = {**best, **{n: _raw(SPACE[n], float(u < 0.5)) for n, u in zip(land.numeric, land.opt, strict=True)}}
        assert land.true_val(BASELINE) < land.true_val(hopeless) <= land.base + SATURATION  # levels off


def check_interface_determinism_and_scale(factory: Any, noise_is_small: bool = True) -> None:
    """What every sealed landscape promises: the run's outcome and curve, the same landscape and
    runs for a seed, and the scale (base 1.5-3.0 at a runnable optimum, 0.2-1.0 to gain from
    train.py's values). Shared with the fourth set's tests."""
    land = factory(3, SPACE)
    out = land.run(BASELINE, BUDGET_S)
    assert set(out) >= {"curve", "val_bpb", "status", "true_val_bpb"} and out["status"] == "ok"
    assert isinstance(out["val_bpb"], float) and math.isfinite(out["val_bpb"]) and isinstance(out["true_val_bpb"], float)
    t, loss = np.array(out["curve"]).T
    assert t[0] == 0.0 and t[-1] == BUDGET_S and np.all(np.diff(t) > 0)
    assert loss[0] == pytest.approx(L0) and loss[-1] == pytest.approx(out["val_bpb"] * LN2, abs=0.1)
    assert loss[len(loss) // 2] < loss[0] - 1.0
    if noise_is_small:
        assert out["val_bpb"] == pytest.approx(out["true_val_bpb"], abs=0.1)
    # Deterministic by seed, run after run; another seed is another landscape.
    again = factory(3, SPACE)
    assert again.run(BASELINE, BUDGET_S) == out and again.run(BASELINE, BUDGET_S) == land.run(BASELINE, BUDGET_S)
    assert not np.allclose(factory(4, SPACE).opt, land.opt)
    for seed in range(8):
        land = factory(seed, SPACE)
        best = land.best_knobs()
        assert set(best) == set(SPACE) and 1.5 <= land.base <= 3.0
        assert land.true_val(best) == pytest.approx(land.base, abs=1e-9)  # the optimum can be run
        assert land.run(best, BUDGET_S)["status"] == "ok"
        assert 0.19 <= land.true_val(BASELINE) - land.true_val(best) <= 1.0  # train.py leaves 0.2-1.0 to gain
        assert land.true_val(BASELINE) - land.true_val(best) == pytest.approx(land.gain, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_interface_determinism_and_scale(name: str) -> None:
    check_interface_determinism_and_scale(load_landscape(f"arrl.heldout:{name}"), noise_is_small=name != "heavy_noise")


def on_floor(land: heldout.SealedShape, knobs_: dict[str, Any], ua: float) -> dict[str, Any]:
    """`ridge`: `knobs_` with the first valley's A at ua and the rest of its chain on the valley floor."""
    a, b, _, _ = land.valley[0]
    u = {land.numeric[a]: ua, land.numeric[b]: land.valley_floor(0, ua)}
    for j, (bb, c, _, _) in enumerate(land.valley[1:], start=1):
        u[land.numeric[c]] = land.valley_floor(j, u[land.numeric[bb]])
    return at(land, knobs_, **u)


def test_ridge_is_a_narrow_valley_whose_best_b_moves_with_a() -> None:
    for seed in range(4):
        land = heldout.ridge(seed, SPACE)
        best = land.best_knobs()
        a, b, _, _ = land.valley[0]
        na, nb = land.numeric[a], land.numeric[b]
        grid = np.linspace(0.0, 1.0, 101)
        argmins = [grid[np.argmin([land.true_val(at(land, on_floor(land, best, ua), **{nb: ub})) for ub in grid])]
                   for ua in np.linspace(0.0, 1.0, 6)]
        assert max(argmins) - min(argmins) > 0.25, argmins  # B's best depends on A
        ua, ub = unit(SPACE[na], best[na]), unit(SPACE[nb], best[nb])
        along = land.true_val(on_floor(land, best, ua + (0.1 if ua < 0.5 else -0.1))) - land.base
        across = land.true_val(at(land, best, **{nb: ub + (0.1 if ub < 0.5 else -0.1)})) - land.base
        assert across > 5 * along > 0


def test_cliff_crashes_past_the_edge_and_the_optimum_is_near_it() -> None:
    rng = np.random.default_rng(0)
    for seed in range(4):
        land = heldout.cliff(seed, SPACE)
        edge = land.cliff[3]
        assert 0.0 < edge - land.sheer(land.best_knobs()) <= 0.04 + 1e-9
        assert land.sheer(BASELINE) < edge
        crashes = 0
        for _ in range(100):
            k = random_knobs(rng)
            out = land.run(k, BUDGET_S)
            assert (out["status"] == "crashed") == (land.sheer(k) > edge)
            if out["status"] == "crashed":
                crashes += 1
                assert math.isnan(out["val_bpb"]) and math.isfinite(out["true_val_bpb"])
                assert out["curve"][-1][0] < 0.75 * BUDGET_S and out["curve"][-1][1] > out["curve"][-3][1] + 1.0
        assert 5 <= crashes <= 95
    assert not any(heldout.log_bowl(0, SPACE).run(random_knobs(rng), BUDGET_S)["status"] == "crashed"
                   for _ in range(50))


def test_heavy_noise_spreads_more_far_from_the_optimum_and_has_outliers() -> None:
    for seed in range(3):
        land = heldout.heavy_noise(seed, SPACE)
        best = land.best_knobs()
        lr = land.numeric[land.lr]
        far = at(land, best, **{n: float(u < 0.5) for n, u in zip(land.numeric, land.opt, strict=True) if n != lr})
        near = np.array([(o := land.run(best, BUDGET_S))["val_bpb"] - o["true_val_bpb"] for _ in range(400)])
        away = np.array([(o := land.run(far, BUDGET_S))["val_bpb"] - o["true_val_bpb"] for _ in range(400)])
        mad_near, mad_away = (float(np.median(np.abs(x - np.median(x)))) for x in (near, away))
        assert mad_away > 1.5 * mad_near
        assert 0.01 <= float(np.mean(near > 0.18)) <= 0.15  # outliers: a few runs 0.2-0.4 worse
        assert land.noise_sd(at(land, best, **{lr: 1.0})) > 2.0 * land.noise_sd(at(land, best, **{lr: 0.0}))
    calm = heldout.log_bowl(0, SPACE)
    assert max(abs((o := calm.run(calm.best_knobs(), BUDGET_S))["val_bpb"] - o["true_val_bpb"]) for _ in range(400)) < 0.1


def test_few_choices_gains_mostly_from_the_choices() -> None:
    for seed in range(8):
        land = heldout.few_choices(seed, SPACE)
        best, base = land.best_knobs(), land.true_val(BASELINE)
        choices_only = {**BASELINE, **{n: best[n] for n in land.choices}}
        numeric_only = {**best, **{n: BASELINE[n] for n in land.choices}}
        assert base - land.true_val(choices_only) > 0.5 * land.gain
        assert base - land.true_val(numeric_only) < 0.35 * land.gain
        # A numeric partner's best value moves with the gate's choice.
        i = next(iter(land.partners))
        grid = np.linspace(0.0, 1.0, 101)
        argmin = {c: grid[np.argmin([land.true_val(at(land, {**best, land.gate: c}, **{land.numeric[i]: u}))
                                     for u in grid])] for c in SPACE[land.gate]["choices"]}
        assert max(argmin.values()) - min(argmin.values()) > 0.05


def test_log_bowl_sits_near_the_ends_of_log_domains_and_punishes_overshooting() -> None:
    for seed in range(4):
        land = heldout.log_bowl(seed, SPACE)
        best = land.best_knobs()
        logs = [u for n, u in zip(land.numeric, land.opt, strict=True) if SPACE[n]["kind"] == "log"]
        assert logs and all(min(u, 1.0 - u) <= 0.1 for u in logs)
        inner = [(n, u) for n, u in zip(land.numeric, land.opt, strict=True)
                 if SPACE[n]["kind"] != "int" and 0.15 <= u <= 0.85]
        assert inner
        for n, u in inner:
            over = land.true_val(at(land, best, **{n: u + 0.1})) - land.base
            under = land.true_val(at(land, best, **{n: u - 0.1})) - land.base
            assert over > 2.5 * under > 0
