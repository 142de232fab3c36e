"""Entrypoint of a Ray training job: `python -m ar2dlm_ray.train --config FILE [key=value ...] [--resume|--overwrite]`.

Submitted with `ray job submit --working-dir . -- python -m ar2dlm_ray.train ...` it joins that cluster;
run directly it joins $RAY_ADDRESS or starts an embedded local Ray. The run is always mode=ray.
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config


def run(config: str, overrides: list[str], resume: bool = False, overwrite: bool = False,
        allow_change: tuple[str, ...] = (), log=None, resume_hint: str | None = None) -> dict:
    from .cluster.driver import train

    cfg = load_config(config, [*overrides, "mode=ray"], warn_ignored=True)
    return train(cfg, resume=resume, log=log or (lambda *a: print(*a, flush=True)), overwrite=overwrite,
                 allow_change=allow_change, resume_hint=resume_hint)


def main(argv: list[str] | None = None) -> int:
    from .cli import add_run_dir_flags, resume_of, run_guarded

    parser = argparse.ArgumentParser(prog="python -m ar2dlm_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    add_run_dir_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    # Inside `ray job submit`: deploy/submit.sh ... --resume; run here: ar2dlm train ... mode=ray --resume.
    resume = resume_of(args.config, args.overrides, args.allow_change, ray_mode=True)
    return run_guarded(run, args.config, args.overrides, args.resume, args.overwrite, tuple(args.allow_change),
                       None, resume, resume=resume)


if __name__ == "__main__":
    sys.exit(main())
