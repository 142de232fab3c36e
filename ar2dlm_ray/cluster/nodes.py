"""Where a Ray run lives, and what losing a node means for it.

- The run directory: a relative `train.out_dir` is resolved once, by the driver, to an absolute path that
  every actor uses (an actor's working directory is its raylet's, not the driver's). A plain path must be
  one that the learners' nodes see: the driver writes a probe file there and a task on each of those nodes
  reads it back; a node that cannot is refused before any actor starts (a storage URI needs no probe).
- The actors every learner step depends on (queues, ledger, weight registry, pool controller) are placed
  on the driver's node: they live exactly as long as the driver can, so a lost node never takes them.
- A lost node is named in one line (its id and address, and the actors it held); the run stops with it
  when it cannot go on, or goes on while Ray restarts the producers elsewhere.
"""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import ConfigError, RunConfig, RunError
from ..runs import URI

PROBE_TIMEOUT_S = 60.0
NODE_DEATH_WAIT_S = 60.0  # how long Ray may take to declare a node dead once its actors stop answering


def absolute_out_dir(cfg: RunConfig, log: Callable = print) -> RunConfig:
    """The config with `train.out_dir` absolute (resolved against the driver's working directory)."""
    out_dir = cfg.train.out_dir
    if URI.match(out_dir) or Path(out_dir).is_absolute():
        return cfg
    resolved = cfg.model_copy(deep=True)
    resolved.train.out_dir = str(Path(out_dir).absolute())
    log(f"[run] train.out_dir {out_dir} is relative: every actor writes to {resolved.train.out_dir}")
    return resolved


@contextmanager
def loopback_only():
    """While it is entered, a Ray started here takes 127.0.0.1 as its node address, so that every server it
    starts (GCS, raylet, agents, each actor's gRPC port) listens on loopback only. Ray otherwise takes the
    machine's address and many of them listen on all interfaces; its single-machine mode (macOS, Windows)
    uses loopback, and this switch selects it."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def dashboard_warning(host: str) -> str | None:
    """The warning for a dashboard that listens beyond this machine (None on loopback)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"[ray] warning: ray.dashboard_host={host} opens the dashboard and its job API (which runs any "
            "submitted code on this machine) beyond it, guarded only by Ray's token (~/.ray/auth_token; none "
            "with RAY_AUTH_MODE=disabled); keep 127.0.0.1 and reach it through an SSH tunnel")


def driver_node() -> str:
    return ray.get_runtime_context().get_node_id()


def on_driver_node() -> dict:
    """Actor options that place an actor on the driver's node (and keep it there)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=driver_node(), soft=False)}


def bundle_nodes(group) -> list[str]:
    """The node ids that a ready placement group's bundles are on (every alive node for no group: its
    actors may land anywhere)."""
    if group is None:
        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    return list(dict.fromkeys(ray.util.placement_group_table(group)["bundles_to_node_id"].values()))


@ray.remote(num_cpus=0, max_retries=0)
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_visible(out_dir: str, nodes: list[str], who: str) -> None:
    """Refuse a run directory (an absolute path) that any of `nodes` (where `who` run) cannot see."""
    others = [n for n in nodes if n != driver_node()]
    if URI.match(out_dir) or not others:
        return
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = path / f".ar2dlm-probe-{token}"
    probe.write_text(token)
    try:
        seen = ray.get([_read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n, soft=False))
                        .remote(str(probe)) for n in others], timeout=PROBE_TIMEOUT_S)
    finally:
        probe.unlink()
    blind = [n for n, text in zip(others, seen) if text != token]
    if blind:
        raise ConfigError(f"train.out_dir {out_dir} is not visible from {describe(blind[0])}, where {who} run: "
                          "they write and read the run directory there; give a path that every node mounts, e.g. "
                          "train.out_dir=/mnt/shared/runs/micro, or a storage URI, e.g. s3://bucket/runs/micro")


def describe(node_id: str, nodes: list[dict] | None = None) -> str:
    """'node 3f2a1b9c (10.0.0.5:41234)'."""
    info = next((n for n in nodes or ray.nodes() if n["NodeID"] == node_id), {})
    return f"node {node_id[:8]} ({info.get('NodeManagerAddress', '?')}:{info.get('NodeManagerPort', '?')})"


class NodeWatch:
    """The nodes alive when the run started; which of them are gone, and what they held."""

    def __init__(self):
        self.alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self.reported: set[str] = set()

    def lost(self) -> list[dict]:
        return [n for n in ray.nodes() if n["NodeID"] in self.alive and not n["Alive"]]

    def line(self, lost: list[dict], placement: dict[str, list[dict]]) -> str:
        """'node 3f2a1b9c (10.0.0.5:41234) was lost with learner-0, rollout-1' for each lost node."""
        parts = []
        for node in lost:
            held = [info.get("name", "?") for infos in placement.values() for info in infos
                    if info.get("node_id") == node["NodeID"]]
            parts.append(f"{describe(node['NodeID'], [node])} was lost with {', '.join(held) or 'no actor of this run'}")
        return "; ".join(parts)

    def report_new(self, placement: dict[str, list[dict]], log: Callable) -> None:
        """Log each newly lost node once (the run goes on while Ray restarts its actors elsewhere)."""
        new = [n for n in self.lost() if n["NodeID"] not in self.reported]
        if new:
            self.reported |= {n["NodeID"] for n in new}
            log(f"[ray] {self.line(new, placement)}; Ray restarts those that have restarts left where the "
                "reservation allows")

    @contextmanager
    def explaining(self, placement: dict[str, list[dict]], actor=None, what: str = ""):
        """A RunError raised inside names the lost nodes first; so does a failed call to `actor` (`what` it did)."""
        try:
            yield
        except RunError as err:
            raise self.explain(err, placement) from None
        except RayActorError as exc:
            if actor is None:
                raise
            settle(actor)
            raise self.explain(RunError(f"{what} ({type(exc).__name__})", resumable=True), placement) from None

    def explain(self, err: RunError, placement: dict[str, list[dict]]) -> RunError:
        """`err` with the lost nodes named first: it is then the node, not an actor, that failed."""
        lost = self.lost()
        if not lost:
            return err
        return RunError(f"{self.line(lost, placement)}: {err}", resumable=True)


def settle(actor, timeout_s: float = NODE_DEATH_WAIT_S) -> None:
    """Wait until a failed actor answers or Ray declares it dead: it is unavailable before its node (if that is
    what failed) is declared dead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.info.remote(), timeout=max(0.1, deadline - time.monotonic()))
            return
        except ActorUnavailableError:
            time.sleep(0.5)
        except Exception:  # noqa: BLE001 - dead (ActorDiedError), or still silent at the deadline
            return
