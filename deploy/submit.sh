#!/usr/bin/env bash
# Submit a training run to a Ray cluster:
#   deploy/submit.sh CONFIG [key=value ...] [--resume | --overwrite | --allow-change KEYS] [ray job submit options]
# CONFIG: a path from the current directory. The config and overrides are checked here first (unknown keys, bad
# values, a relative train.out_dir), in a second, before anything is uploaded (python -m ar2dlm_ray.validate).
# Options of `ray job submit` itself pass through, e.g. --no-wait or --entrypoint-num-cpus 1.
# The job gets the submission id <run name>-<time> (also the run's Ray namespace, unless logging.run_name is set)
# and metadata: run_name, config, git_commit.
# RAY_ADDRESS: the dashboard address (default http://127.0.0.1:8265, e.g. after `ray dashboard` or
# `kubectl port-forward svc/<cluster>-head-svc 8265`). The cluster's token: ~/.ray/auth_token, or
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH in the environment (see deploy/cluster.yaml, deploy/rayjob.yaml).
# Only the repository's tracked files are uploaded (untracked files such as .env or keys stay here), and the
# config: one outside the repository, or not tracked, travels with the job (it is data, not code).
# `ray`: the one on PATH, else this clone's .venv/bin/ray (`make setup`).
set -euo pipefail
usage="usage: deploy/submit.sh CONFIG [key=value ...] [--resume|--overwrite|--allow-change KEYS] [ray job submit options]"
config=${1:?$usage}
shift
[[ -f "$config" ]] || { echo "no such config: $config" >&2; exit 2; }
overrides=() flags=() ray_options=()
while (($#)); do
    case $1 in
        --resume | --overwrite | --allow-change=*) flags+=("$1") ;;
        --allow-change) flags+=("$1" "${2:?--allow-change needs KEYS}"); shift ;;
        -*=*) ray_options+=("$1") ;;
        -*) ray_options+=("$1")  # with its value, if one follows (an override always has a '=')
            if (($# > 1)) && [[ $2 != -* && $2 != *=* ]]; then ray_options+=("$2"); shift; fi ;;
        *=*) overrides+=("$1") ;;
        *) echo "$1 is not key=value, a run flag or a ray job submit option; $usage" >&2; exit 2 ;;
    esac
    shift
done
repo=$(cd "$(dirname "$0")/.." && pwd -P)
python=$repo/.venv/bin/python
[[ -x $python ]] || python=python3
path=$(realpath "$config")
entry_config=${path#"$repo"/} shown=${path#"$repo"/}  # shown: the path a resume command gives, from the repository
if [[ $entry_config == "$path" ]] || ! git -C "$repo" ls-files --error-unmatch "$entry_config" >/dev/null 2>&1; then
    entry_config=submitted/$(basename "$config")  # outside the repository or untracked: uploaded beside the code
fi
commit=$(git -C "$repo" rev-parse HEAD)$(git -C "$repo" diff --quiet HEAD || echo "-dirty")
job=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m ar2dlm_ray.validate --config "$config" \
    --shown-as "$shown" --git-commit "$commit" ${overrides[@]+"${overrides[@]}"}) || exit 2
mapfile -t job_options <<< "$job"
ray=$(command -v ray || echo "$repo/.venv/bin/ray")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/code"
git -C "$repo" ls-files -z --cached | (cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$tmp/code"
if [[ $entry_config == submitted/* ]]; then
    mkdir -p "$tmp/code/submitted"
    cp "$path" "$tmp/code/$entry_config"
fi
# The job's `python` is the first on PATH where the head was started, which need not be the environment Ray
# runs in (`.venv/bin/ray start` without activating it finds the system python, without the dependencies).
# This clone's .venv goes first on the job's PATH: on a cluster started from this clone it is that
# environment; on any other cluster no such directory exists and the image's own (first on its PATH) runs it.
cp "$repo/deploy/runtime_env.yaml" "$tmp/runtime_env.yaml"
[[ -x $repo/.venv/bin/python ]] && printf '  PATH: "%s:${PATH}"\n' "$repo/.venv/bin" >> "$tmp/runtime_env.yaml"
"$ray" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env "$tmp/runtime_env.yaml" \
    --working-dir "$tmp/code" "${job_options[@]}" ${ray_options[@]+"${ray_options[@]}"} \
    -- python -m ar2dlm_ray.train --config "$entry_config" ${overrides[@]+"${overrides[@]}"} ${flags[@]+"${flags[@]}"}
