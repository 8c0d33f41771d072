"""How much `arrl pretrain --workers N` saves: the same pre-training in one process and with N workers.

    python scripts/bench_pretrain.py                          # 32 campaigns in groups of 8, workers 1 and 2
    python scripts/bench_pretrain.py --workers 4 --campaigns 64

Both runs are the real command (`arrl pretrain`, campaign credit) on the same seed, one after the
other, nothing else of ours running. It prints each run's wall time, the speed-up (one process's
time over the workers'), and whether the two policies written are equal weight for weight (they
must be: a group's campaigns are dealt everything random before they play).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pretrain(workers: int, out: Path, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "arrl.cli", "pretrain", "--landscape", args.landscape,
                    "--campaigns", str(args.campaigns), "--group", str(args.group), "--experiments",
                    str(args.experiments), "--seed", str(args.seed), "--workers", str(workers), "--out", str(out),
                    "--target", str(ROOT / "target" / "train.py")],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = (torch.load(p, weights_only=False)["state_dict"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--campaigns", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--landscape", default="arrl.families:randomized")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        alone, pooled = Path(tmp) / "alone.pt", Path(tmp) / "pooled.pt"
        t1 = pretrain(1, alone, args)
        tn = pretrain(args.workers, pooled, args)
        print(f"{args.campaigns} campaigns of {args.experiments} experiments, groups of {args.group}, "
              f"on {args.landscape}")
        print(f"one process: {t1:.1f} s; {args.workers} workers: {tn:.1f} s; speed-up {t1 / tn:.2f}x")
        print(f"policies equal weight for weight: {same_weights(alone, pooled)}")


if __name__ == "__main__":
    main()
