"""Semi-autoregressive block-diffusion sampler (OPDLM.md §3).

`sample(student, prompts, config)` decodes blocks left to right. Within a block every step runs one
forward over the block, draws a token and a confidence for each masked position, and commits some of
them (`static`: a fixed quota per step; `dynamic`: all above the threshold, at least the quota).

Two interchangeable contexts supply a block's logits: `_CachedContext` keeps the finished blocks' keys
and values (exact, because earlier blocks never attend to later ones) and runs only B positions per step;
`_RecomputeContext` re-runs the whole sequence every step. They must produce identical trajectories.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .checks import ConfigError, context_problem
from .masks import block_causal, with_padding
from .student import Student

if TYPE_CHECKING:  # annotations only: the sampler runs without pydantic (ar2dlm_ray.gpu_check)
    from .config import SamplerConfig


@dataclass
class SampleOutput:
    """Trajectories of one batch. Generated tensors have width `gen_width` (whole blocks)."""

    prompt_ids: list[list[int]]
    prompt_width: int  # left-padded prompt width, a multiple of the block size
    sequences: torch.Tensor  # [batch, prompt_width + gen_width]; pad after each sequence's end
    positions: torch.Tensor  # [batch, prompt_width + gen_width] position ids (prompts start at 0)
    key_valid: torch.Tensor  # [batch, prompt_width + gen_width] False on padding
    gen_lens: torch.Tensor  # [batch] generated tokens kept (EOS included)
    reveal_steps: torch.Tensor  # [batch, gen_width] step within its block at which a token was committed; -1 if none
    forwards: torch.Tensor  # [batch] denoising forwards spent on each sequence
    batch_forwards: int  # model calls, prefill included
    seed: int | None = None
    eos_ids: list[int] = field(default_factory=list)

    @property
    def gen_width(self) -> int:
        return self.sequences.shape[1] - self.prompt_width

    def tokens(self, row: int) -> list[int]:
        return self.sequences[row, self.prompt_width: self.prompt_width + int(self.gen_lens[row])].tolist()

    def reveals(self, row: int) -> list[int]:
        return self.reveal_steps[row, : int(self.gen_lens[row])].tolist()

    def tokens_per_forward(self) -> float:
        return float(self.gen_lens.sum()) / max(1, int(self.forwards.sum()))


def step_quota(block_size: int, steps: int) -> list[int]:
    """How many positions a static step commits: B spread as evenly as possible over min(S, B) steps."""
    steps = min(steps, block_size)
    base, extra = divmod(block_size, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering; removed entries become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator):
    """Return (tokens, confidence) for logits [..., V]."""
    logits = logits.float()
    if cfg.temperature == 0:
        probs = logits.softmax(-1)
        tokens = probs.argmax(-1)
    else:
        filtered = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
        probs = filtered.softmax(-1)
        # Gumbel-max: one uniform draw per vocabulary entry, so a tiny logit difference rarely flips a draw.
        u = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(1e-20, 1.0)
        tokens = (filtered - torch.log(-torch.log(u))).argmax(-1)
    if cfg.confidence == "prob":
        conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
    elif cfg.confidence == "margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    else:
        conf = (probs * probs.clamp_min(1e-30).log()).sum(-1)
    return tokens, conf


def choose_commits(conf: torch.Tensor, masked: torch.Tensor, quota: int, cfg: SamplerConfig) -> torch.Tensor:
    """Boolean [batch, B]: which masked positions to commit this step."""
    conf = conf.masked_fill(~masked, float("-inf"))
    if cfg.remasking == "static":
        count = torch.full((conf.shape[0],), quota, device=conf.device)
    else:
        above = ((conf > cfg.threshold) & masked).sum(-1)
        count = torch.clamp(above, min=quota)
    count = torch.minimum(count, masked.sum(-1))
    order = torch.argsort(conf, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return (rank < count[:, None]) & masked


def first_index(flags: torch.Tensor) -> torch.Tensor:
    """[batch]: the first True position of each row of `flags` [batch, B]; B where there is none."""
    return torch.where(flags.any(-1), flags.float().argmax(-1), flags.shape[1])


def past_settled_eos(block: torch.Tensor, masked: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, B]: the positions after a block's first committed EOS, once nothing before that EOS
    is still masked. The output drops them (§3, step 3), so denoising them would only spend forwards; at
    micro scale, where an answer is a few tokens, they would dominate the count of tokens per forward."""
    first = first_index(torch.isin(block, eos) & ~masked)
    idx = torch.arange(block.shape[1], device=block.device)[None, :]
    settled = ~(masked & (idx < first[:, None])).any(-1)
    return settled[:, None] & (idx > first[:, None])


class _RecomputeContext:
    """Runs [prompt, finished blocks, current block] from scratch at every step (the reference)."""

    def __init__(self, student: Student, seq, positions, key_valid, prompt_width):
        self.student, self.seq, self.positions, self.key_valid = student, seq, positions, key_valid
        self.calls = 0

    def block_logits(self, block: torch.Tensor, start: int) -> torch.Tensor:
        B = block.shape[1]
        self.seq[:, start:start + B] = block
        end = start + B
        allowed = with_padding(block_causal(end, B, device=block.device), self.key_valid[:, :end])
        logits, _ = self.student.forward(self.seq[:, :end], self.positions[:, :end], allowed)
        self.calls += 1
        lo = start - 1 if self.student.spec.shift else start
        return logits[:, lo:lo + B]

    def finish_block(self, block: torch.Tensor, start: int) -> None:
        self.seq[:, start:start + block.shape[1]] = block


class _CachedContext:
    """Keeps keys/values of everything committed; each step runs only the current block.

    A finished block is written to the cache by the first step of the next block (one forward over
    [finished block, new block]), so committing costs no extra model call.
    """

    def __init__(self, student: Student, seq, positions, key_valid, prompt_width):
        self.student, self.positions, self.key_valid = student, positions, key_valid
        self.B = student.spec.block_size
        # No config: every layer keeps all its keys. A config would make sliding-window layers keep only
        # the last window of keys, which `crop` cannot roll back and the explicit masks do not describe.
        self.cache = DynamicCache()
        allowed = with_padding(block_causal(prompt_width, self.B, device=seq.device), key_valid[:, :prompt_width])
        # The head at the last position only: [batch, prompt, vocab] logits would be the prefill's largest tensor.
        logits, self.cache = student.forward(seq[:, :prompt_width], positions[:, :prompt_width], allowed,
                                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.calls = 1
        self.carry = logits[:, -1]  # under `shift` the first position of the next block is predicted here
        self.pending: torch.Tensor | None = None

    def block_logits(self, block: torch.Tensor, start: int) -> torch.Tensor:
        B = self.B
        inputs = block if self.pending is None else torch.cat([self.pending, block], dim=1)
        q_offset = start - (inputs.shape[1] - B)
        end = start + B
        allowed = with_padding(block_causal(inputs.shape[1], B, device=block.device, q_offset=q_offset),
                               self.key_valid[:, :end])
        logits, self.cache = self.student.forward(inputs, self.positions[:, q_offset:end], allowed,
                                                  past_key_values=self.cache, use_cache=True,
                                                  key_positions=self.positions[:, :end],
                                                  logits_to_keep=B + 1 if self.pending is not None else 0)
        self.calls += 1
        self.cache.crop(-B)  # the current block is still changing: keep only what is committed
        if self.pending is not None:
            self.carry = logits[:, -B - 1]  # the finished block's last position
            self.pending = None
        logits = logits[:, -B:]
        if self.student.spec.shift:
            logits = torch.cat([self.carry[:, None], logits[:, :-1]], dim=1)
        return logits

    def finish_block(self, block: torch.Tensor, start: int) -> None:
        self.pending = block.clone()


def layout_prompts(prompts: list[list[int]], block_size: int, gen_width: int, pad_id: int, device):
    """Left-pad prompts to a common width that is a multiple of the block size.

    Returns (sequences, positions, key_valid, prompt_width); generated slots are filled with pad.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    longest = max(len(p) for p in prompts)
    width = math.ceil(longest / block_size) * block_size
    total = width + gen_width
    batch = len(prompts)
    seq = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros((batch, total), dtype=torch.long, device=device)
    key_valid = torch.zeros((batch, total), dtype=torch.bool, device=device)
    for row, ids in enumerate(prompts):
        n = len(ids)
        seq[row, width - n:width] = torch.tensor(ids, dtype=torch.long, device=device)
        positions[row, width - n:] = torch.arange(total - (width - n), device=device)
        key_valid[row, width - n:] = True
    return seq, positions, key_valid, width


@torch.no_grad()
def sample(student: Student, prompts: list[list[int]], cfg: SamplerConfig, seed: int | None = None,
           eos_ids: list[int] | None = None, max_new_tokens: int | None = None) -> SampleOutput:
    """Generate block-diffusion rollouts for a batch of token-id prompts."""
    spec = student.spec
    B = spec.block_size
    device = student.device
    max_new = max_new_tokens or cfg.max_new_tokens
    n_blocks = math.ceil(max_new / B)
    if eos_ids is None:
        eos = student.tokenizer.eos_token_id
        eos_ids = [] if eos is None else [eos]
    pad_id = student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else 0
    problem = context_problem(max(map(len, prompts), default=0), max_new, B,
                              getattr(student.model.config, "max_position_embeddings", None))
    if problem:
        raise ConfigError(problem)
    seq, positions, key_valid, width = layout_prompts(prompts, B, n_blocks * B, pad_id, device)
    batch = len(prompts)
    generator = torch.Generator(device=device)
    if seed is None:
        seed = secrets.randbits(63)
    generator.manual_seed(seed)
    context_cls = _CachedContext if cfg.use_cache else _RecomputeContext
    ctx = context_cls(student, seq, positions, key_valid, width)

    quota = step_quota(B, cfg.steps_per_block)
    reveal = torch.full((batch, n_blocks * B), -1, dtype=torch.long, device=device)
    forwards = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    gen_lens = torch.full((batch,), n_blocks * B, dtype=torch.long, device=device)
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)

    for b in range(n_blocks):
        start = width + b * B
        block = torch.full((batch, B), spec.mask_id, dtype=torch.long, device=device)
        masked = torch.ones((batch, B), dtype=torch.bool, device=device)
        step = 0
        while masked[active].any():
            key_valid[:, start:start + B] = True
            logits = ctx.block_logits(block, start)
            logits[..., spec.mask_id] = float("-inf")  # the mask token is never a prediction
            if cfg.suppress_eos and len(eos_ids):
                logits[..., eos_tensor] = float("-inf")
            tokens, conf = draw(logits, cfg, generator)
            forwards += (active & masked.any(-1)).long()
            commit = choose_commits(conf, masked, quota[min(step, len(quota) - 1)], cfg)
            block = torch.where(commit, tokens, block)
            reveal[:, b * B:(b + 1) * B][commit] = step
            masked &= ~commit
            if len(eos_ids):
                masked &= ~past_settled_eos(block, masked, eos_tensor)
            step += 1
        ctx.finish_block(block, start)
        seq[:, start:start + B] = block
        if len(eos_ids):
            first = first_index(torch.isin(block, eos_tensor) & active[:, None])
            hit = first < B
            gen_lens = torch.where(hit, b * B + first + 1, gen_lens)
            active &= ~hit
        if not active.any():
            break

    gen_lens = gen_lens.clamp(max=max_new)
    # Everything after a sequence's end is padding: not a token, not attended, not supervised.
    idx = torch.arange(n_blocks * B, device=device)[None, :]
    after = idx >= gen_lens[:, None]
    seq[:, width:] = seq[:, width:].masked_fill(after, pad_id)
    key_valid[:, width:] = ~after
    reveal = reveal.masked_fill(after, -1)
    return SampleOutput(
        prompt_ids=[list(p) for p in prompts], prompt_width=width, sequences=seq.cpu(), positions=positions.cpu(),
        key_valid=key_valid.cpu(), gen_lens=gen_lens.cpu(), reveal_steps=reveal.cpu(), forwards=forwards.cpu(),
        batch_forwards=ctx.calls, seed=seed, eos_ids=list(eos_ids),
    )
