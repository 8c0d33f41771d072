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
import traceback

from frozen_env import containment

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


def take_key(key: str | None = None) -> None:
    """Give the harness the run's key for signing its events: from the adopter's message (warm),
    else from the pipe named by $ARRL_KEY_FD (cold), which is read and closed here."""
    from frozen_env import harness

    if key is None and os.environ.get("ARRL_KEY_FD"):
        fd = int(os.environ.pop("ARRL_KEY_FD"))
        try:
            key = os.read(fd, 256).decode()
        finally:
            os.close(fd)
    if key:
        harness.install_key(bytes.fromhex(key))


def run_script(script: str, key: str | None = None) -> None:
    from frozen_env import guard
    from frozen_env.constants import dataset_dir

    take_key(key)
    guard.install(os.getcwd(), str(dataset_dir()))  # before any line of the candidate runs
    containment.apply_data_limit()
    containment.apply_file_size_limit()
    script = os.path.abspath(script)
    sys.argv = [script]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException as exc:
        # Out of memory (a GPU's, or the cap on CPU) is said as such, not as one crash among others.
        detail = containment.out_of_memory_detail(exc)
        if detail:
            from frozen_env.harness import emit

            try:
                emit("trainer.out_of_memory", detail=detail)
            except Exception:  # noqa: BLE001 - with no memory left even the event may fail
                pass
        raise


def run_adopted(name: str, owner: int) -> None:
    """Warm mode: prepare, wait to be adopted, run the adopter's script, report how it ended.

    The adopter is not our parent and cannot read our exit status, so the last line we write is
    a `launcher.exit` event with it.
    """
    from frozen_env import warm
    from frozen_env.harness import emit

    spec = warm.serve(name, owner)
    code = 0
    try:
        run_script(spec["script"], spec.get("key"))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        emit("launcher.exit", code=code)
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 4 and args[0] == "--warm" and args[2] == "--owner":
        run_adopted(args[1], int(args[3]))
        return
    if len(args) != 1:
        raise SystemExit("usage: python -m frozen_env.launch SCRIPT | --warm NAME --owner PID")
    die_with_parent()
    run_script(args[0])


if __name__ == "__main__":
    main()
