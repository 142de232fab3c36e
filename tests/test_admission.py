"""The flow-control rules without Ray: a simulated driver and learner group step through a run, and every
batch they train obeys the staleness bound, the queue bound and the run's length."""

import pytest

from ar2dlm_ray.cluster.admission import Admission


def simulate(learners, publish_every, max_staleness, queue_size, total_steps, start_step=0):
    """Producers deliver at once, in order. Returns per trained batch (step, batch id, the version it waited
    for) and the largest number of batches waiting ahead of the learners."""
    rule = Admission(learners, publish_every, max_staleness, queue_size, total_steps, start_step)
    queue, trained, deepest, next_batch = [], [], 0, 0
    for step in range(start_step, total_steps):
        rule.step_started()
        while rule.admit(step):
            queue.append((next_batch, rule.published(step)))
            next_batch += 1
            deepest = max(deepest, rule.ahead)
        assert len(queue) >= learners, f"step {step} starved: the rule admitted too little"
        for _ in range(learners):
            batch, version = queue.pop(0)
            assert rule.fresh(step, version)
            trained.append((step, batch, version))
    assert not queue, "batches were admitted beyond the run's last step"
    return trained, deepest


def test_synchronous_run_trains_batch_i_with_the_weights_after_i_steps():
    trained, deepest = simulate(learners=1, publish_every=1, max_staleness=0, queue_size=4, total_steps=6)
    assert trained == [(s, s, s) for s in range(6)]
    assert deepest == 0


@pytest.mark.parametrize("learners,publish_every,max_staleness,queue_size", [
    (1, 1, 1, 4), (2, 1, 1, 4), (1, 2, 1, 4), (4, 1, 2, 3), (2, 3, 5, 8)])
def test_asynchronous_runs_stay_within_their_bounds(learners, publish_every, max_staleness, queue_size):
    trained, deepest = simulate(learners, publish_every, max_staleness, queue_size, total_steps=9)
    assert [b for _, b, _ in trained] == list(range(9 * learners)), "each batch once, in order"
    assert all(0 <= step - version <= max_staleness for step, _, version in trained)
    assert deepest <= queue_size
    assert any(step > version for step, _, version in trained), "production never ran ahead of training"


def test_a_resumed_run_waits_for_its_own_first_version():
    rule = Admission(learners=1, publish_every=3, max_staleness=2, queue_size=4, total_steps=10, start_step=7)
    assert rule.published(7) == 7 and rule.published(8) == 7 and rule.published(9) == 9


def test_dropped_batches_are_replaced():
    rule = Admission(learners=1, publish_every=1, max_staleness=1, queue_size=2, total_steps=5)
    rule.step_started()
    admitted = sum(rule.admit(0) for _ in range(10))
    rule.replace_dropped(1)
    assert rule.admit(0) and admitted == 2
    assert not rule.fresh(5, 3) and rule.fresh(4, 3)
