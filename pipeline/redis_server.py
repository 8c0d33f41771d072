"""A private redis-server: free port, own directory, stopped with its owner.

`arrl run` starts one inside the run directory (with the append-only file on, so a stopped
campaign can be resumed); the tests start throw-away ones and never touch a shared server.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

# Overridable so a developer can point the tests at another build of redis-server.
REDIS_SERVER_ENV = "ARRL_REDIS_SERVER"
START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    """Path of the redis-server binary, or a RuntimeError that says how to get one."""
    name = os.environ.get(REDIS_SERVER_ENV) or "redis-server"
    path = shutil.which(name)
    if not path:
        raise RuntimeError(
            f"{name!r} not found or not executable: the bus tests need a real redis-server >= 7.0 "
            f"(apt-get install redis-server, or set {REDIS_SERVER_ENV} to its path)"
        )
    return path


def free_port() -> int:
    """A port nobody listens on right now (the kernel picks it, so never 6379 by design)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Every running server, so an interrupted session (Ctrl-C, a failing fixture) still kills
# them at interpreter exit instead of leaving redis-servers behind on a shared machine.
_RUNNING: set[RedisServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        server.stop(hard=True)


def _terminate_with_parent() -> None:
    """SIGTERM (a clean AOF flush) when the owner dies, even by SIGKILL; Linux only."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _PortInUse(Exception):
    pass


class RedisServer:
    """One redis-server process; ``restart()`` keeps port and directory (and so the AOF)."""

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None,
                 fsync: str = "always", die_with_parent: bool = False) -> None:
        self.binary = find_redis_server()
        self.directory = Path(directory).resolve()  # redis-server chdirs there: relative paths break
        self.appendonly = appendonly
        self.fsync = fsync  # "always" loses nothing on a hard kill; "everysec" at most a second
        self.die_with_parent = die_with_parent
        self.port = port or free_port()
        # A kernel-picked port can be taken by someone else before redis binds it; only
        # then may start() move to another port. After the first start the port is fixed,
        # because restart() must come back where clients expect it.
        self._may_change_port = port is None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # no RDB snapshots: tests start empty and leave nothing behind
            "dir": str(self.directory),
            "daemonize": "no",
            "logfile": str(self.log_path),
            "appendonly": "yes" if self.appendonly else "no",
        }
        if self.appendonly:
            options["appendfsync"] = self.fsync
        return [self.binary, *(part for name, value in options.items() for part in (f"--{name}", value))]

    def start(self) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        for _attempt in range(3):
            try:
                self._start_once()
                break
            except _PortInUse:
                if not self._may_change_port:
                    raise RuntimeError(f"port {self.port} is in use: {self._log_tail()}") from None
                self.port = free_port()
        else:
            raise RuntimeError("redis-server could not bind a free port in 3 attempts")
        self._may_change_port = False
        return self

    def _start_once(self) -> None:
        # Read only this start's log lines, not an earlier run's, when diagnosing failure.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=_terminate_with_parent if self.die_with_parent else None,
        )
        _RUNNING.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                if self.process.poll() is not None:
                    if "Address already in use" in self._log_tail():
                        raise _PortInUse()
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode}: {self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # still loading the AOF after a restart
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop(hard=True)
                    raise RuntimeError(
                        f"redis-server did not answer PING within {START_TIMEOUT_S}s: {self._log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self, *, hard: bool = False) -> None:
        """SIGTERM (redis flushes the AOF and exits) or, with ``hard``, SIGKILL like a crash."""
        process, self.process = self.process, None
        _RUNNING.discard(self)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5.0)

    def restart(self, *, hard: bool = False) -> RedisServer:
        self.stop(hard=hard)
        return self.start()

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
