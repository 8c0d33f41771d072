"""Opens a TCP connection (loopback here: the guard refuses every internet-family socket)."""
import socket

from frozen_env.harness import Harness

harness = Harness.from_env()
socket.create_connection(("127.0.0.1", 9), timeout=1)
