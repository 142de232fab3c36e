"""Where x0 comes from (OPDLM.md §8): student rollouts, teacher generations or corpus text, plus the
seeded order in which prompts are consumed. Shared by the local trainer and the rollout actors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import RunConfig
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
        raise ValueError(f"data.max_prompt_tokens ({limit}) is shorter than every prompt (the shortest has "
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
