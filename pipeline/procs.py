"""The process table, read from /proc (Linux): what the launcher, chaos.py and the tests inspect."""

from __future__ import annotations

import os
import signal


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                out.append(int(entry))
    return out


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_mentioning(*needles: str) -> list[int]:
    """Live processes (other than this one) whose command line contains any of `needles`."""
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != me and alive(int(e)) and any(n in cmdline(int(e)) for n in needles)]


def processes_with(needle: bytes, field: str = "cmdline") -> list[int]:
    """Live processes (other than this one) whose /proc/PID/`field` (cmdline, environ) contains `needle`."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                with open(f"/proc/{entry}/{field}", "rb") as f:
                    if needle in f.read() and alive(int(entry)):
                        found.append(int(entry))
            except OSError:  # gone, or not ours to read
                continue
    return found


def kill9(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
