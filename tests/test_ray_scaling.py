"""Independent scaling: on a multi-node Ray cluster (ray.cluster_utils.Cluster) with a "teacher" node
type and a "student" node type, each pool lands on its own node type, sized from the config."""

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from ar2dlm_ray.config import load_config
from test_ray import ray_overrides


@pytest.fixture(scope="module")
def two_node_types():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    teacher = cluster.add_node(num_cpus=2, resources={"teacher_node": 2})
    student = cluster.add_node(num_cpus=4, resources={"student_node": 4})
    ray.init(address=cluster.address, namespace="ar2dlm-scaling", log_to_driver=False)
    yield {"teacher": teacher.node_id, "student": student.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_pools_land_on_their_node_types(micro_teacher, tmp_path, two_node_types):
    from ar2dlm_ray.cluster.driver import RayTrainer

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 2, "teacher.num_replicas": 2, "teacher.pool.resources": "{teacher_node: 1}",
        "rollout.num_workers": 2, "rollout.resources": "{student_node: 1}",
        "learner.resources": "{student_node: 1}"}))
    trainer = RayTrainer(cfg, lambda *a: None)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    placement = summary["placement"]
    assert [a["node_id"] for a in placement["teacher"]] == [two_node_types["teacher"]] * 2
    assert [a["node_id"] for a in placement["rollout"]] == [two_node_types["student"]] * 2
    assert [a["node_id"] for a in placement["learner"]] == [two_node_types["student"]]
    assert summary["steps"] == 2 and json.loads((tmp_path / "summary.json").read_text())["accounting"]["trained_on"] > 0
