"""Where commands write, checked before any work: an output never destroys input.

A command writes a new directory (or one that is empty), or replaces one that ar2dlm wrote itself, which it
recognises by the marker file inside; a result file is new, or replaced with --overwrite. Refused, in one
line: the current directory or anything above it, a source the command reads (or anything above it), a
directory that holds files ar2dlm did not write, an existing file without --overwrite, a directory given
where a file is written, and a place that cannot be written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .checks import ConfigError, file_in_path

MARKER = ".ar2dlm_output"


def write_marker(directory: Path, what: str) -> None:
    """Mark `directory` as written by ar2dlm (what it holds), so that a later --overwrite may replace it."""
    (directory / MARKER).write_text(json.dumps({"written_by": "ar2dlm", "holds": what}) + "\n")


def is_marked(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def _common_refusals(path: Path, shown: str, flag: str, sources: dict[str, str]) -> None:
    if _contains(path, Path.cwd().resolve()):
        raise ConfigError(f"{flag} {shown!r} is the current directory or above it, which holds your files; give a "
                          f"new directory, e.g. {flag} out/{path.name or 'result'}")
    for name, source in sources.items():
        if source and _contains(path, Path(source).expanduser().resolve()):
            raise ConfigError(f"{flag} {shown!r} would replace {name} {source!r}, which this command reads; give a "
                              f"new directory")
    blocker = file_in_path(path.parent)
    if blocker is not None:
        raise ConfigError(f"{flag} {shown!r} cannot be written: {str(blocker)!r} is a file; choose another path")
    # Both kinds are written as a temporary sibling, then renamed: the parent is what must be writable.
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {shown!r} cannot be written: no write permission in {str(existing)!r}; choose "
                          f"another path")


def check_output_dir(out: str | Path, flag: str = "--out", overwrite: bool = False,
                     sources: dict[str, str] | None = None) -> Path:
    """The directory `out` resolved, if writing it destroys nothing; else a one-line ConfigError.
    `sources`: what the command reads (name -> path), which the output may not replace."""
    path = Path(out).expanduser().resolve()
    _common_refusals(path, str(out), flag, sources or {})
    if path.is_file():
        raise ConfigError(f"{flag} {str(out)!r} is a file; give a directory that does not exist yet")
    if path.is_dir() and any(path.iterdir()):
        if not is_marked(path):
            raise ConfigError(f"{flag} {str(out)!r} holds files that ar2dlm did not write; give a new or empty "
                              f"directory (nothing there was touched)")
        if not overwrite:
            raise ConfigError(f"{flag} {str(out)!r} holds an earlier ar2dlm output; pass --overwrite to replace it, "
                              f"or give a new directory")
    return path


def check_output_file(out: str | Path, flag: str = "--out", overwrite: bool = False,
                      sources: dict[str, str] | None = None) -> Path:
    """The file `out` resolved, if writing it destroys nothing; else a one-line ConfigError. An existing file is
    replaced only with --overwrite, and never one inside a source the command reads."""
    path = Path(out).expanduser().resolve()
    _common_refusals(path, str(out), flag, sources or {})
    if path.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a directory; give the path of a file, e.g. {flag} "
                          f"{Path(out) / 'result.json'}")
    if path.exists():
        inside = [name for name, source in (sources or {}).items()
                  if source and _contains(Path(source).expanduser().resolve(), path)]
        if inside:
            raise ConfigError(f"{flag} {str(out)!r} is a file of {inside[0]}, which this command reads; give another "
                              f"path")
        if not overwrite:
            raise ConfigError(f"{flag} {str(out)!r} exists; pass --overwrite to replace it, or give another path")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write a result file whole or not at all (a crash or a full disk never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
