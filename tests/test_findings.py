"""The paper's findings against synthetic measurements: every verdict of every finding, the per-seed
tokens-to-target and the ratio interval against direct computations, and the Markdown table."""

import math

import pytest

from ar2dlm_ray.config import ExperimentConfig
from ar2dlm_ray.experiment import mean_ci
from ar2dlm_ray.findings import MATCH_MARGIN, findings, format_findings, seed_tokens_to_target

BUDGETS = [1000, 2000, 4000]
TEACHER = 0.5
TARGET = 0.9 * TEACHER  # summarize() adds an arm at the teacher's accuracy, so the target is 90 % of the teacher


def make_exp(arms, **kw):
    return ExperimentConfig(name="t", run_config="configs/micro.yaml", arms=arms, budgets=BUDGETS,
                            variants={"bd3lm_mix": {"recipe": "bd3lm"}}, **kw)


def run(arm, seed, accs, dyn=None, tokens=None, tpf=1.2):
    """One run: static accuracies per budget; the dynamic accuracy (γ = 0.9) only at the largest budget."""
    tokens = tokens or [b + 16 for b in BUDGETS[:len(accs)]]
    evals = [{"budget": b, "tokens_trained": t, "task_acc_static": a, "tpf_static": 0.9,
              "task_acc_dynamic@0.9": a, "tpf_dynamic@0.9": tpf} for b, t, a in zip(BUDGETS, tokens, accs)]
    if dyn is not None:
        evals[len(BUDGETS) - 1]["task_acc_dynamic@0.9"] = dyn
    return {"arm": arm, "seed": seed, "evals": evals}


def summarize(runs, exp):
    """experiment.Experiment.summarize's cells: mean and interval over seeds per arm and budget."""
    arms = {}
    for arm in exp.arms:
        rows = [e for r in runs if r["arm"] == arm for e in r["evals"]]
        arms[arm] = {str(b): {k: mean_ci([e.get(k) for e in rows if e["budget"] == b])
                              for k in rows[0] if k != "budget"}
                     for b in exp.budgets_for(arm) if any(e["budget"] == b for e in rows)}
    # An arm outside the comparison that reached the teacher: the best arm, so the target is 90 % of TEACHER.
    arms["reached_teacher"] = {"1000": {"task_acc_static": {"mean": TEACHER, "lo": TEACHER, "hi": TEACHER, "n": 1}}}
    return {"arms": arms, "reference": {"teacher": {"task_acc_static": TEACHER}}}


def final(arm, values, start=0.3, dyn=None):
    """Runs of `arm` whose static accuracy at the largest common budget is values[seed]."""
    return [run(arm, s, [start, start, v], dyn=None if dyn is None else dyn[s]) for s, v in enumerate(values)]


def by_id(rows):
    return {r["id"]: r for r in rows}


def test_on_policy_each_verdict_and_the_paired_difference():
    exp = make_exp(["kd_off", "opdlm_off", "opdlm"])
    kd = [0.30, 0.35, 0.32]
    cases = {"agrees": [0.60, 0.66, 0.61], "disagrees": [0.10, 0.12, 0.15], "unresolved": [0.40, 0.25, 0.36]}
    for verdict, op in cases.items():
        runs = final("kd_off", kd) + final("opdlm", op) + final("opdlm_off", [0.5, 0.5, 0.5])
        row = by_id(findings(summarize(runs, exp), runs, exp))["on_policy"]
        diffs = [a - b for a, b in zip(op, kd)]
        assert row["verdict"] == verdict and row["n"] == 3
        assert row["value"] == pytest.approx(sum(diffs) / 3)
        half = 4.303 * math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) / math.sqrt(3)
        assert (row["lo"], row["hi"]) == pytest.approx((sum(diffs) / 3 - half, sum(diffs) / 3 + half))
        assert row["note"].startswith("opdlm_off − kd_off: +0.177 [")
        assert "4k tokens" in row["measure"]


@pytest.mark.parametrize("other, row_id", [("sft", "sft_static"), ("opdlm_off", "opdlm_off")])
def test_matching_findings_use_the_equivalence_margin(other, row_id):
    exp = make_exp([other, "opdlm"])
    base = [0.50, 0.52, 0.48]
    cases = {"agrees": [0.51, 0.51, 0.49],  # within ±MATCH_MARGIN
             "disagrees": [0.70, 0.75, 0.72],  # excludes 0 and leaves the margin
             "unresolved": [0.60, 0.40, 0.55],  # includes 0, leaves the margin
             }
    for verdict, op in cases.items():
        runs = final(other, base) + final("opdlm", op)
        row = by_id(findings(summarize(runs, exp), runs, exp))[row_id]
        assert row["verdict"] == verdict, (verdict, row)
        assert row["value"] == pytest.approx(sum(o - b for o, b in zip(op, base)) / 3)
    # Significantly above 0 but inside the margin: a match (equivalence is tested first).
    runs = final(other, base) + final("opdlm", [0.52, 0.541, 0.50])
    row = by_id(findings(summarize(runs, exp), runs, exp))[row_id]
    assert 0 < row["lo"] and row["hi"] < MATCH_MARGIN and row["verdict"] == "agrees"


def test_sft_dynamic_difference_of_differences():
    exp = make_exp(["sft", "opdlm"])
    op_static, sft_static = [0.60, 0.62, 0.58], [0.55, 0.57, 0.56]
    cases = {"agrees": ([0.59, 0.61, 0.575], [0.45, 0.46, 0.47]),  # sft loses ~0.1, opdlm ~0.01
             "disagrees": ([0.45, 0.46, 0.42], [0.54, 0.565, 0.555]),
             "unresolved": ([0.50, 0.62, 0.58], [0.55, 0.47, 0.56])}
    for verdict, (op_dyn, sft_dyn) in cases.items():
        runs = final("opdlm", op_static, dyn=op_dyn) + final("sft", sft_static, dyn=sft_dyn)
        for r in runs:
            r["evals"][-1]["tpf_dynamic@0.9"] = 1.47 if r["arm"] == "opdlm" else 1.02
        row = by_id(findings(summarize(runs, exp), runs, exp))["sft_dynamic"]
        d = [(od - os) - (sd - ss) for od, os, sd, ss in zip(op_dyn, op_static, sft_dyn, sft_static)]
        assert row["verdict"] == verdict and row["value"] == pytest.approx(sum(d) / 3)
        assert row["note"] == "tokens per forward at γ = 0.9: opdlm 1.47, sft 1.02"


def test_seed_tokens_to_target_interpolates_in_log_tokens():
    r = run("opdlm", 0, [0.3, 0.7, 0.8], tokens=[1024, 2100, 4200])
    # 0.4 is a quarter of the way from 0.3 to 0.7: a quarter of the way from 1024 to 2100 on a log axis.
    expected = math.exp(math.log(1024) + 0.25 * (math.log(2100) - math.log(1024)))
    assert seed_tokens_to_target(r, BUDGETS, 0.4) == {"tokens": pytest.approx(expected), "not_reached_by": None,
                                                      "first": False}
    # reached by the first evaluation: its tokens are only an upper bound
    assert seed_tokens_to_target(r, BUDGETS, 0.2) == {"tokens": 1024, "not_reached_by": None, "first": True}
    assert seed_tokens_to_target(r, BUDGETS, 0.9) == {"tokens": None, "not_reached_by": 4200, "first": False}
    assert seed_tokens_to_target({"evals": []}, BUDGETS, 0.4) is None


def conversion_runs(op_tokens, conv_tokens, arm="bd3lm"):
    """opdlm reaches the target exactly at its last budget (so its tokens are its tokens trained there),
    `arm` exactly at its extra budget 128k (with conv_tokens trained), or never where conv_tokens is None."""
    runs = []
    for s, (op, conv) in enumerate(zip(op_tokens, conv_tokens)):
        runs.append(run("opdlm", s, [0.1, 0.2, TARGET], tokens=[1000, 2000, op]))
        reached = conv is not None
        evals = run(arm, s, [0.1, 0.2, 0.3])["evals"] + [
            {"budget": 128000, "tokens_trained": conv if reached else 128016,
             "task_acc_static": TARGET if reached else 0.2}]
        runs.append({"arm": arm, "seed": s, "evals": evals})
    return runs


def test_vs_bd3lm_ratio_interval_against_a_direct_computation():
    exp = make_exp(["bd3lm", "opdlm"], seeds=[0, 1, 2, 3, 4], extra_budgets={"bd3lm": [128000]})
    op = [4000, 4100, 4050, 4200, 4010]
    cases = {"agrees": [60e3, 90e3, 45e3, 120e3, 75e3], "disagrees": [8000, 12e3, 16e3, 9000, 10e3],
             "unresolved": [12e3, 120e3, 30e3, 160e3, 100e3]}  # a geometric mean above 10x, the interval is not
    for verdict, conv in cases.items():
        runs = conversion_runs(op, conv)
        row = by_id(findings(summarize(runs, exp), runs, exp))["vs_bd3lm"]
        logs = [math.log(c / o) for c, o in zip(conv, op)]
        mean = sum(logs) / 5
        half = 2.776 * math.sqrt(sum((v - mean) ** 2 for v in logs) / 4) / math.sqrt(5)
        assert row["id"] == "vs_bd3lm" and row["verdict"] == verdict and row["n"] == 5
        assert (row["value"], row["lo"], row["hi"]) == pytest.approx(
            (math.exp(mean), math.exp(mean - half), math.exp(mean + half)), rel=1e-9)
        assert row["lower_bound"] is None
        if verdict == "unresolved":
            assert row["lo"] < 10 < row["value"]


def test_vs_bd3lm_lower_bound_and_opdlm_not_reaching():
    exp = make_exp(["bd3lm", "bd3lm_mix", "opdlm"], extra_budgets={"bd3lm": [128000], "bd3lm_mix": [128000]})
    op = [4000, 5000, 6000]
    runs = conversion_runs(op, [100e3, None, 90e3]) + [r for r in conversion_runs(op, [None, 20e3, 30e3], "bd3lm_mix")
                                                       if r["arm"] != "opdlm"]
    rows = by_id(findings(summarize(runs, exp), runs, exp))
    # bd3lm: ratio 25 in seed 0, at least 128016 / 5000 = 25.6 in seed 1 (never reached), 90k / 6k = 15 in seed 2.
    assert rows["vs_bd3lm"]["lower_bound"] == pytest.approx(15.0) and rows["vs_bd3lm"]["value"] is None
    assert rows["vs_bd3lm"]["verdict"] == "agrees" and "did not reach the target by 128k tokens in seed(s) [1]" in \
        rows["vs_bd3lm"]["note"]
    # bd3lm_mix: a bound 128016 / 4000 = 32, ratios 4 and 5: a lower bound of 4, which cannot decide.
    assert rows["vs_bd3lm_mix"]["lower_bound"] == pytest.approx(4.0)
    assert rows["vs_bd3lm_mix"]["verdict"] == "unresolved"
    # opdlm misses in a seed: that seed's ratio has no bound at all.
    runs[2]["evals"][-1]["task_acc_static"] = 0.3
    row = by_id(findings(summarize(runs, exp), runs, exp))["vs_bd3lm"]
    assert row["verdict"] == "unresolved" and row["lower_bound"] is None and "seed(s) [1]" in row["note"]


def test_vs_bd3lm_own_target_is_measured_where_the_common_one_is_only_bounded():
    """At 90 % of bd3lm's own best mean both arms reach the target in every seed: a ratio with an interval,
    where the common target (90 % of the teacher) gives only a lower bound."""
    exp = make_exp(["bd3lm", "opdlm"], seeds=[0, 1, 2], extra_budgets={"bd3lm": [128000]})
    runs = []
    for s in range(3):
        runs.append(run("opdlm", s, [0.1, 0.3 + 0.01 * s, 0.5], tokens=[1016, 2016, 4016]))
        conv = run("bd3lm", s, [0.1, 0.2, 0.3], tokens=[1016, 2016, 4016])
        conv["evals"].append({"budget": 128000, "tokens_trained": 128016, "task_acc_static": 0.4})
        runs.append(conv)
    rows = by_id(findings(summarize(runs, exp), runs, exp))
    assert rows["vs_bd3lm"]["value"] is None and rows["vs_bd3lm"]["lower_bound"] is not None  # 0.45: bd3lm never

    target = 0.9 * 0.4  # bd3lm's best mean is 0.4, at 128k

    def log_interp(a0, t0, a1, t1):
        return math.exp(math.log(t0) + (target - a0) / (a1 - a0) * (math.log(t1) - math.log(t0)))

    conv_tokens = log_interp(0.3, 4016, 0.4, 128016)
    ratios = [math.log(conv_tokens / log_interp(0.3 + 0.01 * s, 2016, 0.5, 4016)) for s in range(3)]
    mean = sum(ratios) / 3
    half = 4.303 * math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2) / math.sqrt(3)
    own = rows["vs_bd3lm_own"]
    assert f"{target:.3f}" in own["measure"] and own["n"] == 3 and own["lower_bound"] is None
    assert (own["value"], own["lo"], own["hi"]) == pytest.approx(
        (math.exp(mean), math.exp(mean - half), math.exp(mean + half)), rel=1e-9)
    assert own["verdict"] == "agrees"  # about 44x, a narrow interval

    # opdlm at the target by its first evaluation in seed 1: its tokens are an upper bound, the ratio a lower one
    runs[2]["evals"][0]["task_acc_static"] = 0.4
    own = by_id(findings(summarize(runs, exp), runs, exp))["vs_bd3lm_own"]
    assert own["value"] is None and own["lower_bound"] == pytest.approx(min(
        conv_tokens / 1016, *(conv_tokens / log_interp(0.3 + 0.01 * s, 2016, 0.5, 4016) for s in (0, 2))))
    assert "opdlm reached it by its first evaluation in seed(s) [1]" in own["note"]


def test_missing_arms_are_skipped_and_missing_data_is_unresolved():
    exp = make_exp(["bd3lm", "opdlm"], extra_budgets={"bd3lm": [128000]})
    runs = conversion_runs([4000, 4000, 4000], [60e3, 50e3, 70e3])
    assert [r["id"] for r in findings(summarize(runs, exp), runs, exp)] == ["vs_bd3lm", "vs_bd3lm_own"]
    exp = make_exp(["sft", "kd_off"])
    assert findings({"arms": {}, "reference": {"teacher": {"task_acc_static": 0.5}}}, [], exp) == []
    exp = make_exp(["bd3lm", "sft", "kd_off", "opdlm"])
    rows = findings({"arms": {}, "reference": {"teacher": {"task_acc_static": 0.5}}}, [], exp)
    assert [r["id"] for r in rows] == ["on_policy", "sft_static", "sft_dynamic", "vs_bd3lm"]
    assert all(r["verdict"] == "unresolved" and r["n"] == 0 and r["note"].startswith("no paired seeds") for r in rows)
    # One seed: no interval, so no verdict however large the difference.
    runs = final("kd_off", [0.1]) + final("opdlm", [0.9])
    row = by_id(findings(summarize(runs, make_exp(["kd_off", "opdlm"])), runs, make_exp(["kd_off", "opdlm"])))
    assert row["on_policy"]["verdict"] == "unresolved" and row["on_policy"]["note"].startswith("one seed")
    # Chat prompts (no task accuracy): no findings.
    assert findings({"arms": {}, "reference": {"teacher": {}}}, [], exp) == []


def test_format_findings_table():
    exp = make_exp(["bd3lm", "bd3lm_mix", "kd_off", "opdlm"], extra_budgets={"bd3lm": [128000], "bd3lm_mix": [128000]})
    op = [4000, 4000, 4000]
    runs = (conversion_runs(op, [16e3, 8000, 32e3]) + final("kd_off", [0.1, 0.12, 0.11])
            + [r for r in conversion_runs(op, [None, None, None], "bd3lm_mix") if r["arm"] != "opdlm"])
    rows = findings(summarize(runs, exp), runs, exp)
    text = format_findings(rows)
    lines = text.splitlines()
    assert lines[0] == "| paper's finding | measured here | value [95 % interval] | n | verdict | note |"
    assert len(lines) == 2 + len(rows) == 7 and all(line.count(" | ") == 5 for line in lines[2:])
    r = by_id(rows)
    assert r["on_policy"]["verdict"] == "agrees" and "| +0.340 [+0.315, +0.365] | 3 | agrees |" in text
    assert f"{r['vs_bd3lm']['value']:.1f}x [{r['vs_bd3lm']['lo']:.1f}x, {r['vs_bd3lm']['hi']:.1f}x]" in text
    assert "| ≥ 32.0x | 3 | agrees |" in text  # bd3lm_mix never reached: 128016 / 4000
    assert r["vs_bd3lm"]["verdict"] == "unresolved" and "| unresolved |" in text  # ratios 4, 2, 8
