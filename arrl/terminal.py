"""The live view of `arrl run` and `arrl status --watch`: a progress bar and a compact table.

On a terminal the view is a block of lines redrawn in place: a bar of recorded / max_experiments
with the rate and an ETA, the best val_bpb, the running experiments (elapsed, step, last loss)
and the last few results. Anywhere else (a log file, a pipe, CI) it is one plain line per update
with no escape codes, so logs stay greppable.

The rendering functions take a status snapshot (`arrl.status.snapshot`, optionally merged with
`live_details`) and return text, so they are tested on real snapshots without a terminal.
`LiveDisplay` also acts as the output stream of whoever owns the screen: a message written
through it erases the block first, so it appears above the block, which the next draw repaints
below it, instead of being overwritten.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, TextIO

from arrl.status import one_line

BAR_WIDTH = 28
RECENT = 5


# -- what the snapshot lacks: running experiments and the last results ------------------------


async def live_details(campaign: Any, recent: int = RECENT) -> dict[str, Any]:
    """Running experiments (started, not yet recorded) with their last loss, and the last results."""
    from arrl.bus import MESSAGE_FIELD
    from arrl.messages import decode

    redis, bus = campaign.bus.redis, campaign.bus
    inflight = await campaign.inflight()
    started = {k.decode(): float(v) for k, v in (await redis.hgetall(bus.key("started_at"))).items()}
    now = time.time()
    running = []
    for exp_id in sorted(inflight):
        if exp_id not in started:
            continue  # queued, not yet taken by a worker
        row: dict[str, Any] = {"id": exp_id, "elapsed_s": max(now - started[exp_id], 0.0), "step": None,
                               "loss": None, "description": (inflight[exp_id].get("proposal") or {}).get("description")}
        # The newest few events are enough: a step report is emitted every few steps.
        for _, fields in await redis.xrevrange(bus.events_key(exp_id), count=20):
            try:
                event = decode(fields[MESSAGE_FIELD], "loss_event")["event"]
            except Exception:  # noqa: BLE001 - one odd entry must not break the view
                continue
            if event.get("event") == "train.step":
                row.update(step=event.get("step"), loss=event.get("loss"))
                break
        running.append(row)
    # A few more than shown, by id, then the latest recorded: ids finish slightly out of order.
    results = [{"id": r.get("experiment_id"), "status": r.get("status"), "val_bpb": r.get("val_bpb"),
                "kept": bool(r.get("kept")), "reward": r.get("reward"), "description": r.get("description")}
               for r in sorted(await campaign.recent_records(recent + 5), key=lambda r: r.get("recorded_at") or 0)[-recent:]]
    return {"running_experiments": running, "recent_results": results}


# -- rendering ---------------------------------------------------------------------------------


def clock(seconds: float | None) -> str:
    """1:05 / 1:02:03; '-' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def eta_s(s: dict[str, Any]) -> float | None:
    """Seconds until max_experiments at the campaign's rate so far; None without a cap or a rate."""
    cap, done, rate = s.get("max_experiments") or 0, s.get("recorded") or 0, s.get("experiments_per_hour") or 0.0
    if not cap or rate <= 0 or not done:
        return None
    return max(cap - done, 0) / rate * 3600


def bar(done: int, total: int, width: int = BAR_WIDTH, fancy: bool = True) -> str:
    if total <= 0:
        return ""
    filled = min(width, int(width * done / total))
    full, empty = ("█", "░") if fancy else ("#", ".")
    return "[" + full * filled + empty * (width - filled) + "]"


def _best(s: dict[str, Any]) -> str:
    if s.get("best_val_bpb") is None:
        return "best -"
    return f"best {s['best_val_bpb']:.4f} ({s.get('best_experiment')}: {s.get('best_description') or ''})"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def plain_line(s: dict[str, Any]) -> str:
    """One line, no escape codes: the status line plus the ETA and what runs now."""
    parts = [one_line(s)]
    eta = eta_s(s)
    if eta is not None and s.get("state") == "running":
        parts.append(f"eta {clock(eta)}")
    running = s.get("running_experiments") or []
    if running:
        parts.append("now " + ", ".join(f"{r['id']} {clock(r['elapsed_s'])} loss {_num(r.get('loss'), 3)}"
                                       for r in running))
    return "  ".join(parts)


def render(s: dict[str, Any], width: int = 100) -> list[str]:
    """The block of lines for a terminal `width` columns wide (each line cut to fit, so the
    block's height is known and it can be redrawn in place)."""
    cap, done = s.get("max_experiments") or 0, s.get("recorded") or 0
    eta = eta_s(s)
    head = f"arrl {s.get('state')}  {s.get('strategy')}/{s.get('profile')}  campaign {s.get('campaign')}"
    if s.get("stop_reason"):
        head += f"  ({s['stop_reason']})"
    progress = (f"{bar(done, cap)} {done}/{cap} ({done / cap:.0%})" if cap else f"{done} recorded")
    progress += f"  {s.get('experiments_per_hour') or 0.0:.1f}/h"
    if eta is not None and s.get("state") == "running":
        progress += f"  eta {clock(eta)}"
    lines = [head, progress,
             f"{_best(s)}  since improvement {s.get('since_improvement', 0)}",
             f"proposed {s.get('proposed', 0)}  queued {s.get('queued', '?')}  running {s.get('running', '?')}  "
             f"workers {s.get('workers', '?')}  "
             + "  ".join(f"{k} {v}" for k, v in sorted((s.get("statuses") or {}).items()))]
    running = s.get("running_experiments") or []
    if running:
        lines.append(f"  {'running':<8} {'elapsed':>8} {'step':>6} {'loss':>7}  edit")
        lines += [f"  {r['id']:<8} {clock(r.get('elapsed_s')):>8} {r.get('step') if r.get('step') is not None else '-':>6} "
                  f"{_num(r.get('loss'), 3):>7}  {r.get('description') or ''}" for r in running]
    recent = s.get("recent_results") or []
    if recent:
        lines.append(f"  {'recent':<8} {'status':<10} {'val_bpb':>7} {'reward':>7}  edit")
        for r in reversed(recent):  # newest first
            status = "kept" if r.get("kept") else str(r.get("status"))
            lines.append(f"  {r['id']:<8} {status:<10} {_num(r.get('val_bpb')):>7} {_num(r.get('reward'), 2):>7}  "
                         f"{r.get('description') or ''}")
    return [line[: max(width - 1, 10)] for line in lines]


# -- drawing -----------------------------------------------------------------------------------


class LiveDisplay:
    """Draws snapshots on `out`: a block redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO, tty: bool | None = None, width: int | None = None) -> None:
        self.out = out
        self.tty = bool(out.isatty()) if tty is None and hasattr(out, "isatty") else bool(tty)
        self.width = width
        self.shown = 0  # lines of the block on screen now, below which the cursor sits

    def _erase(self) -> str:
        # Cursor to the start of the block's first line, then clear to the end of the screen.
        text, self.shown = (f"\x1b[{self.shown}F\x1b[J" if self.shown else ""), 0
        return text

    def draw(self, s: dict[str, Any]) -> None:
        if not self.tty:
            self.out.write(plain_line(s) + "\n")
        else:
            width = self.width or shutil.get_terminal_size((100, 24)).columns
            lines = render(s, width)
            self.out.write(self._erase() + "\n".join(lines) + "\n")
            self.shown = len(lines)
        self.out.flush()

    def release(self) -> None:
        """Leave the last block on screen: later writes go below it."""
        self.shown = 0

    # A stream for everyone else's messages (see the module docstring).
    def write(self, text: str) -> int:
        if self.tty and self.shown:
            self.out.write(self._erase())
            text = text.lstrip("\n")  # the message no longer has to break off a live line
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.tty
