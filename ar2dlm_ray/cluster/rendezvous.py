"""Rendezvous stores for the torch.distributed groups between actors (the learner group, the collective
weight broadcast).

The hosting rank binds the listening socket itself and hands it to TCPStore: bound to this node's IP only
(TCPStore on its own listens on every interface) and on a port the OS assigned and that stays held (a port
probed free and then reopened can be taken in between).
"""

from __future__ import annotations

import socket
from datetime import timedelta

from torch.distributed import TCPStore

TIMEOUT = timedelta(seconds=300)


def host_store(addr: str, world: int) -> TCPStore:
    """The master store of a group of `world` processes, listening on `addr` only."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    sock.bind((addr, 0))
    sock.listen()
    port = sock.getsockname()[1]
    # detach(): the store's server owns the descriptor from here on; Python must not close it.
    return TCPStore(addr, port, world, True, TIMEOUT, wait_for_workers=False, master_listen_fd=sock.detach())


def join_store(addr: str, port: int, world: int) -> TCPStore:
    return TCPStore(addr, port, world, False, TIMEOUT)
