"""The memory plan (plan.py) against real tensors and against the fake-tensor measurement of the real code paths
(memory.py); the `ar2dlm plan` command; hub ids resolved offline; the preflight refusal."""

import copy
import json
from pathlib import Path

import pytest
import torch

from ar2dlm_ray.cli import main
from ar2dlm_ray.config import ConfigError, load_config
from ar2dlm_ray.learner import Learner
from ar2dlm_ray.memory import measure_learner, measure_rollout
from ar2dlm_ray.plan import (LearnerSettings, ModelShape, learner_parts, load_model_config, preflight,
                             rollout_parts)
from ar2dlm_ray.student import convert

from conftest import tiny_causal_lm
from test_learner import _data

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_model_state_bytes_are_the_real_tensors_bytes(tokenizer):
    """Weights, float32 masters, gradients and AdamW moments of a bf16 Qwen3 learner after a real step."""
    student = convert(tiny_causal_lm("qwen3", len(tokenizer)).to(torch.bfloat16), copy.deepcopy(tokenizer), block_size=2)
    cfg = load_config(None, ["train.rollout_batch_size=4", "train.minibatch_size=4", "train.micro_batch_size=2",
                             "model.dtype=bfloat16"])
    learner = Learner(student, cfg, total_steps=1)
    grads = []
    learner.grad_hook = lambda: grads.append(_bytes(p.grad for p in learner.params))
    learner.train_step(*_data(student.spec.teacher_vocab_size, 4), 0)
    shape = ModelShape.from_config(student.model.config.to_dict())
    parts = learner_parts(shape, LearnerSettings.from_config(cfg, shape.vocab))
    assert shape.params == sum(p.numel() for p in student.model.parameters())
    assert parts["weights"] == _bytes(student.model.parameters())
    assert parts["master weights (fp32)"] == _bytes(learner.master)
    assert parts["grads"] == grads[0]
    moments = [s[k] for s in learner.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert parts["adamw moments"] == _bytes(moments)


def _small(**overrides):
    info = load_model_config("Qwen/Qwen3-0.6B") | dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                      vocab_size=4000, bos_token_id=1, eos_token_id=2)
    cfg = load_config(CONFIGS / "qwen3_0.6b.yaml", ["data.max_prompt_tokens=128", "curriculum.min_len=8",
                                                    "curriculum.max_len=384", "train.micro_batch_size=2",
                                                    "train.loss_chunk_tokens=256", "sampler.batch_size=4",
                                                    *[f"{k}={v}" for k, v in overrides.items()]])
    return cfg, info


STATES = {"weights", "master weights (fp32)", "adamw moments", "grads", "param shards (fp32)", "grad shards (fp32)",
          "unsharded root + 2 layers", "unsharded layer grads"}


@pytest.mark.parametrize("mode,checkpointing", [("local", False), ("local", True), ("ray", False)])
def test_learner_plan_is_within_ten_percent_of_the_measured_step(mode, checkpointing):
    """The activation, logits and loss part (everything but the model states) and the whole peak; a local
    learner is a full replica with float32 masters, a Ray learner an FSDP2 rank (here of a group of 2)."""
    cfg, info = _small(**{"train.activation_checkpointing": checkpointing, "mode": mode, "model.device": "cpu",
                          "learner.num_workers": 2})
    measured = measure_learner(cfg, info)
    shape = ModelShape.from_config(info)
    parts = learner_parts(shape, LearnerSettings.from_config(cfg, shape.vocab))
    assert ("param shards (fp32)" in parts) == (mode == "ray")
    states = STATES
    planned_acts = sum(v for k, v in parts.items() if k not in states)
    measured_acts = measured["parts"]["activation"] + measured["parts"].get("temp", 0)
    assert measured["generated"] == 384 and measured["rows"] == 4  # two micro-batches of the longest rollouts
    assert abs(planned_acts / measured_acts - 1) < 0.10, (parts, measured)
    assert abs(sum(parts.values()) / measured["total"] - 1) < 0.10


def test_rollout_plan_is_within_ten_percent_of_the_measured_decoding():
    cfg, info = _small()
    measured = measure_rollout(cfg, info)
    planned = sum(rollout_parts(ModelShape.from_config(info), cfg).values())
    assert abs(planned / measured["total"] - 1) < 0.10, measured


def test_hub_ids_resolve_offline_to_the_shipped_config():
    info = load_model_config("Qwen/Qwen3-8B")
    assert info == json.loads((CONFIGS / "models" / "Qwen3-8B" / "config.json").read_text())
    assert round(ModelShape.from_config(info).params / 1e9, 2) == 8.19  # the published 8.2B (untied head)
    assert round(ModelShape.from_config(load_model_config("Qwen/Qwen3-0.6B")).params / 1e9, 2) == 0.60
    with pytest.raises(ConfigError, match="configs/models"):
        load_model_config("Qwen/Qwen3-Unknown")


def test_plan_command_prints_json_and_refuses_a_small_gpu(capsys):
    config = str(CONFIGS / "qwen3_0.6b.yaml")
    assert main(["plan", "--config", config, "--json", "--gpu-memory-gb", "141",
                 "train.activation_checkpointing=true", "teacher.gpu_memory_utilization=0.5"]) == 0
    roomy = json.loads(capsys.readouterr().out)
    assert roomy["fits"] and set(roomy["roles"]) == {"learner", "rollout", "teacher"}
    assert main(["plan", "--config", config, "--json", "--gpu-memory-gb", "4"]) == 0
    tight = json.loads(capsys.readouterr().out)
    assert not tight["fits"] and not tight["roles"]["learner"]["fits"]
    assert tight["roles"]["learner"]["gb"] == pytest.approx(sum(tight["roles"]["learner"]["parts"].values()), abs=0.1)


def test_preflight_names_the_role_and_settings_that_fit():
    # The shipped 8B config fits 80 GB; without checkpointing and on two learners it does not.
    unfit = ["teacher.backend=hf", "train.activation_checkpointing=false", "learner.num_workers=2"]
    preflight(load_config(CONFIGS / "qwen3_8b.yaml", ["teacher.backend=hf"]), 80)
    cfg = load_config(CONFIGS / "qwen3_8b.yaml", unfit)
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 80)
    line = str(err.value)
    assert "\n" not in line and line.startswith("the learner needs")
    assert "the GPU has 80 GB" in line and "learner.num_workers=4" in line
    suggested = line.split("set ")[1].split(" (")[0].split()
    preflight(load_config(CONFIGS / "qwen3_8b.yaml", [*unfit, *suggested]), 80)  # it fits
