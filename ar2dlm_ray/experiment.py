"""Experiments (OPDLM.md §8-§9): recipes x seeds trained from one teacher, each evaluated whenever its
training tokens pass a budget, then summarised with 95 % intervals, headline figures and plots.

Layout of `<results_dir>/<name>/`:
  runs/<arm>-s<seed>.json   a finished run: one evaluation per budget (its presence means "done")
  reference.json            the AR teacher and the converted student before any training
  summary.json, report.md, *.png
Unfinished runs keep their training state under `<work_dir>/<name>/<arm>-s<seed>/` and resume from the
checkpoint written after their last evaluation.

All arms hold the learning rate constant after warm-up: a budget sweep evaluates one run at several
points, and a schedule tied to the run's end would make early budgets see a different learning rate
from one arm (or budget list) to another.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Callable

import torch

from .config import ExperimentConfig, RunConfig, StartupError, dump_config, load_config
from .findings import first_reach, findings, format_findings, mean_ci, paired
from .outputs import check_output_dir, is_marked, write_marker, write_text_atomic

RUN_STEPS = 1_000_000_000  # runs end at their last budget, never by step count


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    budgets: tuple[int, ...]
    lr: float | None = None  # None: the run config's own learning rate (no lr_grid)

    @property
    def key(self) -> str:
        return f"{self.arm}-s{self.seed}" if self.lr is None else f"{self.arm}-lr{self.lr:g}-s{self.seed}"


def code_version() -> str:
    """The git commit of the code (with -dirty for uncommitted changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return f"ar2dlm_ray {version('ar2dlm_ray')}"


def _atomic_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


class Experiment:
    def __init__(self, exp: ExperimentConfig, log: Callable = print):
        self.exp, self.log = exp, log
        self.out = Path(exp.results_dir) / exp.name
        self.work = Path(exp.work_dir) / exp.name
        self.base = load_config(exp.run_config, exp.overrides)

    def specs(self, finished: list[dict] | None = None) -> list[RunSpec]:
        """The runs that can be named now, given the finished runs (read from disk when not given).
        Seed-major, so that a partial experiment already holds every arm for its first seeds. With an
        lr_grid, the grid seeds run every rate first; an arm's other seeds appear once its grid runs have
        finished and chosen its rate."""
        exp = self.exp
        if not exp.lr_grid:
            return [RunSpec(arm, seed, tuple(exp.budgets_for(arm))) for seed in exp.seeds for arm in exp.arms]
        out = [RunSpec(arm, seed, tuple(exp.budgets_for(arm)), lr)
               for seed in exp.grid_seeds for arm in exp.arms for lr in exp.lr_grid]
        chosen = self.chosen_lrs(self.finished_runs() if finished is None else finished)
        return out + [RunSpec(arm, seed, tuple(exp.budgets_for(arm)), chosen[arm]["lr"])
                      for seed in exp.seeds if seed not in exp.grid_seeds for arm in exp.arms if arm in chosen]

    def total_runs(self) -> int:
        exp = self.exp
        per_arm = len(exp.lr_grid) * len(exp.grid_seeds) + len(set(exp.seeds) - set(exp.grid_seeds)) if exp.lr_grid \
            else len(exp.seeds)
        return per_arm * len(exp.arms)

    def chosen_lrs(self, runs: list[dict]) -> dict:
        """{arm: select_lr(...)} for the arms whose grid runs have all finished."""
        chosen = {arm: select_lr(runs, arm, self.exp.lr_grid, self.exp.grid_seeds) for arm in self.exp.arms}
        return {arm: c for arm, c in chosen.items() if c is not None}

    def run_config(self, spec: RunSpec, teacher_path: str) -> RunConfig:
        cfg = load_config(self.exp.run_config, [
            *self.exp.arm_overrides(spec.arm), f"model.teacher={teacher_path}", f"train.recipe={self.exp.recipe_of(spec.arm)}",
            f"train.seed={spec.seed}", f"train.out_dir={self.work / spec.key}", f"train.max_steps={RUN_STEPS}",
            f"train.checkpoint_every={RUN_STEPS}", "logging.progress=false",
            # constant after warm-up, at this arm's own rate (set together: min_lr <= lr is validated)
            *([f"train.lr={spec.lr!r}", f"train.min_lr={spec.lr!r}"] if spec.lr is not None else [])])
        cfg.train.min_lr = cfg.train.lr  # the same for a rate from the run config
        return cfg

    # ---- running ------------------------------------------------------------------------------------
    def run(self, stop_after_s: float | None = None) -> dict:
        """Every run not finished yet, `parallel` at a time; none is started after `stop_after_s` seconds
        (the runs under way finish; a later invocation resumes with the rest)."""
        from .models import resolve_teacher_path

        start = time.perf_counter()
        self._claim_results_dir()
        teacher_path = resolve_teacher_path(self.base, self.log)
        digest = self.check_teacher(teacher_path)
        done = len(self.finished_runs())
        todo = self.total_runs() - done
        self.log(f"[experiment] {self.exp.name}: {self.total_runs()} runs ({len(self.exp.arms)} arms x "
                 f"{len(self.exp.seeds)} seeds" + (f", lr grid {self.exp.lr_grid} on seeds {self.exp.grid_seeds}"
                                                   if self.exp.lr_grid else "") +
                 f"), {done} already finished; results in {self.out}")
        if not (self.out / "reference.json").is_file():
            _atomic_json(self.out / "reference.json", {**reference_rows(self.base, teacher_path),
                                                       "teacher_sha256": digest})
            self.log("[experiment] evaluated the teacher and the converted student before training")
        parallel = max(1, min(todo, self.exp.parallel or os.cpu_count() or 1))
        threads = max(1, (os.cpu_count() or 1) // parallel)
        deadline = None if stop_after_s is None else start + stop_after_s
        if parallel == 1:
            self._schedule(_InlinePool(self), 1, teacher_path, threads, start, deadline)
        elif self.exp.runner == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: children that start CUDA cannot be forked from a parent that may have touched it
            with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
                self._schedule(_FuturePool(pool, self.exp), parallel, teacher_path, threads, start, deadline)
        else:
            self._schedule_on_ray(parallel, teacher_path, threads, start, deadline)
        if not self.finished_runs():  # stopped before any run finished
            return {}
        summary = self.summarize(wall_s=time.perf_counter() - start)
        self.log(format_headline(summary))
        return summary

    def _claim_results_dir(self) -> None:
        """An experiment writes into a new or empty directory, or continues its own (marked, or made before
        the marker with its reference.json); never into a directory of other files."""
        if is_marked(self.out) or (self.out / "reference.json").is_file():
            return
        check_output_dir(self.out, "the results directory (results_dir/name)")
        self.out.mkdir(parents=True, exist_ok=True)
        write_marker(self.out, "an experiment's results")

    def check_teacher(self, teacher_path: str) -> str | None:
        """The teacher's weights digest, refused if this experiment's results were made with another: resuming
        on a machine that pretrained its own micro teacher (the weights depend on the CPU's kernels) would
        otherwise mix two teachers under one cache path."""
        digest = teacher_digest(teacher_path)
        if digest is None:
            return None
        reference = self.out / "reference.json"
        recorded = {r.get("teacher_sha256") for r in self.finished_runs()}
        if reference.is_file():
            recorded.add(json.loads(reference.read_text()).get("teacher_sha256"))
        other = recorded - {None, digest}
        if other:
            raise StartupError(
                f"{self.out} was made with the teacher whose weights digest is {', '.join(sorted(other))}, but "
                f"{teacher_path} has {digest}: adding runs would mix two teachers. Copy the original teacher "
                f"directory to {teacher_path} (a micro teacher pretrained on another CPU is another model), or "
                f"start a new experiment with --set name=NEW (or --results-dir)")
        if None in recorded:
            self.log(f"[experiment] some results in {self.out} predate teacher digests: they cannot be checked "
                     f"against this teacher ({digest})")
        return digest

    def _schedule_on_ray(self, parallel: int, teacher_path: str, threads: int, start: float, deadline) -> None:
        import ray

        from .cluster.driver import connect

        cfg = self.base.model_copy(update={"ray": self.base.ray.model_copy(update={"num_cpus": parallel})})
        embedded = connect(cfg, self.log)
        try:
            self._schedule(_RayPool(self), parallel, teacher_path, threads, start, deadline)
        finally:
            if embedded:
                ray.shutdown()

    def _schedule(self, pool, parallel: int, teacher_path: str, threads: int, start: float, deadline) -> None:
        """Keep `parallel` runs going; after each finishes, name the runs that have become possible (an arm's
        other seeds once its learning rate is chosen)."""
        running: dict = {}
        done, total = 0, self.total_runs() - len(self.finished_runs())
        while True:
            runs = self.finished_runs()
            finished = {_key(r) for r in runs}
            busy = {s.key for s in running.values()}
            ready = [s for s in self.specs(runs) if s.key not in finished and s.key not in busy]
            late = deadline is not None and time.perf_counter() > deadline
            while ready and len(running) < parallel and not late:
                spec = ready.pop(0)
                running[pool.submit(spec, teacher_path, threads)] = spec
            if not running:
                if late and ready:
                    self.log(f"[experiment] stopped starting runs after {(time.perf_counter() - start) / 60:.1f} min; "
                             f"{self.total_runs() - len(finished)} left for a later invocation")
                return
            handle = pool.wait(list(running))
            spec = running.pop(handle)
            pool.result(handle)  # re-raises a run's failure; finished runs are already on disk
            done += 1
            self._progress(done, total, spec, start)

    def _progress(self, done: int, total: int, spec: RunSpec, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.log(f"[experiment] {done}/{total} runs finished (last: {spec.key}); {elapsed / 60:.1f} min elapsed, "
                 f"about {elapsed / done * max(0, total - done) / 60:.1f} min to go")

    # ---- summarising ------------------------------------------------------------------------------------
    def finished_runs(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.out / "runs").glob("*.json"))]

    def summarize(self, wall_s: float | None = None) -> dict:
        every_run = self.finished_runs()
        if not every_run:
            raise FileNotFoundError(f"no finished runs in {self.out / 'runs'}; run the experiment first")
        runs, grid = every_run, {}
        if self.exp.lr_grid:  # each arm is summarised at its chosen rate, over all its seeds
            chosen = self.chosen_lrs(every_run)
            runs = [r for r in every_run if r["arm"] in chosen and r.get("lr") == chosen[r["arm"]]["lr"]]
            grid = {arm: {**c, "test": _grid_test(every_run, arm, self.exp)} for arm, c in chosen.items()}
        reference = json.loads((self.out / "reference.json").read_text())
        arms: dict = {}
        for arm in self.exp.arms:
            rows = [e for r in runs if r["arm"] == arm for e in r["evals"]]
            by_budget: dict = {}
            for budget in self.exp.budgets_for(arm):
                at = [e for e in rows if e["budget"] == budget]
                if at:
                    metrics = [k for k, v in at[0].items() if isinstance(v, (int, float)) and k not in ("budget", "seed")]
                    by_budget[str(budget)] = {k: mean_ci([e[k] for e in at]) for k in metrics}
            arms[arm] = by_budget
        summary = {
            "experiment": self.exp.name, "code_version": code_version(),
            "run_code_versions": sorted({r.get("code_version", "?") for r in runs}),
            "teacher_sha256": sorted({r.get("teacher_sha256") or "not recorded" for r in runs}),
            "config": self.exp.model_dump(mode="json"), "run_config": dump_config(self.base),
            "reference": reference, "arms": arms,
            "runs": {_key(r): {"wall_s": r["wall_s"], "accounting": r["accounting"], "lr": r.get("lr")}
                     for r in every_run},
            "complete": len(every_run) == self.total_runs(),
        }
        if grid:
            summary["lr_grid"] = grid
        if self.exp.lr_grid:
            summary["lr_grid_runs"] = grid_table(every_run, self.exp)
        if wall_s is not None:
            summary["wall_s"] = wall_s
        previous = self.out / "summary.json"
        if wall_s is None and previous.is_file():  # re-summarising keeps the measured wall time
            summary["wall_s"] = json.loads(previous.read_text()).get("wall_s")
        summary["headline"] = headline(summary, self.exp, runs)
        summary["findings"] = findings(summary, runs, self.exp)
        _atomic_json(previous, summary)
        (self.out / "report.md").write_text(format_report(summary, self.exp))
        from .plots import plot_experiment

        plot_experiment(summary, self.exp, self.out)
        return summary


def _key(run: dict) -> str:
    return RunSpec(run["arm"], run["seed"], (), run.get("lr")).key


def _grid_test(runs: list[dict], arm: str, exp: ExperimentConfig) -> dict:
    """Test accuracy at each rate of the grid: shown beside the validation scores that chose the rate,
    never used for choosing."""
    return {repr(lr): v for lr, v in grid_scores(runs, arm, exp.lr_grid, exp.grid_seeds, "task_acc_static").items()}


def reference_rows(cfg: RunConfig, teacher_path: str) -> dict:
    """The AR teacher's row and the converted student's row before training (shared by every arm)."""
    from .evaluate import EvalData, evaluate_student, evaluate_teacher, judge_teacher
    from .models import build_student

    teacher = judge_teacher(cfg, teacher_path)
    data = EvalData(cfg, teacher.tokenizer, teacher_path)
    return {"teacher": evaluate_teacher(teacher, cfg, data),
            "before": evaluate_student(build_student(cfg, teacher_path), teacher, cfg, data)}


def _run_remote(experiment: Experiment, spec: RunSpec, teacher_path: str, threads: int) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load, from every worker, buries the progress lines
    return run_one(experiment, spec, teacher_path, threads, print)


def _run_in_process(exp: ExperimentConfig, spec: RunSpec, teacher_path: str, threads: int) -> dict:
    return _run_remote(Experiment(exp), spec, teacher_path, threads)  # the config pickles; a logger may not


# Where the runs go: each pool submits one run and waits for any one of those it holds. The scheduler above
# is the same for all three.
class _InlinePool:
    def __init__(self, experiment: Experiment):
        self.experiment, self.results = experiment, {}

    def submit(self, spec: RunSpec, teacher_path: str, threads: int) -> str:
        self.results[spec.key] = run_one(self.experiment, spec, teacher_path, threads, self.experiment.log)
        return spec.key

    def wait(self, handles: list):
        return handles[0]

    def result(self, handle: str) -> dict:
        return self.results.pop(handle)


class _FuturePool:
    def __init__(self, executor, exp: ExperimentConfig):
        self.executor, self.exp = executor, exp

    def submit(self, spec: RunSpec, teacher_path: str, threads: int):
        return self.executor.submit(_run_in_process, self.exp, spec, teacher_path, threads)

    def wait(self, handles: list):
        from concurrent.futures import FIRST_COMPLETED, wait

        return next(iter(wait(handles, return_when=FIRST_COMPLETED).done))

    def result(self, handle) -> dict:
        return handle.result()


class _RayPool:
    def __init__(self, experiment: Experiment):
        import ray

        self.experiment, self.ray = experiment, ray
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_run_remote)

    def submit(self, spec: RunSpec, teacher_path: str, threads: int):
        return self.remote.remote(self.experiment, spec, teacher_path, threads)

    def wait(self, handles: list):
        return self.ray.wait(handles, num_returns=1)[0][0]

    def result(self, handle) -> dict:
        return self.ray.get(handle)


def grid_scores(runs: list[dict], arm: str, grid: list[float], grid_seeds: list[int], metric: str) -> dict | None:
    """{lr: `metric` averaged over the arm's budgets, then over its grid seeds} in increasing lr (on
    log-spaced budgets, the area under the curve: learning fast and ending high both count); None until
    all the arm's grid runs have finished."""
    scores = {}
    for lr in sorted(grid):
        done = _grid_runs(runs, arm, lr, grid_seeds)
        if len(done) < len(grid_seeds):
            return None
        scores[lr] = _budget_mean(done, metric)
    return scores


def _grid_runs(runs: list[dict], arm: str, lr: float, grid_seeds: list[int]) -> list[dict]:
    return sorted((r for r in runs if r["arm"] == arm and r.get("lr") == lr and r["seed"] in grid_seeds),
                  key=lambda r: r["seed"])


def _budget_mean(runs: list[dict], metric: str) -> float:
    """`metric` averaged over each run's budgets, then over the runs."""
    return fmean(fmean(e[metric] for e in r["evals"]) for r in runs)


def grid_table(runs: list[dict], exp: ExperimentConfig) -> list[dict]:
    """One row per arm and rate of the grid with the grid seeds finished so far: validation and test
    accuracy averaged over budgets then seeds (as grid_scores), test at the last budget, and whether the
    rate was chosen. Shows a grid spread over several invocations before it is complete."""
    rows = []
    for arm in exp.arms:
        chosen = select_lr(runs, arm, exp.lr_grid, exp.grid_seeds)
        for lr in sorted(exp.lr_grid):
            done = _grid_runs(runs, arm, lr, exp.grid_seeds)
            if not done:
                continue
            rows.append({"arm": arm, "lr": lr, "seeds": [r["seed"] for r in done],
                         "val": _budget_mean(done, "val_acc_static"), "test": _budget_mean(done, "task_acc_static"),
                         "test_last": fmean(r["evals"][-1]["task_acc_static"] for r in done),
                         "chosen": None if chosen is None else chosen["lr"] == lr, "curve": _grid_curve(done)})
    return rows


def _grid_curve(runs: list[dict]) -> list[dict]:
    """Validation and test accuracy at each budget, averaged over `runs` (for the grid's figure)."""
    return [{"budget": evals[0]["budget"], "tokens": fmean(e["tokens_trained"] for e in evals),
             "val": fmean(e["val_acc_static"] for e in evals), "test": fmean(e["task_acc_static"] for e in evals)}
            for evals in zip(*(r["evals"] for r in runs))]


def format_grid(rows: list[dict], exp: ExperimentConfig) -> str:
    lines = [f"Grid seeds {exp.grid_seeds}. Accuracy is static; validation and test are averaged over the budgets "
             "(then the seeds done); the rate with the best validation score is chosen once all grid seeds have "
             "finished. The test columns never choose.", "",
             "| arm | lr | grid seeds done | validation | test | test at the last budget | chosen |", "|" + " --- |" * 7]
    for r in rows:
        chosen = "grid unfinished" if r["chosen"] is None else "**yes**" if r["chosen"] else ""
        lines.append(f"| {r['arm']} | {r['lr']:g} | {', '.join(map(str, r['seeds']))} | {r['val']:.3f} | "
                     f"{r['test']:.3f} | {r['test_last']:.3f} | {chosen} |")
    edge = [f"{r['arm']} ({r['lr']:g})" for r in rows if r["chosen"] and r["lr"] in (min(exp.lr_grid), max(exp.lr_grid))]
    if edge:  # the best rate may lie outside the grid
        lines += ["", "Chosen at the edge of the grid, so a rate beyond it may be better: " + ", ".join(edge) + "."]
    return "\n".join(lines)


def select_lr(runs: list[dict], arm: str, grid: list[float], grid_seeds: list[int]) -> dict | None:
    """The grid's learning rate with the best validation accuracy for `arm` (see grid_scores); None until
    the arm's grid has finished; ties go to the smaller rate."""
    scores = grid_scores(runs, arm, grid, grid_seeds, "val_acc_static")
    if scores is None:
        return None
    # Accuracies are multiples of 1/prompts, so equal sums tie exactly; averaging in another order can
    # still differ in the last bit, which must not decide. Round, then take the first (smallest) maximum.
    best = max(scores, key=lambda lr: round(scores[lr], 9))
    return {"lr": best, "scores": {repr(lr): v for lr, v in scores.items()}}


def run_one(experiment: Experiment, spec: RunSpec, teacher_path: str, threads: int, log: Callable) -> dict:
    """Train one arm with one seed, evaluating each time its training tokens pass the next budget.

    After every evaluation the trainer is checkpointed, so an interrupted run resumes from its last
    evaluated budget with the same data order and rollouts."""
    from .evaluate import EvalData, evaluate_student, judge_teacher
    from .runs import read_checkpoint
    from .trainer import LocalTrainer

    torch.set_num_threads(threads)
    result_path = experiment.out / "runs" / f"{spec.key}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    cfg = experiment.run_config(spec, teacher_path)
    work = Path(cfg.train.out_dir)
    evals_path = work / "evals.jsonl"
    latest = work / "checkpoints" / "latest.json"
    resume = latest.is_file()
    evals: list[dict] = []
    if resume:
        step = json.loads(latest.read_text())["step"]
        evals = [json.loads(ln) for ln in evals_path.read_text().splitlines() if ln] if evals_path.is_file() else []
        evals = [e for e in evals if e["step"] <= step]
        log(f"[experiment] {spec.key}: resuming at step {step} with {len(evals)} budgets evaluated")
    work.mkdir(parents=True, exist_ok=True)
    evals_path.write_text("".join(json.dumps(e) + "\n" for e in evals))
    pending = [b for b in spec.budgets if b not in {e["budget"] for e in evals}]
    start, train_s = time.perf_counter(), 0.0
    if not pending:  # interrupted after its last evaluation: the checkpoint holds the accounting
        accounting = read_checkpoint(work / "checkpoints", log)[1]["accounting"]
        return _finish(experiment, spec, result_path, work, evals, accounting, start, teacher_path)

    trainer = LocalTrainer(cfg, log=lambda *a, **k: None)
    judge = judge_teacher(cfg, teacher_path, trainer.teacher)
    data = EvalData(cfg, judge.tokenizer, teacher_path)
    mark = time.perf_counter()

    def after_batch(tr: LocalTrainer) -> bool:
        nonlocal train_s, mark
        while pending and tr.accounting["tokens_trained"] >= pending[0]:
            train_s += time.perf_counter() - mark
            t0 = time.perf_counter()
            samples: list[str] = []
            row = {"arm": spec.arm, "seed": spec.seed, "budget": pending.pop(0), "step": tr.step,
                   "tokens_trained": tr.accounting["tokens_trained"],
                   "sampler_forwards": tr.accounting["sampler_forwards"], **tr.flops(),
                   **evaluate_student(tr.student, judge, cfg, data, samples), "samples": samples}
            row["eval_s"], row["train_s"] = time.perf_counter() - t0, train_s
            with evals_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            evals.append(row)
            tr.checkpoint()
            acc = f"acc static {row['task_acc_static']:.3f}, " if "task_acc_static" in row else ""  # none on chat
            log(f"[experiment] {spec.key} @ {row['tokens_trained']} tokens (budget {row['budget']}): "
                f"{acc}on-policy KL {row['on_policy_kl']:.3f}, teacher NLL {row['gen_teacher_nll']:.3f}, "
                f"NELBO {row['heldout_nelbo']:.3f} ({train_s:.0f}s training, {row['eval_s']:.0f}s eval)")
            mark = time.perf_counter()
        return not pending

    # The work directory is this run's own: without a checkpoint, what an interrupted start left is replaced.
    trainer.run(resume=resume, overwrite=not resume, after_batch=after_batch)
    return _finish(experiment, spec, result_path, work, evals, trainer.accounting, start, teacher_path)


def teacher_digest(teacher_path: str) -> str | None:
    """The weights digest of a local teacher directory; None for a hub id, whose weights are the hub's."""
    from .pretrain import weights_digest

    return weights_digest(teacher_path) if any(Path(teacher_path).glob("*.safetensors")) else None


def _finish(experiment: Experiment, spec: RunSpec, result_path: Path, work: Path, evals: list[dict],
            accounting: dict, start: float, teacher_path: str) -> dict:
    result = {"arm": spec.arm, "seed": spec.seed, "lr": spec.lr, "evals": evals, "accounting": dict(accounting),
              "wall_s": time.perf_counter() - start, "teacher": teacher_path,
              "teacher_sha256": teacher_digest(teacher_path), "code_version": code_version()}
    _atomic_json(result_path, result)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the result is written; keep only `final/`
    return result


# ---- headline figures -----------------------------------------------------------------------------------
def _mean(summary: dict, arm: str, budget, metric: str):
    cell = summary["arms"].get(arm, {}).get(str(budget), {}).get(metric)
    return cell["mean"] if cell else None


def tokens_to_target(summary: dict, exp: ExperimentConfig, arm: str, target: float) -> dict:
    """First budget at which the arm's mean static accuracy reaches `target`, and the training tokens
    there interpolated linearly in log-tokens from the budget before (None when never reached)."""
    measured = [(b, _mean(summary, arm, b, "task_acc_static"), _mean(summary, arm, b, "tokens_trained"))
                for b in exp.budgets_for(arm)]
    measured = [m for m in measured if m[1] is not None]
    hit = first_reach([(acc, tokens) for _, acc, tokens in measured], target)
    if hit:
        return {"budget": measured[hit[0]][0], "tokens": hit[1]}
    last = exp.budgets_for(arm)[-1]
    return {"budget": None, "tokens": None, "not_reached_by": _mean(summary, arm, last, "tokens_trained")}


# Without task accuracy (chat prompts) the arms are compared on what the samples show, against opdlm.
CHAT_METRICS = ("gen_teacher_nll", "on_policy_kl_full_length", "on_policy_kl", "gen_distinct_2")


def headline(summary: dict, exp: ExperimentConfig, runs: list[dict]) -> dict:
    if "task_acc_static" not in summary["reference"]["teacher"]:  # chat prompts: no task accuracy to reach
        largest = exp.budgets[-1]
        others = [a for a in exp.arms if a != "opdlm"]
        return {"budget": largest, "minus_opdlm": {
            m: {a: paired(runs, largest, [(1, a, m), (-1, "opdlm", m)]) for a in others}
            for m in CHAT_METRICS if "opdlm" in exp.arms and any(m in e for r in runs for e in r["evals"])}}
    teacher_acc = summary["reference"]["teacher"]["task_acc_static"]
    best = max((c["task_acc_static"]["mean"] for arm in summary["arms"].values() for c in arm.values()), default=0.0)
    target = min(exp.target_fraction * teacher_acc, best)
    reach = {arm: tokens_to_target(summary, exp, arm, target) for arm in exp.arms}
    out: dict = {"teacher_acc": teacher_acc, "best_acc": best, "target_acc": target, "tokens_to_target": reach}
    out["tokens_to_accuracy"] = {str(t): {arm: tokens_to_target(summary, exp, arm, t) for arm in exp.arms}
                                 for t in exp.report_targets}
    # Standard conversion (bd3lm and its variants) against OPDLM: a ratio, or a lower bound when the
    # conversion arm never reached the target.
    out["over_opdlm"] = {}
    if "opdlm" in reach and reach["opdlm"]["tokens"]:
        op = reach["opdlm"]["tokens"]
        for arm in exp.arms:
            r = reach[arm]
            if exp.recipe_of(arm) == "bd3lm" and (r["tokens"] or r["not_reached_by"]):
                out["over_opdlm"][arm] = ({"ratio": r["tokens"] / op} if r["tokens"] else
                                          {"ratio_at_least": r["not_reached_by"] / op})
    largest = exp.budgets[-1]
    out["largest_common_budget"] = largest
    dyn = f"task_acc_dynamic@{exp.headline_gamma}"
    out["static_to_dynamic"] = {arm: paired(runs, largest, [(1, arm, dyn), (-1, arm, "task_acc_static")])
                                for arm in ("sft", "opdlm") if arm in exp.arms}
    out["vs_kd_off"] = {arm: paired(runs, largest, [(1, arm, "task_acc_static"), (-1, "kd_off", "task_acc_static")])
                        for arm in ("opdlm", "opdlm_off") if arm in exp.arms and "kd_off" in exp.arms}
    return out


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    if cell["n"] < 2:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {(cell['hi'] - cell['lo']) / 2:.{digits}f}"


def format_headline(summary: dict) -> str:
    h = summary["headline"]
    if "minus_opdlm" in h:
        lines = [f"[experiment] no task accuracy (chat prompts); arm - opdlm at {h['budget']} tokens, paired by seed:"]
        lines += [f"  {m}: " + ", ".join(f"{a} {_fmt(d)}" for a, d in by_arm.items())
                  for m, by_arm in h["minus_opdlm"].items()]
        return "\n".join(lines)
    lines = [f"[experiment] target accuracy {h['target_acc']:.3f} (teacher {h['teacher_acc']:.3f}, "
             f"best arm {h['best_acc']:.3f})"]
    for arm, r in h["tokens_to_target"].items():
        reached = (f"{r['tokens']:.0f} tokens" if r["tokens"] else "no evaluations yet" if r["not_reached_by"] is None
                   else f"not reached by {r['not_reached_by']:.0f} tokens")
        lines.append(f"  tokens to target, {arm}: {reached}")
    for arm, r in h.get("over_opdlm", {}).items():
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else f"more than {r['ratio_at_least']:.1f}x (never reached)"
        lines.append(f"  {arm} / opdlm tokens to target: {ratio}")
    for acc, reach in h.get("tokens_to_accuracy", {}).items():
        parts = [f"{arm} {r['tokens'] / 1000:.0f}k" if r["tokens"] else f"{arm} -" for arm, r in reach.items()]
        lines.append(f"  tokens to accuracy {acc}: " + ", ".join(parts))
    for arm, d in h["static_to_dynamic"].items():
        lines.append(f"  {arm}: accuracy change static -> dynamic at the largest common budget: {_fmt(d)}")
    for arm, d in h["vs_kd_off"].items():
        lines.append(f"  {arm} - kd_off, static accuracy at the largest common budget: {_fmt(d)}")
    for row in summary.get("findings", []):
        lines.append(f"  paper's finding '{row['claim']}' ({row['id']}): {row['verdict']}")  # ids tell bd3lm arms apart
    return "\n".join(lines)


REPORT_METRICS = ("tokens_trained", "task_acc_static", "task_acc_dynamic@0.9", "tpf_dynamic@0.9", "gen_teacher_nll",
                  "gen_distinct_2", "heldout_nelbo", "on_policy_kl", "on_policy_kl_full_length", "flops_paper", "flops_with_sampler")


def format_report(summary: dict, exp: ExperimentConfig) -> str:
    """A Markdown table (mean ± 95 % half-interval over seeds) of every arm at every budget."""
    metrics = [m for m in REPORT_METRICS if any(m in c for arm in summary["arms"].values() for c in arm.values())]
    head = "| arm | budget | " + " | ".join(metrics) + " |"
    lines = [f"# {summary['experiment']}", "", f"code {summary['code_version']}; "
             f"{len(summary['runs'])} runs; teacher weights {', '.join(summary.get('teacher_sha256', ['not recorded']))}; wall time {(summary.get('wall_s') or 0) / 60:.1f} min (this invocation)", "",
             head, "|" + " --- |" * (len(metrics) + 2)]
    ref = summary["reference"]
    for name in ("teacher", "before"):
        row = ref[name]
        lines.append(f"| {name} | 0 | " + " | ".join(
            "-" if row.get(m) is None else f"{row[m]:.3g}" for m in metrics) + " |")
    for arm, budgets in summary["arms"].items():
        for budget, cells in budgets.items():
            vals = [_fmt(cells.get(m), 0 if m.startswith(("tokens", "flops")) else 3) if not m.startswith("flops")
                    else f"{cells[m]['mean']:.3g}" for m in metrics]
            lines.append(f"| {arm} | {budget} | " + " | ".join(vals) + " |")
    if summary.get("findings"):
        lines += ["", "## The paper's findings against these runs", "", format_findings(summary["findings"])]
    if summary.get("lr_grid_runs"):
        lines += ["", "## The learning-rate grid", "", format_grid(summary["lr_grid_runs"], exp), "",
                  "![validation and test accuracy against training tokens at each rate](lr_grid.png)"]
    return "\n".join(lines + ["", "```", format_headline(summary), "```", ""])
