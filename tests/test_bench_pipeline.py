"""The arithmetic of `ar2dlm bench pipeline` on made-up step records, against sums done by hand."""

import pytest

from ar2dlm_ray.cluster.bench import _measure


def _step(i, step_s, train_s, busy, tokens):
    return {"step": i, "step_s": step_s, "train_s": train_s, "publish_s": 0.1 * train_s, "tokens_trained": tokens,
            "rollout_s": busy["rollout"] * step_s, "teacher_s": busy["teacher"] * step_s,
            "busy": {**busy, "learner": train_s / step_s}}


def test_measure_skips_warmup_and_weights_busy_fractions_by_step_time():
    records = [_step(1, 9.0, 1.0, {"rollout": 0.1, "teacher": 0.1}, 100),  # warm-up: left out
               _step(2, 5.0, 1.0, {"rollout": 0.2, "teacher": 0.2}, 200),  # warm-up: left out
               _step(3, 2.0, 1.0, {"rollout": 0.5, "teacher": 0.25}, 300),
               _step(4, 4.0, 2.0, {"rollout": 1.0, "teacher": 0.5}, 420)]
    got = _measure(records)
    assert got["steps_per_s"] == pytest.approx(2 / 6.0)
    assert got["trained_tokens_per_s"] == pytest.approx((420 - 200) / 6.0)
    assert got["learner_busy"] == pytest.approx(3.0 / 6.0)
    assert got["rollout_busy"] == pytest.approx((0.5 * 2 + 1.0 * 4) / 6.0)
    assert got["teacher_busy"] == pytest.approx((0.25 * 2 + 0.5 * 4) / 6.0)
    assert got["busy_sum"] == pytest.approx(got["rollout_busy"] + got["teacher_busy"] + got["learner_busy"])
    assert got["train_s_per_batch"] == pytest.approx(1.5) and got["publish_per_step"] == pytest.approx(0.1)
