"""The frozen teacher: scores [prompt, x0] with next-token log-probs (OPDLM.md §4).

A backend implements `score(batch) -> list[TokenTargets]`, where a batch is a list of
(prompt_ids, generated_ids) pairs and target j of a sequence is p_T(· | prompt, x0_<j). The HF backend
lives here; other backends (vLLM) implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .checks import ConfigError
from .student import load_causal_lm


@dataclass
class TokenTargets:
    """Teacher targets for the generated tokens of one sequence."""

    logprobs: torch.Tensor  # [n, K] float32: full vocabulary (K = V) or the top-k
    ids: torch.Tensor | None  # [n, K] token ids of the top-k; None for the full vocabulary

    def __len__(self) -> int:
        return self.logprobs.shape[0]


class TeacherBackend(Protocol):
    vocab_size: int
    top_k: int | None

    def score(self, batch: list[tuple[list[int], list[int]]]) -> list[TokenTargets]: ...


class HFTeacher:
    """A transformers causal LM run with ordinary causal attention; full-vocabulary or top-k targets."""

    def __init__(self, model, tokenizer, top_k: int | None = None, batch_size: int = 16):
        if top_k is not None and top_k > model.config.vocab_size:
            raise ConfigError(f"teacher.top_k ({top_k}) exceeds the teacher's vocabulary ({model.config.vocab_size}); "
                              f"use at most {model.config.vocab_size}, or null for full-vocabulary targets")
        self.model, self.tokenizer = model, tokenizer
        self.top_k, self.batch_size = top_k, batch_size
        self.vocab_size = model.config.vocab_size
        for p in model.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(cls, path: str, top_k: int | None = None, batch_size: int = 16, dtype: str = "float32",
             device: str = "cpu", attn_implementation: str = "sdpa") -> "HFTeacher":
        model, tokenizer = load_causal_lm(path, dtype, device, attn_implementation)
        return cls(model, tokenizer, top_k, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, batch: list[tuple[list[int], list[int]]]) -> list[TokenTargets]:
        out: list[TokenTargets] = []
        for lo in range(0, len(batch), self.batch_size):
            out.extend(self._score_chunk(batch[lo:lo + self.batch_size]))
        return out

    def _score_chunk(self, chunk):
        seqs = [list(p) + list(g) for p, g in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            attn[row, :len(s)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
        results = []
        for row, (prompt, gen) in enumerate(chunk):
            if not prompt:
                raise ValueError("the teacher needs a non-empty prompt to predict the first generated token")
            # Target for generated token j is the logit at the position just before it.
            rows = logits[row, len(prompt) - 1: len(prompt) - 1 + len(gen)].float()
            logp = torch.log_softmax(rows, dim=-1)
            if self.top_k is None:
                results.append(TokenTargets(logp.cpu(), None))
            else:
                top = logp.topk(self.top_k, dim=-1)
                results.append(TokenTargets(top.values.cpu(), top.indices.cpu()))
        return results

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
        """Teacher generations for the off-policy baselines (sft, kd_off); each ends at EOS or the limit."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        results: list[list[int]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for lo in range(0, len(prompts), self.batch_size):
                chunk = prompts[lo:lo + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attn = torch.zeros_like(ids)
                for row, p in enumerate(chunk):
                    ids[row, width - len(p):] = torch.tensor(p)
                    attn[row, width - len(p):] = 1
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=attn.to(self.device), max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                    top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
                )[:, width:].tolist()
                for row in gen:
                    results.append(row[: row.index(eos) + 1] if eos in row else row)
        return results


def build_teacher(cfg, teacher_path: str) -> TeacherBackend:
    """The backend named by `cfg.teacher.backend`, loaded on the configured device."""
    if cfg.teacher.backend == "hf":
        return HFTeacher.load(teacher_path, cfg.teacher.top_k, cfg.teacher.batch_size, cfg.model.dtype,
                              cfg.model.device, cfg.model.attn_implementation)
    from .teacher_vllm import VLLMTeacher  # lazy: vllm is an optional dependency

    t = cfg.teacher
    return VLLMTeacher(teacher_path, t.top_k, t.batch_size, dtype=t.dtype or cfg.model.dtype,
                       max_model_len=t.max_model_len, tensor_parallel_size=t.tensor_parallel_size,
                       gpu_memory_utilization=t.gpu_memory_utilization, max_num_seqs=t.max_num_seqs,
                       max_logprobs=t.max_logprobs, enforce_eager=t.enforce_eager, seed=cfg.train.seed)
