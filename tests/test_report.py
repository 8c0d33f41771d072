"""`arrl report`: the numbers in report.md against the ledger, the plots, a live campaign.

Run directories come from real campaigns: simulated ones (`arrl run --executor sim`, the real
proposer, applier, reward computer and PPO learner against a private redis-server, seconds) and
one real smoke campaign (`arrl run --profile smoke`, real rq worker and training runs), which is
also read while it is still running.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from envfixtures import SmokeCampaign

from arrl.cli import main
from arrl.export import apply_series, export_best
from arrl.report import load_run, proposers, read_jsonl, summarize, timelines, tunable_table, write_report

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    """Whole lines only: a last line without its newline is still being written."""
    lines = (run_dir / "ledger.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def sim_campaign(run_dir: Path, *extra: str) -> Path:
    """A simulated campaign through the `arrl run` command line (it starts its own redis-server)."""
    assert main(["run", "--executor", "sim", "--landscape", "arrl.landscapes:cpu_fitted", "--run-dir",
                 str(run_dir), *extra]) == 0
    return run_dir


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sim_campaign(tmp_path_factory.mktemp("report") / "ppo", "--max-experiments", "60")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another strategy (no PPO updates) and no self-evaluator (no aborts)."""
    return sim_campaign(tmp_path_factory.mktemp("report") / "random", "--max-experiments", "16",
                        "--strategy", "random", "--no-selfeval", "--seed", "3")


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose first header cell is `first_header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def check_numbers(run_dir: Path, report_dir: Path) -> None:
    """Recompute the report's tables from the ledger, independently of arrl.report."""
    records = ledger(run_dir)
    text = (report_dir / "report.md").read_text()
    kept = [r for r in records if r["kept"] and r["status"] == "ok"]
    best = max(kept, key=lambda r: r["lead_version"])  # the run that took the lead last: best_train.py
    baseline = next(r for r in records if r["role"] == "baseline")
    summary = dict(tuple(row) for row in table_rows(text, ""))  # the key | value table
    assert summary["experiments recorded"].split()[0] == str(len(records))
    assert summary["best val_bpb"].startswith(f"{best['val_bpb']:.4f} ({best['experiment_id']}: ")
    assert summary["baseline val_bpb"] == f"{baseline['val_bpb']:.4f}"
    assert summary["kept edits"] == str(sum(1 for r in kept if r["role"] != "baseline"))
    reruns = [r for r in records if r["role"] == "remeasure"]
    assert summary.get("re-runs of the incumbent", "0").split(";")[0] == str(len(reruns))
    executor_s = sum(r.get("wall_seconds") or 0 for r in records)
    assert summary["executor time"] in (f"{executor_s:.0f} s", f"{executor_s / 60:.1f} min", f"{executor_s / 3600:.2f} h")
    statuses = {status: int(n) for status, n in table_rows(text, "status")}
    assert statuses == dict(Counter(r["status"] for r in records))
    # One row per kept edit, with the incumbent it beat and its own val_bpb.
    # (The per-tunable table has a "kept" column too, so look for the table by the fact, not the word.)
    if any(r["role"] != "baseline" for r in kept):
        edits = table_rows(text, "kept")
    else:
        assert "No edit has been kept yet." in text
        edits = []
    assert [row[2] for row in edits] == [r["experiment_id"] for r in kept if r["role"] != "baseline"]
    for n, (row, r) in enumerate(zip(edits, [r for r in kept if r["role"] != "baseline"], strict=True), start=1):
        assert row[0] == str(n) and row[1] == str(records.index(r) + 1)  # the plot's number and x
        assert row[4] == f"{r['incumbent_bpb']:.4f}" and row[5] == f"{r['val_bpb']:.4f}"
    # The per-tunable table: every touched tunable once, counts from the programs.
    tried: Counter[str] = Counter()
    kept_by: Counter[str] = Counter()
    for r in records:
        if r["role"] in ("baseline", "remeasure"):
            continue
        for edit in r.get("program") or []:
            tried[edit["name"]] += 1
            kept_by[edit["name"]] += bool(r["kept"])
    rows = {row[0]: row for row in table_rows(text, "tunable")}
    assert set(rows) == set(tried)
    for name, row in rows.items():
        assert (int(row[1]), int(row[3])) == (tried[name], kept_by[name]), name
    # The ppo strategy's edits by what proposed them: each rule's, or the policy's operator x edits r radius.
    made_by: Counter[str] = Counter()
    for r in records:
        extra = r.get("extra") or {}
        if r["role"] in ("baseline", "remeasure"):
            continue
        rule = {"design": "opening design", "split": "design split", "extend": "pattern move"}
        name = next((v for k, v in rule.items() if extra.get(k)), None)
        if name is None and extra.get("action"):
            op, edits, _ = extra["action"]
            name = f"{('model', 'mutate', 'recombine', 'random')[op]} x{edits + 1} r{extra['radius']:g}"
        if name:
            made_by[name] += 1
    if made_by:
        rows = table_rows(text, "proposer")
        assert {row[0]: int(row[1]) for row in rows} == dict(made_by)
        assert [int(row[1]) for row in rows] == sorted(made_by.values(), reverse=True)
        assert "opening design" in made_by  # a ppo campaign opens with the design
    else:
        assert "| proposer |" not in text
    # summary.json carries the same numbers for scripts.
    saved = json.loads((report_dir / "summary.json").read_text())
    assert saved["best_val_bpb"] == best["val_bpb"] and saved["recorded"] == len(records)
    for name in ("best_val_bpb.png", "experiments_vs_time.png", "ppo_updates.png"):
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"]({name})" in text  # linked beside report.md, so the folder is self-contained


def test_report_numbers_match_the_ledger(ppo_run: Path) -> None:
    started = time.perf_counter()
    assert main(["report", str(ppo_run)]) == 0
    assert time.perf_counter() - started < 30
    check_numbers(ppo_run, ppo_run / "report")


def test_report_of_another_strategy_without_aborts(random_run: Path, tmp_path: Path) -> None:
    write_report(random_run, tmp_path / "out")
    check_numbers(random_run, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "No PPO update is recorded" in text and "No run was aborted early" in text


def test_what_proposed_the_edits_counts_the_hyper_policys_actions_and_rules_only() -> None:
    def edit(extra: dict[str, Any] | None, kept: bool = False, reward: float = 0.0) -> dict[str, Any]:
        return {"role": "edit", "status": "ok", "kept": kept, "reward": reward, "extra": extra}

    records = [
        {"role": "baseline", "status": "ok", "kept": True, "reward": 0.0, "extra": {"design": True}},  # not an edit
        edit({"design": True, "knobs": {}}), edit({"design": True}),
        edit({"action": [0, 2, 1], "radius": 0.15}, kept=True, reward=3.0),
        edit({"action": [0, 2, 1], "radius": 0.35}, reward=1.0),  # the same choice in a campaign that stepped up
        edit({"action": [0, 2, 1], "radius": 0.15}, reward=1.0),
        edit({"extend": True}, kept=True, reward=5.0),
        edit({"action": [1, 0, 2], "space": "edit policy"}),  # the edit policy's: no radius, not counted
        edit(None), edit({"knobs": {}}),  # other strategies
    ]
    # Most used first; ties in the order first seen.
    assert proposers(records) == [["opening design", 2, 0, 0.0], ["model x3 r0.15", 2, 1, 2.0],
                                  ["model x3 r0.35", 1, 0, 1.0], ["pattern move", 1, 1, 5.0]]
    assert proposers([edit(None), edit({"action": [1, 0, 2]})]) == []


def test_learner_logs_one_line_per_ppo_update(ppo_run: Path) -> None:
    updates = read_jsonl(ppo_run / "checkpoints" / "ppo_updates.jsonl")
    assert len(updates) >= 3
    versions = [u["version"] for u in updates]
    assert versions == sorted(set(versions))
    # Version 1 is the initial policy; every later checkpoint is one logged update.
    checkpoints = sorted(int(p.stem.split("-v")[1]) for p in (ppo_run / "checkpoints").glob("policy-v*.pt"))
    assert checkpoints == [1, *versions]
    for u in updates:
        assert u["samples"] > 0 and u["steps"] > 0
        assert math.isfinite(u["entropy"]) and u["entropy"] > 0 and u["approx_kl"] >= 0
        assert math.isfinite(u["reward_mean"]) and u["time"] > 0
    text = (write_report(ppo_run, ppo_run / "r-updates")).read_text()
    rows = table_rows(text, "update")
    assert [int(r[0]) for r in rows] == versions[-10:]
    assert rows[-1][3] == f"{updates[-1]['entropy']:.3f}" and rows[-1][4] == f"{updates[-1]['approx_kl']:.4f}"


def test_abort_savings_charge_each_aborted_run_the_full_budget(ppo_run: Path) -> None:
    records = ledger(ppo_run)
    aborted = [r for r in records if r["status"] == "aborted"]
    assert aborted, "the simulated campaign should have early aborts"
    run = load_run(ppo_run)
    lines = timelines(run)
    extra = sum(30.0 - r["training_seconds"] for r in aborted)  # the cpu profile's 30 s budget
    assert lines["extra_s"] == pytest.approx(extra)
    # One simulated worker: the last run finishes later by exactly the time the aborts saved.
    assert (lines["without"][-1] - lines["actual"][-1]) * 3600 == pytest.approx(extra)
    s = summarize(run)
    assert s["aborted"] == len(aborted) and s["abort_saved_hours"] == pytest.approx(extra / 3600)
    assert s["experiments_per_hour"] > s["experiments_per_hour_without_aborts"]


def test_tunable_table_credits_every_tunable_of_a_program() -> None:
    records = [
        {"experiment_id": "e1", "role": "baseline", "status": "ok", "val_bpb": 2.0, "kept": True},
        {"experiment_id": "e2", "status": "ok", "val_bpb": 1.9, "parent_bpb": 2.0, "kept": True, "reward": 1.0,
         "program": [{"op": "set", "name": "A", "value": 1}, {"op": "scale", "name": "B", "factor": 2}]},
        {"experiment_id": "e3", "status": "ok", "val_bpb": 2.0, "parent_bpb": 1.9, "kept": False, "reward": 0.0,
         "program": [{"op": "set", "name": "A", "value": 2}]},
        {"experiment_id": "e4", "status": "crashed", "val_bpb": None, "parent_bpb": 1.9, "kept": False,
         "reward": -3.0, "description": "B 2 -> 4"},  # no program: credited from the description
    ]
    rows = {row["tunable"]: row for row in tunable_table(records)}
    assert rows["A"]["tried"] == 2 and rows["A"]["kept"] == 1 and rows["A"]["solo_runs"] == 1
    assert rows["A"]["mean_delta"] == pytest.approx(0.0) and rows["A"]["solo_mean_delta"] == pytest.approx(0.1)
    assert rows["B"]["tried"] == 2 and rows["B"]["failed"] == 1 and rows["B"]["mean_reward"] == pytest.approx(-1.0)
    assert list(rows) == ["B", "A"]  # both kept once; then the lower mean delta first


def test_a_torn_last_line_is_skipped(ppo_run: Path, tmp_path: Path) -> None:
    """A campaign being written: the ledger's and the updates log's last lines may be half there."""
    copy = tmp_path / "live"
    shutil.copytree(ppo_run, copy, ignore=shutil.ignore_patterns("redis", "report*", "lineage"))
    before = summarize(load_run(copy))
    with (copy / "ledger.jsonl").open("a") as f:
        f.write('{"experiment_id": "e09999", "status": "ok", "val_bpb": 0.1, "kept": tr')
    with (copy / "checkpoints" / "ppo_updates.jsonl").open("a") as f:
        f.write('{"version": 999, "entropy": 1.')
    after = summarize(load_run(copy))
    assert after == before
    write_report(copy)
    check_numbers(copy, copy / "report")


# -- a real campaign: training runs, rq worker, read while it runs -----------------------------


@pytest.fixture(scope="module")
def smoke_run(smoke_campaign: SmokeCampaign, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session's one smoke campaign (see envfixtures.py), reported on while it ran; test_campaign_e2e.py
    reads it too. `arrl report` and the export write into the run directory, so they get a copy."""
    run_dir = tmp_path_factory.mktemp("report-smoke") / "run"
    shutil.copytree(smoke_campaign.run_dir, run_dir, symlinks=True)
    return {"run_dir": run_dir, "returncode": smoke_campaign.returncode, "stdout": smoke_campaign.stdout,
            "live": smoke_campaign.live}


@pytest.mark.slow
def test_report_of_a_real_campaign_live_and_finished(smoke_run: dict[str, Any]) -> None:
    run_dir = smoke_run["run_dir"]
    assert smoke_run["returncode"] == 0, smoke_run["stdout"][-3000:]
    assert "\x1b" not in smoke_run["stdout"]  # not a terminal: plain lines
    assert smoke_run["live"], "no report was made while the campaign ran"
    for live in smoke_run["live"]:
        assert live["summary"]["recorded"] >= live["recorded"]  # never fewer than were there
    done = subprocess.run([str(BIN / "arrl"), "report", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    check_numbers(run_dir, run_dir / "report")
    s = json.loads((run_dir / "report" / "summary.json").read_text())
    assert s["recorded"] == 3 and s["state"] == "stopped" and s["budget_s"] == 3.0
    assert s["experiments_run"] == sum(1 for r in ledger(run_dir) if r.get("finished_at"))
    # Every real run probed the device before its clock started; the report shows their spread.
    speeds = [r["machine_gflops"] for r in ledger(run_dir) if r.get("steps")]
    assert speeds and all(v > 0 for v in speeds) and s["machine_speed"]["runs"] == len(speeds)
    assert s["machine_speed"]["low"] == min(speeds) and s["machine_speed"]["high"] == max(speeds)
    assert "machine speed (GFLOP/s, probed before each run)" in (run_dir / "report" / "report.md").read_text()
    # The same run directory exported: the series from the real lineage rebuilds best_train.py.
    out = export_best(run_dir)
    kept = [r for r in ledger(run_dir) if r["kept"] and r["role"] != "baseline"]
    patches = (out / "patches" / "series").read_text().split()
    assert len(patches) == len(kept)
    rebuilt = apply_series((out / "baseline_train.py").read_text(),
                           [(out / "patches" / name).read_text() for name in patches])
    assert rebuilt.encode() == (run_dir / "best_train.py").read_bytes()
    assert (out / "baseline_train.py").read_bytes() == (ROOT / "target" / "train.py").read_bytes()


def test_report_of_a_campaign_that_has_recorded_nothing_yet(ppo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "young"
    run.mkdir()
    shutil.copyfile(ppo_run / "campaign.json", run / "campaign.json")
    (run / "ledger.jsonl").write_text("")
    text = write_report(run).read_text()
    assert "| experiments recorded | 0 of 60 |" in text and "No edit has been kept yet." in text
    assert all((run / "report" / name).read_bytes().startswith(PNG_MAGIC)
               for name in ("best_val_bpb.png", "experiments_vs_time.png", "ppo_updates.png"))
    assert main(["report", str(tmp_path / "missing")]) == 2
