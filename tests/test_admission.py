"""The flow-control rules without Ray: a simulated driver and learner group step through a run, and every
batch they train obeys the staleness bound, the queue bound and the run's length; and a naive clock-driven
pipeline shows that the default bound (`auto`) keeps larger pools busy, drops (almost) nothing, and that a
number too tight for the pools is named."""

import random
from collections import deque

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
            assert step - version <= rule.bound(step)
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
    assert rule.bound(5) == 1


# ---- sizing: a naive pipeline on a clock ------------------------------------------------------------
def pipeline(rollout, teacher, learners, costs=(8, 4, 2), max_staleness=None, publish_every=1, queue_size=4,
             steps=80, jitter=0.0, resize=None, seed=0):
    """Rollout workers, teacher replicas and the learner group, each taking `costs` ticks per batch (rollout
    times drawn +- `jitter` of it, so batches overtake each other); free producers take work in order, a
    rollout uses the newest published weights when it starts, and the learners train batches as they arrive,
    dropping (and replacing) those past the bound. `resize`: (at tick, rollout workers). Returns steps per tick
    after the first fifth, the rule, and the batches dropped and trained."""
    rng = random.Random(seed)
    rule = Admission(learners, publish_every, max_staleness, queue_size, steps)
    rule.resize(rollout + teacher, 0)
    size = {"rollout": rollout, "teacher": teacher}
    jobs = {"rollout": [], "teacher": []}  # [done tick, batch, version]
    admitted, scoring, ready = deque(), deque(), deque()
    step, next_batch, training_until, dropped, trained, tick = 0, 0, None, 0, 0, 0
    marks = {}
    rule.step_started()
    while step < steps:
        if resize and tick == resize[0]:
            size["rollout"] = resize[1]
            rule.resize(resize[1] + teacher, step)
        for kind, out in (("rollout", scoring), ("teacher", ready)):
            out.extend((b, v) for done, b, v in sorted(jobs[kind]) if done <= tick)
            jobs[kind] = [j for j in jobs[kind] if j[0] > tick]
        if training_until == tick:
            step, training_until = step + 1, None
            marks[step] = tick
            if step < steps:
                rule.step_started()
        if training_until is None and step < steps:
            while ready and step - ready[0][1] > rule.bound(step):
                ready.popleft()
                dropped += 1
                rule.replace_dropped(1)
            if len(ready) >= learners:
                for _ in range(learners):
                    ready.popleft()
                trained += learners
                training_until = tick + costs[2]
        while rule.admit(step):
            admitted.append(next_batch)
            next_batch += 1
        while admitted and len(jobs["rollout"]) < size["rollout"]:
            cost = costs[0] * (1 + rng.uniform(-jitter, jitter))
            jobs["rollout"].append([tick + max(1, round(cost)), admitted.popleft(), rule.published(step)])
        while scoring and len(jobs["teacher"]) < size["teacher"]:
            jobs["teacher"].append([tick + costs[1], *scoring.popleft()])
        tick += 1
    first = steps // 5
    return (steps - first) / (marks[steps] - marks[first]), rule, dropped, trained


def bound(rollout, teacher, learners, costs=(8, 4, 2)):
    """Steps per tick of the slowest stage."""
    return min(rollout / costs[0], teacher / costs[1], learners / costs[2]) / learners


@pytest.mark.parametrize("pools", [(1, 1, 1), (2, 2, 1), (3, 2, 1), (4, 2, 1), (16, 8, 4)])
def test_auto_staleness_keeps_every_pool_size_at_its_bound(pools):
    rate, rule, dropped, trained = pipeline(*pools)
    assert rate >= 0.95 * bound(*pools), (pools, rate, bound(*pools), rule.staleness)
    assert dropped == 0 and rule.shortfall() is None


def test_scaling_pays_under_auto_and_not_under_a_fixed_bound_of_one():
    one, three = pipeline(1, 1, 1)[0], pipeline(3, 2, 1)[0]
    assert pipeline(2, 2, 1)[0] >= 1.9 * one and three >= 2.8 * one
    tight, rule, _, _ = pipeline(3, 2, 1, max_staleness=1)
    assert tight <= 1.2 * pipeline(1, 1, 1, max_staleness=1)[0] and tight < 0.5 * three, "more workers idle"
    assert rule.shortfall() == ("learner.max_staleness=1 leaves some of them idle; 7 (or auto) would keep every "
                                "one busy")


def test_auto_drops_few_when_batches_overtake_each_other_and_none_when_the_pools_shrink():
    for pools in ((3, 2, 1), (16, 8, 4)):
        _, _, dropped, trained = pipeline(*pools, jitter=0.5, steps=120)
        assert dropped <= 0.05 * (dropped + trained), (pools, dropped, trained)
    rate, rule, dropped, _ = pipeline(6, 2, 1, resize=(100, 1), steps=120)
    assert rule.staleness == 5 and dropped == 0, "batches admitted under the larger bound are still trained"


def test_the_queue_size_is_named_when_it_is_what_limits():
    rule = Admission(learners=8, publish_every=1, max_staleness=None, queue_size=4, total_steps=10)
    rule.resize(16, 0)
    assert rule.staleness == 4 and rule.shortfall().startswith("ray.queue_size=4 leaves some of them idle; 8 ")
