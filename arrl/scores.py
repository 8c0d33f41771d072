"""The incumbent's scores, one per hardware class, and the machine speed each was measured at.

A run's budget is wall-clock time, so a faster device trains more steps in it, and a score is
worth comparing only with runs on the device class it was measured on. A campaign bound to one
class (the default) has one score. With `--hardware-class any`, workers of several classes share
the campaign, and the incumbent keeps a score per class (`scores` in its Redis record: the class's
val_bpb, the run that measured it and that run's speed probe): an edit is judged against the score
on its own class, its speed against the probes of its own class, and the self-evaluator follows
the curve of the run that scored the class it watches. An edit on a class where the incumbent has
no score yet is not compared (`unscored_class` in its record) and the proposer re-runs the
incumbent (`Campaign.claim_remeasure`), which scores whichever class's worker takes the job. The
ppo strategy's model of val_bpb takes each class's offset off its runs (`ClassOffsets`).

The top-level `val_bpb`, `measured_by`, `machine_gflops` and `hardware_class` of the incumbent are
its latest measurement on any class, what readers that know of one score (reports, status) show.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping
from typing import Any


def class_of(record: dict[str, Any]) -> str:
    """The hardware class a run was measured on ("" where none was recorded, as in simulations)."""
    return str(record.get("hardware_class") or "")


def score_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A run as the score of the script it ran, on its class."""
    return {"val_bpb": record["val_bpb"], "measured_by": record["experiment_id"],
            "machine_gflops": record.get("machine_gflops"), "hardware_class": class_of(record)}


def class_score(incumbent: dict[str, Any], cls: str) -> dict[str, Any] | None:
    """The incumbent as measured on class `cls`: its record with that class's `val_bpb`,
    `measured_by` and `machine_gflops`, or None where no run of that class has scored it. An
    incumbent stored before scores were kept per class is its own score on every class."""
    scores = incumbent.get("scores")
    if scores is None:
        return incumbent
    entry = scores.get(cls)
    return None if entry is None else {**incumbent, **entry}


def with_score(incumbent: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The incumbent with `record` (a run of its script) as its latest score on `record`'s class."""
    entry = score_entry(record)
    scores = incumbent.get("scores")
    scores = {class_of(record): entry} if scores is None else {**scores, class_of(record): entry}
    return {**incumbent, **entry, "scores": scores}


def of_class(records: list[dict[str, Any]], incumbent: dict[str, Any], cls: str) -> list[dict[str, Any]]:
    """The records whose probes say what class `cls` ran at: those of that class, or every record
    for an incumbent without per-class scores."""
    if incumbent.get("scores") is None:
        return records
    return [r for r in records if class_of(r) == cls]


def unscored_class(records: list[dict[str, Any]], incumbent: dict[str, Any]) -> str | None:
    """A class on which an edit of the incumbent was left uncompared, for want of a score there,
    since the incumbent's latest measurement: a re-run of the incumbent is due (any worker may take
    it, so one that lands on another class leaves this due again at the next such edit)."""
    scores = incumbent.get("scores")
    if scores is None:
        return None
    latest = experiment_number(measured_by(incumbent))
    for r in reversed(records):
        cls = r.get("unscored_class")
        if (cls is not None and cls not in scores and r.get("parent_hash") == incumbent["hash"]
                and experiment_number(str(r["experiment_id"])) > latest):
            return str(cls)
    return None


class ClassOffsets:
    """How much higher each hardware class scores one script than a reference class does, from the
    incumbent's scores on two or more classes (each pair of measuring runs counted once, the mean
    of their differences kept): what a model of val_bpb over tunables subtracts from a run's
    score, so that a run's class is not taken for an effect of its tunables. Empty on one class."""

    def __init__(self) -> None:
        self.reference: str | None = None
        self._seen: dict[str, dict[tuple[str, str], float]] = {}  # class -> (its run, the other's) -> difference
        self.offsets: dict[str, float] = {}

    def learn(self, incumbent: Mapping[str, Any] | None) -> bool:
        """Read the incumbent's scores; whether an offset changed."""
        scores = (incumbent or {}).get("scores") or {}
        if len(scores) < 2:
            return False
        if self.reference is None:
            self.reference = sorted(scores)[0]
        base = scores.get(self.reference)
        if base is None:
            return False  # measured against the reference class only (with two classes, always)
        changed = False
        for cls, entry in scores.items():
            pair = (str(entry["measured_by"]), str(base["measured_by"]))
            if cls != self.reference and pair not in (seen := self._seen.setdefault(cls, {})):
                seen[pair] = float(entry["val_bpb"]) - float(base["val_bpb"])
                self.offsets[cls] = sum(seen.values()) / len(seen)
                changed = True
        return changed

    def of(self, cls: str) -> float:
        return self.offsets.get(cls, 0.0)


# One run's probe spread this much (a standard deviation of its log) over the latest runs: the
# machine is contended. Steady real cpu campaigns read 0.02-0.04; on a core shared with a busy loop
# 0.3, where scores of one script moved by 0.14 bpb and no edit could be compared (docs/search.md,
# "A probe as noisy as the move it looks for").
CONTENDED_SPREAD = 0.15
SPREAD_WINDOW = 8  # the latest probes it is read from: a real move of the speed is one step among them


def probe_spread(records: list[dict[str, Any]], window: int = SPREAD_WINDOW) -> float | None:
    """How much one run's probe spreads on this machine now, as a standard deviation of its log:
    the median step between consecutive probes of the latest `window` runs in `records` (of one
    class) over 0.954, the median of |a - b| for two draws of one normal. A move of the machine's
    speed is one large step among them, so the median reads the noise around it. None with fewer
    than three steps."""
    probes = [s for _, s in _probes(records)][-window:]
    steps = [abs(math.log(b / a)) for a, b in itertools.pairwise(probes)]
    return statistics.median(steps) / 0.954 if len(steps) >= 3 else None


def speed_shift(records: list[dict[str, Any]], incumbent: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
    """The largest move of a class's speed since the incumbent's score on that class
    (`machine_speed_shift` over that class's runs), with that score; None until one is known."""
    shifts = []
    for cls in incumbent.get("scores") or [""]:
        score = class_score(incumbent, cls)
        if score is not None and (shift := machine_speed_shift(of_class(records, incumbent, cls), score)) is not None:
            shifts.append((shift, score))
    return max(shifts, key=lambda s: abs(s[0])) if shifts else None


def machine_speed_shift(records: list[dict[str, Any]], incumbent: dict[str, Any], runs: int = 3) -> float | None:
    """How far the machine's speed has moved since the incumbent's latest score was measured, as a
    fraction (-0.5: half as fast): the median `machine_gflops` of the last `runs` runs recorded
    after that score, against the median of the `runs` up to and including it (the incumbent's own
    `machine_gflops` when they have left `records`). None until `runs` runs have been probed
    since the score. Medians of three, because in a campaign pinned to one core, one run's probe
    moved by up to a fifth with the machine steady (the campaign's own stages share the core). Every
    run counts, whatever its script: the number is the device's, measured on the same fixed work
    before each run's clock starts (`frozen_env.harness.machine_gflops`)."""
    measured = experiment_number(measured_by(incumbent))
    after = [s for n, s in _probes(records) if n > measured][-runs:]
    then = score_speed(records, incumbent, runs)
    if len(after) < runs or then is None:
        return None
    return statistics.median_low(after) / then - 1.0


def score_speed(records: list[dict[str, Any]], incumbent: dict[str, Any], runs: int = 3,
                top_up: bool = False) -> float | None:
    """The machine's speed when the incumbent's latest score was measured: the median probe of the
    `runs` runs up to and including that score's run, or the incumbent's own `machine_gflops` when
    they have left `records` (None without either).

    With `top_up` (the keep rule's reading), a score with fewer than `runs` probes up to it, as the
    first run's, is topped up with the probes of the runs right after it, and is None until `runs`
    probes are known: one probe is too few to refuse comparisons on (the first run's read 0.5-0.8
    of the next runs' on two cores while the campaign's stages started beside it, and every edit
    was then refused until a re-run; `pipeline.launcher` now starts them first). The re-run
    trigger (`machine_speed_shift`) reads the runs up to the score alone: a first run that was
    slow in truth still gets its re-run."""
    measured = experiment_number(measured_by(incumbent))
    probes = _probes(records)
    before = [s for n, s in probes if n <= measured][-runs:]
    own = incumbent.get("machine_gflops")
    if not before and isinstance(own, int | float) and own > 0:
        before = [float(own)]
    if top_up and len(before) < runs and probes and probes[0][0] <= measured:  # `records` reach the score
        before += [s for n, s in probes if n > measured][:runs - len(before)]
        if len(before) < runs:
            return None
    return statistics.median_low(before) if before else None


def _probes(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(experiment number, machine_gflops) of the records that carry a probe, in their order."""
    return [(experiment_number(str(r["experiment_id"])), float(s)) for r in records if r.get("experiment_id")
            and isinstance(s := r.get("machine_gflops"), int | float) and s > 0]


def experiment_number(exp_id: str) -> int:
    """`e00012` -> 12: experiment ids count proposals in order."""
    return int(exp_id.lstrip("e"))


def measured_by(score: Mapping[str, Any]) -> str:
    """The run whose val_bpb a score (the incumbent, or its score on a class) is: its latest
    re-run, else the run that made it the incumbent."""
    return str(score.get("measured_by") or score["experiment_id"])
