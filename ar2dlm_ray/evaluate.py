"""Evaluation of a student (or of its AR teacher, for reference).

- task accuracy: exact answers to held-out task prompts, greedy, under static decoding (one token per
  step) and dynamic decoding at each threshold γ, with tokens per forward for each;
- generation quality: the teacher's per-token NLL of the model's samples from held-out text openings,
  with distinct-2 beside it so that degenerate, repetitive text cannot look good;
- held-out NELBO: the block-diffusion bound per token on held-out text (random states, 1/t weights);
- on-policy KL: the training objective on fresh rollouts from fixed prompts (OPDLM.md §6).
"""

from __future__ import annotations

import torch

from .config import RunConfig, SamplerConfig
from .losses import objective
from .sampler import sample
from .states import Rollout, build_batch, rollouts_from_sample
from .student import Student
from .teacher import HFTeacher

LOSS_CHUNK = 1024  # positions per chunk of the loss (losses.objective): evaluation never holds more in float32


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Unique n-grams / all n-grams over the generations (1.0: no repetition at all)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def teacher_nll(teacher: HFTeacher, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Mean per-token NLL under the teacher of the generated parts of (prompt, generation) pairs."""
    pairs = [(p, g) for p, g in pairs if g]
    if not pairs:
        return float("nan")
    full = HFTeacher(teacher.model, teacher.tokenizer, top_k=None, batch_size=teacher.batch_size)
    total, count = 0.0, 0
    for (_, gen), tt in zip(pairs, full.score(pairs)):
        total -= float(tt.logprobs.gather(-1, torch.tensor(gen)[:, None]).sum())
        count += len(gen)
    return total / count


def _decode_batched(student: Student, prompts: list[list[int]], cfg: SamplerConfig, seed: int, max_new: int):
    outs = [sample(student, prompts[lo:lo + cfg.batch_size], cfg, seed=seed + lo, max_new_tokens=max_new)
            for lo in range(0, len(prompts), cfg.batch_size)]
    tokens = [o.tokens(r) for o in outs for r in range(len(o.prompt_ids))]
    gen = sum(int(o.gen_lens.sum()) for o in outs)
    fwd = sum(int(o.forwards.sum()) for o in outs)
    return tokens, gen / max(1, fwd), outs


def task_accuracy(student: Student, examples, cfg: SamplerConfig, max_new: int, seed: int = 0) -> tuple[float, float]:
    """(accuracy, tokens per forward) of greedy decoding under `cfg` on task examples."""
    from .tasks import is_correct

    tok = student.tokenizer
    prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
    tokens, tpf, _ = _decode_batched(student, prompts, cfg, seed, max_new)
    hits = [is_correct(e, tok.decode(t)) for e, t in zip(examples, tokens)]
    return sum(hits) / len(hits), tpf


@torch.no_grad()
def heldout_nelbo(student: Student, chunks: list[list[int]], samples: int, seed: int, batch_size: int = 16) -> float:
    """Block-diffusion NELBO per token on held-out text: E_t[(1/t) CE on masked tokens], averaged."""
    tok = student.tokenizer
    bos = [tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id]
    rollouts = [Rollout(bos, c) for c in chunks]
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        for lo in range(0, len(rollouts), batch_size):
            batch = build_batch(rollouts[lo:lo + batch_size], student.spec, tok.pad_token_id, states="random",
                                supervise_eos=True, generator=gen).to(student.device)
            values.append(float(objective(student.supervised_logits(batch), batch, student.spec.teacher_vocab_size,
                                          chunk_tokens=LOSS_CHUNK)))
    return sum(values) / len(values)


@torch.no_grad()
def on_policy_kl(student: Student, teacher, prompts: list[list[int]], cfg: SamplerConfig, max_new: int,
                 seed: int = 0, tail: bool = True, supervise_eos: bool = False) -> float:
    """Forward KL to the teacher on trajectory states of fresh rollouts (the OPDLM objective, with the end
    token's position counted when training counts it: otherwise a student that stops at once looks perfect)."""
    tok = student.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    rollouts = []
    for lo in range(0, len(prompts), cfg.batch_size):
        out = sample(student, prompts[lo:lo + cfg.batch_size], cfg, seed=seed + lo, eos_ids=eos, max_new_tokens=max_new)
        rollouts += [r for r in rollouts_from_sample(out) if r.tokens]
    targets = teacher.score([(r.prompt_ids, r.tokens) for r in rollouts])
    batch = build_batch(rollouts, student.spec, tok.pad_token_id, states="trajectory", eos_ids=eos,
                        supervise_eos=supervise_eos, targets=targets,
                        generator=torch.Generator().manual_seed(seed)).to(student.device)
    return float(objective(student.supervised_logits(batch), batch, student.spec.teacher_vocab_size, tail=tail,
                           chunk_tokens=LOSS_CHUNK))


def judge_teacher(cfg: RunConfig, teacher_path: str, backend=None) -> HFTeacher:
    """The full-vocabulary HF teacher that evaluation scores with: the training backend's model when it
    is an HF teacher, else (e.g. a vLLM backend) its own copy loaded from `teacher_path`."""
    model = getattr(backend, "model", None)
    if model is not None:
        return HFTeacher(model, backend.tokenizer, None, cfg.teacher.batch_size)
    return HFTeacher.load(teacher_path, None, cfg.teacher.batch_size, cfg.model.dtype, cfg.model.device,
                          cfg.model.attn_implementation)


class EvalData:
    """The fixed evaluation inputs derived from a run configuration (same for every model compared)."""

    def __init__(self, cfg: RunConfig, tokenizer, teacher_path: str | None = None):
        from .data import corpus_chunks, load_corpus, text_prompts
        from .rollout import task_suite_for

        ev = cfg.eval
        corpus = load_corpus(cfg.data)
        if cfg.data.prompts == "chat":  # a real model: no micro tasks; held-out chat openings as prompts
            from .data import chat_split

            self.examples, self.validation = [], []
            texts = chat_split(cfg.data, tokenizer, heldout=True)[:ev.num_text_prompts]
        else:
            suite = task_suite_for(cfg, teacher_path)
            self.examples = suite.heldout_examples(ev.num_task_prompts, ev.seed)
            self.validation = (suite.validation_examples(ev.num_validation_prompts, ev.seed, self.examples)
                               if ev.num_validation_prompts else [])
            texts = text_prompts(corpus.eval_texts, tokenizer, ev.num_text_prompts, cfg.data.prompt_tokens, ev.seed)
        self.text_prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        self.chunks = corpus_chunks(corpus.eval_texts, tokenizer, cfg.data.corpus_seq_len, ev.num_text_prompts,
                                    ev.seed + 1)


def evaluate_student(student: Student, teacher: HFTeacher, cfg: RunConfig, data: EvalData,
                     samples: list[str] | None = None) -> dict:
    """The metrics of the module docstring; the first `eval.num_samples_shown` generations from the
    held-out text prompts are appended to `samples` when given."""
    ev, B = cfg.eval, student.spec.block_size
    greedy = cfg.sampler.greedy()
    static = greedy.model_copy(update={"remasking": "static", "steps_per_block": B})
    result: dict = {}
    if data.examples:
        result["task_acc_static"], result["tpf_static"] = task_accuracy(student, data.examples, static, ev.max_new_tokens)
        for gamma in ev.thresholds:
            dyn = greedy.model_copy(update={"remasking": "dynamic", "threshold": gamma, "steps_per_block": B})
            acc, tpf = task_accuracy(student, data.examples, dyn, ev.max_new_tokens)
            result[f"task_acc_dynamic@{gamma}"], result[f"tpf_dynamic@{gamma}"] = acc, tpf
    if data.validation:  # for choosing settings; the test prompts above are never used for that
        result["val_acc_static"] = task_accuracy(student, data.validation, static, ev.max_new_tokens)[0]
    tokens, tpf, _ = _decode_batched(student, data.text_prompts, cfg.sampler, ev.seed, ev.max_new_tokens)
    result["gen_teacher_nll"] = teacher_nll(teacher, list(zip(data.text_prompts, tokens)))
    result["gen_distinct_2"] = distinct_n(tokens, 2)
    result["gen_tpf"] = tpf
    if samples is not None:
        samples.extend(student.tokenizer.decode(t) for t in tokens[:ev.num_samples_shown])
    result["heldout_nelbo"] = heldout_nelbo(student, data.chunks, ev.nelbo_samples, ev.seed)
    kl_prompts = data.text_prompts + [student.tokenizer.encode(e.prompt, add_special_tokens=False)
                                      for e in data.examples[:16]]
    result["on_policy_kl"] = on_policy_kl(student, teacher, kl_prompts, cfg.sampler, ev.max_new_tokens, ev.seed,
                                          cfg.teacher.tail, cfg.train.supervise_eos)
    if ev.full_length_kl:
        # The same KL on rollouts that may not stop early: comparable between models that stop at different
        # lengths (a model that ends every answer at once has a small per-token on-policy KL).
        result["on_policy_kl_full_length"] = on_policy_kl(
            student, teacher, kl_prompts, cfg.sampler.model_copy(update={"suppress_eos": True}), ev.max_new_tokens,
            ev.seed, cfg.teacher.tail)
    return result


@torch.no_grad()
def evaluate_teacher(teacher: HFTeacher, cfg: RunConfig, data: EvalData, samples: list[str] | None = None) -> dict:
    """The AR reference row: greedy task accuracy, NLL of its own samples, its AR NLL on held-out text."""
    from .pretrain import teacher_accuracy

    ev = cfg.eval
    result: dict = {}
    if data.examples:
        acc = teacher_accuracy(teacher.model, teacher.tokenizer, data.examples, max_new_tokens=ev.max_new_tokens)
        result = {"task_acc_static": acc["overall"], "tpf_static": 1.0,
                  **{f"task_acc_dynamic@{g}": acc["overall"] for g in ev.thresholds},
                  **{f"tpf_dynamic@{g}": 1.0 for g in ev.thresholds}}
    if data.validation:
        result["val_acc_static"] = teacher_accuracy(teacher.model, teacher.tokenizer, data.validation,
                                                    max_new_tokens=ev.max_new_tokens)["overall"]
    gens = teacher.generate(data.text_prompts, ev.max_new_tokens, cfg.sampler.temperature, ev.seed)
    if samples is not None:
        samples.extend(teacher.tokenizer.decode(g) for g in gens[:ev.num_samples_shown])
    tok = teacher.tokenizer
    bos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    ar_nll = teacher_nll(teacher, [([bos], c) for c in data.chunks])
    return {**result, "gen_teacher_nll": teacher_nll(teacher, list(zip(data.text_prompts, gens))),
            "gen_distinct_2": distinct_n(gens, 2), "gen_tpf": 1.0, "heldout_nelbo": ar_nll, "on_policy_kl": 0.0,
            **({"on_policy_kl_full_length": 0.0} if ev.full_length_kl else {})}


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text table: one row per model, one column per metric."""
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))  # every metric any row has, in order
    head = ["model"] + keys
    lines = [head] + [[name] + [f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)
                                   for v in (r.get(k) for k in keys)]
                      for name, r in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
