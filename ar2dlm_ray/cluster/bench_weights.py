"""Weight publication benchmark: both transports of `weights.py` moving a state dict shaped like
Qwen3-0.6B's (scaled to `params`, random values) from a publisher actor to a receiver actor, against a raw
gloo broadcast of one flat buffer of the same size between two actors. Medians of `repeats` after a
warm-up.

Per transport: `publish_blocks_s` (what `publish()` costs the learner before its next step),
`end_to_end_s` (publish start until the receiver's model holds the version; every version's in
`end_to_end_all_s`), `gb_s` and `vs_raw`.

`ar2dlm bench weights [--params 0.6e9] [--dtype bfloat16] [--repeats 3] [--json] [--out F]`
"""

from __future__ import annotations

import hashlib
import statistics
import time
from datetime import timedelta

import ray
import torch

from .rendezvous import host_store, join_store
from .registry import WeightRegistry
from .weights import build_transport

# Qwen3-0.6B: vocab 151936, hidden 1024, 28 layers, 16 query / 8 key-value heads of 128, MLP 3072, tied
# embeddings; 596M parameters.
VOCAB, HIDDEN, LAYERS, Q, KV, HEAD, MLP = 151936, 1024, 28, 2048, 1024, 128, 3072


def qwen3_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Qwen3-0.6B's tensor shapes with every width scaled so that the total is about `params`."""
    layer = {"q_proj": (Q, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, Q),
             "gate_proj": (MLP, HIDDEN), "up_proj": (MLP, HIDDEN), "down_proj": (HIDDEN, MLP),
             "q_norm": (HEAD,), "k_norm": (HEAD,), "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,)}
    full = VOCAB * HIDDEN + HIDDEN + LAYERS * sum(torch.Size(s).numel() for s in layer.values())
    scale = (params / full) ** 0.5  # matrices dominate, and they grow with the square of the width

    def sized(shape):
        return tuple(max(1, round(d * scale)) for d in shape)

    shapes = {"embed_tokens": sized((VOCAB, HIDDEN)), "norm": sized((HIDDEN,))}
    for i in range(LAYERS):
        shapes.update({f"layers_{i}_{name}": sized(s) for name, s in layer.items()})
    return shapes


def _model(shapes: dict, dtype: torch.dtype, random: bool) -> torch.nn.Module:
    """The tensors as parameters of a bare Module: the transports take a model and use its state_dict."""
    model = torch.nn.Module()
    for name, shape in shapes.items():
        data = torch.randn(shape, dtype=dtype) if random else torch.zeros(shape, dtype=dtype)
        model.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
    return model


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in model.state_dict().values():
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class GlooPeer:
    """One end of the raw gloo baseline: the same group constructor as the collective transport."""

    def __init__(self, nbytes: int):
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8)

    def rendezvous(self) -> tuple[str, int]:
        addr = ray.util.get_node_ip_address()
        self.store = host_store(addr, 2)
        return addr, self.store.port

    def join(self, addr: str, port: int, rank: int) -> None:
        store = self.store if rank == 0 else join_store(addr, port, 2)
        self.group = torch.distributed.ProcessGroupGloo(store, rank, 2, timedelta(seconds=600))

    def broadcast(self) -> float:
        # A one-element broadcast first lines both ranks up, so the timing is the transfer, not the wait.
        self.group.broadcast(torch.zeros(1), 0).wait()
        start = time.perf_counter()
        self.group.broadcast(self.buffer, 0).wait()
        return time.perf_counter() - start


class Publisher:
    """The learner's side: holds the model and publishes versions with the transport."""

    def __init__(self, transport: str, registry, shapes: dict, dtype: torch.dtype):
        torch.manual_seed(0)
        self.model = _model(shapes, dtype, random=True)
        self.transport = build_transport(transport, registry)

    def rendezvous(self) -> tuple[str, int]:
        addr = ray.util.get_node_ip_address()
        self.store = host_store(addr, 2)
        return addr, self.store.port

    def join(self) -> None:
        self.transport.join(self.store, 0, 2, self.model)

    def publish(self, version: int) -> tuple[float, float]:
        """Change the weights (as a training step would), publish; (wall-clock start, seconds blocked)."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.view(-1)[0] = version
        start = time.time()
        return start, self.transport.publish(self.model, version)

    def digest(self) -> str:
        return _digest(self.model)


class Receiver:
    """A rollout worker's side: its own copy of the model, updated by the transport."""

    def __init__(self, transport: str, registry, shapes: dict, dtype: torch.dtype):
        self.model = _model(shapes, dtype, random=False)
        self.transport = build_transport(transport, registry)
        self.version = -1

    def join(self, addr: str, port: int) -> None:
        self.transport.join(join_store(addr, port, 2), 1, 2, self.model)

    def receive(self, version: int) -> tuple[int, float]:
        """Wait for `version` and load it into the model; (version held, wall-clock time it was in place)."""
        self.version = self.transport.receive(self.model, self.version, version, timeout=600)
        return self.version, time.time()

    def digest(self) -> str:
        return _digest(self.model)


def _raw_gloo(nbytes: int, repeats: int) -> float:
    peers = [ray.remote(GlooPeer).options(num_cpus=1).remote(nbytes) for _ in range(2)]
    addr, port = ray.get(peers[0].rendezvous.remote())
    ray.get([p.join.remote(addr, port, r) for r, p in enumerate(peers)])
    times = []
    for r in range(repeats + 1):
        # The transfer ends for both ranks only when the receiver has the data: the slower side counts.
        seconds = max(ray.get([p.broadcast.remote() for p in peers]))
        if r:  # the first one is the warm-up
            times.append(seconds)
    for p in peers:
        ray.kill(p)  # frees both buffers before the transports allocate theirs
    return statistics.median(times)


def _transport(name: str, shapes: dict, dtype: torch.dtype, repeats: int) -> dict:
    registry = ray.remote(WeightRegistry).options(num_cpus=0).remote()
    pub = ray.remote(Publisher).options(num_cpus=1).remote(name, registry, shapes, dtype)
    recv = ray.remote(Receiver).options(num_cpus=1).remote(name, registry, shapes, dtype)
    if name == "collective":
        addr, port = ray.get(pub.rendezvous.remote())
        ray.get([pub.join.remote(), recv.join.remote(addr, port)])
    blocks, e2e = [], []
    for version in range(repeats + 1):
        # The receiver waits first, as a rollout worker asking for a minimum version does.
        received = recv.receive.remote(version)
        start, blocked = ray.get(pub.publish.remote(version))
        got, done = ray.get(received)
        if got != version:
            raise RuntimeError(f"{name}: the receiver got version {got}, not {version}")
        if version:  # version 0 is the warm-up
            blocks.append(blocked)
            e2e.append(done - start)
    identical = ray.get(pub.digest.remote()) == ray.get(recv.digest.remote())
    for actor in (pub, recv, registry):
        ray.kill(actor)
    return {"publish_blocks_s": statistics.median(blocks), "end_to_end_s": statistics.median(e2e),
            "end_to_end_all_s": e2e, "identical": identical}


def bench_weights(params: float = 0.6e9, dtype: str = "bfloat16", repeats: int = 3, log=print) -> dict:
    torch_dtype = getattr(torch, dtype)
    shapes = qwen3_shapes(params)
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    nbytes = numel * torch_dtype.itemsize
    result: dict = {"params": numel, "dtype": dtype, "tensors": len(shapes), "bytes": nbytes, "repeats": repeats}
    # A private Ray: the measurement must not share an object store or CPUs with a running job.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        raw = _raw_gloo(nbytes, repeats)
        result.update(raw_gloo_s=raw, raw_gloo_gb_s=nbytes / raw / 1e9)
        log(f"[bench] raw gloo: {raw:.3f}s, {result['raw_gloo_gb_s']:.2f} GB/s")
        for name in ("object_store", "collective"):
            m = _transport(name, shapes, torch_dtype, repeats)
            m["gb_s"] = nbytes / m["end_to_end_s"] / 1e9
            m["vs_raw"] = m["gb_s"] / result["raw_gloo_gb_s"]
            result[name] = m
            log(f"[bench] {name}: {m}")
    finally:
        ray.shutdown()
    return result
