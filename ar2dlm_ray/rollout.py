"""Where x0 comes from (OPDLM.md §8): student rollouts, teacher generations or corpus text, plus the
seeded order in which prompts are consumed. Shared by the local trainer and the rollout actors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError, RunConfig
from .curriculum import generation_length
from .sampler import sample
from .states import Rollout, rollouts_from_sample
from .student import Student


@dataclass(frozen=True)
class Recipe:
    source: str  # where x0 comes from: student | teacher | corpus
    states: str  # trajectory | random
    distill: bool  # teacher soft targets (True) or the true token with weight 1/t (False)


RECIPES = {
    "opdlm": Recipe("student", "trajectory", True),
    "opdlm_off": Recipe("student", "random", True),
    "kd_off": Recipe("teacher", "random", True),
    "sft": Recipe("teacher", "random", False),
    "bd3lm": Recipe("corpus", "random", False),
}


def task_suite_for(cfg: RunConfig, teacher_path: str | None = None):
    """The task suite a teacher was pretrained with (from its pretrain report), else the config's."""
    import json
    from pathlib import Path

    from .tasks import TaskSuite

    num_facts, seed = cfg.pretrain.num_facts, cfg.pretrain.seed
    report = Path(teacher_path) / "pretrain_report.json" if teacher_path else None
    if report is not None and report.is_file():
        pcfg = json.loads(report.read_text())["config"]
        num_facts, seed = pcfg["num_facts"], pcfg["seed"]
    return TaskSuite(num_facts, seed)


def encode_prompts(cfg: RunConfig, tokenizer, teacher_path: str | None = None) -> list[list[int]]:
    """The distillation prompts of the `data` section, as token ids."""
    from .data import build_prompts, load_corpus

    suite = task_suite_for(cfg, teacher_path)
    prompts = build_prompts(cfg.data, tokenizer, suite, load_corpus(cfg.data))
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    limit = cfg.data.max_prompt_tokens
    kept = [ids for ids in encoded if limit is None or len(ids) <= limit]
    if not kept:
        raise ConfigError(f"data.max_prompt_tokens ({limit}) is shorter than every prompt (the shortest has "
                          f"{min(map(len, encoded))} tokens); raise it")
    return kept


def conversion_corpus(cfg: RunConfig, tokenizer, teacher_path: str | None, n: int) -> list[list[int]]:
    """bd3lm's x0: `n` chunks of `data.corpus_seq_len` tokens of text the teacher never saw (the first half
    of each held-out document); with `data.conversion_corpus: pretrain_mix`, that text mixed with task
    documents in the teacher's pretraining proportions, the micro analogue of converting on a general
    corpus that covers what the evaluation asks."""
    from .data import Corpus, corpus_chunks, load_corpus

    text = load_corpus(cfg.data).conversion_texts
    if cfg.data.conversion_corpus == "heldout_text":
        return corpus_chunks(text, tokenizer, cfg.data.corpus_seq_len, n, cfg.data.seed)
    from .pretrain import MixtureBatches

    mix = cfg.pretrain.model_copy(update={"seq_len": cfg.data.corpus_seq_len, "batch_size": n, "seed": cfg.data.seed})
    return MixtureBatches(tokenizer, Corpus(text, []), task_suite_for(cfg, teacher_path), mix).next().tolist()


class PromptOrder:
    """Which prompts each rollout batch uses: a fresh seeded permutation per epoch (resumable)."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.batches_per_epoch = math.ceil(n_prompts / batch_size)

    def indices(self, batch_index: int) -> list[int]:
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return order[within * self.batch_size:(within + 1) * self.batch_size]


def rollout_seed(train_seed: int, batch_index: int) -> int:
    return train_seed * 1_000_003 + batch_index


def student_rollouts(student: Student, prompts: list[list[int]], indices: list[int], cfg: RunConfig, gen_len: int,
                     seed: int, version: int) -> tuple[list[Rollout], int]:
    """On-policy x0: the student's own block-diffusion samples. Returns (rollouts, denoising forwards)."""
    tok = student.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    student.model.eval()
    rollouts: list[Rollout] = []
    forwards = 0
    size = cfg.sampler.batch_size
    for lo in range(0, len(prompts), size):
        out = sample(student, prompts[lo:lo + size], cfg.sampler, seed=seed + lo, eos_ids=eos, max_new_tokens=gen_len)
        forwards += int(out.forwards.sum())
        rollouts += rollouts_from_sample(out, version, indices[lo:lo + size])
    # Nothing to learn from an empty generation (EOS at once, and EOS is not supervised).
    return [r for r in rollouts if r.tokens], forwards


def teacher_rollouts(teacher, prompts: list[list[int]], indices: list[int], cfg: RunConfig, gen_len: int,
                     seed: int) -> list[Rollout]:
    """Off-policy x0: the teacher's own (autoregressive) samples for the same prompts."""
    gens = teacher.generate(prompts, gen_len, cfg.sampler.temperature, seed)
    return [Rollout(p, g, None, 0, seed, i) for p, g, i in zip(prompts, gens, indices) if g]


def corpus_rollouts(chunks: list[list[int]], bos: int, indices: list[int], gen_len: int, seed: int) -> list[Rollout]:
    """bd3lm's x0: held-out corpus text after a single BOS token, cut to the curriculum length."""
    return [Rollout([bos], chunks[i % len(chunks)][:gen_len], None, 0, seed, i) for i in indices]


@dataclass
class X0Batch:
    """The x0 of one rollout batch, before any teacher scoring."""

    batch: int
    indices: list[int]  # the prompts it consumed
    gen_len: int  # the curriculum's length limit for this batch
    rollouts: list[Rollout]
    sampler_forwards: int


class X0Producer:
    """x0 for rollout batch i, from the recipe's source: the same prompts (PromptOrder), length limit
    (curriculum) and seed (rollout_seed) wherever it runs. The one producer of the local trainer and the rollout
    actors, which is what makes a Ray run with `max_staleness: 0` repeat the local trainer's batches."""

    def __init__(self, cfg: RunConfig, student: Student, teacher, teacher_path: str | None):
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.source = RECIPES[cfg.train.recipe].source
        tok = student.tokenizer
        self.prompts = encode_prompts(cfg, tok, teacher_path)
        self.order = PromptOrder(len(self.prompts), cfg.train.rollout_batch_size, cfg.train.seed)
        self.bos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        self.corpus = conversion_corpus(cfg, tok, teacher_path, len(self.prompts)) if self.source == "corpus" else None

    def produce(self, batch: int, version: int) -> X0Batch:
        """`version`: the weight version the student's rollouts are stamped with."""
        cfg = self.cfg
        indices = self.order.indices(batch)
        gen_len = generation_length(batch, cfg.curriculum, cfg.sampler.max_new_tokens)
        seed = rollout_seed(cfg.train.seed, batch)
        prompts = [self.prompts[i] for i in indices]
        forwards = 0
        if self.source == "corpus":
            rollouts = corpus_rollouts(self.corpus, self.bos, indices, gen_len, seed)
        elif self.source == "teacher":
            rollouts = teacher_rollouts(self.teacher, prompts, indices, cfg, gen_len, seed)
        else:
            rollouts, forwards = student_rollouts(self.student, prompts, indices, cfg, gen_len, seed, version)
        return X0Batch(batch, indices, gen_len, rollouts, forwards)
