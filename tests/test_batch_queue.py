"""The rollout queue on a real local Ray: an empty poll is an answer (None), not an error raised in the
queue actor (which the dashboard counts as a failed task), the actor never unpickles an item, and the client
can be handed to a restartable actor without Ray's warning about constructor arguments in the object store."""

import os
import pickle
from types import SimpleNamespace

import pytest
import ray

from ar2dlm_ray.cluster.batch_queue import BatchQueue


class Traced:
    """An item that records every process that unpickled it on its way through the queue."""

    def __init__(self, batch: int):
        self.stats, self.seen = SimpleNamespace(batch=batch), []

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.seen = self.seen + [os.getpid()]


def test_empty_poll_returns_none_and_items_round_trip(local_ray):
    queue = BatchQueue(2, "test-queue")
    try:
        assert queue.get(timeout=0.2) is None and queue.get_nowait() is None
        queue.put(Traced(1))
        queue.put(Traced(2))
        assert queue.qsize() == 2
        with pytest.raises(Exception, match="stayed full"):
            queue.put(Traced(3), timeout=0.2)
        first, second = queue.get(timeout=1, holder="learner-0"), queue.get_nowait()
        assert (first.stats.batch, second.stats.batch) == (1, 2)
        # Unpickled here only: the queue actor holds bytes (it would otherwise import the model code).
        assert first.seen == second.seen == [os.getpid()]
        # The lease is kept by batch id without unpickling too.
        assert queue.release("learner-0") == [1] and queue.get(timeout=1).stats.batch == 1
        # Nothing in the queue actor failed: every call above returned normally.
        assert ray.get(queue.actor.qsize.remote()) == 0
    finally:
        ray.kill(queue.actor)


def test_client_pickles_to_its_name(local_ray):
    queue = BatchQueue(4, "named-queue")
    try:
        # No actor handle in the pickle: a restartable actor's constructor arguments stay inline.
        assert b"ActorHandle" not in pickle.dumps(queue)

        @ray.remote(max_restarts=1, num_cpus=0)
        class Producer:
            def __init__(self, q):
                self.q = q

            def produce(self):
                self.q.put(SimpleNamespace(stats=SimpleNamespace(batch=7)))
                return ray.get_runtime_context().get_actor_name()

        producer = Producer.options(name="producer-0").remote(queue)
        assert ray.get(producer.produce.remote()) == "producer-0"
        assert queue.get(timeout=5).stats.batch == 7
        ray.kill(producer)
    finally:
        ray.kill(queue.actor)


def test_metrics_are_tagged_with_pool_actor_and_run(local_ray):
    from ar2dlm_ray.cluster.metrics import Metrics

    @ray.remote(num_cpus=0)
    class Worker:
        def tags(self):
            return Metrics("rollout", "micro-20261130-054012").tags

    worker = Worker.options(name="rollout-3").remote()
    assert ray.get(worker.tags.remote()) == {"pool": "rollout", "actor": "rollout-3", "run": "micro-20261130-054012"}
    assert Metrics("driver", "r", actor="driver").tags == {"pool": "driver", "actor": "driver", "run": "r"}
    ray.kill(worker)
