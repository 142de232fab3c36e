"""Run directories and checkpoints, shared by the local trainer and the Ray driver.

A run directory holds config.json, the metrics log, `checkpoints/` (`step_N/{student/, trainer_state.pt}`
and `latest.json`, which names the newest complete one), `summary.json` and `final/`. A fresh run never
starts over a previous one unless told to (--overwrite); --resume continues from the newest good
checkpoint, and only when the config has not changed what is trained (or the change is allowed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .config import ConfigError, RunConfig, RunError, dump_config
from .student import SPEC_FILE

CHECKPOINT_NAME = re.compile(r"step_(\d+)")
# What a previous run leaves besides its metrics log (config.json alone is a run that never started).
RUN_ENTRIES = ("checkpoints", "summary.json", "final")
# Config keys (or whole sections) a resume may change without changing what is trained: how long to run,
# where and how often to write, what to log, evaluation, and where and on how many actors the pools run.
SAFE_CHANGES = ("train.max_steps", "train.out_dir", "train.checkpoint_every", "train.keep_checkpoints", "logging",
                "eval", "ray", "model.device", "teacher.num_replicas", "teacher.pool", "teacher.call_timeout_s",
                "rollout", "learner.num_cpus", "learner.num_gpus", "learner.resources", "learner.labels",
                "learner.max_restarts")
STATE_KEYS = {"step", "next_batch", "optimizer", "scheduler", "rng", "accounting", "config"}
ABSENT = "(absent)"
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the entrypoint of a submitted job


def flops(acc: dict, n_teacher: int, n_student: int, block_size: int) -> dict:
    """Training FLOPs as the paper counts them, and including the sampler's forwards."""
    paper = 2 * n_teacher * acc["tokens_trained"] + 6 * n_student * acc["tokens_trained"]
    sampler = 2 * n_student * acc["sampler_forwards"] * block_size
    return {"flops_paper": paper, "flops_with_sampler": paper + sampler}


# ---- the run directory ------------------------------------------------------------------------------------
def previous_run(out_dir: Path, metrics_file: str) -> list[str]:
    """The entries of a previous run in `out_dir` (none for an empty or missing directory)."""
    return [name for name in (metrics_file, *RUN_ENTRIES) if (out_dir / name).exists()]


def check_run_dir(out_dir: Path, metrics_file: str, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a fresh run over a previous one, contradictory flags, and (in a job submitted
    with `ray job submit`) a relative out_dir."""
    if not out_dir.is_absolute() and os.environ.get(JOB_ENV_VAR):
        raise ConfigError(f"train.out_dir {str(out_dir)!r} is relative: in a job submitted with `ray job submit` it "
                          "would land in Ray's temporary copy of the working directory and be deleted with it; give "
                          "an absolute path on storage every node mounts, e.g. train.out_dir=/mnt/shared/runs/micro")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir and --overwrite replaces it; give one of them")
    found = previous_run(out_dir, metrics_file)
    if found and not (resume or overwrite):
        raise ConfigError(f"{out_dir} holds a previous run ({', '.join(found)}); pass --resume to continue it or "
                          "--overwrite to replace it, or choose another train.out_dir")


def checkpoint_due(step: int, total: int, every: int) -> bool:
    """Checkpoints fall on multiples of checkpoint_every and on the last step, so a resumed run (or one stopped
    early with its own checkpoint) keeps the schedule of an uninterrupted one."""
    return step % every == 0 or step >= total


class StopRequest:
    """SIGTERM (what `ray job stop` and most schedulers send) asks the training loop to checkpoint after the step
    in progress and stop. The handler then steps aside, so a second SIGTERM ends the process at once. Only the
    main thread can take signals; elsewhere (a run inside a Ray task) it never fires."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.restore()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def stopped(self, step: int, ckpt: Path) -> RunError:
        self.restore()
        return RunError(f"stopped by SIGTERM after step {step}; checkpoint {ckpt} written", resumable=True)


def clear_run(out_dir: Path, metrics_file: str) -> None:
    """Remove a previous run's files (only those: the directory may hold other things, e.g. the demo's)."""
    for name in previous_run(out_dir, metrics_file):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool, allow_change: tuple[str, ...] = (),
                    log: Callable = print) -> tuple[Path, tuple[Path, dict] | None]:
    """Check the run directory, clear it (--overwrite) or pick the checkpoint to resume from, and record the
    config. Returns the metrics log and, when resuming, the checkpoint directory and its trainer state."""
    out_dir = Path(cfg.train.out_dir)
    metrics_path = out_dir / cfg.logging.metrics_file
    check_run_dir(out_dir, cfg.logging.metrics_file, resume, overwrite)
    if overwrite:
        clear_run(out_dir, cfg.logging.metrics_file)
    resumed = None
    if resume:
        ckpt, state = resumed = read_checkpoint(out_dir / "checkpoints", log)
        check_resume_config(state["config"], dump_config(cfg), allow_change, ckpt)
        trim_metrics(metrics_path, state["step"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    return metrics_path, resumed


def trim_metrics(metrics_path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint: that work will be redone."""
    if metrics_path.exists():
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        metrics_path.write_text("".join(k + "\n" for k in kept))


# ---- checkpoints ------------------------------------------------------------------------------------------
def checkpoint_steps(root: Path) -> dict[int, Path]:
    """The checkpoint directories under `root` by step number, oldest first (numbers, not names, order them:
    `step_10000000` comes after `step_9999999`)."""
    found = {}
    for path in root.glob("step_*"):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def write_checkpoint(root: Path, step: int, save_student: Callable[[Path], object], state: dict, keep: int) -> Path:
    """`root/step_N/{student/, trainer_state.pt}`; then `root/latest.json`, only once the directory is
    complete; then pruning to the `keep` newest, so that latest.json never names a missing checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp, aside = root / f".tmp-{name}", root / f".old-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    tmp.mkdir()
    save_student(tmp / "student")
    torch.save(state, tmp / "trainer_state.pt")
    final = root / name
    if final.exists():  # the same step again (the experiment runner checkpoints after evaluating)
        os.replace(final, aside)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.json.tmp"
    latest_tmp.write_text(json.dumps({"checkpoint": name, "step": step}))
    os.replace(latest_tmp, root / "latest.json")
    shutil.rmtree(aside, ignore_errors=True)
    # Newer numbers than this step are left from before a resume; the run replaces them when it gets there.
    older = [path for number, path in checkpoint_steps(root).items() if number < step]
    for path in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read_checkpoint(root: Path, log: Callable = print) -> tuple[Path, dict]:
    """The checkpoint latest.json names and its trainer state; when that one is damaged, the newest good
    other one, with one log line that says what was wrong."""
    problems, candidates = [], list(reversed(checkpoint_steps(root).values()))
    try:
        named = _latest(root)
        candidates = [named] + [c for c in candidates if c != named]
    except ValueError as exc:
        problems.append(str(exc))
    for ckpt in candidates:
        try:
            state = load_trainer_state(ckpt)
        except ValueError as exc:
            problems.append(f"{ckpt.name} {exc}")
            continue
        if problems:
            log(f"[train] {root}: {'; '.join(problems)}; resuming from {ckpt.name} instead")
        return ckpt, state
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise ConfigError(f"--resume: no usable checkpoint in {root}{detail}; start without --resume, or with --overwrite")


def _latest(root: Path) -> Path:
    """The checkpoint directory latest.json names (ValueError when the file is missing or bad)."""
    if not (root / "latest.json").is_file():
        raise ValueError("latest.json is missing")
    try:
        name = json.loads((root / "latest.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"latest.json is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"latest.json names {name!r}, which is not a checkpoint")
    return root / name


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint, loaded without pickle (tensors, containers, numbers and strings
    only, so a planted file cannot run code), after checking that its student files are whole. ValueError
    says what is wrong."""
    student = ckpt / "student"
    try:
        json.loads((student / SPEC_FILE).read_text())
        json.loads((student / "config.json").read_text())
        weights = sorted(student.glob("*.safetensors"))
        if not weights:
            raise ValueError("no *.safetensors")
        for path in weights:
            with safe_open(path, "pt"):  # reads the header and checks it covers the file: truncation shows
                pass
    except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged checkpoint
        raise ValueError(f"has a damaged student/ ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, garbage, or holding objects other than plain data
        raise ValueError(f"has an unreadable trainer_state.pt ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        raise ValueError("has a trainer_state.pt that is not a trainer state")
    return state


# ---- config changes on --resume ---------------------------------------------------------------------------
def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (old, new) for every setting that differs (ABSENT where a config lacks the key)."""
    a, b = _flatten(old), _flatten(new)
    return {key: (a.get(key, ABSENT), b.get(key, ABSENT)) for key in sorted(a.keys() | b.keys())
            if a.get(key, ABSENT) != b.get(key, ABSENT)}


def refused_changes(old: dict, new: dict, allow: tuple[str, ...] = ()) -> dict[str, tuple]:
    """The changes a resume may not make: those outside SAFE_CHANGES and `allow` (keys or sections)."""
    allowed = (*SAFE_CHANGES, *allow)
    return {key: change for key, change in config_changes(old, new).items()
            if not any(key == a or key.startswith(a + ".") for a in allowed)}


def check_resume_config(old: dict, new: dict, allow: tuple[str, ...], ckpt: Path) -> None:
    refused = refused_changes(old, new, allow)
    if refused:
        changes = ", ".join(f"{key} {_show(o)} -> {_show(n)}" for key, (o, n) in refused.items())
        raise ConfigError(f"--resume: the config changes what {ckpt} was trained with: {changes}; restore it, or "
                          f"pass --allow-change {','.join(refused)} to continue anyway")


def _show(value) -> str:
    return value if value is ABSENT else json.dumps(value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
