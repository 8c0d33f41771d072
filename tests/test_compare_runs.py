"""scripts/compare_runs.py: two campaigns compared on the same number of experiments and the same wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _run_dir(root: Path, name: str, strategy: str, runs: list[tuple[float, float, bool]]) -> Path:
    """A run directory whose ledger holds (minutes after the start it finished, val_bpb, kept) per run."""
    d = root / name
    d.mkdir()
    (d / "campaign.json").write_text(json.dumps({"strategy": strategy}))
    start = 1_800_000_000.0
    lines = [json.dumps({"experiment_id": f"e{i + 1:05d}", "role": "baseline" if i == 0 else "edit",
                         "status": "ok", "val_bpb": v, "kept": kept, "created_at": start + 60 * max(0.0, m - 1),
                         "finished_at": start + 60 * m})
             for i, (m, v, kept) in enumerate(runs)]
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n" + '{"experiment_id": "e999')  # a torn last line
    return d


def test_best_by_experiments_and_by_the_shortest_campaigns_wall_time(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                     load_script) -> None:
    # a: slow but ends lower, with its best run after b has stopped; b: quick, its best early.
    a = _run_dir(tmp_path, "a", "ppo", [(1, 3.0, True), (2, 2.9, True), (3, 2.95, False), (4, 2.8, True),
                                        (9, 2.85, False), (25, 2.5, True)])
    b = _run_dir(tmp_path, "b", "random", [(1, 3.1, True), (2, 2.7, True), (3, 2.75, False), (5, 2.8, False),
                                           (8, 2.9, False), (12, 2.6, True)])
    assert load_script("compare_runs").main([str(a), str(b), "--every", "2"]) == 0
    rows = {line[:32].strip(): line[32:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["strategy"] == ["ppo", "random"] and rows["baseline"] == ["3.0000", "3.1000"]
    assert rows["best after 2 experiments"] == ["2.9000", "2.7000"]
    assert rows["best after 4 experiments"] == ["2.8000", "2.7000"]
    assert rows["best after 6 experiments"] == ["2.5000", "2.6000"]  # at the end: a is ahead
    assert rows["best by 10 min"] == ["2.8000", "2.7000"]
    assert rows["best by 12.0 min (shortest)"] == ["2.8000", "2.6000"]  # by b's end, b is ahead
    assert rows["wall time, min"] == ["25.0", "12.0"]


def test_a_directory_without_a_ledger_is_a_clear_error(tmp_path: Path, load_script) -> None:
    with pytest.raises(SystemExit, match="has no ledger.jsonl records"):
        load_script("compare_runs").main([str(tmp_path)])
