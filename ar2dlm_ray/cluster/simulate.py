"""Stand-ins for the stages' compute, for the orchestration benchmark (bench_orchestration.py).

The actor classes here subclass the real ones and override only what builds the compute (`build_backend`,
`build_producer`, `build_learner`): pulling, producing, training, the queues, the delivery ledger and weight
publication all run the real actor code. Each stand-in takes a given time per rollout batch (it sleeps:
~29 actors share two cores, so they must not burn CPU) and passes messages of realistic size:

- rollout: `rollouts` Rollouts of `prompt_tokens` + `gen_tokens` token ids with their reveal steps;
- teacher: one TokenTargets per rollout, top-`top_k` float32 log-probs and int64 ids per generated token
  (the HF backend's dtypes), 4,000 x 16 x 12 B = 768 KB per rollout;
- learner: a small student (`student_params` float32 weights) that changes each step and is published by
  the real transport; its optimiser state is a step counter (checkpoints work).

The stage times reach the actors inside their class: `roles(sim)` makes one subclass per pool whose class
attribute `sim` holds them; a class made at run time is pickled by value, so the actor processes get it.

`paper_costs()` derives the stages' relative cost per rollout from published hardware figures for the
paper's Qwen3-8B setting (see its docstring); `BALANCED` is the 4:2:1 ratio under which pools of 16/8/4
are all saturated, the hardest case for the orchestration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..rollout import X0Batch
from ..states import Rollout
from ..teacher import TokenTargets
from .actors import LearnerWorker, RolloutWorker, TeacherServer
from .driver import Roles

SIM_TEACHER = "simulated"  # what stands in for the teacher's path


@dataclass(frozen=True)
class Sim:
    """Seconds per rollout batch of each stage, and the size of what they pass."""

    rollout_s: float  # one rollout worker rolls out one batch (student block-diffusion sampling)
    teacher_s: float  # one teacher replica scores one batch (one prefill)
    train_s: float  # one learner rank trains on one batch (one step)
    rollouts: int = 32  # rollouts per batch
    prompt_tokens: int = 256
    gen_tokens: int = 4000
    top_k: int = 16
    vocab: int = 151_936  # Qwen3's
    tokens_per_forward: float = 2.0  # sampler forwards per rollout = gen_tokens / this (accounting only)
    block_size: int = 4
    student_params: int = 2 * 1024 * 1024  # float32: 8 MB published per step

    def target_bytes(self) -> int:
        """Bytes of teacher targets per batch (log-probs float32 + ids int64)."""
        return self.rollouts * self.gen_tokens * self.top_k * (4 + 8)


def paper_costs(params: float = 8.2e9, prompt: int = 256, gen: int = 4000, sampler_batch: int = 32,
                tokens_per_forward: float = 2.0, layers: int = 36, kv_heads: int = 8, head_dim: int = 128,
                peak_flops: float = 989e12, mfu: float = 0.40, hbm_bytes_s: float = 3.35e12,
                hbm_efficiency: float = 0.6) -> dict[str, float]:
    """Seconds per rollout of each stage for the paper's setting (configs/qwen3_8b.yaml: Qwen3-8B teacher, the
    student its converted copy, bf16, block size 4, 4,000-token rollouts, sampler chunks of 32) on one
    H100 SXM per actor, from published figures: 989 TFLOP/s dense bf16 and 3.35 TB/s HBM (NVIDIA's data sheet),
    ~40 % MFU for large-model training (the Llama 3 paper reports 38-43 % on H100) assumed for training and
    for the teacher's prefill, and 60 % of HBM bandwidth in decode. Assumed, not measured: the dynamic sampler
    reveals 2 tokens per forward on average (block 4, at most 4 steps per block).

    - learner: 6 N FLOPs per token over [prompt | x0 | xt] = P + 2L tokens;
    - teacher: 2 N FLOPs per token over P + L tokens (compute-bound prefill);
    - rollout: memory-bound decode; each forward of a chunk of 32 reads the weights (2 N bytes) and the
      chunk's KV cache at the mean context P + L/2 (2 x layers x kv_heads x head_dim x 2 B per token), and
      L / tokens_per_forward forwards finish the chunk.

    With the defaults: rollout 0.82, teacher 0.18, learner 1.03 s per rollout (~0.8 : 0.17 : 1)."""
    flops_s = peak_flops * mfu
    learner = 6 * params * (prompt + 2 * gen) / flops_s
    teacher = 2 * params * (prompt + gen) / flops_s
    kv = 2 * layers * kv_heads * head_dim * 2
    forward = (2 * params + sampler_batch * (prompt + gen / 2) * kv) / (hbm_bytes_s * hbm_efficiency)
    rollout = gen / tokens_per_forward * forward / sampler_batch
    return {"rollout": rollout, "teacher": teacher, "learner": learner}


def paper_ratios() -> dict[str, float]:
    """`paper_costs` relative to the learner's."""
    costs = paper_costs()
    return {k: v / costs["learner"] for k, v in costs.items()}


BALANCED = {"rollout": 4.0, "teacher": 2.0, "learner": 1.0}  # 16/8/4 saturates all three pools


def _pause(start: float, seconds: float) -> None:
    """Sleep what is left of `seconds` since `start` (building the message counts)."""
    left = seconds - (time.perf_counter() - start)
    if left > 0:
        time.sleep(left)


# ---- the stand-ins -----------------------------------------------------------------------------------
class SimStudent:
    """What the actors need of a student: `.model` (published, checkpointed), `.spec.block_size`, `.device`,
    `.save`."""

    def __init__(self, sim: Sim):
        width = 1024
        layers = max(1, round(sim.student_params / (width * width)))
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
        self.spec = SimpleNamespace(block_size=sim.block_size)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def save(self, path: Path, state: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path / "sim_student.pt")


class SimProducer:
    """X0Producer's interface: `prompts`, `produce(batch, version) -> X0Batch`, taking `sim.rollout_s`."""

    def __init__(self, sim: Sim):
        self.sim = sim
        self.prompts = range(1 << 30)  # only counted (the driver's default number of steps)

    def produce(self, batch: int, version: int) -> X0Batch:
        start = time.perf_counter()
        s = self.sim
        g = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, s.vocab, (s.rollouts, s.gen_tokens), generator=g).tolist()
        steps = max(1, int(s.gen_tokens / s.tokens_per_forward))
        reveal = torch.randint(0, steps, (s.rollouts, s.gen_tokens), generator=g).tolist()
        prompt = list(range(s.prompt_tokens))
        indices = list(range(batch * s.rollouts, (batch + 1) * s.rollouts))
        rollouts = [Rollout(prompt, tokens[i], reveal[i], version, batch, indices[i]) for i in range(s.rollouts)]
        _pause(start, s.rollout_s)
        return X0Batch(batch, indices, s.gen_tokens, rollouts, s.rollouts * steps)


class SimTeacherBackend:
    """A teacher backend: `score` returns top-k targets for every generated token, taking `sim.teacher_s`."""

    model = None

    def __init__(self, sim: Sim):
        self.sim, self.top_k, self.vocab_size = sim, sim.top_k, sim.vocab

    def score(self, pairs) -> list[TokenTargets]:
        start = time.perf_counter()
        k = self.sim.top_k
        out = [TokenTargets(torch.full((len(g), k), -2.0, dtype=torch.float32),
                            torch.arange(len(g) * k, dtype=torch.int64).view(len(g), k) % self.vocab_size)
               for _, g in pairs]
        _pause(start, self.sim.teacher_s)
        return out

    def generate(self, prompts, max_new_tokens, temperature, seed):
        raise NotImplementedError("the simulated teacher only scores (recipe opdlm)")


class SimLearnerCore:
    """Learner's interface: `train_step` (taking `sim.train_s`, with the group's gradient all-reduce when
    there is a group), `state_dict` / `load_state_dict`, `sharded_state` / `load_sharded_state`, `grad_hook`."""

    def __init__(self, student: SimStudent, sim: Sim):
        self.student, self.sim = student, sim
        self.grad_hook = None
        self.steps = 0

    def train_step(self, rollouts: list[Rollout], targets, step: int) -> dict:
        start = time.perf_counter()
        if targets is None or len(targets) != len(rollouts):
            raise ValueError("the simulated learner expects one TokenTargets per rollout")
        if self.grad_hook is not None:
            self.grad_hook()  # the group's all-reduce (of zero gradients): the ranks step together
        with torch.no_grad():  # new weights each step, so each publication is a new version
            for p in self.student.model.parameters():
                p.add_(1e-6)
        self.steps += 1
        supervised = sum(len(r.tokens) for r in rollouts)
        _pause(start, self.sim.train_s)
        update = {"loss": 1.0, "grad_norm": 1.0, "lr": 1e-5, "supervised_tokens": supervised}
        return {"loss": 1.0, "grad_norm": 1.0, "lr": 1e-5, "supervised_tokens": supervised, "optimizer_steps": 1,
                "updates": [update]}

    def state_dict(self) -> dict:
        return {"sim_steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["sim_steps"]

    def sharded_state(self) -> dict:
        return {"sim_steps": torch.tensor(self.steps)}

    def load_sharded_state(self, state: dict) -> None:
        self.steps = int(state["sim_steps"])


# ---- the actor classes -------------------------------------------------------------------------------
class SimTeacher(TeacherServer):
    sim: Sim

    def build_backend(self, cfg, teacher_path: str):
        return SimTeacherBackend(self.sim)


class SimRollout(RolloutWorker):
    sim: Sim

    def build_producer(self, cfg, teacher_path: str):
        return SimStudent(self.sim), SimProducer(self.sim)


class SimLearner(LearnerWorker):
    sim: Sim

    def build_student(self, cfg, teacher_path: str):
        return SimStudent(self.sim)

    def build_learner(self):
        core = SimLearnerCore(self.student, self.sim)
        if self.world > 1:
            core.grad_hook = lambda: _reduce_like_gradients(self.student.model)
        return core


def _reduce_like_gradients(model) -> None:
    """The stand-in's gradient reduction: one all-reduce of the model's size, so the ranks step together."""
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(sum(p.numel() for p in model.parameters())))


def roles(sim: Sim) -> Roles:
    """The three pools' actor classes with `sim` built in (classes made here are pickled by value)."""

    def made(base: type) -> type:
        name = f"{base.__name__}Run"
        return type(name, (base,), {"sim": sim, "__qualname__": name, "__module__": __name__})

    return Roles(teacher=made(SimTeacher), rollout=made(SimRollout), learner=made(SimLearner),
                 teacher_path=lambda cfg, log: SIM_TEACHER)
