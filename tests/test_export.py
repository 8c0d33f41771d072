"""`arrl export --best`: the patch series reproduces best_train.py; results.tsv stays loadable.

The run directory is a real simulated campaign (`arrl run --executor sim`: real proposer,
applier, reward computer writing the ledger and the lineage repository, private redis-server).
The series is applied with git and with patch(1), the tools a user has, not only with ours.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from arrl.cli import main
from arrl.export import ExportError, export_best

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "target" / "train.py"
GIT_ID = ["-c", "user.name=test", "-c", "user.email=test@localhost"]


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]


def kept_edits(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in ledger(run_dir) if r["kept"] and r["role"] != "baseline"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "run"
    assert main(["run", "--executor", "sim", "--landscape", "arrl.landscapes:cpu_fitted", "--max-experiments",
                 "60", "--run-dir", str(path)]) == 0
    assert len(kept_edits(path)) >= 2, "the campaign should keep a few edits"
    return path


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export-out") / "best"
    assert main(["export", str(run_dir), "--best", "--out", str(out)]) == 0
    return out


def series(out: Path) -> list[Path]:
    return [out / "patches" / name for name in (out / "patches" / "series").read_text().split()]


def test_one_patch_per_kept_edit_naming_experiment_and_val_bpb(run_dir: Path, exported: Path) -> None:
    kept = kept_edits(run_dir)
    patches = series(exported)
    assert len(patches) == len(kept) and sorted(exported.glob("patches/*.patch")) == patches
    for i, (patch, record) in enumerate(zip(patches, kept, strict=True), start=1):
        text = patch.read_text()
        assert f"Subject: [PATCH {i}/{len(kept)}] {record['experiment_id']}: {record['description']}\n" in text
        assert f"val_bpb before: {record['incumbent_bpb']:.6f}" in text
        assert f"val_bpb after:  {record['val_bpb']:.6f}" in text
        assert patch.name.startswith(f"{i:04d}-{record['experiment_id']}-")
    assert (exported / "train.py").read_bytes() == (run_dir / "best_train.py").read_bytes()
    assert (exported / "baseline_train.py").read_bytes() == TRAIN_PY.read_bytes()
    readme = (exported / "README.md").read_text()
    assert all(r["experiment_id"] in readme for r in kept)


def test_git_am_of_the_series_reproduces_best_train_py(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(TRAIN_PY, repo / "train.py")
    git = ["git", "-C", str(repo), *GIT_ID]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], check=True)
    subprocess.run([*git, "am", "-q", *map(str, series(exported))], check=True, capture_output=True)
    assert (repo / "train.py").read_bytes() == (run_dir / "best_train.py").read_bytes()
    subjects = subprocess.run([*git, "log", "--reverse", "--format=%s"], check=True, capture_output=True,
                              text=True).stdout.splitlines()
    assert subjects[1:] == [f"{r['experiment_id']}: {r['description']}" for r in kept_edits(run_dir)]


@pytest.mark.skipif(shutil.which("patch") is None, reason="patch(1) is not installed")
def test_patch_p1_in_order_reproduces_best_train_py(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    shutil.copyfile(TRAIN_PY, tmp_path / "train.py")
    for patch in series(exported):
        subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=tmp_path, check=True)
    assert (tmp_path / "train.py").read_bytes() == (run_dir / "best_train.py").read_bytes()


def test_without_lineage_the_ledger_diffs_give_the_same_series(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("lineage", "redis", "export"))
    out = export_best(copy, tmp_path / "out", baseline=TRAIN_PY)
    assert (out / "train.py").read_bytes() == (run_dir / "best_train.py").read_bytes()
    ours, theirs = series(out), series(exported)
    assert [p.name for p in ours] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        # Same diffs and messages; only the commit id on the first line differs (none without git).
        assert a.read_text().split("\n", 1)[1] == b.read_text().split("\n", 1)[1]


def test_a_series_that_does_not_reproduce_is_refused(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("redis", "export"))
    (copy / "best_train.py").write_text((copy / "best_train.py").read_text() + "# edited by hand\n")
    with pytest.raises(ExportError, match="does not reproduce best_train.py"):
        export_best(copy, tmp_path / "out")
    assert main(["export", str(copy), "--best", "--out", str(tmp_path / "out")]) == 1
    assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 2  # --best is what to export


def test_results_tsv_stays_loadable_by_autoresearch_analysis(run_dir: Path, exported: Path) -> None:
    """autoresearch's notebook does pd.read_csv('results.tsv', sep='\\t'): a header of five columns,
    one row per experiment, numeric val_bpb and memory_gb, status keep / discard / crash."""
    records = ledger(run_dir)
    for path in (run_dir / "results.tsv", exported / "results.tsv"):
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = list(reader)
        assert reader.fieldnames == ["commit", "val_bpb", "memory_gb", "status", "description"]
        assert len(rows) == len(records)
        assert all(None not in row and len(row) == 5 for row in rows)  # no stray tabs: exactly five fields
        by_id = {r["experiment_id"]: r for r in records}
        for row in rows:
            assert row["status"] in {"keep", "discard", "crash"}
            float(row["val_bpb"]), float(row["memory_gb"])
            assert len(row["commit"]) >= 7 and not row["description"].startswith('"')  # no CSV quoting
            record = by_id[row["description"].split()[0]]
            assert (row["status"] == "keep") == bool(record["kept"])
            if record["status"] == "ok":
                assert float(row["val_bpb"]) == pytest.approx(record["val_bpb"], abs=1e-6)
        keeps = [row for row in rows if row["status"] == "keep"]
        assert len(keeps) == len(kept_edits(run_dir)) + 1  # and the baseline
