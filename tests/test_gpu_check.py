"""The GPU check (ar2dlm_ray/gpu_check.py), run with --tiny on CPU in a process that cannot import the
packages a bare GPU image may lack."""

import json
import math
import subprocess
import sys

import pytest
import torch

# sys.modules[name] = None makes `import name` fail and find_spec report it missing. yaml stays: it is a
# dependency of transformers (through huggingface_hub), so every GPU image has it.
RUN_BLOCKED = """
import sys
for name in ("pydantic", "ray", "vllm"):
    sys.modules[name] = None
from ar2dlm_ray.gpu_check import main
main(sys.argv[1:])
"""

LEARNER_KEYS = {"rollout_len", "prompt_len", "batch_size", "positions", "supervised_tokens", "build_s", "step_s",
                "tokens_per_s", "processed_tokens_per_s", "flops_per_step", "attention_flops_per_step", "mfu",
                "mfu_with_attention", "peak_memory_gib", "loss"}
AGREEMENT_KEYS = {"dtype", "gen_len", "batch_size", "remasking", "temperature", "seed", "identical",
                  "tokens_equal_fraction", "reveal_steps_equal_fraction", "first_difference", "max_abs_logit_diff"}
SAMPLER_KEYS = {"remasking", "threshold", "steps_per_block", "seconds", "tokens", "tokens_per_s", "model_calls",
                "tokens_per_forward", "peak_memory_gib"}
GENERATE_KEYS = {"seconds", "tokens", "tokens_per_s", "peak_memory_gib"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", RUN_BLOCKED, "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_report_has_every_field(report):
    assert set(report) == {"device", "model", "settings", "learner", "production_learner", "sampler_agreement",
                           "sampling", "notes"}
    # Without pydantic (a bare GPU image) the production learner step is skipped with the reason.
    assert "pydantic" in report["production_learner"]["skipped"]
    assert {"name", "type", "peak_bf16_flops", "torch", "cuda", "transformers"} <= set(report["device"])
    assert report["device"]["type"] == "cpu" and report["device"]["peak_bf16_flops"] is None
    assert report["model"]["profile"] == "tiny" and report["model"]["matmul_parameters"] > 0
    lengths = report["settings"]["lengths"]
    assert [row["rollout_len"] for row in report["learner"]] == lengths
    assert [row["gen_len"] for row in report["sampling"]] == lengths
    for row in report["learner"]:
        assert set(row) == LEARNER_KEYS
        assert row["mfu"] is None  # no known peak on CPU
    assert set(report["sampler_agreement"]) == AGREEMENT_KEYS
    for row in report["sampling"]:
        assert set(row["static"]) == SAMPLER_KEYS and set(row["dynamic"]) == SAMPLER_KEYS
        assert set(row["ar_generate"]) == GENERATE_KEYS
        assert row["static_vs_ar"] > 0 and row["dynamic_vs_ar"] > 0
    assert report["notes"]


def test_cached_and_recomputed_rollouts_agree_exactly_in_float32(report):
    agreement = report["sampler_agreement"]
    assert agreement["dtype"] == "float32"
    assert agreement["identical"], agreement
    assert agreement["tokens_equal_fraction"] == 1.0 and agreement["reveal_steps_equal_fraction"] == 1.0
    assert agreement["max_abs_logit_diff"] < 1e-4


def test_throughputs_are_positive(report):
    for row in report["learner"]:
        assert row["tokens_per_s"] > 0 and row["processed_tokens_per_s"] > row["tokens_per_s"]
        assert row["supervised_tokens"] > 0
    for row in report["sampling"]:
        for kind in ("static", "dynamic", "ar_generate"):
            assert row[kind]["tokens_per_s"] > 0
            assert row[kind]["tokens"] == row["batch_size"] * row["gen_len"]  # no EOS: full length


def test_without_cuda_the_full_check_exits_with_one_line(monkeypatch):
    from ar2dlm_ray import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device visible"):
        gpu_check.main(["--out", "unused.json"])


def test_the_production_learner_step_runs_at_world_one_beside_the_plan():
    """The learner the Ray runs use (FSDP2 at world 1, checkpointing, chunked loss), one step on the tiny model;
    on a GPU it records its peak beside the plan's estimate (here on the CPU: the step and the estimate)."""
    from ar2dlm_ray import gpu_check

    result = gpu_check.production_learner(gpu_check.PROFILES["tiny"], torch.device("cpu"), torch.float32, 8, 32)
    assert result["supervised_tokens"] == 32 and result["positions"] == 72
    assert math.isfinite(result["loss"]) and result["loss"] > 0 and result["planned_parts_gib"]
    assert result["peak_memory_gib"] is None  # CUDA only
