#!/usr/bin/env bash
# Submit a training run to a Ray cluster: deploy/submit.sh CONFIG [key=value ...] [--resume]
# RAY_ADDRESS: the dashboard address (default http://127.0.0.1:8265, e.g. after `ray dashboard` or
# `kubectl port-forward svc/<cluster>-head-svc 8265`). The cluster's token: ~/.ray/auth_token, or
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH in the environment (see deploy/cluster.yaml, deploy/rayjob.yaml).
# Only the repository's tracked files are uploaded (untracked files such as .env or keys stay here).
set -euo pipefail
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...] [--resume]}
shift
cd "$(dirname "$0")/.."
[[ -f "$config" ]] || { echo "no such config: $config" >&2; exit 2; }
git ls-files --error-unmatch "$config" >/dev/null 2>&1 || {
    echo "$config is not tracked by git, so it would not be uploaded; git add it first" >&2; exit 2; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
git ls-files -z --cached | tar --null -T - -cf - | tar -xf - -C "$stage"
ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$stage" \
    -- python -m ar2dlm_ray.train --config "$config" "$@"
