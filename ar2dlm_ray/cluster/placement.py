"""Gang placement of the three pools: every actor's resources are reserved (one placement group per pool,
one bundle per actor) before any actor starts, so a job whose pools do not fit never half-starts and holds
what it got. On a cluster that can grow, the reservation waits up to `ray.startup_timeout_s` for the
autoscaler; then it fails with one message naming the shortfall per resource and releases everything. On a
cluster that cannot (an embedded Ray, one started by hand with `ray start`) a shortfall fails at once.

While a job runs, a pool that is scaled up first refills bundles freed by actors scaled away, then reserves a
one-bundle group per further actor (its actor starts when Ray can place it); a scaled-away actor's own
group is removed with it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import ConfigError, RunConfig, StartupError


def bundle(pool) -> dict[str, float]:
    """What one actor of `pool` asks Ray for (resources of 0 left out: a bundle holds positive amounts)."""
    wants = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **(pool.resources or {})}
    return {k: float(v) for k, v in wants.items() if v > 0}


def pools(cfg: RunConfig) -> dict[str, tuple[object, int]]:
    """Each pool's resource settings and size."""
    return {"teacher": (cfg.teacher.pool, cfg.teacher.num_replicas), "rollout": (cfg.rollout, cfg.rollout.num_workers),
            "learner": (cfg.learner, cfg.learner.num_workers)}


def pool_demand(cfg: RunConfig) -> dict[str, float]:
    """Total Ray resources the three pools ask for."""
    demand: dict[str, float] = {}
    for pool, count in pools(cfg).values():
        for key, value in bundle(pool).items():
            demand[key] = demand.get(key, 0.0) + count * value
    return demand


def shortfall(demand: dict[str, float], have: dict[str, float], who: str = "pools", where: str = "cluster has") -> str:
    """'CPU: pools need 14, cluster has 8; GPU: ...' for every resource the cluster lacks ('' if none)."""
    return "; ".join(f"{k}: {who} need {need:g}, {where} {have.get(k, 0.0):g}"
                     for k, need in sorted(demand.items()) if need > have.get(k, 0.0) + 1e-9)


@dataclass
class Reservation:
    """The placement group of each pool (None for a pool that asks for no resources) and which bundle each
    actor holds."""

    groups: dict[str, PlacementGroup | None]
    sizes: dict[str, int]  # bundles in each pool's group
    held: dict[str, tuple[str, int, PlacementGroup]] = field(default_factory=dict)  # actor -> (pool, bundle, group)

    def options(self, pool_name: str, pool, name: str) -> dict:
        """Actor options for actor `name` of the pool: a bundle of its own."""
        opts = {"name": name, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "max_restarts": pool.max_restarts}
        if pool.resources:
            opts["resources"] = dict(pool.resources)
        if self.groups.get(pool_name) is not None:
            group, index = self._bundle(pool_name, pool, name)
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index)
        elif pool.labels:
            opts["label_selector"] = dict(pool.labels)
        return opts

    def _bundle(self, pool_name: str, pool, name: str) -> tuple[PlacementGroup, int]:
        group = self.groups[pool_name]
        taken = {index for p, index, g in self.held.values() if p == pool_name and g == group}
        free = [i for i in range(self.sizes[pool_name]) if i not in taken]
        if not free:  # beyond the reservation the job started with
            group = placement_group([bundle(pool)], name=f"{name}-{secrets.token_hex(4)}",
                                    bundle_label_selector=[dict(pool.labels)] if pool.labels else None)
        self.held[name] = (pool_name, free[0] if free else 0, group)
        return self.held[name][2], self.held[name][1]

    def spare(self, pool_name: str) -> int:
        """Bundles of the pool's reservation that no actor holds (freed by actors scaled away)."""
        group = self.groups.get(pool_name)
        taken = sum(1 for p, _, g in self.held.values() if p == pool_name and g == group)
        return self.sizes[pool_name] - taken if group is not None else 0

    def release_actor(self, name: str) -> None:
        """The actor is gone: its bundle is free again (its own group, if it had one, is removed)."""
        pool_name, _, group = self.held.pop(name, (None, 0, None))
        if group is not None and group != self.groups.get(pool_name):
            remove_placement_group(group)

    def release(self) -> None:
        extra = {id(g): g for p, _, g in self.held.values() if g != self.groups.get(p)}
        for group in [*self.groups.values(), *extra.values()]:
            if group is not None:
                remove_placement_group(group)
        self.held.clear()


def can_grow() -> bool:
    """Whether an autoscaler may add nodes. Without one (a cluster started by `ray start` or `ray.init`) Ray's
    monitor runs the read-only provider, whose node types are the nodes themselves ('node_<node id>'). No
    status yet (an autoscaler still starting, or autoscaler v2, which reports elsewhere) counts as one that may."""
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
    if not status:
        return True
    types = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return not types or any(not re.fullmatch(r"node_[0-9a-f]+", t) for t in types.values())


def reserve(cfg: RunConfig, embedded: bool, log=print) -> Reservation:
    """Reserve every pool, or fail with the shortfall and hold nothing. An embedded Ray or a cluster without an
    autoscaler cannot grow, so there a shortfall fails at once; one that can gets `ray.startup_timeout_s`."""
    demand = pool_demand(cfg)
    short = shortfall(demand, ray.cluster_resources())
    if short and embedded:
        raise ConfigError(f"the pools do not fit on this Ray ({short}); lower rollout.num_workers / *.num_cpus "
                          "(per-pool `num_cpus` may be fractional, e.g. 0.5) or raise ray.num_cpus")
    if short and not can_grow():
        raise StartupError(f"the pools do not fit the cluster ({short}) and no autoscaler can add nodes to it; add "
                           "nodes (`ray start --address ...` on another machine), or lower the pool sizes / "
                           "per-actor resources")
    if short:
        log(f"[ray] the pools do not fit the cluster as it is now ({short}); waiting up to "
            f"ray.startup_timeout_s={cfg.ray.startup_timeout_s:g}s for it to grow")
    groups: dict[str, PlacementGroup | None] = {}
    for name, (pool, count) in pools(cfg).items():
        want = bundle(pool)
        labels = [dict(pool.labels)] * count if pool.labels else None
        # Names are unique cluster-wide: the suffix keeps a resumed job clear of a dying one's groups.
        groups[name] = placement_group([want] * count, strategy="PACK", name=f"{name}-pool-{secrets.token_hex(4)}",
                                       bundle_label_selector=labels) if want else None
    reservation = Reservation(groups, {name: count for name, (_, count) in pools(cfg).items()})
    pending = [g.ready() for g in groups.values() if g is not None]
    try:
        ray.get(pending, timeout=cfg.ray.startup_timeout_s)
    except GetTimeoutError:
        reservation.release()
        have = ray.cluster_resources()
        detail = shortfall(demand, have) or "the resources exist but not together on nodes that match each pool"
        raise StartupError(f"the pools could not be placed within ray.startup_timeout_s={cfg.ray.startup_timeout_s:g}s "
                           f"({detail}); add nodes, or lower the pool sizes / per-actor resources") from None
    return reservation


# ---- memory: the plan against the GPUs, before anything is reserved ---------------------------------------
# GPU memory by Ray's accelerator type (the `accelerator_type:<name>` resource of a node), in GB.
GPU_MEMORY_GB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100": 40, "L40S": 48, "L40": 48, "A10G": 24, "L4": 24,
                 "V100": 16, "T4": 16}


def gpu_roles(cfg: RunConfig) -> tuple[str, ...]:
    return tuple(role for role, pool in (("learner", cfg.learner), ("rollout", cfg.rollout),
                                         ("teacher", cfg.teacher.pool)) if pool.num_gpus)


def cluster_gpu_memory_gb() -> float | None:
    """The smallest memory among the GPUs of the cluster's live nodes, by the accelerator types Ray reports
    (None when it reports none known here)."""
    sizes = [GPU_MEMORY_GB[key.split(":", 1)[1]] for node in ray.nodes() if node.get("Alive")
             for key in node.get("Resources", {}) if key.startswith("accelerator_type:")
             and key.split(":", 1)[1] in GPU_MEMORY_GB]
    return min(sizes) if sizes else None


def check_memory(cfg: RunConfig, log) -> None:
    """The memory plan of every role that runs on GPUs (plan.py), refused in one line when it cannot fit."""
    from ..plan import load_model_config, preflight

    roles = gpu_roles(cfg)
    if not roles:
        return
    gpu_gb = cfg.ray.gpu_memory_gb or cluster_gpu_memory_gb()
    try:
        load_model_config(cfg.model.student or cfg.model.teacher)
    except ConfigError as exc:
        log(f"[plan] the memory plan was not checked: {exc}")
        return
    if gpu_gb is None:
        log("[plan] the memory plan was not checked: the cluster reports no GPU type known here; set "
            "ray.gpu_memory_gb")
        return
    preflight(cfg, gpu_gb, roles)
    log(f"[plan] every role on GPUs fits {gpu_gb:g} GB (ar2dlm plan --config ... shows each part)")
