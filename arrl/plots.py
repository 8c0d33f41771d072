"""The report's figures, drawn with matplotlib's Agg backend (files only, no display needed).

best_curve   best val_bpb against experiment index, kept edits marked (the paper's Figure 2)
throughput   cumulative experiments against wall-clock, with and without early aborts (Figure 3)
ppo          reward, policy entropy and approximate KL per PPO update
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: a campaign host has no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from arrl.report import Run, best_so_far, ok_val  # noqa: E402
from arrl.reward import is_edit  # noqa: E402

DPI = 130
MAX_LISTED = 22  # kept edits listed beside the best-val_bpb plot (the report's table has them all)
KEPT, RUN, ABORT, CRASH, BEST = "#d62728", "#7f7f7f", "#ff7f0e", "#9467bd", "#1f77b4"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    # "tight" also takes in what sits beside the axes (the legend and the list of kept edits).
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def _short(text: str, n: int = 38) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def best_curve(run: Run, path: Path) -> None:
    records = run.records
    fig, ax = plt.subplots(figsize=(12, 5.4))
    xs = list(range(1, len(records) + 1))
    vals = [ok_val(r) for r in records]
    best = best_so_far(records)
    finite = [v for v in vals if v is not None]
    if not finite:
        ax.text(0.5, 0.5, "no finished experiment yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        _save(fig, path)
        return
    # The y range follows the interesting part: the incumbent and the runs near it. Far worse runs
    # (a diverging learning rate) would squash everything else, so they sit on the top edge.
    known = [b for b in best if b is not None]
    low, start = min(known or finite), (known or finite)[0]
    span = max(start - low, 0.01)
    top = min(max(finite), start + 2.5 * span)
    bottom = low - 0.2 * span  # room for the numbers below the kept edits
    clipped = [(x, v) for x, v in zip(xs, vals, strict=True) if v is not None and v > top]
    shown = [(x, v) for x, v, r in zip(xs, vals, records, strict=True)
             if v is not None and v <= top and not r.get("kept")]
    if shown:
        ax.scatter(*zip(*shown, strict=True), s=14, color=RUN, alpha=0.55, label="finished run (not kept)", zorder=2)
    if clipped:
        ax.scatter([x for x, _ in clipped], [top] * len(clipped), marker="^", s=18, color=RUN, alpha=0.55,
                   label="finished run, off the scale", zorder=2, clip_on=False)
    aborted = [(x, r.get("forecast_val_bpb")) for x, r in zip(xs, records, strict=True) if r.get("status") == "aborted"]
    forecasts = [(x, min(float(f), top)) for x, f in aborted if isinstance(f, int | float) and math.isfinite(f)]
    if forecasts:
        ax.scatter(*zip(*forecasts, strict=True), marker="x", s=16, color=ABORT, alpha=0.6,
                   label="aborted early (its forecast;\non the top edge: off the scale)", zorder=2)
    failed = [x for x, r in zip(xs, records, strict=True) if r.get("status") not in ("ok", "aborted", "duplicate")]
    if failed:
        ax.scatter(failed, [top] * len(failed), marker="|", s=60, color=CRASH, label="crashed / failed",
                   zorder=2, clip_on=False)
    steps = [(x, b) for x, b in zip(xs, best, strict=True) if b is not None]
    if steps:
        sx, sy = zip(*steps, strict=True)
        ax.step(list(sx) + [len(records)], list(sy) + [sy[-1]], where="post", color=BEST, lw=2,
                label="best val_bpb so far", zorder=3)
    kept = [(x, v, r) for x, v, r in zip(xs, vals, records, strict=True) if r.get("kept") and v is not None]
    if kept:
        ax.scatter([x for x, _, _ in kept], [v for _, v, _ in kept], marker="*", s=140, color=KEPT,
                   edgecolor="black", linewidth=0.5, label="kept edit", zorder=4)
        # Each kept edit gets a number just below its star (below the staircase no run can be, since
        # nothing beats the best), and the numbers are spelled out in a list beside the plot: full
        # descriptions on the plot itself overlap as soon as edits are kept a few experiments apart.
        edits = [k for k in kept if is_edit(k[2])]
        for n, (x, v, _) in enumerate(edits, start=1):
            ax.annotate(str(n), (x, v), xytext=(0, -9), textcoords="offset points", fontsize=7, ha="center",
                        va="top", color=KEPT, fontweight="bold")
        shown = edits[-MAX_LISTED:]
        listing = [f"{len(edits) - len(shown) + i:>2}  {r['experiment_id']}  {_short(r.get('description'), 40)}"
                   for i, (_, _, r) in enumerate(shown, start=1)]
        if len(shown) < len(edits):
            listing.insert(0, f"(the last {len(shown)} of {len(edits)}; all in report.md)")
        if listing:
            ax.text(1.02, 0.70, "kept edits\n" + "\n".join(listing), transform=ax.transAxes, va="top", ha="left",
                    fontsize=7, family="monospace", color="#222222")
    baseline = next((v for v, r in zip(vals, records, strict=True) if v is not None and r.get("role") == "baseline"),
                    None)
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=0.8, ls="--", alpha=0.6, label=f"baseline {baseline:.4f}")
    ax.set_ylim(bottom, top + 0.04 * (top - bottom))
    ax.set_xlim(0, len(records) + 1)
    ax.set_xlabel("experiment index (order recorded)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val_bpb (lower is better)")
    final = known[-1] if known else None
    ax.set_title(f"Best val_bpb over {len(records)} experiments"
                 + (f": {final:.4f}, {len([k for k in kept if is_edit(k[2])])} kept edits" if final else ""))
    ax.grid(alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _save(fig, path)


def throughput(run: Run, lines: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    actual, without = lines["actual"], lines["without"]
    if not actual:
        ax.text(0.5, 0.5, "no experiment has finished yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        _save(fig, path)
        return
    hours = max(without[-1], actual[-1])
    unit, scale = ("seconds", 3600.0) if hours < 2 / 60 else ("minutes", 60.0) if hours < 2 else ("hours", 1.0)
    counts = list(range(1, len(actual) + 1))
    ax.step([0.0] + [t * scale for t in actual], [0] + counts, where="post", color=BEST, lw=2,
            label=f"with early aborts (as run): {len(actual)} in {actual[-1] * scale:.1f} {unit}")
    if lines["aborted"]:
        ax.step([0.0] + [t * scale for t in without], [0] + counts, where="post", color=RUN, lw=2, ls="--",
                label=f"without early aborts (estimated): {without[-1] * scale:.1f} {unit}")
        runs = "the aborted run is" if lines["aborted"] == 1 else f"each of the {lines['aborted']} aborted runs is"
        note = (f"Without aborts is an estimate: {runs} charged\n"
                f"the full {run.budget_s:g} s budget, which delays later runs on the same worker.")
        ax.text(0.98, 0.04, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#cccccc"})
    ax.set_xlabel(f"wall-clock {unit} since the first run started")
    ax.set_ylabel("experiments finished\n(duplicates and refusals take no time)")
    ax.set_title("Experiments against wall-clock" + (", with and without early aborts" if lines["aborted"] else ""))
    ax.set_xlim(0, hours * scale * 1.02)
    ax.set_ylim(0, len(actual) * 1.05 + 0.5)
    ax.grid(alpha=0.25)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def ppo(run: Run, path: Path) -> None:
    updates = run.updates
    if not updates:
        # Other strategies learn nothing to plot: show what they were paid per experiment.
        fig, ax = plt.subplots(figsize=(8, 3.6))
        pairs = [(i + 1, float(r["reward"])) for i, r in enumerate(run.records)
                 if isinstance(r.get("reward"), int | float) and is_edit(r)]
        if pairs:
            ax.scatter(*zip(*pairs, strict=True), s=14, color=BEST)
        ax.set_xlabel("experiment index (order recorded)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0, color="black", lw=0.6, alpha=0.5)
        ax.set_ylabel("reward (noise units)")
        ax.set_title(f"Reward per experiment ({run.config.get('strategy') or 'this strategy'}: no PPO update recorded)")
        ax.grid(alpha=0.25)
        _save(fig, path)
        return
    xs = [int(u.get("version") or i + 1) for i, u in enumerate(updates)]

    def series(key: str) -> list[float]:
        return [float(u[key]) if isinstance(u.get(key), int | float) else math.nan for u in updates]

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    reward, spread = series("reward_mean"), series("reward_std")
    axes[0].plot(xs, reward, marker="o", ms=3, color=BEST, label="mean reward of the batch")
    axes[0].fill_between(xs, [m - s for m, s in zip(reward, spread, strict=True)],
                         [m + s for m, s in zip(reward, spread, strict=True)], color=BEST, alpha=0.15,
                         label="± one standard deviation")
    axes[0].axhline(0, color="black", lw=0.6, alpha=0.5)
    axes[0].set_ylabel("reward\n(noise units)")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].plot(xs, series("entropy"), marker="o", ms=3, color=KEPT)
    axes[1].set_ylabel("policy entropy\n(nats, last minibatch)")
    kl = series("approx_kl")
    axes[2].plot(xs, kl, marker="o", ms=3, color=ABORT, label="approx. KL to the pre-update policy")
    early = [(x, k) for x, k, u in zip(xs, kl, updates, strict=True) if u.get("stopped_early")]
    if early:
        axes[2].scatter(*zip(*early, strict=True), marker="s", s=30, facecolor="none", edgecolor="black",
                        label="stopped at the target KL", zorder=3)
    axes[2].set_ylabel("approx. KL")
    axes[2].set_xlabel("PPO update (policy version)")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].legend(loc="upper left", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.25)
    axes[0].set_title(f"PPO: {len(updates)} updates")
    _save(fig, path)
