"""Entrypoint of a Ray training job: `python -m ar2dlm_ray.train --config FILE [key=value ...] [--resume]`.

Submitted with `ray job submit --working-dir . -- python -m ar2dlm_ray.train ...` it joins that cluster;
run directly it joins $RAY_ADDRESS or starts an embedded local Ray. The run is always mode=ray.
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config


def run(config: str, overrides: list[str], resume: bool = False, log=None) -> dict:
    from .cluster.driver import train

    cfg = load_config(config, [*overrides, "mode=ray"])
    return train(cfg, resume=resume, log=log or (lambda *a: print(*a, flush=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ar2dlm_ray.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    from .cli import run_guarded

    return run_guarded(run, args.config, args.overrides, args.resume)


if __name__ == "__main__":
    sys.exit(main())
