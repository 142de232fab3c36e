"""Figures of an experiment summary (matplotlib, written as PNG; no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import ExperimentConfig  # noqa: E402

CURVES = (("task_acc_static", "task accuracy, static"), ("task_acc_dynamic@{g}", "task accuracy, dynamic γ={g}"),
          ("gen_teacher_nll", "teacher NLL of samples"), ("gen_distinct_2", "distinct-2 of samples"),
          ("heldout_nelbo", "held-out NELBO per token"), ("on_policy_kl", "on-policy KL to the teacher"))

# Chat prompts have no task accuracy: those two panels show the full-length KL and the samples' parallelism.
CHAT_CURVES = (("on_policy_kl_full_length", "on-policy KL, full-length rollouts"),
               ("gen_tpf", "tokens per forward of samples"))


def _series(arm_cells: dict, metric: str):
    xs, ys, lo, hi = [], [], [], []
    for cells in arm_cells.values():
        if metric in cells and cells[metric]["mean"] is not None:
            xs.append(cells["tokens_trained"]["mean"])
            ys.append(cells[metric]["mean"])
            lo.append(cells[metric]["lo"])
            hi.append(cells[metric]["hi"])
    return xs, ys, lo, hi


def plot_experiment(summary: dict, exp: ExperimentConfig, out: Path) -> list[Path]:
    g = exp.headline_gamma
    ref = summary["reference"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    curves = CURVES if "task_acc_static" in ref["teacher"] else CHAT_CURVES + CURVES[2:]
    for ax, (key, title) in zip(axes.flat, curves):
        metric, title = key.format(g=g), title.format(g=g)
        means = []
        for arm, cells in summary["arms"].items():
            xs, ys, lo, hi = _series(cells, metric)
            if xs:
                (line,) = ax.plot(xs, ys, marker="o", ms=3, label=arm)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
                means += ys
        for name, style in (("teacher", "--"), ("before", ":")):
            if ref[name].get(metric) is not None:
                ax.axhline(ref[name][metric], color="black" if name == "teacher" else "gray", ls=style, lw=1,
                           label=f"{name} (AR)" if name == "teacher" else "before training")
                means.append(ref[name][metric])
        if means:  # frame the means: with 3 seeds a t-interval can be far wider than the differences
            low, high = min(means), max(means)
            pad = 0.3 * (high - low) + 0.05
            low, high = low - pad, high + pad
            if metric.startswith("task_acc"):
                low, high = max(0.0, low), min(1.02, high)
            ax.set_ylim(low, high)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    next((ax for ax in axes.flat if ax.lines), axes.flat[0]).legend(fontsize=8)  # chat runs leave the task panels empty
    fig.suptitle(f"{summary['experiment']}: mean over seeds, shaded 95 % interval")
    fig.tight_layout()
    paths = [out / "metrics_vs_tokens.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    if summary.get("lr_grid_runs"):
        paths.append(plot_grid(summary, out / "lr_grid.png"))
    if "task_acc_static" not in ref["teacher"]:  # chat prompts: no task accuracy to plot against parallelism
        return paths
    # Decoding robustness: accuracy against tokens per forward at the largest common budget.
    budget = str(exp.budgets[-1])
    fig, ax = plt.subplots(figsize=(7, 5))
    for arm, cells in summary["arms"].items():
        at = cells.get(budget)
        if not at:
            continue
        modes = [("static", "task_acc_static", "tpf_static")] + [
            (f"γ={t}", f"task_acc_dynamic@{t}", f"tpf_dynamic@{t}") for t in sorted(
                {float(k.split("@")[1]) for k in at if k.startswith("task_acc_dynamic@")}, reverse=True)]
        xs = [at[tpf]["mean"] for _, _, tpf in modes]
        ys = [at[acc]["mean"] for _, acc, _ in modes]
        err = [[y - at[acc]["lo"] for (_, acc, _), y in zip(modes, ys)], [at[acc]["hi"] - y for (_, acc, _), y in zip(modes, ys)]]
        container = ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=arm)
        for (name, _, _), x, y in zip(modes, xs, ys):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points",
                        color=container[0].get_color())
    ax.axhline(ref["teacher"]["task_acc_static"], color="black", ls="--", lw=1, label="teacher (AR)")
    ax.set_ylim(0.0, 1.05)  # accuracy; 3-seed t-intervals may run past it
    ax.set_xlabel("generated tokens per denoising forward")
    ax.set_ylabel("task accuracy")
    ax.set_title(f"accuracy vs decoding parallelism at {int(budget)} training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_tokens_per_forward.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_grid(summary: dict, path: Path) -> Path:
    """The learning-rate grid, one panel per arm: validation accuracy (which chooses the rate, solid) and
    test accuracy (dotted) against training tokens at each rate, averaged over the grid seeds done."""
    rows = summary["lr_grid_runs"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    cols = min(3, len(arms))
    fig, axes = plt.subplots(-(-len(arms) // cols), cols, figsize=(5 * cols, 3.8 * -(-len(arms) // cols)),
                             squeeze=False)
    teacher = summary["reference"]["teacher"].get("task_acc_static")
    for ax, arm in zip(axes.flat, arms):
        for r in (r for r in rows if r["arm"] == arm):
            xs = [c["tokens"] for c in r["curve"]]
            mark = " (chosen)" if r["chosen"] else ""
            (line,) = ax.plot(xs, [c["val"] for c in r["curve"]], marker="o", ms=3, lw=2.5 if r["chosen"] else 1.2,
                              label=f"lr {r['lr']:g}, seeds {','.join(map(str, r['seeds']))}{mark}")
            ax.plot(xs, [c["test"] for c in r["curve"]], ls=":", color=line.get_color())
        if teacher is not None:
            ax.axhline(teacher, color="black", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("training tokens")
        ax.set_title(arm)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(arms):]:
        ax.set_visible(False)
    fig.suptitle(f"{summary['experiment']}: learning-rate grid; validation accuracy solid (chooses the rate), "
                 "test dotted, teacher dashed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
