"""Warm trainers: the next trainer process is started while the current experiment trains.

A warm trainer (`python -m frozen_env.launch --warm KEY --owner PID`) imports torch, loads the
prepared data (onto the GPU where there is one) and creates the CUDA context, then waits on an
abstract unix socket named by KEY. The next job of the same worker adopts it: it sends the
script, the working directory, the environment and the write end of a pipe (SCM_RIGHTS), and
the trainer runs that one script with its output on the pipe, then exits. Each trainer still
runs exactly one experiment, so isolation is unchanged; only start-up is taken off the clock.

The trainer is not the adopting job's child (it was started by the previous job), so the
runner kills it by process group, learns its exit from a pidfd, and its exit status from the
`launcher.exit` event it writes last. It exits by itself when its worker (the owner) dies or
after IDLE_TIMEOUT_S without an adopter, so none is ever left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from frozen_env import containment

IDLE_TIMEOUT_S = 1800.0
ADOPT_TIMEOUT_S = 5.0


def warm_key(worker: str, profile: str, budget_s: float) -> str:
    """An abstract-namespace socket name: no file to clean up, no path-length limit."""
    digest = hashlib.sha256(f"{worker}|{profile}|{budget_s}|{os.environ.get('ARRL_HOME', '')}".encode()).hexdigest()
    return f"\0arrl-warm-{digest[:24]}"


# -- the adopting side (the job, in the runner) -------------------------------------------------

def spawn_warm(key: str, owner_pid: int, env: dict[str, str], log_path: Path | None = None) -> int:
    """Start a warm trainer for the next job; returns its pid. It outlives the caller on purpose."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    # Its own run token, never the caller's: the run that starts it kills whatever carries its
    # own token when it ends, and the adopter reads this one from /proc (frozen_env.containment).
    env = containment.tag(env, containment.new_token())
    try:
        child = subprocess.Popen(
            [sys.executable, "-u", "-m", "frozen_env.launch", "--warm", key.lstrip("\0"), "--owner", str(owner_pid)],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which the adopting runner kills
        )
    finally:
        if log_path:
            out.close()
    return child.pid


def adopt(key: str, script: Path, workdir: Path, env: dict[str, str], events_fd: int,
          gate_fd: int | None = None, events_key: str | None = None) -> tuple[int, int] | None:
    """Hand a script to the warm trainer waiting at `key`: returns (pid, read end of its output), or None.

    `events_fd` is the write end of the harness's event pipe, passed along with the output's;
    `gate_fd`, when given, the read end of the device gate's pipe (frozen_env.gate).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ADOPT_TIMEOUT_S)
    read_fd, write_fd = os.pipe()
    try:
        sock.connect(key)
        # The events key travels in the message, never in the environment the candidate can read.
        spec = json.dumps({"script": str(script), "workdir": str(workdir), "env": env,
                           "key": events_key}).encode()
        fds = [write_fd, events_fd] + ([gate_fd] if gate_fd is not None else [])
        socket.send_fds(sock, [len(spec).to_bytes(4, "big") + spec], fds)
        reply = json.loads(sock.recv(4096) or b"{}")
        pid = int(reply["pid"])
    except (OSError, ValueError, KeyError):
        os.close(read_fd)
        return None
    finally:
        os.close(write_fd)
        sock.close()
    return pid, read_fd


def listening(key: str) -> bool:
    """Whether a warm trainer is ready at `key` (its socket shows in /proc/net/unix, listening);
    looking does not adopt it."""
    name = "@" + key.lstrip("\0")
    try:
        with open("/proc/net/unix") as f:
            # Columns: Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
            return any(cols[-1] == name and cols[3] == "00010000"
                       for cols in (line.split() for line in list(f)[1:]) if len(cols) >= 8)
    except OSError:
        return False


class AdoptedProcess:
    """What the runner needs of a process that is not its child: pid, output, exit."""

    def __init__(self, pid: int, read_fd: int) -> None:
        self.pid = pid
        from frozen_env.transcript import fd_chunks

        self._fd = read_fd
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._exited = False
        self.stdout = fd_chunks(read_fd)

    async def wait(self) -> int | None:
        # A pidfd turns readable when the process exits. Polled, not awaited with wait_readable,
        # because the runner may wait from two tasks at once (the reader and an abort).
        while not self._exited:
            if select.select([self._pidfd], [], [], 0)[0]:
                self._exited = True
                break
            await anyio.sleep(0.02)
        return self.returncode

    def set_exit_code(self, code: int) -> None:
        self.returncode = code

    async def aclose(self) -> None:
        for fd in (self._fd, self._pidfd):
            try:
                os.close(fd)
            except OSError:
                pass


# -- the warm trainer itself ----------------------------------------------------------------

def _watch_owner(owner_pid: int, adopted: threading.Event) -> None:
    started = time.monotonic()
    while not adopted.is_set():
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(0)  # the worker is gone: nobody will adopt us
        if time.monotonic() - started > IDLE_TIMEOUT_S:
            os._exit(0)
        adopted.wait(1.0)


def preload() -> None:
    """Everything but the candidate: torch, the harness, the data on its device, the CUDA context,
    and one throw-away training step, which pays the first-use costs of the usual kernels."""
    from frozen_env import harness
    from frozen_env.data import load_dataset

    profile = harness.profile_from_env()
    harness.preload(load_dataset(with_val=False), profile.device)
    warm_up_kernels(profile.device)


def warm_up_kernels(device: str) -> None:
    """A tiny transformer-shaped step (embedding, linear, RMSNorm, attention, cross-entropy, AdamW).

    The first model built in a process costs about a second on CPU (lazy initialisation of the
    operator libraries); paying it here takes it off the next experiment's wall time.
    """
    import torch
    import torch.nn.functional as F

    emb = torch.nn.Embedding(256, 64).to(device)
    lin = torch.nn.Linear(64, 256, bias=False).to(device)
    opt = torch.optim.AdamW([*emb.parameters(), *lin.parameters()], lr=1e-3)
    x = torch.randint(0, 256, (2, 32), device=device)
    h = F.rms_norm(emb(x), (64,))
    q = h.view(2, 1, 32, 64)
    h = F.scaled_dot_product_attention(q, q, q, is_causal=True).view(2, 32, 64)
    loss = F.cross_entropy(lin(h).view(-1, 256), x.view(-1))
    loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()


def serve(name: str, owner_pid: int) -> dict[str, Any]:
    """Wait for one adopter; set up its script's process environment; return its spec."""
    adopted = threading.Event()
    threading.Thread(target=_watch_owner, args=(owner_pid, adopted), daemon=True).start()
    try:
        os.nice(10)  # preparing must not slow the experiment that is training now
    except OSError:
        pass
    preload()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # back to normal for our own run (allowed for root only)
    except OSError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    conn, _ = listener.accept()
    listener.close()  # one experiment per trainer: later adopters find nobody and start cold
    adopted.set()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int.from_bytes(message[:4], "big")
    while len(message) < 4 + size:
        message += conn.recv(1 << 20)
    spec = json.loads(message[4:4 + size])
    conn.sendall(json.dumps({"pid": os.getpid()}).encode())
    conn.close()
    out = fds[0]
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    token = os.environ.get(containment.RUN_TOKEN_VAR)
    os.environ.update(spec["env"])
    if token:  # what the candidate's children inherit: the token the adopter knows us by
        os.environ[containment.RUN_TOKEN_VAR] = token
    os.environ["ARRL_EVENTS_FD"] = str(fds[1])  # the harness's channel, as numbered in this process
    os.environ.pop("ARRL_GATE_FD", None)
    if len(fds) > 2:
        os.environ["ARRL_GATE_FD"] = str(fds[2])
    os.chdir(spec["workdir"])
    return spec
