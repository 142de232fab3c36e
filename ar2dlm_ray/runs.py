"""Run directories and checkpoints, shared by the local trainer and the Ray driver.

A run directory holds config.json, the metrics log, `checkpoints/` (`step_N/{student/, trainer_state.pt}`
and `latest.json`, which names the newest complete one), `summary.json` and `final/`. A fresh run never
starts over a previous one unless told to (--overwrite); --resume continues from the newest good
checkpoint, and only when the config has not changed what is trained (or the change is allowed).

`train.out_dir` is a path (local, or a shared filesystem every node mounts) or a storage URI that
`pyarrow.fs` opens (s3://, gs://, file:///, ...), as Ray Train's `storage_path` is; see RunStorage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs
import torch
from safetensors import safe_open

from .config import ConfigError, RunConfig, RunError, dump_config
from .data import default_cache_dir
from .outputs import write_text_atomic
from .student import SPEC_FILE

CHECKPOINT_NAME = re.compile(r"step_(\d+)")
# What a previous run leaves besides its metrics log (config.json alone is a run that never started).
RUN_ENTRIES = ("checkpoints", "summary.json", "final")
# Config keys (or whole sections) a resume may change without changing what is trained: how long to run,
# where and how often to write, what to log, evaluation, and where and on how many actors the pools run.
SAFE_CHANGES = ("train.max_steps", "train.out_dir", "train.checkpoint_every", "train.keep_checkpoints", "logging",
                "eval", "ray", "model.device", "teacher.num_replicas", "teacher.pool", "teacher.call_timeout_s",
                "rollout", "learner.num_cpus", "learner.num_gpus", "learner.resources", "learner.labels",
                "learner.max_restarts", "train.activation_checkpointing", "train.loss_chunk_tokens")
STATE_KEYS = {"step", "next_batch", "optimizer", "scheduler", "rng", "accounting", "config"}
ABSENT = "(absent)"
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the entrypoint of a submitted job
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def flops(acc: dict, n_teacher: int, n_student: int, block_size: int) -> dict:
    """Training FLOPs as the paper counts them, and including the sampler's forwards."""
    paper = 2 * n_teacher * acc["tokens_trained"] + 6 * n_student * acc["tokens_trained"]
    sampler = 2 * n_student * acc["sampler_forwards"] * block_size
    return {"flops_paper": paper, "flops_with_sampler": paper + sampler}


# ---- where a run lives: a path or a storage URI ---------------------------------------------------------
def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a storage URI; a one-line ConfigError when pyarrow cannot open it
    (unknown scheme, no support built in, no credentials, bucket unreachable)."""
    if uri.startswith("file://") and not uri.startswith("file:///"):
        raise ConfigError(f"train.out_dir {uri!r}: a file:// URI must be absolute, e.g. file:///mnt/shared/runs/micro")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ArrowNotImplementedError or OSError
        raise ConfigError(f"train.out_dir {uri!r} cannot be opened: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class RunStorage:
    """Where a run's files live. A plain path is the run directory itself, written in place. A storage URI
    is written through `local`, a staging directory (under $AR2DLM_CACHE/runs/, named by a hash of the URI,
    emptied when a run starts), whose files the trainers persist to the URI as they write them; checkpoints
    and final/ go straight to the URI, so a learner on another node can upload its part itself."""

    def __init__(self, out_dir: str | Path):
        self.uri = str(out_dir) if URI.match(str(out_dir)) else None
        if self.uri is None:
            self.local = Path(out_dir)
        else:
            self.fs, self.root = open_uri(self.uri)
            self.local = default_cache_dir() / "runs" / hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.uri or str(self.local)

    def location(self, rel: str) -> str:
        """Where the run keeps `rel`: a path, or a URI (any query, e.g. ?region=, stays at the end)."""
        if self.uri is None:
            return str(self.local / rel)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{rel}{sep}{query}"

    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        if self.uri is None:
            return (self.local / rel).exists()
        return self.fs.get_file_info(self._remote(rel)).type != pafs.FileType.NotFound

    def previous(self, metrics_file: str) -> list[str]:
        """The entries of a previous run (none for an empty or missing run directory)."""
        return [name for name in (metrics_file, *RUN_ENTRIES) if self.exists(name)]

    def check_writable(self) -> None:
        """Write and delete a small file at the URI (OSError when the bucket is missing or read-only)."""
        probe = self._remote(".ar2dlm-write-check")
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        self.fs.delete_file(probe)

    def remove(self, rel: str) -> None:
        """Remove a file or directory of the run (with a URI: there and in the staging directory)."""
        path = self.local / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        if self.uri is not None:
            _delete(self.fs, self._remote(rel))

    def stage(self) -> None:
        """Start with an empty staging directory: what it holds may be from another run to the same URI."""
        if self.uri is not None:
            shutil.rmtree(self.local, ignore_errors=True)
            self.local.mkdir(parents=True)

    def persist(self, *rels: str) -> None:
        """Upload staged files or directories to the URI, in this order (nothing to do for a plain path)."""
        if self.uri is not None:
            for rel in rels:
                if (self.local / rel).exists():
                    _put(self.local / rel, self.fs, self._remote(rel))

    def fetch(self, rel: str) -> None:
        """Download a file or directory of the run from the URI into the staging directory, when it is there."""
        if self.uri is not None and self.exists(rel):
            _get(self.fs, self._remote(rel), self.local / rel)

    def write_checkpoint(self, step: int, save_student: Callable[[str], object], state: dict, keep: int) -> str:
        """write_checkpoint into the run; `save_student(where)` gets a path or a URI. On a URI there is no rename:
        the student and trainer state are uploaded first, then latest.json (one object, which a PUT replaces
        whole), then older checkpoints are pruned there. A checkpoint rewritten for the same step is deleted
        first; were it latest.json's, a resume falls back to the one before."""
        root = self.local / "checkpoints"
        if self.uri is None:
            return str(write_checkpoint(root, step, lambda path: save_student(str(path)), state, keep))
        rel = f"checkpoints/{checkpoint_name(step)}"
        self.remove(rel)
        save_student(self.location(f"{rel}/student"))
        (self.local / rel).mkdir(parents=True)
        torch.save(state, self.local / rel / "trainer_state.pt")
        (root / "latest.json").write_text(json.dumps({"checkpoint": checkpoint_name(step), "step": step}))
        self.persist(f"{rel}/trainer_state.pt", "checkpoints/latest.json")
        shutil.rmtree(self.local / rel)  # trainer states are large; the URI has it
        for old in _pruned(self._remote_steps(), step, keep):
            self.remove(old)
        return self.location(rel)

    def _remote_steps(self) -> dict[int, str]:
        selector = pafs.FileSelector(self._remote("checkpoints"), allow_not_found=True)
        return {int(match.group(1)): f"checkpoints/{info.base_name}" for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.Directory and (match := CHECKPOINT_NAME.fullmatch(info.base_name))}

    def read_checkpoint(self, log: Callable = print) -> tuple[Path, dict]:
        """read_checkpoint on the run. From a URI: latest.json is staged, and each checkpoint only when it is
        tried (usually just the newest), so the fallback from a damaged one works as for a path."""
        root = self.local / "checkpoints"
        if self.uri is not None:
            self.fetch("checkpoints/latest.json")
            for rel in self._remote_steps().values():
                (self.local / rel).mkdir(parents=True, exist_ok=True)  # the candidates; filled when tried
        return read_checkpoint(root, log, self._fetch_checkpoint, self.location("checkpoints"))

    def _fetch_checkpoint(self, ckpt: Path) -> None:
        try:
            self.fetch(f"checkpoints/{ckpt.name}")
        except OSError as exc:
            raise ValueError(f"could not be downloaded ({_first_line(exc)})") from None


def _put(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Copy a local file or directory to `path` on `fs`, replacing it."""
    if local.is_dir():
        _delete(fs, path)  # no stale files from an older copy
    # A local filesystem needs the directories (copy_files only makes those of subdirectories).
    fs.create_dir(path if local.is_dir() else posixpath.dirname(path), recursive=True)
    pafs.copy_files(str(local.absolute()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _get(fs: pafs.FileSystem, path: str, local: Path) -> None:
    is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
    (local if is_dir else local.parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.absolute()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def _delete(fs: pafs.FileSystem, path: str) -> None:
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def save_dir(where: str, save: Callable[[Path], object], shared: bool = False) -> None:
    """`save(path)` writes a directory; here to `where`, a path or a storage URI (then through a temporary
    directory on this node, uploaded from here: a Ray learner writes the student on its own node). `shared`:
    several processes write parts of it (each rank its shards), so each uploads only its own files and never
    removes the others'."""
    if not URI.match(where):
        save(Path(where))
        return
    fs, path = open_uri(where)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "dir"
        save(local)
        if not shared:
            _put(local, fs, path)
            return
        fs.create_dir(path, recursive=True)
        for part in local.iterdir():
            _put(part, fs, f"{path.rstrip('/')}/{part.name}")


def sibling(where: str, name: str) -> str:
    """The entry `name` beside `where` (a path, or a storage URI whose query, e.g. ?region=, stays at the end)."""
    base, sep, query = str(where).partition("?") if URI.match(str(where)) else (str(where), "", "")
    return f"{posixpath.dirname(base.rstrip('/'))}/{name}{sep}{query}"


@contextmanager
def local_dir(where: str) -> Iterator[Path]:
    """The directory at `where`, a path or a storage URI (then downloaded to a temporary directory)."""
    if not URI.match(where):
        yield Path(where)
        return
    fs, path = open_uri(where)
    with tempfile.TemporaryDirectory() as tmp:
        _get(fs, path, Path(tmp) / "dir")
        yield Path(tmp) / "dir"


# ---- the run directory ------------------------------------------------------------------------------------
def check_run_dir(out_dir: str | Path, metrics_file: str, resume: bool, overwrite: bool,
                  timeout_s: float = 30.0) -> None:
    """Refuse, before any work, a storage URI that cannot be opened or written (or does not answer within
    `timeout_s`), a fresh run over a previous one, --resume with nothing to resume, contradictory flags, and
    (in a job submitted with `ray job submit`) a relative out_dir."""
    run = RunStorage(out_dir)
    if run.uri is None and not run.local.is_absolute() and os.environ.get(JOB_ENV_VAR):
        raise ConfigError(f"train.out_dir {str(out_dir)!r} is relative: in a job submitted with `ray job submit` it "
                          "would land in Ray's temporary copy of the working directory and be deleted with it; give "
                          "an absolute path on storage every node mounts, e.g. train.out_dir=/mnt/shared/runs/micro, "
                          "or a storage URI, e.g. train.out_dir=s3://bucket/runs/micro")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir and --overwrite replaces it; give one of them")
    try:
        found = _within(timeout_s, run, lambda: run.previous(metrics_file))
        if run.uri is not None:
            _within(timeout_s, run, run.check_writable)
    except OSError as exc:  # e.g. no credentials, no such bucket, or no access to it
        raise ConfigError(f"train.out_dir {run.uri!r} cannot be used: {_first_line(exc)}") from None
    if resume and "checkpoints" not in found:  # before any model loads or Ray starts
        raise ConfigError(f"--resume: {run} holds no checkpoints to continue from"
                          f"{' (it holds ' + ', '.join(found) + ')' if found else ''}; check train.out_dir, or start "
                          f"without --resume")
    if found and not (resume or overwrite):
        raise ConfigError(f"{run} holds a previous run ({', '.join(found)}); pass --resume to continue it or "
                          "--overwrite to replace it, or choose another train.out_dir")


def _within(timeout_s: float, run: "RunStorage", call: Callable):
    """`call()`, or a one-line ConfigError when it has not answered within `timeout_s` (pyarrow waits
    without end on a gs:// bucket it cannot reach); the call is left to finish on a daemon thread."""
    if run.uri is None:
        return call()
    answer: dict = {}

    def work():
        try:
            answer["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            answer["error"] = exc

    thread = threading.Thread(target=work, daemon=True, name="storage-check")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ConfigError(f"train.out_dir {run.uri!r} did not answer within {timeout_s:g}s (ray.connect_timeout_s): "
                          f"check the bucket's name, the network and the credentials")
    if "error" in answer:
        raise answer["error"]
    return answer.get("value")


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

    def stopped(self, step: int, ckpt: str | Path) -> RunError:
        self.restore()
        return RunError(f"stopped by SIGTERM after step {step}; checkpoint {ckpt} written", resumable=True)


def clear_run(out_dir: str | Path, metrics_file: str) -> None:
    """Remove a previous run's files (only those: the directory may hold other things, e.g. the demo's)."""
    run = RunStorage(out_dir)
    for name in run.previous(metrics_file):
        run.remove(name)


def prepare_run_dir(run: RunStorage, cfg: RunConfig, resume: bool, overwrite: bool,
                    allow_change: tuple[str, ...] = (), log: Callable = print) -> tuple[Path, tuple[Path, dict] | None]:
    """Check the run directory, clear it (--overwrite) or pick the checkpoint to resume from, and record the
    config. Returns the metrics log and, when resuming, the (staged) checkpoint directory and its trainer state."""
    metrics_file = cfg.logging.metrics_file
    check_run_dir(str(run), metrics_file, resume, overwrite)
    if overwrite:
        clear_run(str(run), metrics_file)
    run.stage()
    resumed = None
    if resume:
        ckpt, state = resumed = run.read_checkpoint(log)
        check_resume_config(state["config"], dump_config(cfg), allow_change,
                            run.location(f"checkpoints/{ckpt.name}"))
        run.fetch(metrics_file)
        trim_metrics(run.local / metrics_file, state["step"], log)
        run.persist(metrics_file)
    run.local.mkdir(parents=True, exist_ok=True)
    (run.local / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    run.persist("config.json")
    return run.local / metrics_file, resumed


def trim_metrics(metrics_path: Path, step: int, log: Callable = print) -> None:
    """Drop metric lines written after the checkpoint: that work will be redone. A damaged line (what a crash
    mid-write or a full disk leaves: cut short, or not a record of a step) is dropped too, with a log line."""
    if not metrics_path.exists():
        return
    kept, damaged = [], []
    for number, line in enumerate(metrics_path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            at = record["step"]
            if not isinstance(at, int) or isinstance(at, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            damaged.append(number)
            continue
        if at <= step:
            kept.append(line)
    if damaged:
        log(f"[train] {metrics_path}: dropped {len(damaged)} damaged line(s) (line {', '.join(map(str, damaged))}: "
            f"cut short or without a step); the rest is kept")
    write_text_atomic(metrics_path, "".join(k + "\n" for k in kept))


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


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _pruned(steps: dict[int, object], step: int, keep: int) -> list:
    """What pruning to the `keep` newest removes after writing `step`. Newer numbers than this step are left
    from before a resume; the run replaces them when it gets there."""
    older = [where for number, where in sorted(steps.items()) if number < step]
    return older[:max(0, len(older) - (keep - 1))]


def write_checkpoint(root: Path, step: int, save_student: Callable[[Path], object], state: dict, keep: int) -> Path:
    """`root/step_N/{student/, trainer_state.pt}`; then `root/latest.json`, only once the directory is
    complete; then pruning to the `keep` newest, so that latest.json never names a missing checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp, aside = root / f".tmp-{name}", root / f".old-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    tmp.mkdir()
    try:
        save_student(tmp / "student")
        torch.save(state, tmp / "trainer_state.pt")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never a partial checkpoint
        if disk_full(exc):
            raise _full_disk(root, name, state) from None
        raise
    final = root / name
    if final.exists():  # the same step again (the experiment runner checkpoints after evaluating)
        os.replace(final, aside)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.json.tmp"
    latest_tmp.write_text(json.dumps({"checkpoint": name, "step": step}))
    os.replace(latest_tmp, root / "latest.json")
    shutil.rmtree(aside, ignore_errors=True)
    for path in _pruned(checkpoint_steps(root), step, keep):
        shutil.rmtree(path, ignore_errors=True)
    return final


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps: a Ray task error's cause) is a write that found no space or quota left.
    torch.save reports it as a RuntimeError from its zip writer ("unexpected pos"), not as an OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(exc) for sign in ("No space left on device", "Disk quota exceeded", "unexpected pos")):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


def _full_disk(root: Path, name: str, state: dict) -> RunError:
    """The one line for a checkpoint that found the disk full: where, how much it needs, what still resumes."""
    previous = list(checkpoint_steps(root).values())
    if previous:
        needed, basis = _bytes_under(previous[-1]), f"the size of {previous[-1].name}"
    else:
        needed, basis = _tensor_bytes(state), "its trainer state alone, without the student"
    free = shutil.disk_usage(root).free
    resumes = f"{previous[-1].name} still resumes" if previous else "there is no earlier checkpoint to resume"
    return RunError(f"no space left on the device of {root} while writing checkpoint {name}: it needs about "
                    f"{needed / 1e6:,.1f} MB ({basis}) and {free / 1e6:,.1f} MB are free; nothing partial was left and "
                    f"{resumes}; free space (or move train.out_dir and copy the run there)", resumable=bool(previous))


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def read_checkpoint(root: Path, log: Callable = print, fetch: Callable[[Path], object] = lambda ckpt: None,
                    shown: str | None = None) -> tuple[Path, dict]:
    """The checkpoint latest.json names and its trainer state; when that one is damaged, the newest good
    other one, with one log line that says what was wrong. `fetch(ckpt)` stages a checkpoint before it is
    read (ValueError when it cannot); `shown` names `root` in messages (a staged copy: its URI)."""
    shown = shown or str(root)
    problems, candidates = [], list(reversed(checkpoint_steps(root).values()))
    try:
        named = _latest(root)
        candidates = [named] + [c for c in candidates if c != named]
    except ValueError as exc:
        problems.append(str(exc))
    for ckpt in candidates:
        try:
            fetch(ckpt)
            state = load_trainer_state(ckpt)
        except ValueError as exc:
            problems.append(f"{ckpt.name} {exc}")
            continue
        if problems:
            log(f"[train] {shown}: {'; '.join(problems)}; resuming from {ckpt.name} instead")
        return ckpt, state
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise ConfigError(f"--resume: no usable checkpoint in {shown}{detail}; start without --resume, or with --overwrite")


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


def check_resume_config(old: dict, new: dict, allow: tuple[str, ...], ckpt: str | Path) -> None:
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
