"""The pool controller: a named actor (`pools-controller`, in the job's namespace) through which a user
resizes a running job's pools (`ar2dlm pools scale --address ... rollout=4 teacher=2`) and reads them
(`ar2dlm pools show`). It only relays: the driver takes the requested sizes between steps, starts or
drains actors, and reports the pools back. Requests are checked here, so a bad one is refused at once
with the reason instead of failing inside the job.
"""

from __future__ import annotations

import ray

from ..config import ConfigError
from .address import gcs_address, wait_until_reachable
from .placement import shortfall

CONTROLLER_NAME = "pools-controller"
SCALABLE = ("rollout", "teacher")


def parse_sizes(pairs: list[str]) -> dict[str, int]:
    """['rollout=4', 'teacher=2'] -> {'rollout': 4, 'teacher': 2}; a one-line error for anything else."""
    sizes: dict[str, int] = {}
    for pair in pairs:
        pool, sep, value = pair.partition("=")
        if not sep or not value.strip().isdigit():
            raise ConfigError(f"{pair!r} is not POOL=N with a whole number N, e.g. rollout=4 teacher=2")
        sizes[pool.strip()] = int(value)
    if not sizes:
        raise ConfigError("name at least one pool size, e.g. `ar2dlm pools scale --address auto rollout=4`")
    return sizes


def check_request(sizes: dict[str, int], fixed: dict[str, str]) -> list[str]:
    """What is wrong with a resize request ([] if nothing); `fixed`: pools that cannot change, and why."""
    problems = []
    for pool, n in sizes.items():
        if pool not in SCALABLE:
            why = "its process group is fixed when the job starts; resubmit to change it" if pool == "learner" else \
                f"the pools are {', '.join(SCALABLE)}"
            problems.append(f"pool {pool!r} cannot be resized ({why})")
        elif pool in fixed:
            problems.append(f"pool {pool!r} cannot be resized in this job ({fixed[pool]})")
        elif not isinstance(n, int) or n < 1:
            problems.append(f"{pool}={n}: a pool needs at least one actor")
    return problems


def room_problem(sizes: dict[str, int], state: dict, bundles: dict[str, dict], free: dict[str, float]) -> str | None:
    """Why the cluster cannot place the actors a resize adds now (None if it can): each pool's growth beyond
    its reserved spare bundles, times its actors' resources, against the cluster's `free` resources."""
    demand: dict[str, float] = {}
    for pool, n in sizes.items():
        extra = max(0, n - state["sizes"].get(pool, 0) - state.get("spare", {}).get(pool, 0))
        for key, amount in bundles.get(pool, {}).items():
            demand[key] = demand.get(key, 0.0) + extra * amount
    short = shortfall(demand, free, who="the new actors", where="the cluster has free")
    if not short:
        return None
    asked = " ".join(f"{pool}={n}" for pool, n in sizes.items())
    return f"the cluster cannot place {asked} now ({short}); add nodes or ask for fewer"


class PoolController:
    def __init__(self, fixed: dict[str, str], bundles: dict[str, dict] | None = None):
        self.fixed, self.bundles = fixed, bundles or {}
        self.wanted: dict[str, int] = {}
        self.state: dict = {"sizes": {}, "members": {}, "events": []}

    def scale(self, sizes: dict[str, int]) -> dict:
        """Ask for new sizes; {'error': ...} when refused, else the pools as last reported."""
        problems = check_request(sizes, self.fixed)
        if not problems and (room := room_problem(sizes, self.state, self.bundles, ray.available_resources())):
            problems = [room]
        if problems:
            return {"error": "; ".join(problems)}
        self.wanted.update(sizes)
        return {"accepted": dict(sizes), **self.state}

    def take(self) -> dict[str, int]:
        """The driver: sizes requested since the last call."""
        wanted, self.wanted = self.wanted, {}
        return wanted

    def report(self, state: dict) -> None:
        self.state = state

    def status(self) -> dict:
        return {**self.state, "pending": dict(self.wanted)}

    def members(self, pool: str) -> list[str]:
        return list(self.state["members"].get(pool, []))


def current_members(pool: str) -> list[str]:
    """The pool's live actor names, from the controller ([] where there is none, e.g. outside a job)."""
    try:
        return ray.get(ray.get_actor(CONTROLLER_NAME).members.remote(pool), timeout=30)
    except Exception:  # noqa: BLE001 - no controller: the caller keeps what it has
        return []


def connect_to_job(address: str, run: str | None, log=print):
    """A running run's controller, from outside its job (the CLI). `address`: the dashboard URL (what
    `ray job submit` takes), the GCS address host:port, ray://host:port or auto; `run`: the run's Ray
    namespace, needed only when several runs share the cluster. Connecting makes this process a Ray driver,
    which Ray lists as a short job of its own."""
    gcs = gcs_address(address)
    if not ray.is_initialized():
        if not gcs.startswith("ray://"):
            wait_until_reachable(gcs, 10.0)
        ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
    named = ray.util.list_named_actors(all_namespaces=True)
    runs = sorted(a["namespace"] for a in named if a["name"] == CONTROLLER_NAME)
    if run is None and len(runs) == 1:
        run = runs[0]
    if run not in runs:
        asked = f"no run {run!r} on" if run else "which run on"
        found = f"the runs there: {', '.join(runs)}; pick one with --run NAME" if runs else "no ar2dlm run is there"
        raise ConfigError(f"{asked} the Ray cluster at {gcs}? {found}")
    log(f"[pools] cluster at {gcs}{f' (dashboard {address})' if gcs != address else ''}, run {run!r}")
    return ray.get_actor(CONTROLLER_NAME, namespace=run)
