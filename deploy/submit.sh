#!/usr/bin/env bash
# Submit a training run to a Ray cluster: deploy/submit.sh CONFIG [key=value ...] [--resume]
# RAY_ADDRESS: the dashboard address (default http://127.0.0.1:8265, e.g. after `ray dashboard` or
# `kubectl port-forward svc/<cluster>-head-svc 8265`). Run from the repository root.
set -euo pipefail
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...] [--resume]}
shift
cd "$(dirname "$0")/.."
[[ -f "$config" ]] || { echo "no such config: $config" >&2; exit 2; }
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
    -- python -m ar2dlm_ray.train --config "$config" "$@"
