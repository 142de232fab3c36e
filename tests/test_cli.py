"""The command line as users call it: convert a real checkpoint, then sample from it with --json."""

import json
import subprocess
import sys


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "ar2dlm_ray.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_convert_then_sample_json(micro_teacher, tmp_path):
    out = tmp_path / "student"
    info = json.loads(_cli("convert", "--model", micro_teacher, "--out", str(out), "--block-size", "4",
                           "--no-shift").strip().splitlines()[-1])
    assert info["block_size"] == 4 and info["shift"] is False
    result = json.loads(_cli("sample", "--model", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                             "--steps-per-block", "4", "--remasking", "static", "--temperature", "0.8",
                             "--seed", "3", "--json").strip().splitlines()[-1])
    assert set(result) >= {"prompt_ids", "token_ids", "reveal_steps", "text", "forwards"}
    assert 0 < len(result["token_ids"]) <= 12 and len(result["reveal_steps"]) == len(result["token_ids"])
    assert all(0 <= r < 4 for r in result["reveal_steps"])
    blocks = (len(result["token_ids"]) + 3) // 4
    if len(result["token_ids"]) == 12:
        assert result["forwards"] == 4 * blocks
    else:  # ended at EOS: its block stops once everything up to the end is committed
        assert 4 * (blocks - 1) < result["forwards"] <= 4 * blocks


def test_help_lists_every_command():
    text = _cli("--help")
    for cmd in ("convert", "sample", "train", "teacher", "eval", "demo", "bench"):
        assert cmd in text
