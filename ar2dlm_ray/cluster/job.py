"""What a driver knows of the Ray job it runs in, and the command that resumes its run.

`ray job submit` gives its entrypoint the job's runtime env and metadata in RAY_JOB_CONFIG_JSON_ENV_VAR;
the metadata holds the submission id, and deploy/submit.sh adds the run name, the config path as the user
gave it (the job sees an uploaded copy) and the git commit. No Ray import: the CLI's error path uses this.
"""

from __future__ import annotations

import json
import os
import shlex

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_metadata() -> dict | None:
    """The submitted job's metadata; None outside `ray job submit`."""
    text = os.environ.get(JOB_ENV)
    if not text:
        return None
    try:
        return json.loads(text).get("metadata") or {}
    except (ValueError, AttributeError):
        return {}


def submission_id() -> str | None:
    return (job_metadata() or {}).get("job_submission_id")


def resume_command(config: str, overrides: list[str], flags: list[str] = (), ray_mode: bool = False) -> str:
    """The exact command that continues this run from its last checkpoint: inside a submitted job,
    deploy/submit.sh again (with the user's config path); elsewhere `ar2dlm train` (`ray_mode`: the run was
    started by the Ray entrypoint, which forces mode=ray)."""
    overrides = list(overrides)
    meta = job_metadata()
    if meta is not None:
        return shlex.join(["deploy/submit.sh", meta.get("config") or config, *overrides, *flags, "--resume"])
    if ray_mode and "mode=ray" not in overrides:
        overrides.append("mode=ray")
    return shlex.join(["ar2dlm", "train", "--config", config, *overrides, *flags, "--resume"])
