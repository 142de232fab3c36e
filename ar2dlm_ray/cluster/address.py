"""Ray cluster addresses: reaching one within a deadline, and the GCS address behind a dashboard URL or
`auto` (the CLI takes what `ray job submit` takes). No torch here: `ar2dlm pools` answers in seconds."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

from ..config import ConfigError


def wait_until_reachable(address: str, timeout_s: float) -> None:
    """Fail within `timeout_s` when nothing listens at a host:port Ray address (ray.init itself retries
    the GCS for minutes, printing only warnings)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address {address!r} is not host:port (or ray://host:port, auto)")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(f"cannot reach a Ray cluster at {address!r} within ray.connect_timeout_s="
                                  f"{timeout_s:g}s ({exc}); start one (`ray start --head`) or fix ray.address / "
                                  "RAY_ADDRESS") from None
            time.sleep(0.5)


def gcs_address(address: str) -> str:
    """The GCS address behind `address`. A dashboard URL: read from its head node's raylet command line (the
    dashboard has no field for it); auto: the one cluster running on this machine (Ray's own `auto` picks the
    newest when there are several)."""
    if address.startswith(("http://", "https://")):
        return _gcs_of_dashboard(address.rstrip("/"))
    if address != "auto":
        return address
    from ray._private.services import find_gcs_addresses

    found = sorted(find_gcs_addresses())
    if len(found) != 1:
        what = f"{len(found)} Ray clusters run on this machine ({', '.join(found)})" if found else \
            "no Ray cluster runs on this machine"
        raise ConfigError(f"--address auto: {what}; give --address (the dashboard URL, e.g. http://127.0.0.1:8265, "
                          "or the GCS address host:6379)")
    return found[0]


def _gcs_of_dashboard(url: str) -> str:
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    request = urllib.request.Request(f"{url}/nodes?view=summary", headers=get_auth_headers_if_auth_enabled({}))
    try:
        text = urllib.request.urlopen(request, timeout=10).read().decode()
    except OSError as exc:
        token = "; it wants the cluster's token: RAY_AUTH_TOKEN or ~/.ray/auth_token" \
            if getattr(exc, "code", None) in (401, 403) else ""
        raise ConfigError(f"--address {url}: the Ray dashboard did not answer ({exc}){token}") from None
    heads = [n for n in json.loads(text)["data"]["summary"] if n.get("raylet", {}).get("isHeadNode")]
    found = re.search(r"--gcs-address=([\w.:\[\]-]+)", json.dumps(heads))
    if not found:
        raise ConfigError(f"--address {url}: the dashboard does not show its cluster's GCS address; give it "
                          "directly (--address host:6379)")
    return found.group(1)
