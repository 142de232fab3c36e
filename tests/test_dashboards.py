"""The shipped Grafana dashboard and Prometheus configuration against the metrics the code defines (a real
Prometheus scrapes a running job in tests/test_ray_job.py)."""

import json
import re
from pathlib import Path

import yaml

from ar2dlm_ray.cluster.metrics import METRIC_NAMES, POOL_GAUGES, POOL_TAG_KEYS, TAG_KEYS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_grafana_dashboard_uses_only_defined_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "ar2dlm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bray_ar2dlm_\w+", expr)}
    defined = {f"ray_{n}" for n in METRIC_NAMES}
    assert used <= defined, used - defined
    assert used == defined, f"metrics without a panel: {defined - used}"
    # Every panel is per actor (the pool gauges: per pool) and filtered by the dashboard's run variable.
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert all('run=~"$run"' in t["expr"] for t in targets)
    for t in targets:
        per_pool = any(f"ray_ar2dlm_{name}" in t["expr"] for name in POOL_GAUGES)
        assert ("{{pool}}" if per_pool else "{{actor}}") in t["legendFormat"], t
    assert {"pool", "actor", "run"} == set(TAG_KEYS) and {"pool", "run"} == set(POOL_TAG_KEYS)


def test_prometheus_config_scrapes_a_ray_sessions_service_discovery_file():
    """The file that Ray's head writes in its session directory (not the machine-wide link, which follows the
    newest Ray on the machine), and the comments say how to pick one cluster's session among several."""
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    (job,) = yaml.safe_load(text)["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/session_latest/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert "--temp-dir=/tmp/ray-mine" in text and "grep -lx 6379 /tmp/ray/session_*/gcs_server_port_*" in text
