"""The integrity guard: what a candidate script may not do while it trains.

Installed by the launcher as a Python audit hook before the candidate's code runs (audit hooks
cannot be removed). It refuses, with a PermissionError and an `integrity.violation` event that
makes the run `invalid`:

- reading the validation split outside the harness's own evaluation;
- writing outside the experiment's working directory (temporary and compiler caches allowed);
- opening network connections (a candidate must not reach the campaign's Redis or the world);
- starting shells and a few programs that delete or reach the network (FORBIDDEN_PROGRAMS).

And `verify()`, called by the harness before it evaluates, checks that the evaluation code is
the code the launcher loaded, not a patched or replaced one. This is a guard against accidents
and naive cheating, not a sandbox: run candidates as an unprivileged user for that.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

_state: dict = {"installed": False, "finishing": False, "inside": False, "violations": []}


def _resolved(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return path


def install(workdir: str, data_dir: str) -> None:
    """Start guarding this process; call once, before the candidate's code."""
    if _state["installed"]:
        return
    home = str(Path.home())
    allowed = [_resolved(workdir), _resolved(tempfile.gettempdir()), "/dev", "/proc/self",
               os.path.join(home, ".triton"), os.path.join(home, ".cache"), os.path.join(home, ".nv")]
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        allowed.append(_resolved(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
    _state.update(installed=True, allowed=allowed, data=_resolved(data_dir), workdir=_resolved(workdir),
                  code=_evaluation_code())
    sys.addaudithook(_hook)


def installed() -> bool:
    return bool(_state["installed"])


@contextmanager
def finishing():
    """The harness's evaluation: the only time the validation split may be read."""
    _state["finishing"] = True
    try:
        yield
    finally:
        _state["finishing"] = False


def _evaluation_code() -> tuple:
    """The code that measures a run: the evaluation, every method of the harness (its clock
    above all), and the clocks it reads."""
    import time

    from frozen_env import evaluate, harness

    methods = tuple(sorted((name, getattr(f, "__func__", f).__code__) for name, f in vars(harness.Harness).items()
                           if hasattr(getattr(f, "__func__", f), "__code__")))
    return (evaluate.evaluate_bpb.__code__, evaluate.peeks_ahead.__code__, methods,
            harness.emit.__code__, harness.install_key.__code__, time.perf_counter, time.time, time.monotonic)


def verify(instance: object | None = None) -> str | None:
    """Why the measurement cannot be trusted, or None when it is the launcher's own.

    `instance`, the harness being finished: a subclass, or a method shadowed on the instance,
    is a replaced measurement as much as a patched class.
    """
    if not _state["installed"]:
        return None
    if _evaluation_code() != _state["code"]:
        return "the evaluation code, the harness or its clock was patched or replaced"
    if instance is not None:
        from frozen_env.harness import Harness

        shadowed = sorted(set(vars(instance)) & set(vars(Harness)))
        if type(instance) is not Harness or shadowed:
            return f"the harness was replaced ({', '.join(shadowed) or type(instance).__name__})"
    return None


def _violation(reason: str) -> None:
    from frozen_env.harness import emit

    _state["violations"].append(reason)
    emit("integrity.violation", reason=reason)
    raise PermissionError(f"arrl integrity guard: {reason}")


def _writing(mode: object, flags: object) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))


# Programs a candidate may not start: shells (what `os.system` and `shell=True` run), deleting,
# copying over the network. A denylist, not an allowlist: compilers (torch.compile, Triton) start
# programs of their own that differ between machines.
FORBIDDEN_PROGRAMS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "csh", "fish", "busybox", "rm", "shred",
                                "curl", "wget", "nc", "ncat", "netcat", "socat", "ssh", "scp", "sftp", "rsync",
                                "ftp", "telnet", "dd"})
_EVENTS = ("open", "socket.connect", "socket.sendto", "os.system", "subprocess.Popen", "os.exec",
           "os.posix_spawn", "os.spawn")


def _program(event: str, args: tuple) -> str | None:
    """The program an audited process start would run, or None when it cannot be told."""
    if event == "os.system":
        return "sh"
    if event == "subprocess.Popen":  # (executable, args, cwd, env)
        executable, argv = args[0], args[1]
        if executable is None and isinstance(argv, list | tuple) and argv:
            executable = argv[0]
        elif executable is None:
            executable = argv
    elif event == "os.spawn":  # (mode, path, args, env)
        executable = args[1]
    else:  # os.exec / os.posix_spawn: (path, argv, env)
        executable = args[0]
    if isinstance(executable, str | bytes | os.PathLike):
        return os.path.basename(os.fsdecode(executable).split()[0] if os.fsdecode(executable).strip() else "")
    return None


def _hook(event: str, args: tuple) -> None:
    if _state["inside"] or event not in _EVENTS:
        return
    _state["inside"] = True  # the checks below may audit events themselves
    try:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            if not isinstance(path, str | bytes):
                return  # a file descriptor
            real = _resolved(os.fsdecode(path))
            if real.startswith(_state["data"] + os.sep) and not _state["finishing"]:
                if os.path.basename(real).startswith("val"):
                    _violation("read the validation split while training")
                if _writing(mode, flags):
                    _violation(f"wrote into the prepared data: {real}")
            if _writing(mode, flags) and not real.endswith(".pyc") and "__pycache__" not in real:
                if not any(real == root or real.startswith(root + os.sep) for root in _state["allowed"]):
                    _violation(f"wrote outside its working directory: {real}")
        elif event in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
            program = _program(event, args)
            if program in FORBIDDEN_PROGRAMS:
                _violation(f"started a forbidden program: {program}")
        else:
            sock = args[0]
            if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
                _violation(f"opened a network connection to {args[1]!r}")
    finally:
        _state["inside"] = False
