#!/usr/bin/env bash
# Submit a training run to a Ray cluster: deploy/submit.sh CONFIG [key=value ...] [--resume]
# RAY_ADDRESS: the dashboard address (default http://127.0.0.1:8265, e.g. after `ray dashboard` or
# `kubectl port-forward svc/<cluster>-head-svc 8265`). The cluster's token: ~/.ray/auth_token, or
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH in the environment (see deploy/cluster.yaml, deploy/rayjob.yaml).
# Only the repository's tracked files are uploaded (untracked files such as .env or keys stay here).
# `ray`: the one on PATH, else this clone's .venv/bin/ray (`make setup`).
set -euo pipefail
config=${1:?usage: deploy/submit.sh CONFIG [key=value ...] [--resume]}
shift
cd "$(dirname "$0")/.."
[[ -f "$config" ]] || { echo "no such config: $config" >&2; exit 2; }
git ls-files --error-unmatch "$config" >/dev/null 2>&1 || {
    echo "$config is not tracked by git, so it would not be uploaded; git add it first" >&2; exit 2; }
ray=$(command -v ray || echo .venv/bin/ray)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/code"
git ls-files -z --cached | tar --null -T - -cf - | tar -xf - -C "$tmp/code"
# The job's `python` is the first on PATH where the head was started, which need not be the environment Ray
# runs in (`.venv/bin/ray start` without activating it finds the system python, without the dependencies).
# This clone's .venv goes first on the job's PATH: on a cluster started from this clone it is that
# environment; on any other cluster no such directory exists and the image's own (first on its PATH) runs it.
cp deploy/runtime_env.yaml "$tmp/runtime_env.yaml"
[[ -x .venv/bin/python ]] && printf '  PATH: "%s:${PATH}"\n' "$PWD/.venv/bin" >> "$tmp/runtime_env.yaml"
"$ray" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env "$tmp/runtime_env.yaml" \
    --working-dir "$tmp/code" -- python -m ar2dlm_ray.train --config "$config" "$@"
