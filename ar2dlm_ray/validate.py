"""`python -m ar2dlm_ray.validate --config FILE [key=value ...]`: the checks of a Ray training job's config, made
where it is submitted, before anything is uploaded (deploy/submit.sh). Loads the config only (no torch, no Ray:
about a second). Prints the job's `ray job submit` options, one a line: its submission id (<run name>-<time>,
which also names the run's Ray namespace) and its metadata (run name, config path, git commit). A bad key or
value is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig, load_config


def out_dir_problem(cfg: RunConfig) -> str | None:
    """What is wrong with the run directory of a submitted job (None if nothing)."""
    out_dir = cfg.train.out_dir
    if "://" in out_dir or Path(out_dir).is_absolute():
        return None
    return (f"train.out_dir {out_dir} is relative: a submitted job runs in a temporary copy of the code, where its "
            "run would land and be lost; give a path that every node mounts (e.g. train.out_dir=/mnt/shared/runs/"
            f"{Path(out_dir).name}) or a storage URI (s3://bucket/runs/{Path(out_dir).name})")


def check_job(config: str, overrides: list[str]) -> RunConfig:
    """The job's config as its entrypoint will load it; model paths are the cluster's, not looked up here."""
    cfg = load_config(config, [*overrides, "mode=ray"], warn_ignored=True, elsewhere=True)
    if problem := out_dir_problem(cfg):
        raise ConfigError(problem)
    return cfg


def submit_options(cfg: RunConfig, config: str, commit: str) -> list[str]:
    """`ray job submit` options: the submission id and the metadata (`config`: the path that resumes the run)."""
    name = cfg.logging.run_name or Path(cfg.train.out_dir).name
    job_id = re.sub(r"[^\w.-]+", "-", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    metadata = {"run_name": cfg.logging.run_name or job_id, "config": config, "git_commit": commit}
    return [f"--submission-id={job_id}", f"--metadata-json={json.dumps(metadata)}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ar2dlm_ray.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--shown-as", default=None, help="the config's path in the metadata (default: --config)")
    parser.add_argument("--git-commit", default="unknown")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = check_job(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"ar2dlm: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(submit_options(cfg, args.shown_as or args.config, args.git_commit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
