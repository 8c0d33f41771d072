"""scripts/bench_search.py's tables from saved results: medians per strategy and paired differences."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _result(strategy: str, seed: int, curve: list[float]) -> dict:
    return {"landscape": "mod:land", "strategy": strategy, "seed": seed, "wall_s": 1.0,
            "statuses": {"ok": len(curve)}, "observed": curve, "true": curve, "virtual_s": 1.0}


def _curve(start: float, rate: float, n: int = 10) -> list[float]:
    return [start - rate * k for k in range(n)]


def test_paired_differences_use_shared_seeds_and_the_half_horizon(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   load_script) -> None:
    bench = load_script("bench_search")
    # Each seed has its own level (as the sealed landscapes do); ppo gains 0.02 per experiment, tpe 0.01,
    # random 0.005. Random also ran seeds 3-5, which ppo did not: they must not enter the pairs.
    levels = {0: 3.0, 1: 2.0, 2: 2.5, 3: 1.0, 4: 1.1, 5: 1.2}
    results = [_result("ppo-pretrained", s, _curve(levels[s], 0.02)) for s in (0, 1, 2)]
    results += [_result("tpe", s, _curve(levels[s], 0.01)) for s in (0, 1, 2)]
    results += [_result("random", s, _curve(levels[s], 0.005 * (1 + s % 2))) for s in range(6)]
    text = bench.paired(results, ["random", "tpe", "ppo-pretrained"], [5, 10], "observed")
    rows = {line.split()[1]: line for line in text.splitlines()[1:]}
    assert set(rows) == {"random", "tpe"}
    # ppo minus tpe @5: -0.01 * 4 on every seed (curves start equal), so the error is 0 and ppo is lower on 3 of 3.
    assert "@5 -0.0400 ± 0.0000 (3/3)" in rows["tpe"]
    assert "@10 -0.0900 ± 0.0000 (3/3)" in rows["tpe"]
    # The claim's comparison: ppo at 5 (half of 10) against tpe at 10: -0.08 against -0.09, so +0.01.
    assert "@5 vs tpe@10 +0.0100 ± 0.0000 (0/3)" in rows["tpe"]
    diffs = [-0.02 * 4 + 0.005 * (1 + s % 2) * 4 for s in (0, 1, 2)]  # seeds 0-2 only
    se = statistics.stdev(diffs) / math.sqrt(3)
    assert f"@5 {statistics.mean(diffs):+.4f} ± {se:.4f} (3/3)" in rows["random"]
    assert bench.paired([r for r in results if r["strategy"] != "ppo-pretrained"], ["random", "tpe"], [5, 10],
                        "observed") == ""  # no learned strategy: nothing to pair
    # Through --tables-from: the medians table, with the seed counts that differ by strategy, then the pairs.
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(results))
    assert bench.main(["--tables-from", str(saved), "--horizons", "5,10"]) == 0
    out = capsys.readouterr().out
    assert "mod:land: median over 3-6 (by strategy) seeds" in out
    assert "paired, ppo-pretrained minus each" in out and "@5 vs tpe@10 +0.0100" in out


def test_compare_pairs_two_runs_by_experiments_and_at_equal_simulated_time(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str],
                                                                          load_script) -> None:
    """`--compare A B`: B's campaigns are the same curves run twice as fast (each experiment 5 s
    instead of 10 s), as a variant that stops runs early would be. Per experiment they are level;
    at equal time B has run twice as many experiments, so it is lower; and its time is -50%."""
    bench = load_script("bench_search")

    def run(seed: int, step_s: float, strategy: str = "ppo-pretrained") -> dict:
        curve = _curve(3.0 + seed, 0.01 * (1 + seed))
        return {**_result(strategy, seed, curve), "clock": [step_s * (k + 1) for k in range(len(curve))]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([run(s, 10.0) for s in range(3)] + [run(0, 10.0, "tpe")]))
    b.write_text(json.dumps([run(s, 5.0) for s in range(4)]))  # seed 3 and tpe are in one file only
    assert bench.main(["--compare", str(a), str(b), "--horizons", "5,10"]) == 0
    out = capsys.readouterr().out
    assert "paired, b.json minus a.json" in out
    row = next(line for line in out.splitlines() if "mod:land ppo-pretrained (3 seeds)" in line)
    assert "tpe" not in out.split("metric observed:")[1]
    assert "@5 +0.0000 ± 0.0000 (0/3)" in row and "@10 +0.0000 ± 0.0000 (0/3)" in row
    # The shorter campaign's time is B's 50 s. By 12.5 / 25 / 50 s, A has run 1 / 2 / 5 experiments and
    # B 2 / 5 / 10: B is lower by 1 / 3 / 5 of seed s's steps of 0.01 * (1 + s).
    for label, steps in (("1/4", 1), ("1/2", 3), ("all", 5)):
        gains = [-0.01 * (1 + s) * steps for s in range(3)]
        se = statistics.stdev(gains) / math.sqrt(3)
        assert f"time {label} {statistics.mean(gains):+.4f} ± {se:.4f} (3/3)" in row
    assert "time % -50.0 ± 0.0 (3/3)" in row
    (tmp_path / "c.json").write_text(json.dumps([run(0, 10.0, "random")]))
    assert bench.main(["--compare", str(a), str(tmp_path / "c.json")]) == 0
    assert "no campaign (landscape, strategy, seed) is in both" in capsys.readouterr().out


def test_a_bad_selfeval_option_fails_before_any_campaign(capsys: pytest.CaptureFixture[str], load_script) -> None:
    import structlog

    bench = load_script("bench_search")
    before = structlog.get_config()
    for bad, says in (("bogus=1", "unknown self-evaluator option(s): bogus"), ("audit_every=-1", "audit_every must be")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--landscapes", "arrl.landscapes:cpu_fitted", "--strategies", "random", "--seeds", "1",
                        "--selfeval-option", bad])
        assert stop.value.code == 2 and says in capsys.readouterr().err
    # Nothing global changed: a later test's captured warnings must still reach it.
    assert structlog.get_config() == before


def test_incumbent_reruns_are_run_side_by_side_and_paired(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          load_script) -> None:
    """`--remeasure-every 0,3`: every campaign once without re-runs and once with, labelled and paired;
    `--metric true` follows the incumbent, a run kept for beating a re-run included."""
    saved = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--landscapes",
                           "arrl.heldout_fifth:drift", "--strategies", "ppo-pretrained", "--seeds", "2", "--experiments",
                           "12", "--horizons", "6,12", "--jobs", "1", "--remeasure-every", "0,3", "--metric", "true",
                           "--json", str(saved)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(saved.read_text())
    assert sorted((r["strategy"], r["seed"]) for r in results) == [
        ("ppo-pretrained", 0), ("ppo-pretrained", 1), ("ppo-pretrained/rm3", 0), ("ppo-pretrained/rm3", 1)]
    assert all(len(r["true"]) == 12 for r in results)
    assert "vs ppo-pretrained/rm3" in done.stdout
    bench = load_script("bench_search")
    for bad in ("x", "0,1"):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--strategies", "random", "--remeasure-every", bad])
        assert stop.value.code == 2 and "--remeasure-every" in capsys.readouterr().err
    for bad in ("fast", "-0.2"):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--strategies", "random", "--remeasure-on-speed", bad])
        assert stop.value.code == 2 and "--remeasure-on-speed" in capsys.readouterr().err


def test_the_true_metric_follows_the_incumbent(load_script) -> None:
    bench = load_script("bench_search")

    def run(val: float, true: float, kept: bool, role: str = "edit") -> dict:
        return {"status": "ok", "val_bpb": val, "true_val_bpb": true, "kept": kept, "role": role}

    # The edit kept at 1.8 is re-run at 1.9; 1.85 beats the re-run and is kept: the incumbent is its script.
    records = [run(2.0, 2.0, True, "baseline"), run(1.8, 1.88, True), run(1.9, 1.88, False, "remeasure"),
               run(1.85, 1.84, True), run(1.95, 1.9, False)]
    assert bench.best_curve(records, "true") == [2.0, 1.88, 1.88, 1.84, 1.84]
    assert bench.best_curve(records, "observed") == [2.0, 1.8, 1.8, 1.8, 1.8]


def test_a_campaign_repeats_exactly_so_two_versions_of_the_code_compare_seed_by_seed(tmp_path: Path) -> None:
    """The self-evaluator audits the runs a hash of the campaign and experiment ids picks; each
    benchmark campaign's id is fixed by its landscape, strategy and seed, so a second run of the
    benchmark (on another version of the code, say) meets the same audits, and where the code did
    not change, repeats each campaign run for run."""
    outputs = []
    for run in ("a", "b"):
        saved = tmp_path / f"{run}.json"
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--landscapes",
                               "arrl.shared_machine:mixed_fleet", "--strategies", "ppo-pretrained", "--seeds", "2",
                               "--experiments", "40", "--horizons", "20,40", "--jobs", "1", "--metric", "true",
                               # every other would-be abort audited: campaigns whose audits differ diverge
                               "--selfeval-option", "audit_first=0", "--selfeval-option", "audit_every=2",
                               "--json", str(saved)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append({r["seed"]: (r["observed"], r["true"], r["statuses"], r["keep_rule"], r["clock"])
                        for r in json.loads(saved.read_text())})
    assert outputs[0] == outputs[1]
    for *_, clock in outputs[0].values():  # simulated seconds by the end of each experiment
        assert len(clock) == 40 and all(0 < b - a <= 60 for a, b in itertools.pairwise([0.0, *clock]))
    # What the keep rule did: every edit that ran to the end was compared or left uncompared.
    for *_, rule, _ in outputs[0].values():
        assert rule["compared"] + rule["unscored_class"] + rule["speed_mismatch"] == rule["edits_ok"]
        assert rule["kept"] <= rule["compared"] and rule["unscored_class"] > 0  # two classes, one scored at a time
    assert any(statuses.get("aborted") for _, _, statuses, _, _ in outputs[0].values())  # the self-evaluator had a say
