"""The pure rules of the elastic three-stage pipeline, without Ray: the leased backlog between the rollout
and teacher pools, pool membership (start, drain, pick), resize requests, the autoscaling policy, and
admission counting one batch in progress per producer."""

from types import SimpleNamespace

import pytest

from ar2dlm_ray.cluster.admission import Admission
from ar2dlm_ray.cluster.autoscale import Autoscaler
from ar2dlm_ray.cluster.batch_queue import Backlog
from ar2dlm_ray.cluster.controller import check_request, parse_sizes
from ar2dlm_ray.cluster.pools import Pool
from ar2dlm_ray.config import ConfigError


def _item(batch: int):
    return SimpleNamespace(stats=SimpleNamespace(batch=batch))


def test_backlog_puts_a_dead_holders_batches_back_first_in_order():
    book = Backlog(maxsize=3)
    for b in range(4):
        book.push(_item(b))
    assert book.full()
    first, second = book.pop("teacher-1"), book.pop("teacher-1")
    third = book.pop("teacher-0")
    assert [first.stats.batch, second.stats.batch, third.stats.batch] == [0, 1, 2]
    assert book.holders() == {"teacher-0": [2], "teacher-1": [0, 1]}
    assert book.ack("teacher-0", 2) and not book.ack("teacher-0", 2), "an ack counts once"
    assert not book.ack("teacher-0", 0), "only the holder acks"
    assert book.release("teacher-1") == [0, 1]
    assert [book.pop().stats.batch for _ in range(3)] == [0, 1, 3], "released batches go first, oldest first"
    assert not book.ack("teacher-1", 0), "a late ack from a released holder changes nothing"
    assert book.holders() == {} and book.release("teacher-1") == []


def test_pool_starts_drains_newest_first_and_retires_only_idle_members():
    started = []
    pool = Pool("rollout", lambda index, name: started.append(name) or f"handle-{name}")
    new, gone = pool.resize(3)
    assert [m.name for m in new] == started == ["rollout-0", "rollout-1", "rollout-2"] and gone == []
    for m in new[:2]:
        pool.activate(m.name)
    # rollout-2 is still starting: it goes before the active ones.
    _, gone = pool.resize(1)
    assert [m.name for m in gone] == ["rollout-2", "rollout-1"] and pool.names() == ["rollout-0"]
    pool.members["rollout-1"].calls = 1
    assert [m.name for m in pool.retire()] == ["rollout-2"], "a draining member with a call in flight stays"
    assert pool.pick(now=0.0).name == "rollout-0", "draining members take no new calls"
    pool.members["rollout-1"].calls = 0
    assert [m.name for m in pool.retire()] == ["rollout-1"]
    new, _ = pool.resize(2)
    assert [m.name for m in new] == ["rollout-3"], "names are never reused (Ray frees them asynchronously)"


def test_pool_picks_the_least_loaded_ready_member():
    pool = Pool("teacher", lambda index, name: name)
    for m in pool.resize(3)[0]:
        pool.activate(m.name)
    a, b, c = (pool.members[f"teacher-{i}"] for i in range(3))
    assert [pool.pick(0.0).name for _ in range(4)] == ["teacher-0", "teacher-1", "teacher-2", "teacher-0"], \
        "idle members take turns"
    a.calls, b.calls, c.calls = 2, 1, 1
    assert pool.pick(0.0) is b, "fewest calls, then the one picked least recently"
    assert pool.pick(0.0) is c and pool.pick(0.0, avoid="teacher-1") is c, "after a failure, another member"
    b.not_before = c.not_before = 10.0
    assert pool.pick(5.0) is a, "a restarting member waits out its backoff"
    a.not_before = 10.0
    assert pool.pick(5.0) is None and pool.pick(10.0) is b
    (new,), _ = pool.resize(4)
    pool.activate(new.name)
    new.calls = 1
    assert pool.pick(10.0) is new, "a member that just joined gets work before busier ones"


def test_resize_requests_are_checked_before_they_reach_the_job():
    assert parse_sizes(["rollout=4", "teacher=2"]) == {"rollout": 4, "teacher": 2}
    for bad in (["rollout"], ["rollout=-1"], ["rollout=two"], []):
        with pytest.raises(ConfigError):
            parse_sizes(bad)
    assert check_request({"rollout": 4, "teacher": 1}, {}) == []
    problems = check_request({"learner": 2, "rollout": 0, "gpu": 1}, {})
    assert len(problems) == 3 and "process group is fixed" in problems[0] and "at least one" in problems[1]
    fixed = {"rollout": "collective transport"}
    assert check_request({"rollout": 2}, fixed) == ["pool 'rollout' cannot be resized in this job (collective transport)"]


def test_autoscaler_grows_the_bottleneck_and_shrinks_idle_pools_within_limits():
    auto = Autoscaler({"rollout": (1, 4), "teacher": (1, 2)}, interval_s=10)
    assert not auto.due(0.0) and not auto.due(9.0) and auto.due(10.0)
    sizes = {"rollout": 2, "teacher": 1}
    # The learners waited 30 % of the time with batches queued for scoring: the teacher pool grows ...
    assert auto.decide(10.0, sizes, {"rollout": 0.6, "teacher": 0.95}, learner_wait=0.3, score_backlog=1.5) == \
        {"teacher": 2}
    assert not auto.due(15.0) and auto.due(20.0), "the next decision judges a fresh interval"
    # ... with nothing queued for scoring the rollout workers are behind, however busy the teachers look.
    assert auto.decide(20.0, sizes, {"rollout": 0.9, "teacher": 0.95}, 0.3, score_backlog=0.2) == {"rollout": 3}
    # At its maximum the bottleneck cannot grow; growing the other pool would not help.
    assert auto.decide(20.0, {"rollout": 2, "teacher": 2}, {"rollout": 0.6, "teacher": 0.99}, 0.3, 4.0) == {}
    # The learners never waited: the least busy pool below the threshold shrinks, never under its minimum.
    assert auto.decide(30.0, {"rollout": 4, "teacher": 2}, {"rollout": 0.3, "teacher": 0.4}, 0.0) == {"rollout": 3}
    assert auto.decide(40.0, {"rollout": 1, "teacher": 1}, {"rollout": 0.1, "teacher": 0.1}, 0.0) == {}
    assert auto.decide(50.0, {"rollout": 2, "teacher": 2}, {"rollout": 0.9, "teacher": 0.9}, 0.05) == {}
    # Sizes outside the limits (set by hand) come back within them first.
    assert auto.decide(60.0, {"rollout": 6, "teacher": 2}, {}, 0.5) == {"rollout": 4}


def test_admission_keeps_one_batch_in_progress_per_producer():
    adm = Admission(learners=1, publish_every=1, max_staleness=100, queue_size=2, total_steps=1000)
    adm.step_started()
    admitted = sum(adm.admit(0) for _ in range(50))
    assert admitted == 1 + 2, "the current step's batch plus queue_size ahead"
    adm.producers = 5  # e.g. 3 rollout workers and 2 teacher replicas joined
    assert sum(adm.admit(0) for _ in range(50)) == 5
    adm.producers = 0  # scaled back down: nothing more until the learners catch up
    assert not adm.admit(0)
