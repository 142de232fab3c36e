"""The shipped Grafana dashboard and Prometheus configuration against the metrics the code defines (a real
Prometheus scrapes a running job in tests/test_ray_job.py)."""

import json
import re
from pathlib import Path

import yaml

from ar2dlm_ray.cluster.metrics import METRIC_NAMES, TAG_KEYS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_grafana_dashboard_uses_only_defined_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "ar2dlm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bray_ar2dlm_\w+", expr)}
    defined = {f"ray_{n}" for n in METRIC_NAMES}
    assert used <= defined, used - defined
    assert used == defined, f"metrics without a panel: {defined - used}"
    # Every panel is per actor and filtered by the dashboard's run variable.
    assert all("{{actor}}" in t["legendFormat"] and 'run=~"$run"' in t["expr"]
               for p in dashboard["panels"] for t in p.get("targets", []))
    assert {"pool", "actor", "run"} == set(TAG_KEYS)


def test_prometheus_config_scrapes_rays_service_discovery_file():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
