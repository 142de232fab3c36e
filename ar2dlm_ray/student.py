"""The student: a Hugging Face causal LM run with block-causal attention and a mask token (OPDLM.md §2).

Conversion does not touch the architecture. Block-causal attention is imposed at every forward by
passing an explicit 4D mask and explicit position ids, which every HF decoder family accepts; the only
weights that change are the mask token's embedding row (when the tokenizer has no spare token).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .checks import SPEC_FILE, ConfigError, StartupError, model_dir_problem, student_spec
from .outputs import is_marked, write_marker

NEW_MASK_TOKEN = "<|mask|>"
_SPARE_TOKEN = re.compile(r"^<\|?(reserved|unused)[\w]*\|?>$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StudentSpec:
    mask_id: int
    mask_token: str
    block_size: int
    shift: bool
    teacher_vocab_size: int  # logits beyond this (an added mask row) are not part of the teacher's vocabulary


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StartupError("model.device is 'cuda' but no CUDA device is visible; use model.device=cpu")
    return torch.device(device)


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa",
                   meta: bool = False):
    """Load a HF causal LM and its tokenizer from a local directory or a hub id, frozen in eval mode.
    `meta`: the architecture only, on the meta device (no weights read or allocated): a learner rank whose
    shards come from rank 0."""
    problem = model_dir_problem(path)
    if problem:
        raise ConfigError(problem)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=_DTYPES[dtype],
                                                         attn_implementation=attn_implementation)
            return model.eval(), _with_pad(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], attn_implementation=attn_implementation
        )
    except Exception as exc:  # damaged files fail in each library's own way (safetensors, tokenizers, json)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"cannot load a causal LM from {path!r}: {reason}; give a complete local model directory "
                          f"(this machine cannot reach the Hugging Face hub)") from exc
    model.to(resolve_device(device)).eval()
    return model, _with_pad(tokenizer)


def _with_pad(tokenizer):
    if tokenizer.pad_token_id is None:
        # Padding is always masked out of attention; any valid id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _vocab_width(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def choose_mask_token(tokenizer) -> tuple[str, int | None]:
    """The tokenizer's mask token, else its first reserved/unused special token, else (NEW_MASK_TOKEN, None)."""
    if tokenizer.mask_token is not None:
        return tokenizer.mask_token, tokenizer.mask_token_id
    spare = sorted(
        (idx, tok) for tok, idx in tokenizer.get_vocab().items() if _SPARE_TOKEN.match(tok)
    )
    if spare:
        idx, tok = spare[0]
        return tok, idx
    return NEW_MASK_TOKEN, None


@torch.no_grad()
def add_mask_token(model, tokenizer) -> tuple[str, int]:
    """Give the model a mask token; a new one gets the mean embedding of the existing vocabulary."""
    token, mask_id = choose_mask_token(tokenizer)
    if mask_id is not None:
        return token, mask_id
    old_len = len(tokenizer)
    tokenizer.add_special_tokens({"mask_token": token})
    mask_id = tokenizer.mask_token_id
    if mask_id >= _vocab_width(model):
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    rows = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != rows[0].data_ptr():
        rows.append(head.weight)
    for weight in rows:
        weight[mask_id] = weight[:old_len].mean(0)
    return token, mask_id


class Student:
    """A causal LM plus the block-diffusion settings it runs under."""

    def __init__(self, model, tokenizer, spec: StudentSpec):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self._layer_types = getattr(model.config, "layer_types", None)
        self._window = model.config.sliding_window if "sliding_attention" in (self._layer_types or ()) else None
        self.compute_dtype: torch.dtype | None = None  # set when sharded: float32 shards, computed in this dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or next(self.model.parameters()).dtype

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def additive_mask(self, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor):
        """Turn a boolean [batch, 1, q, kv] mask into what the HF attention code expects.

        Families with per-layer mask types (Gemma 3) take a dict. Their sliding layers see a key only if
        query_position - key_position < sliding_window, the rule of HF's own sliding-window mask, taken
        over position ids because xt reuses x0's positions and prompts are left-padded.
        """
        if self._layer_types is None:
            return self._additive(allowed)
        masks = {kind: allowed for kind in set(self._layer_types)}
        if self._window is not None:
            near = query_positions[:, None, :, None] - key_positions[:, None, None, :] < self._window
            sliding = allowed & near
            # A padding query past a rollout's end can lose all its keys; like masks.with_padding, give it
            # every key (its output is never read) so that no softmax row is empty.
            masks["sliding_attention"] = sliding | ~sliding.any(-1, keepdim=True)
        return {kind: self._additive(mask) for kind, mask in masks.items()}

    def forward(self, input_ids, position_ids, allowed, past_key_values=None, use_cache=False, key_positions=None,
                logits_to_keep: int | torch.Tensor = 0):
        """Logits for `input_ids` under the boolean attention mask `allowed` ([batch, 1, q, kv]).

        `key_positions` ([batch, kv]) are the position ids of the keys; they default to `position_ids`,
        and differ only when cached keys precede the queries. `logits_to_keep`: the LM head only at these
        columns (a 1-D index tensor), or at the last n (an int; 0 is every column), as in Hugging Face.
        """
        keys = position_ids if key_positions is None else key_positions
        extra = {"logits_to_keep": logits_to_keep} if not isinstance(logits_to_keep, int) or logits_to_keep else {}
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=self.additive_mask(allowed, position_ids, keys),
            past_key_values=past_key_values,
            use_cache=use_cache,
            **extra,
        )
        return out.logits, out.past_key_values

    def supervised_logits(self, batch) -> torch.Tensor:
        """The logits that predict each supervised token of a TrainBatch ([N, V], in `pred_index` order). The
        LM head runs only at the columns that some row supervises: at Qwen3 scale the head over every
        position of [prompt | x0 | xt] is the largest tensor of the step."""
        width = batch.input_ids.shape[1]
        rows, cols = batch.pred_index // width, batch.pred_index % width
        keep = torch.unique(cols)  # sorted
        logits, _ = self.forward(batch.input_ids, batch.positions, batch.allowed, logits_to_keep=keep)
        return logits[rows, torch.searchsorted(keep, cols)]

    def save(self, out_dir: str | Path, state: dict | None = None) -> Path:
        """Write an ordinary HF directory plus our settings, atomically (temp dir, then rename). `state`: the
        weights to write instead of the model's own (a sharded model's, gathered)."""
        return save_hf_dir(self.model, self.tokenizer, out_dir, {SPEC_FILE: json.dumps(asdict(self.spec), indent=2)},
                           state)


def save_hf_dir(model, tokenizer, out_dir: str | Path, extra_files: dict[str, str] | None = None,
                state: dict | None = None) -> Path:
    """Save model + tokenizer (+ extra text files) into a temporary sibling, then rename it into place,
    so that a crash never leaves a half-written model directory. An existing `out_dir` is replaced only
    when it is empty or an earlier output of ar2dlm (its marker): never a directory of someone else's files."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_marked(out_dir):
        raise ConfigError(f"{str(out_dir)!r} holds files that ar2dlm did not write; it is not replaced: give a new "
                          f"or empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    aside = tmp.with_name(tmp.name + "-old")
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({} if state is None else {"state_dict": state}))
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_marker(tmp, "a Hugging Face model directory")
        if out_dir.exists():
            os.replace(out_dir, aside)  # the old copy stays whole until the new one is in place
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not out_dir.exists():
            os.replace(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return out_dir


def convert(model, tokenizer, block_size: int, shift: bool = False) -> Student:
    """Turn a loaded causal LM into a student, in place."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    teacher_vocab = model.config.vocab_size
    token, mask_id = add_mask_token(model, tokenizer)
    spec = StudentSpec(mask_id=mask_id, mask_token=token, block_size=block_size, shift=shift,
                       teacher_vocab_size=teacher_vocab)
    return Student(model, tokenizer, spec)


def is_student_dir(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def load_student(path: str | Path, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa",
                 meta: bool = False) -> Student:
    if not is_student_dir(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a student directory (no {SPEC_FILE}); create one with `ar2dlm convert`"
        )
    spec = StudentSpec(**student_spec(path))
    model, tokenizer = load_causal_lm(str(path), dtype, device, attn_implementation, meta)
    return Student(model, tokenizer, spec)
