"""`arrl export RUN_DIR --best`: the best train.py and the chain of kept edits as a patch series.

Output (default RUN_DIR/export):

    train.py             the best script (a copy of best_train.py)
    baseline_train.py    the script the campaign started from
    patches/NNNN-*.patch one patch per kept edit, in order, in `git format-patch`'s mail format
    patches/series       the patch names in order (quilt's format: `quilt push -a` applies them)
    results.tsv          a copy of autoresearch's results table
    README.md            what each patch did (experiment, edit, val_bpb before and after) and how to apply

Where the chain comes from. The lineage repository holds the full script of every kept edit, in
the order the incumbent moved, so it is the authority: each patch is the difference between two
consecutive kept scripts. A ledger diff is against the proposal's parent, which with several
workers may be an older incumbent, so ledger diffs alone need not chain; without git (no lineage)
the scripts are rebuilt from the baseline by applying each kept record's diff to its parent's
script, checked against the record's content hash, and the patches are again made between
consecutive kept scripts. Either way the series is applied back to the baseline before anything
is written, and the export fails unless that reproduces best_train.py byte for byte.
"""

from __future__ import annotations

import email.utils
import fcntl
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arrl.edits import render_diff
from arrl.ledger import superseded
from arrl.patch import apply_unified_diff, content_hash
from arrl.report import load_run

SIGNATURE = "-- \narrl\n"


class ExportError(RuntimeError):
    """The run directory cannot be exported faithfully (missing files, or a chain that does not reproduce)."""


@dataclass
class Step:
    """One kept script in the chain; `record` is None for the baseline."""

    source: str
    record: dict[str, Any] | None
    commit: str = ""


# -- the chain of kept scripts ----------------------------------------------------------------


def _git(lineage: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(lineage), *args], check=True, text=True, capture_output=True).stdout


def chain_from_lineage(lineage: Path, records: dict[str, dict[str, Any]]) -> list[Step]:
    """Baseline plus one step per lineage commit that changed train.py (the baseline run's commit
    changes nothing and is skipped)."""
    log = _git(lineage, "log", "--reverse", "--format=%H%x00%s", "main").splitlines()
    steps: list[Step] = []
    for line in log:
        commit, _, subject = line.partition("\0")
        # Read as bytes and decoded strictly: text mode would translate line endings.
        source = subprocess.run(["git", "-C", str(lineage), "show", f"{commit}:train.py"], check=True,
                                capture_output=True).stdout.decode("utf-8")
        exp_id = subject.split(":", 1)[0] if ":" in subject else ""
        if steps and source == steps[-1].source:
            continue
        record = records.get(exp_id) if steps else None
        if steps and record is None:
            raise ExportError(f"lineage commit {commit[:7]} ({subject!r}) has no ledger record")
        steps.append(Step(source, record, commit))
    if not steps:
        raise ExportError(f"{lineage} has no commits")
    return steps


def chain_from_ledger(baseline: str, baseline_hash: str, records: list[dict[str, Any]]) -> list[Step]:
    """The same chain rebuilt from the ledger's diffs (no lineage repository)."""
    if baseline_hash and content_hash(baseline) != baseline_hash:
        raise ExportError("the baseline script given is not the campaign's (content hash differs)")
    sources = {content_hash(baseline): baseline}
    steps = [Step(baseline, None)]
    kept_before: list[dict[str, Any]] = []
    for r in records:
        if not r.get("kept") or r.get("status") != "ok":
            continue
        # As in RunDir.append: a kept record superseded by one written earlier did not move the lineage.
        moved_lineage = r.get("role") != "baseline" and not superseded(r, kept_before)
        kept_before.append(r)
        if not moved_lineage:
            continue
        parent = sources.get(r.get("parent_hash") or "")
        if parent is None:
            raise ExportError(f"{r['experiment_id']}: its parent script {str(r.get('parent_hash'))[:12]} is unknown")
        source = apply_unified_diff(parent, r.get("diff") or "")
        if r.get("candidate_hash") and content_hash(source) != r["candidate_hash"]:
            raise ExportError(f"{r['experiment_id']}: its diff does not rebuild the recorded script")
        sources[content_hash(source)] = source
        steps.append(Step(source, r, r.get("commit") or ""))
    return steps


# -- patches ----------------------------------------------------------------------------------


def _slug(text: str, limit: int = 52) -> str:
    """A file-name form of a subject, as `git format-patch` makes one."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")[:limit].rstrip("-.") or "edit"


def _subject(record: dict[str, Any]) -> str:
    return f"{record.get('experiment_id', '?')} {record.get('description') or ''}"


def _val(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, int | float) else "unknown"


def patch_text(step: Step, before: Step, number: int, total: int, campaign: str) -> str:
    r = step.record or {}
    exp_id, description = r.get("experiment_id", "?"), r.get("description") or "edit"
    # What it beat: the incumbent's score when it was kept (a re-run's, `remeasure_every`), else the
    # previous step's own score.
    after_bpb, before_bpb = r.get("val_bpb"), r.get("incumbent_bpb")
    if not isinstance(before_bpb, int | float):
        before_bpb = (before.record or {}).get("val_bpb")
    change = after_bpb - before_bpb if isinstance(after_bpb, int | float) and isinstance(before_bpb, int | float) else None
    when = r.get("recorded_at") or r.get("finished_at")
    date = email.utils.formatdate(float(when), usegmt=True) if isinstance(when, int | float) else email.utils.formatdate()
    body = [
        f"Experiment {exp_id} of campaign {campaign}, kept as the new best script.",
        "",
        f"val_bpb before: {_val(before_bpb)} ({(before.record or {}).get('experiment_id', 'baseline')})",
        f"val_bpb after:  {_val(after_bpb)}" + (f" (delta {change:+.6f})" if change is not None else ""),
        f"reward: {r.get('reward')} noise units (sigma {r.get('sigma')}); strategy {r.get('strategy')}",
    ]
    if r.get("program"):
        body.append("program: " + "; ".join(
            " ".join(f"{k}={v}" for k, v in sorted(e.items())) for e in r["program"] if isinstance(e, dict)))
    diff = render_diff(before.source, step.source)
    return (f"From {step.commit or '0' * 40} Mon Sep 17 00:00:00 2001\n"
            f"From: arrl <arrl@localhost>\nDate: {date}\n"
            f"Subject: [PATCH {number}/{total}] {exp_id}: {description}\n\n"
            + "\n".join(body) + "\n---\n"
            + "diff --git a/train.py b/train.py\n" + diff + SIGNATURE)


def diff_of(patch: str) -> str:
    """The unified diff inside a patch file (between the mail header and the signature)."""
    start = patch.index("\ndiff --git ") + 1
    end = patch.rindex("\n" + SIGNATURE) + 1 if patch.endswith(SIGNATURE) else len(patch)
    body = patch[start:end]
    return body[body.index("\n") + 1:]  # the `diff --git` line itself: arrl.patch reads ---/+++ only


def apply_series(baseline: str, patches: list[str]) -> str:
    source = baseline
    for patch in patches:
        source = apply_unified_diff(source, diff_of(patch))
    return source


# -- the export -------------------------------------------------------------------------------


@contextmanager
def _quiet(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (shared), which a reward computer holds while it commits a
    kept edit and rewrites best_train.py: a live campaign is read between two records, never
    halfway through one."""
    lock = run_dir / ".lock"
    if not lock.exists():
        yield
        return
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_best(run_dir: Path | str, out: Path | str | None = None, baseline: Path | str | None = None) -> Path:
    """Write the export (see the module docstring); returns its folder.

    `baseline` (default: the lineage's first commit, else target/train.py) is needed only when
    the run directory has no lineage repository.
    """
    with _quiet(Path(run_dir)):
        run = load_run(run_dir)
        best_path = run.path / "best_train.py"
        if not best_path.exists():
            raise ExportError(f"{run.path} has no best_train.py")
        best = best_path.read_bytes().decode("utf-8")
        by_id = {r["experiment_id"]: r for r in run.records}
        lineage = run.path / "lineage"
        if (lineage / ".git").exists() and shutil.which("git"):
            steps = chain_from_lineage(lineage, by_id)
        else:
            default = Path(__file__).resolve().parents[1] / "target" / "train.py"
            source = Path(baseline or default).read_bytes().decode("utf-8")
            steps = chain_from_ledger(source, run.config.get("baseline_hash", ""), run.records)
    if steps[0].record is None:  # the baseline step: give it the baseline run's numbers for "before"
        steps[0].record = next((r for r in run.records if r.get("role") == "baseline" and r.get("status") == "ok"),
                               {"experiment_id": "baseline"})
    campaign = run.config.get("campaign_id", "")
    total = len(steps) - 1
    patches = [(f"{i:04d}-{_slug(_subject(s.record or {}))}.patch", patch_text(s, steps[i - 1], i, total, campaign))
               for i, s in enumerate(steps[1:], start=1)]
    rebuilt = apply_series(steps[0].source, [text for _, text in patches])
    if rebuilt != best:
        raise ExportError("applying the series to the baseline does not reproduce best_train.py "
                          "(the campaign may still be writing it: try again)")

    out_dir = Path(out) if out else run.path / "export"
    patch_dir = out_dir / "patches"
    if patch_dir.exists():
        shutil.rmtree(patch_dir)  # a re-export replaces the series, never mixes two
    patch_dir.mkdir(parents=True)
    for name, text in patches:
        (patch_dir / name).write_bytes(text.encode("utf-8"))
    (patch_dir / "series").write_text("".join(f"{name}\n" for name, _ in patches))
    (out_dir / "train.py").write_bytes(best.encode("utf-8"))
    (out_dir / "baseline_train.py").write_bytes(steps[0].source.encode("utf-8"))
    if (run.path / "results.tsv").exists():
        shutil.copyfile(run.path / "results.tsv", out_dir / "results.tsv")
    (out_dir / "README.md").write_text(readme(run.path.name, campaign, steps, [name for name, _ in patches]))
    return out_dir


def readme(run_name: str, campaign: str, steps: list[Step], names: list[str]) -> str:
    rows = []
    for i, (step, name) in enumerate(zip(steps[1:], names, strict=True), start=1):
        r, before = step.record or {}, steps[i - 1].record or {}
        rows.append(f"| {i} | `{name}` | {r.get('experiment_id')} | {(r.get('description') or '').replace('|', '/')} "
                    f"| {_val(before.get('val_bpb'))} | {_val(r.get('val_bpb'))} |")
    baseline_bpb = _val((steps[0].record or {}).get("val_bpb"))
    final_bpb = _val((steps[-1].record or {}).get("val_bpb"))
    return (
        f"# Best train.py of campaign {campaign} ({run_name})\n\n"
        f"`train.py` is the best script (val_bpb {final_bpb}; the baseline scored {baseline_bpb}). "
        f"`patches/` turns `baseline_train.py` (the script the campaign started from) into it "
        f"in {len(names)} steps, one per kept edit, in the order they were kept; applying them in order "
        f"reproduces `train.py` byte for byte (checked when this export was written).\n\n"
        "| # | patch | experiment | edit | val_bpb before | val_bpb after |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        "Apply them in a git checkout with `git am patches/*.patch` (one commit per edit) or "
        "`git apply patches/*.patch`; elsewhere `for p in $(cat patches/series); do patch -p1 < patches/$p; done` "
        "in a folder holding train.py, or `quilt push -a`.\n\n"
        "`results.tsv` is autoresearch's table of every experiment (commit, val_bpb, memory_gb, status, "
        "description; status keep, discard or crash).\n")
