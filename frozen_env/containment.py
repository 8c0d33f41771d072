"""Containment of a trainer: the memory it may use and the processes it may leave behind.

The runner starts every trainer (cold or warm) in its own process group and kills the group at
the end, but a candidate can leave the group (a child that calls `os.setsid()`, a double fork,
a daemon) and can allocate until the machine swaps. Cgroups would contain both, but workers do
not always own one (containers, shared hosts), so containment here needs none:

- Every trainer is tagged with a unique `ARRL_RUN_TOKEN` in its environment. Children inherit
  it whatever session they move to, so at the end of every run the runner scans
  `/proc/*/environ` and kills every process carrying the run's token (`kill_tagged`).
- A `MemoryWatchdog` polls the memory of the trainer's whole process tree (plus anything
  carrying its token) and kills it all once the sum passes the cap, or once the machine itself
  runs short of memory; the run is recorded `crashed` with an "out of memory: ..." reason.
- On CPU the launcher also sets RLIMIT_DATA with headroom above the cap (`data_limit_mb`): a
  backstop for allocations faster than the watchdog's poll. Not RLIMIT_AS, which counts
  reserved address space that torch and CUDA never touch; not on CUDA, whose driver maps
  memory in ways RLIMIT_DATA would count unpredictably.
- An out-of-memory exception (torch.cuda.OutOfMemoryError, CPU allocation failures,
  MemoryError) is reported by the launcher as a `trainer.out_of_memory` event, so a GPU that
  runs out ends the same way: `crashed`, "out of memory: CUDA out of memory. Tried to ...".

This is a guard against accidents and naive escapes, not a sandbox: a process that clears its
environment and leaves the tree between two polls is not found. Run workers in a cgroup (one
systemd scope or container per worker) where that matters.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

RUN_TOKEN_VAR = "ARRL_RUN_TOKEN"
MEMORY_CAP_VAR = "ARRL_MEMORY_CAP_MB"  # "0" turns the cap off
DATA_LIMIT_VAR = "ARRL_DATA_LIMIT_MB"  # set by the runner, applied by the launcher
# Without ARRL_MEMORY_CAP_MB: this share of the machine's memory, split between the trainers
# of the workers on this host. The rest is for the workers' prepared next trainers, the stages,
# Redis and the page cache; no trainer can push the machine into swap or the kernel's OOM killer.
MEMORY_SHARE = 0.75
# RLIMIT_DATA counts writable private mappings, close to resident memory for torch on CPU
# (measured: 354 MB data for 347 MB resident after training); the headroom keeps the watchdog,
# which reports the clearer reason, the one that normally acts.
DATA_LIMIT_FACTOR = 1.5
DATA_LIMIT_SLACK_MB = 512
POLL_S = 0.2  # a 3 GB/s allocator gets at most ~600 MB past the cap before it is seen
TOKEN_SCAN_S = 1.0  # escaped processes are added to the watched set this often
# The machine itself must keep this much available, whatever the cap says (other workers,
# other users); below it the trainer is stopped before the kernel starts reclaiming hard.
PRESSURE_FLOOR_SHARE = 0.03
PRESSURE_FLOOR_MIN_MB = 256
KILL_ROUNDS = 20  # a forking escapee can spawn between a scan and its kill: scan again
# Disk: what a trainer may keep in its working directory (checked each TOKEN_SCAN_S), and the
# largest file it may write anywhere (RLIMIT_FSIZE: a write past it fails with EFBIG at once).
DISK_CAP_VAR = "ARRL_DISK_CAP_MB"  # "0" turns both off
DEFAULT_DISK_CAP_MB = 4096
FILE_LIMIT_VAR = "ARRL_FILE_LIMIT_MB"  # set by the runner, applied by the launcher
OOM_PREFIX = "out of memory: "


def new_token() -> str:
    return uuid.uuid4().hex


def tag(env: dict[str, str], token: str) -> dict[str, str]:
    """The environment with the run's token set (overriding any inherited one)."""
    return {**env, RUN_TOKEN_VAR: token}


def token_of(pid: int) -> str | None:
    """The token a process was started with (a warm trainer gets its own when it starts)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{RUN_TOKEN_VAR}=".encode()
    return next((item[len(prefix):].decode() for item in env if item.startswith(prefix)), None)


# -- the cap --------------------------------------------------------------------------------

def _meminfo() -> dict[str, int]:
    """/proc/meminfo in MB."""
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def machine_memory_mb() -> int:
    """Physical memory, or the cgroup's limit when ours is smaller (a container)."""
    total = _meminfo().get("MemTotal", 0)
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip()) // 2**20
        except (OSError, ValueError):  # absent, or "max"
            continue
        if 0 < limit < total:
            total = limit
    return total


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def rq_workers_here() -> int:
    """How many `rq worker` processes run on this host (each runs one trainer at a time).

    A job's work horse is a fork of its worker with the same command line; it is told apart by
    its parent being a worker too.
    """
    def is_worker(argv: list[str]) -> bool:
        names = [os.path.basename(a) for a in argv[:3]]
        return "worker" in argv[:6] and ("rq" in names or "rq.cli" in argv[:4])

    workers = {e for e in os.listdir("/proc") if e.isdigit() and is_worker(_cmdline(e))}
    parents = {}
    for pid in workers:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[pid] = f.read().rsplit(")", 1)[-1].split()[1]
        except (OSError, IndexError):
            continue
    return max(1, sum(1 for pid, parent in parents.items() if parent not in workers))


def default_memory_cap_mb(trainers: int | None = None) -> int:
    trainers = rq_workers_here() if trainers is None else trainers
    return max(256, int(machine_memory_mb() * MEMORY_SHARE / max(1, trainers)))


def memory_cap_mb(trainers: int | None = None) -> int | None:
    """The cap for one trainer: $ARRL_MEMORY_CAP_MB when set (0: none), else MEMORY_SHARE of
    the machine split between the rq workers on this host."""
    configured = os.environ.get(MEMORY_CAP_VAR, "").strip()
    if configured:
        cap = int(float(configured))
        return cap if cap > 0 else None
    return default_memory_cap_mb(trainers)


def data_limit_mb(cap_mb: int) -> int:
    return int(cap_mb * DATA_LIMIT_FACTOR) + DATA_LIMIT_SLACK_MB


def apply_data_limit() -> None:
    """In the trainer, before the candidate runs: RLIMIT_DATA from $ARRL_DATA_LIMIT_MB, if set."""
    import resource

    limit = os.environ.get(DATA_LIMIT_VAR)
    if not limit:
        return
    wanted = int(limit) * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (wanted, hard))


def disk_cap_mb() -> int | None:
    raw = os.environ.get(DISK_CAP_VAR, "").strip()
    value = int(raw) if raw else DEFAULT_DISK_CAP_MB
    return value if value > 0 else None


def apply_file_size_limit() -> None:
    """In the trainer, before the candidate runs: RLIMIT_FSIZE from $ARRL_FILE_LIMIT_MB, if set.
    Python ignores SIGXFSZ, so an oversized write raises OSError (EFBIG) in the candidate."""
    import resource

    limit = os.environ.get(FILE_LIMIT_VAR)
    if limit:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        wanted = int(limit) * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def tree_mb(path: Path) -> float:
    """Disk space used under `path` (allocated blocks, so a sparse file counts what it holds)."""
    total, todo = 0, [str(path)]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total / 2**20


# -- out-of-memory exceptions ---------------------------------------------------------------

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def out_of_memory_detail(exc: BaseException) -> str | None:
    """A one-line description when `exc` means the trainer ran out of memory, else None.

    By name and message, so the launcher never imports torch to ask: torch.cuda.OutOfMemoryError
    (torch.OutOfMemoryError), the CPU allocator's RuntimeError, and Python's MemoryError.
    """
    name = type(exc).__name__
    message = str(exc).strip()
    if not (name == "OutOfMemoryError" or isinstance(exc, MemoryError)
            or any(text in message.lower() for text in _OOM_MESSAGES)):
        return None
    first = message.splitlines()[0] if message else ""
    return f"{name}: {first}"[:300] if first else name


def oom_reason(detail: str, cap_mb: int | None, device: str) -> str:
    """The reason recorded for an out-of-memory exception in the trainer."""
    if device == "cpu" and cap_mb:
        return f"{OOM_PREFIX}memory cap {cap_mb} MB exceeded ({detail})"
    return OOM_PREFIX + detail


# -- the process table ----------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def process_tree(pid: int) -> set[int]:
    """`pid` and its live descendants (while they are still children, setsid or not)."""
    found, todo = {pid}, [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {p for p in found if os.path.exists(f"/proc/{p}")}


def tagged(token: str) -> set[int]:
    """Processes whose environment carries `token` (this process excluded)."""
    needle = f"{RUN_TOKEN_VAR}={token}".encode()
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle + b"\0" in env or env.endswith(needle):
            found.add(int(entry))
    return found


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_tagged(token: str) -> int:
    """SIGKILL every process carrying `token`, again until none is left; returns how many.

    A zombie carries no environment, so one that merely waits to be reaped is not counted.
    """
    killed: set[int] = set()
    for _ in range(KILL_ROUNDS):
        alive = {p for p in tagged(token) if not _zombie(p)}
        if not alive:
            break
        _kill(alive)
        killed |= alive
        time.sleep(0.01)  # SIGKILL is not instant; a forking one may have spawned meanwhile
    return len(killed)


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def memory_mb(pids: set[int]) -> float:
    """Anonymous and shared-memory pages, shared ones split between their users (PSS), in MB.

    Not plain RSS: forked workers share their parent's pages copy-on-write, and summing RSS
    would count those once per process; file pages (torch's libraries) are reclaimable.
    """
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines()[1:] if ":" in line)
            total_kb += sum(int(fields[k].split()[0]) for k in ("Pss_Anon", "Pss_Shmem") if k in fields)
        except (OSError, ValueError):
            continue
    return total_kb / 1024


# -- the watchdog ---------------------------------------------------------------------------

class MemoryWatchdog:
    """Kills a trainer's processes when their memory passes `cap_mb` or the machine runs short.

    `exceeded` holds the recorded reason once it acted; `peak_mb` the most it saw.
    """

    def __init__(self, pid: int, token: str, cap_mb: int | None, workdir: Path | None = None,
                 disk_cap_mb: int | None = None) -> None:
        self.pid = pid
        self.token = token
        self.cap_mb = cap_mb
        self.workdir, self.disk_cap_mb = workdir, disk_cap_mb
        self.exceeded: str | None = None
        self.peak_mb = 0.0
        # Every process seen in the tree, by (pid, start time): one that started with a clean
        # environment (no token) and then left the tree is still found if a poll saw it.
        self.seen: dict[int, str] = {}
        total = machine_memory_mb()
        self.floor_mb = max(PRESSURE_FLOOR_MIN_MB, int(total * PRESSURE_FLOOR_SHARE))

    def check(self, escaped: set[int]) -> str | None:
        """One look: the reason to stop the trainer now, or None."""
        members = process_tree(self.pid) | escaped
        for pid in members - self.seen.keys():
            started = start_time(pid)
            if started is not None:
                self.seen[pid] = started
        used = memory_mb(members)
        self.peak_mb = max(self.peak_mb, used)
        if self.cap_mb and used > self.cap_mb:
            return f"{OOM_PREFIX}memory cap {self.cap_mb} MB exceeded (rss {used:.0f} MB)"
        available = _meminfo().get("MemAvailable")
        if available is not None and available < self.floor_mb and used > self.floor_mb:
            return (f"{OOM_PREFIX}the machine's available memory fell to {available} MB "
                    f"(trainer rss {used:.0f} MB)")
        return None

    async def run(self) -> None:
        """Poll until cancelled, or until it had to kill."""
        import anyio  # here, not at the top: the launcher imports this module in every trainer

        escaped: set[int] = set()
        last_scan = 0.0
        while True:
            await anyio.sleep(POLL_S)
            reason = None
            if time.monotonic() - last_scan > TOKEN_SCAN_S:
                escaped, last_scan = tagged(self.token), time.monotonic()
                reason = self.check_disk()
            reason = reason or self.check(escaped)
            if reason:
                self.exceeded = reason
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.kill_escaped()
                return

    def check_disk(self) -> str | None:
        if self.workdir is None or not self.disk_cap_mb:
            return None
        used = tree_mb(self.workdir)
        if used > self.disk_cap_mb:
            return f"disk cap {self.disk_cap_mb} MB exceeded: its working directory holds {used:.0f} MB"
        return None

    def kill_escaped(self) -> int:
        """Kill whatever carries the token or was seen in the tree and still lives; returns how many."""
        same = {pid for pid, started in self.seen.items() if pid != self.pid and start_time(pid) == started}
        _kill({pid for pid in same if not _zombie(pid)})
        return kill_tagged(self.token) + len(same)
