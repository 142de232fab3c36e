"""Rendezvous stores listen on the one address they are given, on a port they hold from the start."""

import socket

import pytest

from ar2dlm_ray.cluster.rendezvous import host_store, join_store


def _other_address() -> str | None:
    """A non-loopback address of this machine (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_store_listens_on_its_address_only_and_holds_its_port():
    other = _other_address()
    if other is None:
        pytest.skip("this machine has no non-loopback address")
    store = host_store("127.0.0.1", 2)
    client = join_store("127.0.0.1", store.port, 2)
    client.set("k", "v")
    assert store.get("k") == b"v"
    with pytest.raises(OSError):  # the same port on another interface: nothing listens there
        socket.create_connection((other, store.port), timeout=2).close()
    with socket.socket() as s, pytest.raises(OSError):  # the port is held, not merely probed free
        s.bind(("127.0.0.1", store.port))
