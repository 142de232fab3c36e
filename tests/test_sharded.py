"""The sharded learner (torch FSDP2, learner.strategy fsdp) in real processes with gloo: two ranks, each training
its own rollout batch, take the same optimiser steps as one local learner on both batches together (rank 1 built
on the meta device, its shards sent by rank 0, as in a Ray learner group); published weights are the full
weights; a sharded checkpoint resumes exactly, also on another number of ranks."""

import copy

import pytest
import torch
import torch.multiprocessing as mp

from ar2dlm_ray.bench import free_port
from ar2dlm_ray.cluster.weights import WeightSource
from ar2dlm_ray.learner import Learner, shard
from ar2dlm_ray.student import convert

from conftest import tiny_causal_lm
from test_learner import _cfg, _data

STEPS, PER_RANK = 3, 4  # rollouts per rank and step: two minibatches of 2


def _student(tokenizer, dtype, meta: bool = False):
    """`meta`: the architecture alone, as learner ranks other than 0 build it (their shards come from rank 0)."""
    with torch.device("meta" if meta else "cpu"):
        model = tiny_causal_lm("llama", len(tokenizer), seed=4).to(torch.bfloat16).to(dtype)  # bf16-representable
    return convert(model, copy.deepcopy(tokenizer), block_size=2)


def _batches(vocab: int, world: int):
    """[step][rank] -> (rollouts, targets): every token revealed at step 0, so the training states do not
    depend on how the random draws are split between ranks."""
    rollouts, targets = _data(vocab, STEPS * world * PER_RANK, seed=11)
    out = []
    for step in range(STEPS):
        row = []
        for rank in range(world):
            lo = (step * world + rank) * PER_RANK
            row.append((rollouts[lo:lo + PER_RANK], targets[lo:lo + PER_RANK]))
        out.append(row)
    return out


def _config(world: int):
    return _cfg(rollout_batch_size=PER_RANK, minibatch_size=PER_RANK // 2, micro_batch_size=1)


def _rank(rank: int, world: int, port: int, tokenizer, dtypes: list, out: str) -> None:
    """Each dtype's run in turn, in one process group (a spawned process costs seconds of imports)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for dtype in dtypes:
        _train_sharded(rank, world, tokenizer, dtype, f"{out}-{dtype}")
    dist.destroy_process_group()


def _train_sharded(rank: int, world: int, tokenizer, dtype, out: str) -> None:
    import torch.distributed as dist

    student = _student(tokenizer, dtype, meta=rank > 0)
    shard(student, dtype, from_rank0=True)
    learner = Learner(student, _config(world), total_steps=STEPS)
    grads = []
    learner.grad_hook = lambda: grads.append({n: p.grad.full_tensor().float().clone()
                                              for n, p in student.model.named_parameters() if p.grad is not None})
    losses = []
    for step, row in enumerate(_batches(student.spec.teacher_vocab_size, world)):
        losses.append([u["loss"] for u in learner.train_step(*row[rank], step)["updates"]])
    weights = WeightSource.gathered(student.model, torch.float32).state_dict()  # what publication sends
    everyone = [None] * world
    dist.all_gather_object(everyone, losses)
    if rank == 0:
        torch.save({"losses": everyone, "weights": weights, "first_grads": grads[0],
                    "master_has_grad": any(p.grad is not None for p in learner.params)}, out)


def _local(tokenizer, dtype, world: int):
    """One unsharded learner whose minibatch m is every rank's minibatch m together (the ranks' mean loss)."""
    student = _student(tokenizer, dtype)
    cfg = _cfg(rollout_batch_size=PER_RANK * world, minibatch_size=PER_RANK * world // 2, micro_batch_size=1)
    learner = Learner(student, cfg, total_steps=STEPS)
    grads = []
    learner.grad_hook = lambda: grads.append({n: p.grad.float().clone()
                                              for n, p in student.model.named_parameters() if p.grad is not None})
    losses = []
    for step, row in enumerate(_batches(student.spec.teacher_vocab_size, world)):
        losses.append([u["loss"] for u in learner.train_step(*_interleaved(row), step)["updates"]])
    return losses, {k: v.float() for k, v in student.model.state_dict().items()}, grads[0]


@pytest.fixture(scope="module")
def sharded(tokenizer, tmp_path_factory) -> dict:
    """{dtype: rank 0's record} of two sharded ranks training in float32, then in bfloat16."""
    out = tmp_path_factory.mktemp("sharded") / "rank0"
    dtypes = [torch.float32, torch.bfloat16]
    mp.spawn(_rank, args=(2, free_port(), tokenizer, dtypes, str(out)), nprocs=2, join=True)
    return {dtype: torch.load(f"{out}-{dtype}") for dtype in dtypes}


def test_two_sharded_ranks_take_the_local_learners_steps(tokenizer, sharded):
    got = sharded[torch.float32]
    losses, weights, grads = _local(tokenizer, torch.float32, 2)
    for step in range(STEPS):
        for u, want in enumerate(losses[step]):
            mean = sum(rank[step][u] for rank in got["losses"]) / 2  # each rank's loss is over its own rollouts
            assert abs(mean - want) < 1e-5, (step, u, mean, want)
    assert got["weights"].keys() == weights.keys()
    for name, w in weights.items():
        torch.testing.assert_close(got["weights"][name], w, atol=1e-5, rtol=1e-4, msg=name)
    assert not got["master_has_grad"]  # the float32 shards' gradients are freed after each step


def test_bf16_sharded_gradients_match_the_local_bf16_learner(tokenizer, sharded):
    """bf16 compute with float32 shards as masters, against bf16 weights with float32 master copies: the first
    optimiser step's gradients (AdamW's first step flips sign on near-zero gradients, so weights are no test)."""
    got = sharded[torch.bfloat16]["first_grads"]
    _, _, want = _local(tokenizer, torch.bfloat16, 2)
    assert got.keys() == want.keys()
    for name, g in want.items():
        error = float((got[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert error < 2e-2, (name, error)  # bf16 keeps 8 bits: per-tensor relative error of a few 1e-3


def _resharded_rank(rank: int, world: int, port: int, tokenizer, ckpt: str, phase: str, out: str) -> None:
    """phase "save": `world` ranks train step 0, write the sharded checkpoint, then train steps 1-2 on their own
    batches. phase "resume": `world` ranks (another number) load it and train steps 1-2 on the same rollouts,
    split their way."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    student = _student(tokenizer, torch.float32)
    shard(student, torch.float32)
    per_rank = 2 * PER_RANK // world  # the two saving ranks' rollouts, shared among `world` ranks
    learner = Learner(student, _cfg(rollout_batch_size=per_rank, minibatch_size=per_rank // 2, micro_batch_size=1),
                      total_steps=STEPS)
    batches = _batches(student.spec.teacher_vocab_size, 2)
    if phase == "save":
        learner.train_step(*batches[0][rank], 0)
        dcp.save(learner.sharded_state(), checkpoint_id=ckpt)
        if rank == 0:
            torch.save(learner.state_dict(), f"{ckpt}/schedule.pt")
    else:
        state = learner.sharded_state()
        dcp.load(state, checkpoint_id=ckpt)
        learner.load_sharded_state(state)
        learner.load_state_dict(torch.load(f"{ckpt}/schedule.pt", weights_only=True))
    losses = []
    for step in (1, 2):
        if phase == "save":
            rollouts, targets = batches[step][rank]
        else:
            rollouts, targets = _interleaved(batches[step])
            rollouts, targets = rollouts[rank * per_rank:][:per_rank], targets[rank * per_rank:][:per_rank]
        losses.append([u["loss"] for u in learner.train_step(rollouts, targets, step)["updates"]])
    everyone = [None] * world
    dist.all_gather_object(everyone, losses)
    if rank == 0:
        torch.save(everyone, out)
    dist.destroy_process_group()


def _interleaved(row):
    """Both ranks' rollouts of one step as one list, minibatch m of every rank together (see `_local`)."""
    half = PER_RANK // 2
    rollouts, targets = [], []
    for part in (slice(0, half), slice(half, PER_RANK)):
        for r, t in row:
            rollouts += r[part]
            targets += t[part]
    return rollouts, targets


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_exactly_on_another_number_of_ranks(tokenizer, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved, resumed = tmp_path / "saved.pt", tmp_path / "resumed.pt"
    mp.spawn(_resharded_rank, args=(2, free_port(), tokenizer, ckpt, "save", str(saved)), nprocs=2, join=True)
    mp.spawn(_resharded_rank, args=(1, free_port(), tokenizer, ckpt, "resume", str(resumed)), nprocs=1, join=True)
    two, one = torch.load(saved), torch.load(resumed)
    for step in range(2):  # the second step's loss depends on the AdamW moments read back from the shards
        for u in range(2):
            mean = (two[0][step][u] + two[1][step][u]) / 2
            assert abs(one[0][step][u] - mean) < 1e-5, (step, u, one[0][step][u], mean)


@pytest.mark.slow
def test_the_learner_benchmark_compares_like_with_like():
    """`ar2dlm bench learner`: the sharded learner and the replicas it replaced take the same steps (a tiny
    model; the timings of a real run are the benchmark's, not this test's)."""
    from ar2dlm_ray.bench import bench_learner

    result = bench_learner(world=2, steps=3, repeats=1, hidden=64, layers=2, vocab=256, rollouts=2, length=8)
    assert result["same_losses"] and result["replica_step_s"] > 0 and result["fsdp_step_s"] > 0
