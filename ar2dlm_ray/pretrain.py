"""The micro teacher: a small Llama ARLM pretrained on CPU on Shakespeare + the synthetic tasks.

It exists so the whole conversion pipeline can be checked end to end on a laptop, with a teacher whose
knowledge (held-out arithmetic, memorised facts) can be measured exactly before and after conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checks import ConfigError, unwritable_problem
from .config import MICRO_CONTEXT, DataConfig, PretrainConfig
from .data import Corpus, corpus_chunks, default_cache_dir, load_corpus, text_prompts
from .tasks import EOS_TOKEN, PAD_TOKEN, TaskExample, TaskSuite, is_correct

# Bump when the recipe changes so stale cached teachers are not reused.
RECIPE_VERSION = 1
# Share of task documents that are arithmetic (the rest are facts): addition needs far more examples.
ARITH_SHARE = 0.75
EVAL_PER_TASK = 200
# The micro teacher of the default `pretrain` section, shipped inside the package (pretrained on an AMD EPYC with
# torch's AVX512 kernels): the weights depend on the CPU's kernels, so a teacher pretrained elsewhere may differ,
# and the demo would then print another table. MANIFEST records the sha256 of every shipped file.
SHIPPED_TEACHER = Path(__file__).parent / "assets" / "micro_teacher"
MANIFEST = "manifest.json"


def teacher_key(pcfg: PretrainConfig, dcfg: DataConfig) -> str:
    # The default device stays out of the key, so that teachers cached before it existed keep theirs.
    fields = pcfg.model_dump(mode="json", exclude={"cache_dir", "threads"} | ({"device"} if pcfg.device == "cpu" else set()))
    fields["data"] = dcfg.model_dump(mode="json", include={"text_files", "dataset", "dataset_column", "seed"})
    fields["recipe"] = RECIPE_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def teacher_dir(pcfg: PretrainConfig, dcfg: DataConfig) -> Path:
    return Path(pcfg.cache_dir).expanduser() / teacher_key(pcfg, dcfg)


def shipped_teacher(pcfg: PretrainConfig, dcfg: DataConfig) -> Path | None:
    """The shipped micro teacher when the config asks for exactly that teacher (the same cache key), else None;
    a shipped file that differs from its manifest is an error."""
    report = SHIPPED_TEACHER / "pretrain_report.json"
    if not report.is_file() or json.loads(report.read_text())["key"] != teacher_key(pcfg, dcfg):
        return None
    manifest = json.loads((SHIPPED_TEACHER / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        if hashlib.sha256((SHIPPED_TEACHER / name).read_bytes()).hexdigest() != digest:
            raise ConfigError(f"the shipped micro teacher's {name} differs from its manifest ({SHIPPED_TEACHER}); "
                              f"reinstall ar2dlm_ray")
    return SHIPPED_TEACHER


def weights_digest(model_dir: str | Path) -> str:
    """sha256 (first 12 hex digits) of a checkpoint's tensors: names, dtypes, shapes and bytes, in name order
    (file by file for a sharded checkpoint).

    Unlike the file's hash it does not depend on how the safetensors header was written, so two teachers
    have the same digest exactly when they have the same weights.
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file to take a weights digest of")
    h = hashlib.sha256()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def teacher_fingerprint(model_dir: str | Path) -> dict:
    """What identifies a pretrained micro teacher, for telling whether two runs used the same one: its cache
    key, the digest of its weights and of its tokenizer, and where it was trained (thread count, torch's CPU
    kernel set, torch version). Teachers cached before these were recorded get their digests computed here
    and report the rest as None."""
    model_dir = Path(model_dir)
    report_file = model_dir / "pretrain_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return {
        "key": report.get("key", model_dir.name),
        "weights_sha256": report.get("weights_sha256") or weights_digest(model_dir),
        "tokenizer_sha256": report.get("tokenizer_sha256") or file_digest(model_dir / "tokenizer.json"),
        "threads": report.get("threads"),
        "cpu_capability": report.get("cpu_capability"),
        "torch": report.get("torch"),
    }


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with digits split one per token, so addition works digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=1024)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy HF generate, batched with left padding; returns the decoded continuations with special
    tokens kept (so an EOS after the answer is visible to `is_correct`)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    texts: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def teacher_accuracy(model, tokenizer, examples: list[TaskExample], batch_size: int = 64,
                     max_new_tokens: int | None = None) -> dict:
    """Greedy exact-match accuracy per task, plus "overall"."""
    if not examples:
        return {}
    if max_new_tokens is None:  # the longest answer plus room for EOS
        max_new_tokens = 2 + max(len(tokenizer(e.answer, add_special_tokens=False, verbose=False)["input_ids"])
                                 for e in examples)
    texts = greedy_generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    hits: dict[str, list[bool]] = {}
    for e, t in zip(examples, texts):
        hits.setdefault(e.task, []).append(is_correct(e, t))
    acc = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    every = [x for h in hits.values() for x in h]
    acc["overall"] = sum(every) / len(every)
    return acc


class MixtureBatches:
    """Rows of `seq_len` ids: a task_fraction of rows pack whole task documents (each row starts at a
    document start, so the model sees prompts both at position 0 and after EOS); the rest are random
    windows of the Shakespeare stream (documents joined by EOS)."""

    def __init__(self, tokenizer, corpus: Corpus, suite: TaskSuite, pcfg: PretrainConfig):
        eos = tokenizer.eos_token_id
        enc = tokenizer(corpus.train_texts, add_special_tokens=False, verbose=False)["input_ids"]
        self.stream = torch.tensor([i for ids in enc for i in ids + [eos]], dtype=torch.long)
        docs = tokenizer([e.document for e in suite.train_examples()], add_special_tokens=False, verbose=False)["input_ids"]
        self.docs = {"arith": [], "facts": []}
        for e, ids in zip(suite.train_examples(), docs):
            self.docs[e.task].append(ids + [eos])
        self.seq_len, self.batch_size, self.task_fraction = pcfg.seq_len, pcfg.batch_size, pcfg.task_fraction
        self.rng = random.Random(pcfg.seed)
        if len(self.stream) <= self.seq_len:  # pretrain.seq_len, or data.corpus_seq_len for bd3lm's pretrain_mix
            raise ConfigError(f"rows of {self.seq_len} tokens do not fit the training text ({len(self.stream)} "
                              f"tokens); lower pretrain.seq_len (data.corpus_seq_len with data.conversion_corpus="
                              f"pretrain_mix), or add text (data.text_files, data.dataset)")

    def _task_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.seq_len:
            task = "arith" if self.rng.random() < ARITH_SHARE else "facts"
            row.extend(self.rng.choice(self.docs[task]))
        return row[:self.seq_len]

    def next(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):
            if self.rng.random() < self.task_fraction:
                rows.append(torch.tensor(self._task_row(), dtype=torch.long))
            else:
                s = self.rng.randrange(len(self.stream) - self.seq_len)
                rows.append(self.stream[s:s + self.seq_len])
        return torch.stack(rows)


@torch.no_grad()
def _text_loss(model, chunks: list[list[int]]) -> float:
    model.eval()
    ids = torch.tensor(chunks, dtype=torch.long, device=model.device)
    loss = sum(model(input_ids=ids[i:i + 16], labels=ids[i:i + 16]).loss.item() * len(ids[i:i + 16])
               for i in range(0, len(ids), 16)) / len(ids)
    model.train()
    return loss


def pretrain_teacher(pcfg: PretrainConfig, dcfg: DataConfig, log=print) -> Path:
    """Train (or fetch from the cache) the micro teacher; returns its HF model+tokenizer directory."""
    out = teacher_dir(pcfg, dcfg)
    if (out / "pretrain_report.json").is_file():
        return out
    # Checked here, not when the config is validated: a cached teacher needs neither, and a config may be read on
    # another machine (an experiment summarised on a laptop).
    if pcfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("pretrain.device=cuda, but torch sees no GPU here: use pretrain.device=cpu")
    problem = unwritable_problem(out.parent)
    if problem:  # found before, not after, the pretraining
        raise ConfigError(f"pretrain.cache_dir: {problem}; give a writable directory")
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(pcfg.threads or os.cpu_count() or 1)
    torch.manual_seed(pcfg.seed)
    try:
        corpus = load_corpus(dcfg, default_cache_dir())
        suite = TaskSuite(pcfg.num_facts, pcfg.seed)
        tokenizer = train_tokenizer(corpus.train_texts + [e.document for e in suite.train_examples()],
                                    pcfg.vocab_size)
        batches = MixtureBatches(tokenizer, corpus, suite, pcfg)
        log(f"[pretrain] tokenizer ({len(tokenizer)} tokens) and data ready in {time.time() - t0:.1f}s; "
            f"{len(batches.stream):,} text tokens, {len(corpus.train_texts)} train / "
            f"{len(corpus.heldout_texts)} held-out documents")

        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=pcfg.hidden_size, num_hidden_layers=pcfg.num_layers,
            num_attention_heads=pcfg.num_heads, num_key_value_heads=pcfg.num_heads,
            intermediate_size=pcfg.intermediate_size, max_position_embeddings=MICRO_CONTEXT,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(config).float().to(pcfg.device)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        n_params = sum(p.numel() for p in model.parameters())

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=pcfg.lr, betas=(0.9, 0.95))
        warmup = max(1, min(100, pcfg.steps // 10))

        def lr_at(step: int) -> float:  # linear warmup, cosine to 10 %
            if step < warmup:
                return pcfg.lr * (step + 1) / warmup
            frac = (step - warmup) / max(1, pcfg.steps - warmup)
            return pcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

        probe = suite.heldout_examples(64, seed=pcfg.seed + 1)
        model.train()
        t_train, window, losses = time.time(), [], []
        every = max(1, min(100, pcfg.steps // 10))
        for step in range(pcfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ids = batches.next().to(pcfg.device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.append(loss.item())
            losses.append(window[-1])
            if (step + 1) % every == 0 or step + 1 == pcfg.steps:
                log(f"[pretrain] step {step + 1}/{pcfg.steps} loss {sum(window) / len(window):.3f} "
                    f"lr {lr_at(step):.2e} elapsed {time.time() - t0:.0f}s")
                if (step + 1) % (4 * every) == 0 and step + 1 < pcfg.steps:  # cheap progress probe
                    log(f"[pretrain] step {step + 1} accuracy {teacher_accuracy(model, tokenizer, probe)}")
                window = []
        train_s = time.time() - t_train

        accuracy = teacher_accuracy(model, tokenizer, suite.heldout_examples(2 * EVAL_PER_TASK, seed=pcfg.seed))
        heldout_text_loss = None
        if corpus.heldout_texts:
            chunks = corpus_chunks(corpus.heldout_texts, tokenizer, pcfg.seq_len, 64, seed=pcfg.seed,
                                   key="pretrain.seq_len")
            heldout_text_loss = _text_loss(model, chunks)
        samples = []
        model.eval()
        for p in text_prompts(corpus.heldout_texts or corpus.train_texts, tokenizer, 2, 16, seed=pcfg.seed):
            enc = tokenizer(p, return_tensors="pt", add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=48, pad_token_id=tokenizer.pad_token_id)
            samples.append(tokenizer.decode(gen[0], skip_special_tokens=False))
        tail = losses[-max(1, len(losses) // 20):]
        report = {
            "accuracy": accuracy,
            "final_loss": sum(tail) / len(tail),
            "heldout_text_loss": heldout_text_loss,
            "train_seconds": round(train_s, 1),
            "wall_seconds": round(time.time() - t0, 1),
            "num_params": n_params,
            "threads": torch.get_num_threads(),
            # The weights depend on torch's CPU kernels (AVX2, AVX512, ARM...), not on the thread count:
            # measured on 1 to 16 threads, identical; with ATEN_CPU_CAPABILITY=avx2 instead of AVX512, different.
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if pcfg.device == "cuda" else "cpu",
            "text_samples": samples,
            "config": pcfg.model_dump(mode="json"),
            "data": dcfg.model_dump(mode="json", include={"text_files", "dataset", "dataset_column", "seed"}),
            "key": out.name,
        }
        log(f"[pretrain] held-out accuracy {accuracy}, final loss {report['final_loss']:.3f}, held-out text "
            f"loss {heldout_text_loss}, wall {report['wall_seconds']}s")

        # Write into a temporary sibling, then rename: a crash never leaves a half-written teacher.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            report["weights_sha256"] = weights_digest(tmp)
            report["tokenizer_sha256"] = file_digest(tmp / "tokenizer.json")
            (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2))
            os.replace(tmp, out)
        except OSError:
            if not (out / "pretrain_report.json").is_file():  # not just a concurrent run that finished first
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"[pretrain] saved {out} (weights sha256 {report['weights_sha256']}, {report['threads']} threads, "
            f"{report['cpu_capability']})")
        return out
    finally:
        torch.set_num_threads(prev_threads)


if __name__ == "__main__":
    import sys

    from .config import load_config

    cfg = load_config(overrides=sys.argv[1:])
    print(pretrain_teacher(cfg.pretrain, cfg.data))
