"""Attention masks for block diffusion, as boolean tensors (True = may attend).

Positions are block-aligned: position p belongs to block p // block_size. Every function here is plain
tensor code so that the masks can be checked against a naive loop.
"""

from __future__ import annotations

import torch


def block_causal(length: int, block_size: int, device=None, q_offset: int = 0, kv_length: int | None = None):
    """[q, kv] mask: a query attends to every key in its own block and in all earlier blocks.

    `q_offset` places the queries at absolute positions q_offset.. (for cached decoding), keys start at 0.
    """
    kv_length = q_offset + length if kv_length is None else kv_length
    q_block = (torch.arange(length, device=device) + q_offset) // block_size
    k_block = torch.arange(kv_length, device=device) // block_size
    return k_block[None, :] <= q_block[:, None]


def with_padding(mask: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Combine a [q, kv] mask with a [batch, kv] key-validity mask into [batch, 1, q, kv].

    A query whose row has no valid key (a pad position) is given every key instead: its output is never
    read, and an all-masked row would make softmax produce NaN.
    """
    full = mask[None, None, :, :] & key_valid[:, None, None, :]
    empty = ~full.any(-1, keepdim=True)
    return full | (empty & torch.ones_like(full))


def bd3lm_training(prompt_len: int, gen_len: int, block_size: int, device=None) -> torch.Tensor:
    """[T, T] mask for the vectorised [prompt | x0 | xt] layout, T = prompt_len + 2 * gen_len.

    The prompt occupies whole blocks (prompt_len % block_size == 0). Clean tokens (prompt and x0) attend
    block-causally among themselves. Noisy block b of xt attends to the prompt, to the clean blocks
    before b, and to itself bidirectionally; nothing attends to xt from outside its own block.
    """
    if prompt_len % block_size or gen_len % block_size:
        raise ValueError(f"prompt_len ({prompt_len}) and gen_len ({gen_len}) must be multiples of block_size ({block_size})")
    clean = prompt_len + gen_len
    total = clean + gen_len
    idx = torch.arange(total, device=device)
    is_noisy = idx >= clean
    # Block index in the shared coordinate system: xt reuses x0's positions.
    block = torch.where(is_noisy, idx - gen_len, idx) // block_size
    q_noisy, k_noisy = is_noisy[:, None], is_noisy[None, :]
    q_block, k_block = block[:, None], block[None, :]
    clean_to_clean = ~q_noisy & ~k_noisy & (k_block <= q_block)
    noisy_to_clean = q_noisy & ~k_noisy & (k_block < q_block)
    noisy_to_self = q_noisy & k_noisy & (k_block == q_block)
    return clean_to_clean | noisy_to_clean | noisy_to_self
