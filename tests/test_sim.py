"""The simulator executor: whole campaigns on virtual time against a real redis-server.

Only the executor is simulated; the proposer, applier and reward computer are the real stages.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arrl import landscapes
from arrl.bus import Bus
from arrl.campaign import Campaign
from arrl.edits import knobs, parse_tunables, search_space
from arrl.forecast import smoothed_final
from arrl.landscape_loading import LandscapeError, load_landscape
from arrl.patch import check_candidate
from arrl.selfeval import audit_tally
from arrl.sim import compact_target, run_sim_campaign, run_sim_cli

pytestmark = pytest.mark.anyio

TRAIN_PY = Path(__file__).resolve().parents[1] / "target" / "train.py"
BUDGET_S = 30.0  # the cpu profile's


class Recorder:
    """A user's landscape: a deterministic bowl that remembers what it was asked."""

    instances: list[Recorder] = []

    def __init__(self, seed: int, space: dict[str, Any]) -> None:
        self.seed, self.space, self.calls = seed, space, []
        Recorder.instances.append(self)

    def run(self, knobs: dict[str, Any], budget_s: float) -> dict[str, Any]:
        self.calls.append(dict(knobs))
        val = 2.0 + abs(float(knobs["MATRIX_LR"]) - 0.05) + 0.1 * abs(int(knobs["DEPTH"]) - 2)
        final = val * math.log(2)
        curve = [[float(t), final + (5.5 - final) / (1.0 + t)] for t in range(int(budget_s) + 1)]
        return {"curve": curve, "val_bpb": val, "status": "ok"}


def recorder(seed: int, space: dict[str, Any]) -> Recorder:
    return Recorder(seed, space)


def test_landscapes_load_from_module_factory_strings(tmp_path: Path) -> None:
    assert load_landscape("arrl.landscapes:cpu_fitted") is landscapes.cpu_fitted
    assert load_landscape("test_sim:recorder") is recorder  # a factory in a user's (test) module
    module = tmp_path / "my_landscape.py"
    module.write_text("def flat(seed, space):\n    return 'a landscape object'\n")
    assert load_landscape(f"{module}:flat")(0, {}) == "a landscape object"
    for bad in ("arrl.landscapes", "arrl.landscapes:nope", "no_such_module_xyz:f"):
        with pytest.raises(LandscapeError):
            load_landscape(bad)


def test_builtin_landscapes_follow_the_interface_and_calibration() -> None:
    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    baseline = knobs(parse_tunables(TRAIN_PY.read_text()))
    for factory in (landscapes.cpu_fitted, landscapes.cpu_fitted_hard, landscapes.tiny):
        land = factory(3, space)
        out = land.run(baseline, BUDGET_S)
        assert out["status"] in ("ok", "crashed") and out["curve"][0] == [0.0, pytest.approx(math.log(256), abs=0.2)]
        assert all(0.0 <= t <= BUDGET_S for t, _ in out["curve"])
    vals = [landscapes.cpu_fitted(s, space).run(baseline, BUDGET_S)["val_bpb"] for s in range(8)]
    assert all(2.55 < v < 2.75 for v in vals)  # the baseline cpu run scores ~2.65
    land = landscapes.cpu_fitted(0, space)
    assert land.true_val(baseline) - land.base == pytest.approx(2.65 - land.base, abs=0.1)
    assert land.crash_probability({**baseline, "MATRIX_LR": 0.2, "MATRIX_OPTIMIZER": "adamw"}) > 0.9
    assert land.crash_probability({**baseline, "MATRIX_LR": 0.2}) < 0.5  # muon copes (as in the real runs)
    assert land.crash_probability(baseline) < 0.01
    curve = land.run(baseline, BUDGET_S)["curve"]  # ends below val_bpb * ln 2 by the small gap
    assert curve[-1][1] == pytest.approx(land.true_val(baseline) * math.log(2) - 0.063, abs=0.2)


def test_pretraining_and_held_out_families_follow_the_interface() -> None:
    from arrl import families

    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    baseline = knobs(parse_tunables(TRAIN_PY.read_text()))
    assert load_landscape("arrl.families:rotated") is families.rotated
    for factory in (families.randomized, families.rotated):
        outs = [factory(s, space).run(baseline, BUDGET_S) for s in range(6)]
        assert all(o["status"] in ("ok", "crashed") and all(0.0 <= t <= BUDGET_S for t, _ in o["curve"]) for o in outs)
        vals = [o["val_bpb"] for o in outs if o["status"] == "ok"]
        assert vals and all(2.3 < v < 3.0 for v in vals)  # calibrated near the real baseline
    # The pre-training family moves the optima: two seeds disagree on where MATRIX_LR is best.
    optima = {round(families.randomized(s, space).dims["MATRIX_LR"]["opt"], 2) for s in range(6)}
    assert len(optima) >= 4
    # `anchored` keeps a seed's landscape but puts its optima near train.py's values; `mixed` alternates.
    from arrl.landscapes import unit

    def distances(land: Any) -> list[float]:
        return [abs(d["opt"] - unit(space[n], baseline[n])) for n, d in land.dims.items()]  # dims: in [0, 1]

    near = [x for s in range(6) for x in distances(families.anchored(s, space))]
    far = [x for s in range(6) for x in distances(families.randomized(s, space))]
    assert statistics.median(near) < 0.12 < statistics.median(far) and max(near) < 0.7
    assert [d["w"] for d in families.anchored(3, space).dims.values()] == \
        [d["w"] for d in families.randomized(3, space).dims.values()]
    assert families.anchored(3, space).run(baseline, BUDGET_S)["val_bpb"] == pytest.approx(
        families.randomized(3, space).run(baseline, BUDGET_S)["val_bpb"])  # the same calibration and noise
    assert distances(families.mixed(3, space)) == distances(families.anchored(3, space))
    assert distances(families.mixed(4, space)) == distances(families.randomized(4, space))
    land = families.rotated(1, space)
    assert land.true_val(baseline) == pytest.approx(2.641, abs=1e-6)  # the gain is below the baseline
    # The written ones: the optimum (2.2 plus choice offsets under 0.05 each) is far from train.py's values.
    for factory in (families.bowl, families.chain):
        lands = [factory(s, space) for s in range(4)]
        outs = [land.run(baseline, BUDGET_S) for land in lands]
        assert all(o["status"] == "ok" and o["curve"][-1][0] == BUDGET_S for o in outs)
        assert all(o["val_bpb"] > 2.6 for o in outs)
        best = {n: families._raw(space[n], lands[0].opt[n]) for n in lands[0].numeric}
        assert 2.2 <= lands[0].true_val({**baseline, **best}) < 2.2 + 0.05 * len(lands[0].offsets)


def test_held_out_shapes_are_calibrated_and_have_their_shape() -> None:
    from arrl import families

    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    baseline = knobs(parse_tunables(TRAIN_PY.read_text()))
    assert [load_landscape(spec) for spec in families.SHAPES.split(",")] == [
        families.sparse, families.noisy, families.edges, families.crashy, families.twin]
    for factory in (families.sparse, families.noisy, families.edges, families.crashy, families.twin):
        for seed in range(3):
            land = factory(seed, space)
            assert land.true_val(baseline) == pytest.approx(2.641, abs=1e-6)
            out = land.run(baseline, BUDGET_S)
            assert out["status"] == "ok" and out["curve"][-1][0] == BUDGET_S  # train.py's values never crash
            best = {**baseline, **{n: families._raw(space[n], u) for n, u in zip(land.numeric, land.opt, strict=True)}}
            best.update({n: next(c for c in space[n]["choices"] if offs[families._key(c)] == 0.0)
                         for n, offs in land.offsets.items()})
            assert 2.2 < land.true_val(best) < land.base + 0.01  # 0.2-0.4 below the baseline (ints round)
    land = families.sparse(0, space)
    assert sum(w > 0.01 for w in land.weight) == 4
    assert sum(u in (0.0, 1.0) for u in families.edges(0, space).opt) >= 5
    crashy = families.crashy(0, space)
    name = crashy.numeric[crashy.crash_dims[0]]
    assert crashy.crash_edge[0] < 0.95
    past = families._raw(space[name], crashy.crash_edge[0] + 0.02)
    assert crashy.run({**baseline, name: past}, BUDGET_S)["status"] == "crashed"
    twin = families.twin(0, space)
    second = {**baseline, **{n: families._raw(space[n], u) for n, u in zip(twin.numeric, twin.opt2, strict=True)}}
    assert twin.penalty(second) <= twin.depth + sum(max(o.values()) for o in twin.offsets.values())
    assert families.noisy(0, space).noise == 0.04
    with pytest.raises(ValueError, match="unknown shape 'bumpy'"):
        families.ShapeLandscape(0, space, "bumpy")


def test_second_held_out_set_follows_the_interface_and_has_its_shape() -> None:
    from arrl import families

    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    baseline = knobs(parse_tunables(TRAIN_PY.read_text()))
    factories = [load_landscape(spec) for spec in families.FRESH.split(",")]
    assert factories == [families.small_scale, families.ripple, families.peaky, families.rotated_bowl,
                         families.plateau]
    with pytest.raises(ValueError, match="unknown shape"):
        families.FreshShape(0, space, "saddle")
    for factory in factories:
        land = factory(2, space)
        out = land.run(baseline, BUDGET_S)
        assert out["status"] == "ok" and out["curve"][-1][0] == BUDGET_S and len(out["curve"]) == 40
        assert out["val_bpb"] == pytest.approx(out["true_val_bpb"], abs=0.05)
        best = {**baseline, **{n: families._raw(space[n], u) for n, u in zip(land.numeric, land.opt, strict=True)}}
        best.update({n: min(space[n]["choices"], key=lambda c, o=offs: o[repr(c)]) for n, offs in land.offsets.items()})
        # The optimum (up to ints' rounding) is well below train.py's values, by whole bpb but for `small_scale`.
        assert land.true_val(best) < land.true_val(baseline) - (0.1 if land.shape == "small_scale" else 0.3)
        assert land.true_val(best) < land.base + land.scale * 0.1
    assert families.small_scale(2, space).true_val(baseline) < 2.0
    assert families.ripple(2, space).true_val(baseline) > 2.4
    peaky = families.peaky(2, space)
    assert 1 <= sum(w == 20.0 for w in peaky.weight) < len(peaky.weight) / 2
    plateau = families.plateau(2, space)
    far = {**baseline, **{n: families._raw(space[n], 1.0 if u < 0.5 else 0.0)
                          for n, u in zip(plateau.numeric, plateau.opt, strict=True)}}
    assert plateau.true_val(far) - plateau.base == pytest.approx(
        1.2 + sum(plateau.offsets[n][repr(far[n])] for n in plateau.offsets))  # on the plateau
    # Ripples: along some tunable, more than one local minimum, which a bowl never has.
    ripple = families.ripple(2, space)

    def minima(name: str) -> int:
        line = [ripple.true_val({**baseline, name: families._raw(space[name], u)}) for u in np.linspace(0, 1, 401)]
        return sum(a > b < c for a, b, c in zip(line, line[1:], line[2:], strict=False))

    assert max(minima(name) for name in ripple.numeric) >= 2


def test_wide_training_family_holds_plateaus_and_dips() -> None:
    from arrl import families
    from arrl.landscapes import ParametricLandscape

    space = search_space(parse_tunables(TRAIN_PY.read_text()))
    baseline = knobs(parse_tunables(TRAIN_PY.read_text()))
    assert load_landscape("arrl.families:wide") is families.wide
    assert isinstance(families.wide(0, space), ParametricLandscape)  # `mixed` for seeds 0 and 1 modulo 4
    assert isinstance(families.wide(5, space), ParametricLandscape)
    capped, dips = families.wide(2, space), families.wide(7, space)
    assert (capped.kind, dips.kind) == ("capped", "dips")
    for land in (capped, dips):
        out = land.run(baseline, BUDGET_S)
        assert out["status"] == "ok" and out["curve"][-1][0] == pytest.approx(BUDGET_S)
        assert out["val_bpb"] == pytest.approx(out["true_val_bpb"], abs=0.15)
        assert out["curve"][-1][1] == pytest.approx(out["val_bpb"] * math.log(2), abs=0.3)
        best = {**baseline, **{n: families._raw(space[n], u) for n, u in zip(land.numeric, land.opt, strict=True)}}
        best.update({n: min(space[n]["choices"], key=lambda c, o=offs: o[families._key(c)]) for n, offs in land.offsets.items()})
        assert land.true_val(best) < land.true_val(baseline) - 0.05
    # `capped`: far from the optimum every configuration is on one plateau, whatever its distance.
    offsets = sum(capped.offsets[n][families._key(baseline[n])] for n in capped.offsets)
    far = [{**baseline, **{n: families._raw(space[n], (u + shift) % 1.0)
                           for n, u in zip(capped.numeric, capped.opt, strict=True)}} for shift in (0.45, 0.5)]
    assert [capped.true_val(k) for k in far] == pytest.approx([capped.base + capped.scale * capped.cap + offsets] * 2)
    # `dips`: a dip's tunable gains only within a few widths of its optimum; far from it the line is flat.
    i = int(np.flatnonzero(dips.dip)[0])
    name, u = dips.numeric[i], float(dips.opt[i])
    line = [dips.true_val({**baseline, name: families._raw(space[name], x)}) for x in (u, (u + 0.5) % 1.0, (u + 0.45) % 1.0)]
    assert line[0] < line[1] - 0.5 * dips.scale * dips.depth[i]
    assert line[1] == pytest.approx(line[2], abs=0.01 * dips.scale)


def test_fit_landscape_recovers_the_noise_and_reference() -> None:
    records = [{"description": "baseline", "val_bpb": 2.60 + d, "status": "ok"} for d in (-0.01, 0.0, 0.01)]
    records += [{"description": f"MATRIX_LR 0.02 -> {lr}", "val_bpb": 2.60 + 4 * abs(lr - 0.04), "status": "ok"}
                for lr in (0.005, 0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.002, 0.06)]
    params = landscapes.fit_landscape(records)
    assert params["ref_bpb"] == pytest.approx(2.60)
    assert params["noise"][0] < 0.01 < params["noise"][1]
    assert params["dims"]["MATRIX_LR"]["w"] > 0


def test_compact_target_keeps_the_tunables_and_passes_the_applier_checks() -> None:
    source = TRAIN_PY.read_text()
    compact = compact_target(source)
    check_candidate(compact)
    assert search_space(parse_tunables(compact)) == search_space(parse_tunables(source))
    assert knobs(parse_tunables(compact)) == knobs(parse_tunables(source))
    assert len(compact) < len(source) / 3


async def test_random_sim_campaign_records_exactly_one_record_per_proposal(redis_server) -> None:
    records = await run_sim_campaign(redis_server.url, "arrl.landscapes:cpu_fitted", "random", 0, 30,
                                     campaign_id="simrandom")
    assert [r["experiment_id"] for r in records] == [f"e{i:05d}" for i in range(1, 31)]
    assert records[0]["role"] == "baseline" and records[0]["status"] == "ok" and records[0]["kept"]
    assert {r["status"] for r in records} <= {"ok", "aborted", "crashed", "diverged", "duplicate"}
    ran = [r for r in records if r["status"] != "duplicate"]
    assert all(r["training_seconds"] == BUDGET_S for r in ran if r["status"] == "ok")
    assert all(r["started_at"] >= records[0]["started_at"] for r in ran)  # virtual timestamps
    bus = Bus.from_url(redis_server.url, "simrandom")
    try:
        # The rewarder writes each finished run's smoothed final loss (the self-evaluator's gap
        # spread is measured from it); a cut-short run has none.
        ok = next(r for r in ran if r["role"] == "edit" and r["status"] == "ok")
        steps = [[e["training_seconds"], e["loss"]] for _, e in await bus.read_events(ok["experiment_id"], "0")
                 if e["event"] == "train.step"]
        assert ok["final_loss"] == pytest.approx(smoothed_final(steps, BUDGET_S))
        assert all(r.get("final_loss") is None for r in ran if r["status"] != "ok")
        counters = await (await Campaign.load(bus)).counters()
        assert counters["proposed"] == counters["recorded"] == 30
        assert await bus.redis.xlen(bus.stream_key("started")) == len(ran)  # as the real executor
        kept = [r for r in records if r["kept"]]
        incumbent = await bus.get_incumbent()
        assert incumbent is not None and incumbent["experiment_id"] == kept[-1]["experiment_id"]
    finally:
        await bus.aclose()


@pytest.mark.parametrize("depth", [0, 1])
async def test_queue_depth_zero_proposes_only_after_every_earlier_outcome(redis_server, depth: int) -> None:
    records = await run_sim_campaign(redis_server.url, "arrl.landscapes:cpu_fitted", "greedy", 2, 12,
                                     selfeval=False, queue_depth=depth, campaign_id=f"simdepth{depth}")
    assert len(records) == 12
    # Proposals and records carry real timestamps: was each proposal made after the last record?
    saw_all = [b["created_at"] >= a["recorded_at"] for a, b in zip(records, records[1:], strict=False)]
    if depth == 0:
        assert all(saw_all)  # sequential: autoresearch's loop
    else:
        assert not all(saw_all)  # one proposal waits behind the running job, made before its outcome


async def test_a_users_factory_sees_the_space_and_each_candidates_knobs(redis_server) -> None:
    Recorder.instances.clear()
    records = await run_sim_campaign(redis_server.url, "test_sim:recorder", "greedy", 1, 12, selfeval=False,
                                     landscape_seed=77)
    [land] = Recorder.instances
    assert land.seed == 77 and land.space == search_space(parse_tunables(TRAIN_PY.read_text()))
    ran = [r for r in records if r["status"] == "ok"]
    assert len(land.calls) == len(ran)
    for record, asked in zip(ran, land.calls, strict=True):
        assert record["val_bpb"] == pytest.approx(2.0 + abs(asked["MATRIX_LR"] - 0.05) + 0.1 * abs(asked["DEPTH"] - 2))
    edits = [r for r in records if r["role"] == "edit" and r["status"] != "duplicate"]
    assert all(len(r["program"]) == 1 for r in edits)  # greedy: one atomic edit each


async def test_selfeval_aborts_hopeless_runs_which_then_cost_less(redis_server) -> None:
    # The random strategy proposes the same programs whatever the self-evaluator does (aborted runs
    # are never kept, nor would they have been), so the two campaigns differ only in the aborts.
    args = (redis_server.url, "arrl.landscapes:cpu_fitted", "random", 5, 40)
    on = await run_sim_campaign(*args, selfeval=True)
    off = await run_sim_campaign(*args, selfeval=False)
    assert [r["program"] for r in on] == [r["program"] for r in off]
    aborted = [(a, b) for a, b in zip(on, off, strict=True) if a["status"] == "aborted"]
    assert len(aborted) >= 3
    for a, b in aborted:
        assert a["training_seconds"] < 0.9 * BUDGET_S  # it stopped early...
        assert a["selfeval"]["decision"] == "abort" and a["forecast_val_bpb"] is not None
        assert not b["kept"]  # ...and the full run would not have been kept: it crashed later or lost
        assert b["status"] == "crashed" or b["val_bpb"] > b["incumbent_bpb"]
        assert a["training_seconds"] < b["training_seconds"]  # what the abort saved
    cost_on = sum(r["training_seconds"] or 0.0 for r in on)
    cost_off = sum(r["training_seconds"] or 0.0 for r in off)
    assert cost_on < cost_off - 0.1 * BUDGET_S * len(aborted)
    assert [r["experiment_id"] for r in on if r["kept"]] == [r["experiment_id"] for r in off if r["kept"]]


def false_aborts(records: list[dict[str, Any]]) -> int:
    """Aborted runs whose noise-free outcome beat every run finished before them."""
    best, count = math.inf, 0
    for r in records:
        count += r["status"] == "aborted" and r["true_val_bpb"] < best
        best = min(best, r["val_bpb"]) if r["status"] == "ok" else best
    return count


async def test_the_self_evaluators_audits_catch_late_bloomers_it_would_abort(redis_server) -> None:
    # On `late_bloomer` the best runs' loss falls slowly at first, and a forecast from the
    # incumbent's curve takes them for hopeless. The rule audits its first would-be aborts (the
    # rewarder keeps what it would have aborted on in the record); one that ends below its tau is a
    # false abort caught, and every later forecast widens, so the rest are not aborted either.
    args = (redis_server.url, "arrl.heldout_fourth:late_bloomer", "random", 1, 20)
    bare = await run_sim_campaign(*args, selfeval=True, selfeval_options={"audit_first": 0, "audit_every": 0})
    audited = await run_sim_campaign(*args, selfeval=True)
    assert false_aborts(bare) >= 2
    assert false_aborts(audited) == 0 and not any(r["status"] == "aborted" for r in audited)
    caught = [r for r in audited if r.get("audit") and r["val_bpb"] < r["audit"]["tau"]]
    assert caught and audit_tally(audited).miss > 0.5
    assert caught[0]["audit"]["forecast_val_bpb"] > caught[0]["val_bpb"] + 0.5  # the forecast it corrects
    assert min(r["val_bpb"] for r in audited if r["status"] == "ok") < min(r["val_bpb"] for r in bare if r["status"] == "ok")


async def test_run_sim_cli_lays_out_a_run_directory(redis_server, tmp_path: Path, capsys) -> None:
    args = argparse.Namespace(
        landscape="arrl.landscapes:tiny", run_dir=str(tmp_path / "run"), redis_url=redis_server.url,
        strategy="random", seed=2, max_experiments=8, selfeval=True, target=TRAIN_PY, selfeval_option=None,
        profile="cpu", budget_s=0.0, baseline_repeats=1, noise_sigma=0.01, keep_margin=0.0, queue_depth=1,
        remeasure_every=4)
    import anyio

    assert await anyio.to_thread.run_sync(run_sim_cli, args) == 0
    run = tmp_path / "run"
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 8 and any(r["role"] == "remeasure" for r in ledger)
    assert len((run / "results.tsv").read_text().splitlines()) == 9
    assert (run / "best_train.py").read_text().startswith('"""Baseline training script')  # the full script
    out = capsys.readouterr().out
    assert "8 simulated experiments" in out and "[" not in out  # one class: no class beside the kept runs
    # A fleet of two classes: each kept run's score holds on its class, which is printed beside it.
    fleet = argparse.Namespace(**{**vars(args), "landscape": "arrl.shared_machine:mixed_fleet",
                                  "run_dir": str(tmp_path / "fleet"), "max_experiments": 20})
    assert await anyio.to_thread.run_sync(run_sim_cli, fleet) == 0
    kept = [line for line in capsys.readouterr().out.splitlines() if line.startswith("e0")]
    assert kept and all(("  [sim:fast]  " in line) != ("  [sim:slow]  " in line) for line in kept)


BROKEN_LANDSCAPES = """
from arrl.landscapes import tiny


class Broken:
    def __init__(self, seed, space, answer):
        self.inner, self.calls, self.answer = tiny(seed, space), 0, answer

    def run(self, knobs, budget_s):
        self.calls += 1
        if self.calls == 5:  # the baseline and three edits run first
            return self.answer()
        return self.inner.run(knobs, budget_s)


def raising(seed, space):
    def boom():
        raise ValueError("a bug in the user's landscape")
    return Broken(seed, space, boom)


def malformed(seed, space):
    return Broken(seed, space, lambda: {"curve": [], "status": "finished"})
"""


@pytest.mark.parametrize("factory, says", [
    ("raising", "e00005: landscape.run raised ValueError: a bug in the user's landscape (knobs {"),
    ("malformed", "e00005: landscape status must be 'ok' or 'crashed', got 'finished'"),
])
async def test_a_landscape_that_fails_mid_campaign_stops_it_with_a_clear_error_and_keeps_the_runs_before(
        redis_server, tmp_path: Path, capsys, factory: str, says: str) -> None:
    module = tmp_path / "broken_landscapes.py"
    module.write_text(BROKEN_LANDSCAPES)
    run = tmp_path / "run"
    args = argparse.Namespace(
        landscape=f"{module}:{factory}", run_dir=str(run), redis_url=redis_server.url,
        strategy="random", seed=2, max_experiments=8, selfeval=True, target=TRAIN_PY, selfeval_option=None,
        profile="cpu", budget_s=0.0, baseline_repeats=1, noise_sigma=0.01, keep_margin=0.0, queue_depth=1,
        remeasure_every=0)
    import anyio

    assert await anyio.to_thread.run_sync(run_sim_cli, args) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"arrl run: {says}") and "Traceback" not in "\n".join(out)
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [r["experiment_id"] for r in ledger] == ["e00001", "e00002", "e00003", "e00004"]
    assert out[1] == f"arrl run: the campaign stopped; the 4 experiments recorded before it are in {run}"


def test_offline_benchmark_runs_campaigns_and_pairs_two_runs_seed_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                          load_script, monkeypatch: pytest.MonkeyPatch) -> None:
    import arrl.operators

    bench = load_script("bench_offline")
    common = ["--landscapes", "arrl.families:bowl", "--seeds", "2", "--experiments", "12", "--horizons", "6,12"]
    assert bench.main([*common, "--json", str(tmp_path / "a.json")]) == 0
    assert bench.main([*common, "--action", "3,0,0", "--json", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())["arrl.families:bowl"]
    b = json.loads((tmp_path / "b.json").read_text())["arrl.families:bowl"]
    assert set(a) == set(b) == {"0", "1"}
    for runs in (a, b):
        for best in runs.values():
            assert set(best) == {"6", "12", "wins"} and 2.2 < best["12"] <= best["6"] < 5.0  # best-so-far never rises
            assert 0.0 <= best["wins"] <= 1.0  # the share of the opening design's probes that won
    assert a != b  # the fixed action (random programs) searched differently
    capsys.readouterr()
    bench.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["bowl", "@6"], ["bowl", "@12"]]
    diff = statistics.mean(b[s]["12"] - a[s]["12"] for s in a)
    assert f"paired {diff:+.4f}" in lines[1]
    # The pooled verdict per horizon (one landscape here: its own change, better or worse).
    assert lines[3].startswith(f"over 1 landscapes @12: mean {diff:+.4f}, better {int(diff < 0)} / worse {int(diff > 0)};")
    # The claim's tally: each run's median at the early horizon against the target's at the late one.
    goal = statistics.median(r["12"] for r in a.values())
    assert bench.reach(tmp_path / "a.json", [tmp_path / "a.json", tmp_path / "b.json"], "6", "12") == {
        name: int(statistics.median(r["6"] for r in run.values()) <= goal) for name, run in (("a", a), ("b", b))}
    printed = capsys.readouterr().out.splitlines()
    line = printed[0]
    assert line.split()[:3] == ["bowl", "target@12", f"{goal:.4f}"]
    # ... with the paired difference, seed by seed: run at 6 minus target at 12 (a against itself: 6 >= 12).
    paired = [statistics.mean(run[s]["6"] - a[s]["12"] for s in a) for run in (a, b)]
    assert [f"paired {d:+.4f} ±" in line for d in paired] == [True, True]
    tally = printed[-1].removeprefix("paired, at or below the target / above it by over two standard errors: ")
    assert tally.startswith("a 0 / ") and f", b {int(paired[1] <= 0)} / " in tally  # a's best at 6 is above its own at 12
    for bad in (["--reach", str(tmp_path / "a.json")], ["--reach", str(tmp_path / "a.json")] * 2 + ["--reach-at", "6"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
    # --trace prints every run of every campaign: who proposed it, its outcome, and its edits.
    assert bench.main([*common, "--trace"]) == 0
    out = capsys.readouterr().out.splitlines()
    starts = [i for i, line in enumerate(out) if line.endswith(":")]
    assert [out[i] for i in starts] == ["arrl.families:bowl seed 0:", "arrl.families:bowl seed 1:"]
    runs = out[starts[0] + 1:starts[1]]
    assert len(runs) == 2 + 12 and [line.split()[0] for line in runs] == [str(i) for i in range(14)]
    assert all("baseline" in line for line in runs[:2]) and "design" in runs[2]
    assert any(any(f" {op} x" in line for op in arrl.operators.OPERATORS) for line in runs[8:])
    kept_best = [float(line.split()[2]) for line in runs if line.split()[3] == "K"]
    assert kept_best == sorted(kept_best, reverse=True) and kept_best[-1] == pytest.approx(a["0"]["12"], abs=1e-4)
    crash = {"status": "crashed", "val_bpb": None, "kept": False, "program": [{"op": "set", "name": "LR", "value": 0.2}],
             "extra": {"action": [1, 0, 2], "radius": 0.35}}
    assert bench.trace_lines([crash])[0].split() == ["0", "crashed", "-", "mutate", "x1", "r0.35", "LR=0.2"]
    # A constant of the search changed from the command line changes the search; a bad one is refused.
    monkeypatch.setattr(arrl.operators, "DESIGN_STEP", arrl.operators.DESIGN_STEP)  # restored after the test
    assert bench.main([*common, "--set", "arrl.operators.DESIGN_STEP=0.15", "--json", str(tmp_path / "c.json")]) == 0
    assert arrl.operators.DESIGN_STEP == 0.15
    assert json.loads((tmp_path / "c.json").read_text())["arrl.families:bowl"] != a
    for bad, says in [("arrl.operators.NO_SUCH=1", "has no NO_SUCH"), ("arrl.operators.DESIGN_STEP=big", "not a Python literal"),
                      ("DESIGN_STEP", "expected MODULE.NAME=VALUE")]:
        with pytest.raises(SystemExit, match=says):
            bench.main([*common, "--set", bad])
    assert bench.expand("fifth,arrl.heldout_fifth:drift,first")[4:6] == ["arrl.heldout_fifth:drift", "arrl.landscapes:cpu_fitted"]
    assert len(bench.expand("all")) == 32
    # --workers plays the campaigns in other processes, the --set constant applied there too: the
    # same results as c.json, made here in one process.
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_offline.py"
    done = subprocess.run([sys.executable, str(script), *common, "--set", "arrl.operators.DESIGN_STEP=0.15",
                           "--workers", "2", "--json", str(tmp_path / "w.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "w.json").read_text()) == json.loads((tmp_path / "c.json").read_text())
    assert done.stdout.split()[0] == "bowl"
    with pytest.raises(SystemExit):
        bench.main([*common, "--workers", "2", "--trace"])


def test_the_radius_rules_fit_runs_each_seed_stepping_up_and_not_and_tabulates_the_paired_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], load_script) -> None:
    fit = load_script("fit_radius_rule")
    out = tmp_path / "pairs.json"
    assert fit.main(["--landscape", "arrl.families:bowl", "--campaigns", "3", "--experiments", "14",
                     "--horizons", "7,14", "--fit-horizon", "14", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())
    assert [r["seed"] for r in runs] == [0, 1, 2]
    for r in runs:  # both runs of a seed share the design, so its winning share
        assert r["up"]["wins"] == r["down"]["wins"] == r["wins"] and 0.0 <= r["wins"] <= 1.0
    assert any(r["up"]["14"] != r["down"]["14"] for r in runs)  # the step up changed the search
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert rows["never"][1:] == ["0", "+0.0000", "±", "0.0000", "+0.0000", "±", "0.0000"]
    lowest = min(r["wins"] for r in runs)  # every campaign steps up from the lowest share on
    assert rows[f"{lowest:.3f}"][1] == "3"
    assert f"{statistics.mean(r['up']['14'] - r['down']['14'] for r in runs):+.4f}" == rows[f"{lowest:.3f}"][5]
    assert lines[-1].startswith("lowest mean at @14: step up when w >= ")
    capsys.readouterr()
    assert fit.main(["--from", str(out), "--fit-horizon", "14"]) == 0  # the table again, from the file
    assert capsys.readouterr().out.strip().splitlines() == lines
