"""The run directory: the files a campaign leaves behind.

    campaign.json       the campaign's configuration
    ledger.jsonl        one line per experiment (diff, parent, status, numbers), discarded too
    results.tsv         autoresearch's columns: commit, val_bpb, memory_gb, status, description
    lineage/            a git repository whose history is the chain of kept edits
    best_train.py       the best script so far
    logs/<id>.jsonl     each experiment's structured log (proposal, events, decision)

Writes are idempotent by experiment id (at-least-once delivery means duplicates) and serialised
with a file lock, so several reward computers may share one run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "arrl", "GIT_AUTHOR_EMAIL": "arrl@localhost",
    "GIT_COMMITTER_NAME": "arrl", "GIT_COMMITTER_EMAIL": "arrl@localhost",
}


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.ledger = self.path / "ledger.jsonl"
        self.tsv = self.path / "results.tsv"
        self.lineage = self.path / "lineage"
        self.best = self.path / "best_train.py"
        self.logs = self.path / "logs"
        self.checkpoints = self.path / "checkpoints"
        self._written: set[str] | None = None

    # -- set-up ---------------------------------------------------------------------------
    def init(self, config: dict[str, Any], baseline_source: str) -> None:
        for folder in (self.path, self.logs, self.checkpoints, self.lineage):
            folder.mkdir(parents=True, exist_ok=True)
        if not (self.path / "campaign.json").exists():
            (self.path / "campaign.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if not self.tsv.exists():
            self.tsv.write_text(TSV_HEADER)
        self.ledger.touch()
        if not self.best.exists():
            self.best.write_text(baseline_source)
        if self.has_git and not (self.lineage / ".git").exists():
            self._git("init", "-q", "-b", "main")
            (self.lineage / "train.py").write_text(baseline_source)
            self._git("add", "train.py")
            self._git("commit", "-q", "-m", "baseline")

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "campaign.json").read_text())

    # -- reading --------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        out = []
        for line in self.ledger.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:  # the last line, torn by a crash mid-write: not written
                    continue
        return out

    def curves(self) -> Iterator[dict[str, Any]]:
        """One record per experiment in campaign order: its loss curve and outcome.

        Runs the self-evaluator stopped have partial curves; `budget_s` is the profile's.
        """
        from frozen_env.constants import get_profile

        config = self.config()
        budget = config.get("budget_s") or get_profile(config.get("profile", "cpu")).budget_s
        for record in sorted(self.records(), key=lambda r: r["experiment_id"]):
            log = self.logs / f"{record['experiment_id']}.jsonl"
            curve = []
            if log.exists():
                for line in log.read_text().splitlines():
                    event = json.loads(line)
                    if event.get("event") == "train.step":
                        curve.append([event["training_seconds"], event["loss"]])
            yield {"id": record["experiment_id"], "budget_s": budget, "curve": curve,
                   "val_bpb": record.get("val_bpb"), "status": record.get("status"),
                   "description": record.get("description")}

    def written_ids(self) -> set[str]:
        if self._written is None:
            self._written = {r["experiment_id"] for r in self.records()}
        return self._written

    # -- writing --------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.path / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, record: dict[str, Any], source: str | None = None,
               log_lines: list[dict[str, Any]] | None = None) -> bool:
        """Write one experiment's record everywhere it belongs; False if it was already there.

        Safe to repeat after a crash at any point: the log file is replaced whole, the lineage
        commit and the results.tsv row are written only if missing, and the ledger line, the
        commit point, comes last. A line torn by a crash mid-write is cut off first.
        """
        exp_id = record["experiment_id"]
        with self._locked():
            for path in (self.ledger, self.tsv):
                _cut_torn_tail(path)
            self._written = None  # another process may have appended since we last looked
            if exp_id in self.written_ids():
                return False
            if log_lines is not None:
                log_path = self.logs / f"{exp_id}.jsonl"
                partial = log_path.with_suffix(".jsonl.partial")
                partial.write_text("".join(json.dumps(line, default=str) + "\n" for line in log_lines))
                partial.replace(log_path)
            # Kept records improve strictly on one another, but several reward computers (or a
            # redelivery after a crash) may write them out of order: one beaten by a record
            # already written must not move the lineage's head or best_train.py back.
            if record.get("kept") and source is not None and not self._superseded(record):
                record["commit"] = self._commit_kept(exp_id, record, source)
                self.best.write_text(source)
            if exp_id not in self._tsv_ids():
                _append_line(self.tsv, tsv_row(record))
            _append_line(self.ledger, json.dumps(for_files(record), default=str, sort_keys=True) + "\n", sync=True)
            self.written_ids().add(exp_id)
        return True

    def _tsv_ids(self) -> set[str]:
        """Experiment ids that already have a results.tsv row (the description starts with the id)."""
        if not self.tsv.exists():
            return set()
        rows = (line.split("\t") for line in self.tsv.read_text().splitlines()[1:])
        return {row[4].split()[0] for row in rows if len(row) == 5 and row[4].split()}

    @property
    def has_git(self) -> bool:
        """Without git the lineage is skipped (best_train.py and the ledger still hold everything)."""
        return shutil.which("git") is not None

    def _superseded(self, record: dict[str, Any]) -> bool:
        return superseded(record, [r for r in self.records() if r.get("kept") and r.get("status") == "ok"])

    def _commit_kept(self, exp_id: str, record: dict[str, Any], source: str) -> str | None:
        if not self.has_git:
            return None
        # A reward computer killed inside git leaves its lock files behind; we hold the run
        # directory's lock, so no live git of ours is using them.
        for lock in (".git/index.lock", ".git/HEAD.lock", ".git/refs/heads/main.lock"):
            (self.lineage / lock).unlink(missing_ok=True)
        existing = self._git("log", "--format=%h", f"--grep=^{exp_id}:", capture=True).strip()
        if existing:  # committed before a crash, then redelivered
            return existing.splitlines()[0]
        (self.lineage / "train.py").write_text(source)
        self._git("add", "train.py")
        message = (f"{exp_id}: {record.get('description') or 'edit'}\n\n"
                   f"val_bpb {record.get('incumbent_bpb')} -> {record.get('val_bpb')}\n")
        self._git("commit", "-q", "--allow-empty", "-m", message)
        return self._git("rev-parse", "--short", "HEAD", capture=True).strip()

    def _git(self, *args: str, capture: bool = False) -> str:
        done = subprocess.run(["git", "-C", str(self.lineage), *args], check=True, text=True,
                              capture_output=True, env={**os.environ, **GIT_ENV})
        return done.stdout if capture else ""


def superseded(record: dict[str, Any], kept_before: list[dict[str, Any]]) -> bool:
    """Whether a kept record written earlier took the lead after this one did, so this one must
    not move the lineage's head or best_train.py back (several reward computers, or a redelivery
    after a crash, write kept records out of order).

    By the incumbent version each made (`lead_version`); records without one (written before
    versions were stamped) are ordered by score, which a re-run of the incumbent would upset."""
    version = record.get("lead_version")
    if isinstance(version, int):
        return any(isinstance(r.get("lead_version"), int) and r["lead_version"] > version for r in kept_before)
    val = record.get("val_bpb")
    return isinstance(val, int | float) and any(isinstance(w := r.get("val_bpb"), int | float) and w <= val
                                                for r in kept_before)


def leader(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The kept record that holds the lead at the end (what best_train.py holds), or None."""
    kept = [r for r in records if r.get("kept") and r.get("status") == "ok" and isinstance(r.get("val_bpb"), int | float)]
    versioned = [r for r in kept if isinstance(r.get("lead_version"), int)]
    if versioned:
        return max(versioned, key=lambda r: r["lead_version"])
    return min(kept, key=lambda r: r["val_bpb"]) if kept else None


def remeasures_of(records: list[dict[str, Any]], lead: dict[str, Any]) -> list[float]:
    """The val_bpb of the re-runs of `lead`'s script recorded after it, in order: the last one is
    its score now (`remeasure_every`)."""
    return [r["val_bpb"] for r in sorted(records, key=lambda r: r["experiment_id"])
            if r.get("role") == "remeasure" and r.get("status") == "ok" and r["experiment_id"] > lead["experiment_id"]
            and r.get("candidate_hash") == lead.get("candidate_hash") and isinstance(r.get("val_bpb"), int | float)]


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line left without its newline by a crash mid-write (it was never complete)."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _append_line(path: Path, line: str, sync: bool = False) -> None:
    """One write(2) with O_APPEND: concurrent appenders never interleave within a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def for_files(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the policy's state vector (kilobytes of floats, kept in Redis for the learner)."""
    extra = record.get("extra")
    if isinstance(extra, dict) and "state" in extra:
        record = {**record, "extra": {k: v for k, v in extra.items() if k != "state"}}
    return record


def tsv_row(record: dict[str, Any]) -> str:
    """A row in autoresearch's results.tsv layout: keep / discard / crash."""
    status = record.get("status")
    if status == "ok":
        verdict = "keep" if record.get("kept") else "discard"
    elif status in ("aborted", "duplicate"):
        verdict = "discard"
    else:
        verdict = "crash"
    val = record.get("val_bpb") if status == "ok" else None
    memory_gb = (record.get("peak_memory_mb") or 0.0) / 1024
    commit = record.get("commit") or (record.get("candidate_hash") or "0000000")[:7]
    description = f"{record['experiment_id']} {record.get('description') or ''}".strip()
    if status != "ok":
        description += f" [{status}: {record.get('reason') or ''}]"
    description = " ".join(description.replace("\t", " ").split())[:300]
    return f"{commit}\t{val if val is not None else 0.0:.6f}\t{memory_gb:.1f}\t{verdict}\t{description}\n"
