"""The experiment runner: the smoke variant of the shipped ablation end to end on a real local Ray, and an
interrupted run that resumes to exactly the result of an uninterrupted one."""

import json
import math
from pathlib import Path

import pytest

from ar2dlm_ray.cli import main
from ar2dlm_ray.config import ConfigError, load_experiment_config
from ar2dlm_ray.experiment import Experiment, RunSpec, mean_ci

CONFIG = "configs/experiments/micro_ablation.yaml"


def test_mean_ci_against_a_direct_computation():
    values = [0.25, 0.5, 0.75]
    ci = mean_ci(values)
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 2)
    assert ci["mean"] == pytest.approx(0.5) and ci["n"] == 3
    assert ci["hi"] - ci["mean"] == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)
    assert mean_ci([0.3]) == {"mean": 0.3, "lo": 0.3, "hi": 0.3, "n": 1}
    assert mean_ci([float("nan")])["n"] == 0


def test_tokens_to_target_interpolates_in_log_tokens():
    from ar2dlm_ray.config import ExperimentConfig
    from ar2dlm_ray.experiment import tokens_to_target

    exp = ExperimentConfig(name="t", run_config="configs/micro.yaml", arms=["opdlm", "bd3lm"], budgets=[1000, 2000, 4000])

    def cells(acc, tokens):
        return {"task_acc_static": {"mean": acc}, "tokens_trained": {"mean": tokens}}

    summary = {"arms": {"opdlm": {"1000": cells(0.2, 1000), "2000": cells(0.6, 2000), "4000": cells(0.7, 4000)},
                        "bd3lm": {"1000": cells(0.1, 1010), "2000": cells(0.2, 2020), "4000": cells(0.3, 4040)}}}
    # 0.4 is halfway from 0.2 to 0.6: halfway between 1000 and 2000 tokens on a log axis.
    assert tokens_to_target(summary, exp, "opdlm", 0.4) == {"budget": 2000, "tokens": pytest.approx(1000 * 2 ** 0.5)}
    assert tokens_to_target(summary, exp, "opdlm", 0.1) == {"budget": 1000, "tokens": 1000}
    assert tokens_to_target(summary, exp, "bd3lm", 0.4) == {"budget": None, "tokens": None, "not_reached_by": 4040}


def _grid_run(arm, lr, seed, val, test=0.5):
    evals = [{"budget": b, "tokens_trained": b + 8, "task_acc_static": test, "tpf_static": 0.9, "val_acc_static": v}
             for b, v in zip((1000, 2000, 4000), val)]
    return {"arm": arm, "seed": seed, "lr": lr, "evals": evals, "accounting": {}, "wall_s": 1.0}


def test_select_lr_averages_validation_over_budgets_and_waits_for_the_grid():
    from ar2dlm_ray.experiment import select_lr

    runs = [_grid_run("opdlm", 1e-3, 0, [0.1, 0.9]), _grid_run("opdlm", 1e-3, 1, [0.2, 0.8]),  # mean 0.5
            _grid_run("opdlm", 5e-4, 0, [0.5, 0.6]), _grid_run("opdlm", 5e-4, 1, [0.4, 0.7])]  # mean 0.55
    chosen = select_lr(runs, "opdlm", [5e-4, 1e-3], [0, 1])
    assert chosen["lr"] == 5e-4 and chosen["scores"] == {"0.0005": pytest.approx(0.55), "0.001": pytest.approx(0.5)}
    assert select_lr(runs[:3], "opdlm", [5e-4, 1e-3], [0, 1]) is None  # a grid run is missing
    assert select_lr(runs, "sft", [5e-4, 1e-3], [0, 1]) is None
    tie = [_grid_run("sft", lr, s, [0.5, 0.5]) for lr in (1e-3, 2.5e-4) for s in (0, 1)]
    assert select_lr(tie, "sft", [1e-3, 2.5e-4], [0, 1])["lr"] == 2.5e-4  # ties go to the smaller rate
    # the same six accuracies arranged otherwise: equal means, but averaged in float the larger rate's
    # mean is one ulp higher; the tie must still go to the smaller rate
    small = [[0.578125, 0.0390625, 0.828125], [0.1953125, 0.3671875, 0.5859375]]
    large = [[0.578125, 0.3671875, 0.828125], [0.1953125, 0.0390625, 0.5859375]]
    ulp = [_grid_run("sft", lr, s, vals) for lr, arranged in ((1e-4, small), (2e-4, large))
           for s, vals in enumerate(arranged)]
    scores = select_lr(ulp, "sft", [1e-4, 2e-4], [0, 1])
    assert scores["scores"]["0.0001"] < scores["scores"]["0.0002"]  # the float means differ ...
    assert scores["lr"] == 1e-4  # ... but the tie goes to the smaller rate


def test_lr_grid_names_the_other_seeds_once_chosen_and_summarises_the_chosen_rate(tmp_path):
    """Grid seeds first; an arm's other seeds appear at its chosen rate once its grid has finished; the
    summary reads only the chosen rate's runs, and shows the grid's validation and test scores."""
    exp = load_experiment_config(CONFIG).model_copy(update={
        "arms": ["opdlm", "sft"], "seeds": [0, 1, 2], "grid_seeds": [0, 1], "lr_grid": [5e-4, 1e-3],
        "budgets": [1000, 2000], "extra_budgets": {}, "results_dir": str(tmp_path)})
    e = Experiment(exp, log=lambda *a: None)
    assert [s.key for s in e.specs()] == [f"{a}-lr{lr:g}-s{s}" for s in (0, 1) for a in ("opdlm", "sft")
                                          for lr in (5e-4, 1e-3)]
    assert e.total_runs() == 2 * (2 * 2 + 1)
    val = {5e-4: [0.3, 0.4], 1e-3: [0.6, 0.7]}
    for seed in (0, 1):
        for lr in (5e-4, 1e-3):
            (tmp_path / exp.name / "runs").mkdir(parents=True, exist_ok=True)
            (tmp_path / exp.name / "runs" / f"opdlm-lr{lr:g}-s{seed}.json").write_text(
                json.dumps(_grid_run("opdlm", lr, seed, val[lr], test=0.2 + seed * 0.1 + lr * 100)))
    specs = [s.key for s in e.specs()]
    assert "opdlm-lr0.001-s2" in specs and not any(k.startswith("sft") and k.endswith("s2") for k in specs)
    assert next(s for s in e.specs() if s.seed == 2).lr == 1e-3
    assert e.run_config(next(s for s in e.specs() if s.seed == 2), "micro").train.lr == 1e-3
    low = e.run_config(RunSpec("sft", 0, (), 6.25e-5), "micro").train  # below the run config's min_lr
    assert low.lr == low.min_lr == 6.25e-5
    # sft's grid has one run so far: shown in the grid table, not chosen from.
    (tmp_path / exp.name / "runs" / "sft-lr0.0005-s0.json").write_text(
        json.dumps(_grid_run("sft", 5e-4, 0, [0.1, 0.3], test=0.25)))
    (tmp_path / exp.name / "reference.json").write_text(json.dumps(
        {"teacher": {"task_acc_static": 1.0}, "before": {"task_acc_static": 0.1}}))
    summary = e.summarize()
    assert summary["lr_grid"]["opdlm"]["lr"] == 1e-3 and "sft" not in summary["lr_grid"]
    rows = {(r["arm"], r["lr"]): r for r in summary["lr_grid_runs"]}
    assert set(rows) == {("opdlm", 5e-4), ("opdlm", 1e-3), ("sft", 5e-4)}
    assert rows[("opdlm", 1e-3)] == {"arm": "opdlm", "lr": 1e-3, "seeds": [0, 1], "val": pytest.approx(0.65),
                                     "test": pytest.approx(0.35), "test_last": pytest.approx(0.35), "chosen": True,
                                     "curve": [{"budget": 1000, "tokens": 1008, "val": pytest.approx(0.6),
                                                "test": pytest.approx(0.35)},
                                               {"budget": 2000, "tokens": 2008, "val": pytest.approx(0.7),
                                                "test": pytest.approx(0.35)}]}
    assert rows[("opdlm", 5e-4)]["chosen"] is False and rows[("opdlm", 5e-4)]["val"] == pytest.approx(0.35)
    assert rows[("sft", 5e-4)]["seeds"] == [0] and rows[("sft", 5e-4)]["chosen"] is None
    report = (tmp_path / exp.name / "report.md").read_text()
    assert "| opdlm | 0.001 | 0, 1 | 0.650 | 0.350 | 0.350 | **yes** |" in report
    assert "| sft | 0.0005 | 0 | 0.200 | 0.250 | 0.250 | grid unfinished |" in report
    assert "at the edge of the grid, so a rate beyond it may be better: opdlm (0.001)." in report
    assert summary["lr_grid"]["opdlm"]["test"]["0.001"] == pytest.approx((0.3 + 0.4) / 2)
    cell = summary["arms"]["opdlm"]["2000"]["task_acc_static"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(0.35)  # only the chosen rate's two seeds
    assert not summary["complete"] and len(summary["runs"]) == 5
    assert summary["teacher_sha256"] == ["not recorded"]  # these runs predate the digest
    assert (tmp_path / exp.name / "lr_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_headline_compares_each_arm_with_opdlm_by_seed():
    """Chat prompts have no task accuracy: the headline is each arm minus opdlm on the sample metrics."""
    from ar2dlm_ray.experiment import format_headline, headline

    exp = load_experiment_config("configs/experiments/smollm2_compare.yaml")
    nll = {("opdlm", 0): 3.0, ("opdlm", 1): 3.4, ("kd_off", 0): 3.5, ("kd_off", 1): 3.6, ("sft", 0): 4.0, ("sft", 1): 3.9}
    runs = [{"arm": a, "seed": s, "evals": [{"budget": exp.budgets[-1], "gen_teacher_nll": v, "gen_distinct_2": 0.9}]}
            for (a, s), v in nll.items()]
    h = headline({"reference": {"teacher": {"gen_teacher_nll": 2.7}}}, exp, runs)
    kd = h["minus_opdlm"]["gen_teacher_nll"]["kd_off"]
    diffs = [0.5, 0.2]
    assert kd["n"] == 2 and kd["mean"] == pytest.approx(0.35)
    assert kd["hi"] - kd["mean"] == pytest.approx(12.706 * math.sqrt(sum((d - 0.35) ** 2 for d in diffs)) / math.sqrt(2))
    assert h["minus_opdlm"]["gen_teacher_nll"]["sft"]["mean"] == pytest.approx(0.75)
    assert set(h["minus_opdlm"]) == {"gen_teacher_nll", "gen_distinct_2"}  # only metrics the runs have
    assert "kd_off 0.350 ±" in format_headline({"headline": h})


def test_headline_names_each_findings_row():
    """Finding 4 has one row per conversion arm with the same claim: the headline tells them apart."""
    from ar2dlm_ray.experiment import format_headline

    summary = json.loads(Path("results/micro_long_cpu/summary.json").read_text())
    lines = [line for line in format_headline(summary).splitlines() if "paper's finding" in line]
    assert len(lines) == len(summary["findings"]) == 6  # two rows per conversion arm: common and own target
    assert [line.rsplit("(", 1)[1].split(")")[0] for line in lines] == [r["id"] for r in summary["findings"]]


def test_bad_experiment_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nrun_config: {CONFIG.replace('experiments/micro_ablation', 'micro')}\n"
                   "budgets: [100, 50]\n")
    with pytest.raises(ConfigError, match="budgets: .*strictly increasing"):
        load_experiment_config(bad)
    bad.write_text("name: x\nrun_config: configs/micro.yaml\nbudgets: [100]\noverrides: [train.lrr=1]\n")
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_experiment_config(bad)
    bad.write_text("name: x\nrun_config: configs/micro.yaml\nbudgets: [100]\nlr_grid: [1.0e-3]\n")
    with pytest.raises(ConfigError, match="lr_grid and grid_seeds go together"):
        load_experiment_config(bad)
    bad.write_text("name: x\nrun_config: configs/micro.yaml\nbudgets: [100]\nlr_grid: [1.0e-3]\ngrid_seeds: [0]\n")
    with pytest.raises(ConfigError, match="eval.num_validation_prompts=N"):
        load_experiment_config(bad)


def test_set_replaces_experiment_fields_and_rejects_typos():
    """`--set` reuses a design under a new name (two arms at a new rate); a misspelt field or a bad value
    fails before any run, and run-config overrides are kept apart from it."""
    exp = load_experiment_config(CONFIG, settings=["name=edges", "arms=[bd3lm, sft]", "seeds=[0, 1]",
                                                  "lr_grid=[3.125e-5, 6.25e-5]"])
    base = load_experiment_config(CONFIG)
    assert (exp.name, exp.arms, exp.seeds, exp.lr_grid) == ("edges", ["bd3lm", "sft"], [0, 1], [3.125e-5, 6.25e-5])
    assert (exp.grid_seeds, exp.budgets, exp.overrides) == (base.grid_seeds, base.budgets, base.overrides)
    with pytest.raises(ConfigError, match="lr_gird: unknown key"):
        load_experiment_config(CONFIG, settings=["lr_gird=[1e-4]"])
    with pytest.raises(ConfigError, match=r"grid_seeds \[0, 1\] must be among seeds \[2\]"):
        load_experiment_config(CONFIG, settings=["seeds=[2]"])
    with pytest.raises(ConfigError, match="positional arguments"):
        load_experiment_config(CONFIG, settings=["overrides=[train.lr=1]"])


def test_resuming_on_another_teacher_is_refused_before_any_run(tmp_path):
    """A micro teacher pretrained on another CPU is another model under the same cache path: results made
    with one teacher take no runs on another. The digest is that of the weights, so one changed value is
    enough to tell them apart."""
    import torch
    from safetensors.torch import save_file

    from ar2dlm_ray.config import StartupError
    from ar2dlm_ray.experiment import teacher_digest

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")  # enough for the config's check; no model is loaded
    save_file({"w": torch.zeros(4)}, str(teacher / "model.safetensors"))
    original = teacher_digest(str(teacher))
    save_file({"w": torch.tensor([0.0, 0.0, 0.0, 1e-7])}, str(teacher / "model.safetensors"))
    current = teacher_digest(str(teacher))
    assert original != current and teacher_digest("Qwen/Qwen3-0.6B") is None  # a hub id is not checked

    exp = load_experiment_config(CONFIG, [f"model.teacher={teacher}"]).model_copy(update={"results_dir": str(tmp_path)})
    e = Experiment(exp, log=lambda *a: None)
    (e.out / "runs").mkdir(parents=True)
    (e.out / "reference.json").write_text(json.dumps({"teacher": {}, "before": {}, "teacher_sha256": original}))
    with pytest.raises(StartupError, match=f"digest is {original}, but .* has {current}: adding runs would mix"):
        e.run()
    assert list((e.out / "runs").iterdir()) == [] and not e.work.exists()
    (e.out / "reference.json").write_text(json.dumps({"teacher": {}, "before": {}, "teacher_sha256": current}))
    (e.out / "runs" / "sft-lr6.25e-05-s0.json").write_text(json.dumps({**_grid_run("sft", 6.25e-5, 0, [0.5]),
                                                                      "teacher_sha256": original}))
    with pytest.raises(StartupError, match=f"digest is {original}"):  # a finished run's record counts too
        e.run()
    (e.out / "runs" / "sft-lr6.25e-05-s0.json").write_text(json.dumps(_grid_run("sft", 6.25e-5, 0, [0.5])))
    logged = []
    e.log = logged.append
    assert e.check_teacher(str(teacher)) == current and "predate teacher digests" in logged[0]


@pytest.mark.slow
def test_smoke_experiment_on_ray(tmp_path, capsys):
    """`ar2dlm experiment --smoke` on the shipped config: every arm and seed evaluated at every budget,
    intervals, headline figures, report and plots; a second invocation redoes nothing."""
    args = ["experiment", "--config", CONFIG, "--smoke", "--parallel", "2",
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]
    assert main(args) == 0
    exp = load_experiment_config(CONFIG, smoke=True)
    out = tmp_path / "results" / exp.name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and set(summary["arms"]) == set(exp.arms) == {
        "bd3lm", "bd3lm_mix", "sft", "kd_off", "opdlm_off", "opdlm"}
    assert summary["code_version"] and summary["config"]["seeds"] == exp.seeds
    for arm, budgets in summary["arms"].items():
        assert list(budgets) == [str(b) for b in exp.budgets_for(arm)]
        for budget, cells in budgets.items():
            acc = cells["task_acc_static"]
            assert acc["n"] == len(exp.seeds) and acc["lo"] <= acc["mean"] <= acc["hi"]
            # Matched budgets: each evaluation is the first rollout batch at or past the budget.
            assert int(budget) <= cells["tokens_trained"]["mean"] < int(budget) + 16 * 16
            assert cells["flops_with_sampler"]["mean"] >= cells["flops_paper"]["mean"] > 0
    for run in (out / "runs").glob("*.json"):
        result = json.loads(run.read_text())
        assert [e["budget"] for e in result["evals"]] == exp.budgets_for(result["arm"])
    # The grid: both rates on seed 0, seed 1 at the rate chosen on validation accuracy (which every
    # evaluation carries), per arm.
    grid = summary["lr_grid"]
    assert set(grid) == set(exp.arms) and all(g["lr"] in exp.lr_grid for g in grid.values())
    assert len(summary["runs"]) == len(exp.arms) * 3
    assert all(summary["runs"][f"{arm}-lr{g['lr']:g}-s1"]["lr"] == g["lr"] for arm, g in grid.items())
    assert all("val_acc_static" in c for budgets in summary["arms"].values() for c in budgets.values())
    assert summary["runs"][f"bd3lm-lr{grid['bd3lm']['lr']:g}-s0"]["accounting"]["sampler_forwards"] == 0
    assert summary["config"]["variants"]["bd3lm_mix"]["recipe"] == "bd3lm"
    assert summary["runs"][f"opdlm-lr{grid['opdlm']['lr']:g}-s0"]["accounting"]["sampler_forwards"] > 0
    assert {f["id"] for f in summary["findings"]} == {"on_policy", "opdlm_off", "sft_static", "sft_dynamic", "vs_bd3lm",
                                                      "vs_bd3lm_own", "vs_bd3lm_mix", "vs_bd3lm_mix_own"}
    h = summary["headline"]
    assert h["target_acc"] <= h["best_acc"] and set(h["tokens_to_target"]) == set(exp.arms)
    assert set(h["static_to_dynamic"]) == {"sft", "opdlm"} and set(h["vs_kd_off"]) == {"opdlm", "opdlm_off"}
    if h["tokens_to_target"]["opdlm"]["tokens"]:
        assert set(h["over_opdlm"]) == {"bd3lm", "bd3lm_mix"}
    for png in ("metrics_vs_tokens.png", "accuracy_vs_tokens_per_forward.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| opdlm |" in (out / "report.md").read_text()
    assert "tokens to target, opdlm" in capsys.readouterr().out

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps


@pytest.mark.slow
def test_processes_runner_needs_no_ray(tmp_path, capsys):
    """`--runner processes` (the GPU machine has no Ray): the runs are spawned processes, and the experiment
    finishes with Ray unimportable; `--stop-after 0` starts no run and a later invocation does them."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "block"
    for name in ("ray", "vllm"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.getcwd()}"}
    args = [sys.executable, "-m", "ar2dlm_ray.cli", "experiment", "--config", CONFIG, "--smoke", "--runner", "processes",
            "--parallel", "2", "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"),
            "train.rollout_batch_size=8"]
    small = ["--stop-after", "0"]
    exp = load_experiment_config(CONFIG, smoke=True)
    out = tmp_path / "results" / exp.name
    assert main(args[3:] + small) == 0  # in this process (a process start less): it starts no run
    assert "stopped starting runs" in capsys.readouterr().out and not list((out / "runs").glob("*.json"))
    # Only the two rates of one arm on the grid seed, then its other seed: 3 runs.
    cfg = tmp_path / "one_arm.yaml"
    cfg.write_text(Path(CONFIG).read_text().replace(
        "arms: [bd3lm, bd3lm_mix, sft, kd_off, opdlm_off, opdlm]", "arms: [opdlm]"))
    args[args.index(CONFIG)] = str(cfg)
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted(p.stem for p in (out / "runs").glob("*.json"))
    chosen = json.loads((out / "summary.json").read_text())["lr_grid"]["opdlm"]["lr"]
    assert runs == sorted(["opdlm-lr0.0005-s0", "opdlm-lr0.001-s0", f"opdlm-lr{chosen:g}-s1"])
    assert "ray is blocked" not in second.stderr


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    """A run killed after its first budget resumes from the checkpoint written there, is killed again after its
    last evaluation, and ends with the same evaluations and accounting as a run that was never interrupted."""
    import ar2dlm_ray.evaluate as evaluate

    def experiment(root):
        exp = load_experiment_config(CONFIG, smoke=True).model_copy(update={
            "arms": ["opdlm"], "seeds": [0], "extra_budgets": {}, "parallel": 1, "lr_grid": [], "grid_seeds": [],
            "budgets": [300, 600],
            "results_dir": str(root / "results"), "work_dir": str(root / "work")})
        return Experiment(exp, log=lambda *a: None)

    clean = experiment(tmp_path / "clean")
    clean.run()
    expected = clean.finished_runs()[0]["evals"]

    real, calls = evaluate.evaluate_student, []

    def failing(*args, **kwargs):  # the fault: the process "dies" during the second budget's evaluation
        calls.append(1)
        if len(calls) == 3:  # 1: the before-training reference row, 2: first budget, 3: second budget
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    broken = experiment(tmp_path / "broken")
    monkeypatch.setattr(evaluate, "evaluate_student", failing)
    with pytest.raises(KeyboardInterrupt):
        broken.run()
    monkeypatch.setattr(evaluate, "evaluate_student", real)
    assert not list((broken.out / "runs").glob("*.json"))
    assert len((broken.work / "opdlm-s0" / "evals.jsonl").read_text().splitlines()) == 1

    # The resumed run is interrupted again, after its last evaluation and before the result is written: the
    # next run retrains nothing and takes the accounting from the checkpoint.
    import ar2dlm_ray.experiment as experiment_module

    real_finish = experiment_module._finish
    monkeypatch.setattr(experiment_module, "_finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        broken.run()
    monkeypatch.setattr(experiment_module, "_finish", real_finish)
    assert not list((broken.out / "runs").glob("*.json"))
    broken.run()
    got = broken.finished_runs()[0]["evals"]
    timing = ("eval_s", "train_s")
    assert [{k: v for k, v in e.items() if k not in timing} for e in got] == \
        [{k: v for k, v in e.items() if k not in timing} for e in expected]
    assert broken.finished_runs()[0]["accounting"] == clean.finished_runs()[0]["accounting"]
    assert clean.finished_runs()[0]["accounting"]["tokens_trained"] == expected[-1]["tokens_trained"]
