"""The orchestration benchmark on a real local Ray: the real driver, queues and actors with stand-in stage
costs report throughput against the bottleneck's bound, busy fractions, queue depths and publication overhead,
and account for every batch exactly (also across a mid-run resize)."""

import pytest

from ar2dlm_ray.cluster.bench_orchestration import Spec, bench_orchestration, bound, stage_seconds
from ar2dlm_ray.cluster.simulate import BALANCED, paper_costs, paper_ratios


def test_stage_costs_and_bound():
    costs = paper_costs()
    assert costs["teacher"] < costs["rollout"] < costs["learner"]  # the 8B setting: the learner dominates
    assert paper_ratios()["learner"] == 1.0
    seconds = stage_seconds(Spec("b", (16, 8, 4), "balanced", 2.0, 10))
    assert seconds == {k: v * 2.0 for k, v in BALANCED.items()}
    rate, slowest = bound({"rollout": 16, "teacher": 8, "learner": 4}, seconds)
    assert rate == pytest.approx(2.0) and slowest == ["rollout", "teacher", "learner"]


@pytest.mark.slow
def test_quick_bench_reports_throughput_against_the_bound_with_exact_accounting(local_ray):
    result = bench_orchestration("configs/micro.yaml", [], quick=True, log=lambda *a: None)
    assert result["throughput_vs_bound"] and result["accounting_exact"]
    for name, value in result["throughput_vs_bound"].items():
        assert 0 < value <= 1.2, name
    run = result["runs"][0]
    assert run["bottleneck"] == ["learner"]
    assert all(0 <= v <= 1.2 for v in run["busy"].values())
    assert run["accounting"]["exact"], run["accounting"]["checks"]
    assert len(run["queues"]["t_s"]) == run["steps"] == len(run["queues"]["ready"])
    assert 0 <= run["publication"]["publish_over_train"] < 0.5
    assert result["message"]["target_mb_per_batch"] == pytest.approx(32 * 4000 * 16 * 12 / 1e6)


@pytest.mark.slow
def test_resize_mid_run_is_reported_and_every_batch_is_trained_once(local_ray):
    spec = Spec("scale", (1, 1, 1), "balanced", 1.0, 16, scale=((4, {"rollout": 2}), (10, {"rollout": 1})))
    result = bench_orchestration("configs/micro.yaml", [], log=lambda *a: None, specs=(spec,))
    run = result["runs"][0]
    assert [(e["pool"], e["from"], e["to"]) for e in run["events"]] == [("rollout", 1, 2), ("rollout", 2, 1)]
    assert [p["pools"]["rollout"] for p in run["phases"]] == [1, 2, 1]
    assert run["accounting"]["exact"], run["accounting"]["checks"]
