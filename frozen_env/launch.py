"""Entry point of every trainer process: `python -m frozen_env.launch SCRIPT`.

It ties the trainer's life to its parent (so a killed worker takes its trainer with it) and then
runs the candidate script as `__main__` in this process.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    # The parent may have died between fork and prctl; then we were re-parented already.
    expected = os.environ.get("ARRL_PARENT_PID")
    if expected and os.getppid() != int(expected):
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m frozen_env.launch SCRIPT")
    die_with_parent()
    script = os.path.abspath(args[0])
    sys.argv = [script]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
