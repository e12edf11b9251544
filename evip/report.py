"""The evidence of an EViP run: loss curves, accuracy per stage, a Markdown report and one JSON of everything.

- :func:`plot_losses` draws one panel per stage from each run folder's ``metrics.jsonl`` (stages differ in data
  and loss scale, so a shared axis would flatten the later stages).
- :func:`plot_accuracy` draws accuracy per task after each stage, one line per task.
- :func:`write_report` writes ``report.md`` (task accuracy, perplexity with a "bit-identical to base" marker,
  timings and their shares) and ``results.json``, and draws both plots into the same folder when given the
  run folders.

Every function takes an optional :class:`Ablation`, a second run of the same stages (for example with delta
tuning off), drawn dashed beside the main run and given its own columns in the tables.

Plots use matplotlib's ``Figure`` directly (Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .metrics import format_duration

__all__ = ["Ablation", "plot_accuracy", "plot_losses", "read_losses", "write_report"]

BASE = "base"
"""The key of the starting LLM in ``perplexity_per_stage``; every other stage is compared to it."""


@dataclass
class Ablation:
    """A second run of the same chain, shown beside the main one (``label`` names it in legends and columns)."""

    label: str
    results_per_stage: dict[str, dict] = field(default_factory=dict)
    perplexity_per_stage: dict[str, float] = field(default_factory=dict)
    stage_runs: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# ============================================================================================== loss curves
def read_losses(run_dir: str | Path, key: str = "loss") -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` from ``<run_dir>/metrics.jsonl``; lines without the key are skipped.

    Raises:
        FileNotFoundError: the run folder has no ``metrics.jsonl``.
        ValueError: a line is not JSON (the file and line are named).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the stage's run folder (it holds metrics.jsonl)")
    steps, values = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
        if key in row and "step" in row and row[key] is not None and math.isfinite(row[key]):
            steps.append(int(row["step"]))
            values.append(float(row[key]))
    return steps, values


def _figure(num_panels: int, panel_width: float = 3.6, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.5, panel_width * num_panels), height), layout="constrained")
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    return fig, axes


def plot_losses(stage_runs: Mapping[str, str | Path], out_png: str | Path, *,
                ablation: Optional[Ablation] = None, label: str = "EViP") -> Path:
    """One panel per stage: the logged training loss (window mean, ``loss``) against the stage's step.

    The per-step loss (``loss_step``) is drawn faint behind it; an ablation's stages of the same name are drawn
    dashed in the same panel. Returns ``out_png``.
    """
    if not stage_runs:
        raise ValueError("plot_losses needs at least one stage run folder")
    fig, axes = _figure(len(stage_runs))
    runs = [(label, stage_runs, "-")]
    if ablation is not None:
        runs.append((ablation.label, ablation.stage_runs, "--"))
    for ax, stage in zip(axes, stage_runs):
        for i, (name, folders, style) in enumerate(runs):
            if stage not in folders:
                continue
            colour = f"C{i}"
            steps, raw = read_losses(folders[stage], "loss_step")
            if steps:
                ax.plot(steps, raw, style, color=colour, alpha=0.25, linewidth=0.8)
            steps, mean = read_losses(folders[stage], "loss")
            ax.plot(steps, mean, style, color=colour, linewidth=1.6, label=name)
            if not steps:
                ax.text(0.5, 0.5, f"{name}: no steps logged", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.suptitle("training loss per stage (bold: mean of each logging window; faint: the logged step)", fontsize=9)
    if ablation is not None:
        axes[0].legend(fontsize=8)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


# ============================================================================================== accuracy
def _accuracies(results_per_stage: Mapping[str, dict]) -> dict[str, dict[str, float]]:
    """``{stage: {task: accuracy}}`` from :func:`evip.eval.evaluate_tasks` results."""
    return {stage: {task: entry["accuracy"] for task, entry in result["tasks"].items()}
            for stage, result in results_per_stage.items()}


def _task_names(*runs: Mapping[str, dict]) -> list[str]:
    names: list[str] = []
    for results in runs:
        for result in results.values():
            names += [t for t in result["tasks"] if t not in names]
    return names


def plot_accuracy(results_per_stage: Mapping[str, dict], out_png: str | Path, *,
                  ablation: Optional[Ablation] = None, label: str = "EViP") -> Path:
    """Accuracy (0-100 %) of every task after each stage, one line per task; the ablation dashed, same colours.

    ``results_per_stage`` maps stage names (in chain order) to :func:`evip.eval.evaluate_tasks` results.
    Returns ``out_png``.
    """
    if not results_per_stage:
        raise ValueError("plot_accuracy needs the results of at least one stage")
    stages = list(results_per_stage)
    if ablation is not None:
        stages += [s for s in ablation.results_per_stage if s not in stages]
    runs = [(label, _accuracies(results_per_stage), "-o")]
    if ablation is not None:
        runs.append((ablation.label, _accuracies(ablation.results_per_stage), "--s"))
    tasks = _task_names(results_per_stage, *([ablation.results_per_stage] if ablation else []))
    fig, axes = _figure(1, height=3.6)
    ax = axes[0]
    fig.set_size_inches(max(5.0, 1.3 * len(stages) + 3.0), 3.6)
    for i, task in enumerate(tasks):
        for name, acc, style in runs:
            xs = [x for x, s in enumerate(stages) if task in acc.get(s, {})]
            ys = [100 * acc[stages[x]][task] for x in xs]
            suffix = f" ({name})" if ablation is not None else ""
            ax.plot(xs, ys, style, color=f"C{i % 10}", label=task + suffix, markersize=4)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_xlim(-0.3, len(stages) - 0.7)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("after stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


# ============================================================================================== report
def _percent(result: Optional[dict], task: str) -> str:
    entry = (result or {}).get("tasks", {}).get(task) if task != "overall" else (result or {}).get("overall")
    if entry is None:
        return "-"
    return f"{100 * entry['accuracy']:.1f}% ({entry['correct']}/{entry['total']})"


def _accuracy_table(results: Mapping[str, dict], ablation: Optional[Ablation], label: str) -> list[str]:
    stages = list(results) + [s for s in (ablation.results_per_stage if ablation else {}) if s not in results]
    columns = []  # (header, result) pairs: the ablation's column right after the main one, stage by stage
    for s in stages:
        columns.append((s if ablation is None else f"{s} ({label})", results.get(s)))
        if ablation is not None:
            columns.append((f"{s} ({ablation.label})", ablation.results_per_stage.get(s)))
    tasks = _task_names(results, *([ablation.results_per_stage] if ablation else []))
    lines = ["| task | " + " | ".join(h for h, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for task in tasks + ["overall"]:
        lines.append(f"| {task} | " + " | ".join(_percent(r, task) for _, r in columns) + " |")
        ious = [(r or {}).get("tasks", {}).get(task, {}).get("mean_iou") for _, r in columns]
        if any(v is not None for v in ious):
            lines.append(f"| {task} mean IoU | " + " | ".join("-" if v is None else f"{v:.3f}" for v in ious) + " |")
    return lines


def _perplexity_cell(value: Optional[float], base: Optional[float], is_base: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.6f}"
    if is_base or base is None:
        return text
    if value == base:  # exact float equality: the frozen LLM computed the very same numbers
        return f"{text} **bit-identical to base**"
    return f"{text} ({100 * (value / base - 1):+.3f}% vs base)"


def _perplexity_table(ppl: Mapping[str, float], ablation: Optional[Ablation], label: str) -> list[str]:
    stages = list(ppl) + [s for s in (ablation.perplexity_per_stage if ablation else {}) if s not in ppl]
    base = ppl.get(BASE)
    header = ["stage", label] + ([ablation.label] if ablation else [])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for s in stages:
        cells = [_perplexity_cell(ppl.get(s), base, s == BASE)]
        if ablation is not None:
            # The ablation starts from the same base LLM: compare with its own base if it measured one.
            ab_base = ablation.perplexity_per_stage.get(BASE, base)
            cells.append(_perplexity_cell(ablation.perplexity_per_stage.get(s), ab_base, s == BASE))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _timing_table(timings: Mapping[str, float], heading: str) -> list[str]:
    total = sum(timings.values())
    lines = [f"| {heading} | seconds | time | share |", "|---|---:|---:|---:|"]
    for part, seconds in timings.items():
        share = 100 * seconds / total if total > 0 else 0.0
        lines.append(f"| {part} | {seconds:.1f} | {format_duration(seconds)} | {share:.1f}% |")
    lines.append(f"| **total** | {total:.1f} | {format_duration(total)} | 100% |")
    return lines


def _bit_identical(ppl: Mapping[str, float]) -> dict[str, bool]:
    base = ppl.get(BASE)
    return {s: v == base for s, v in ppl.items() if s != BASE and base is not None}


def write_report(
    out_dir: str | Path,
    results_per_stage: Mapping[str, dict],
    perplexity_per_stage: Mapping[str, float],
    timings: Mapping[str, float],
    extra_notes: Sequence[str] | str = (),
    *,
    stage_runs: Optional[Mapping[str, str | Path]] = None,
    ablation: Optional[Ablation] = None,
    label: str = "EViP",
    title: str = "EViP run report",
) -> Path:
    """Write ``report.md`` and ``results.json`` (and ``loss.png`` / ``accuracy.png``) into ``out_dir``.

    ``results_per_stage``: stage -> :func:`evip.eval.evaluate_tasks` result, in chain order.
    ``perplexity_per_stage``: stage -> held-out text perplexity; the ``"base"`` entry (the LLM before S1.1) is
    the reference, and a stage whose float equals it exactly is marked bit-identical.
    ``timings``: part (stage, data generation, evaluation, ...) -> seconds; shares are of their sum.
    ``stage_runs``: stage -> run folder, to draw the loss curves (``accuracy.png`` needs only the results).
    Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = [extra_notes] if isinstance(extra_notes, str) else list(extra_notes)
    plots: dict[str, str] = {}
    if stage_runs:
        plots["loss"] = plot_losses(stage_runs, out_dir / "loss.png", ablation=ablation, label=label).name
    if results_per_stage:
        plots["accuracy"] = plot_accuracy(results_per_stage, out_dir / "accuracy.png", ablation=ablation,
                                          label=label).name

    md = [f"# {title}", ""]
    if results_per_stage:
        md += ["## Held-out accuracy", "",
               "Exact match after normalisation (counting and digits: number words = numerals); grounding: "
               "IoU >= 0.5 with the expected box.", ""]
        md += _accuracy_table(results_per_stage, ablation, label) + [""]
    if perplexity_per_stage:
        md += ["## Text perplexity (held-out text, text-only input)", ""]
        md += _perplexity_table(perplexity_per_stage, ablation, label) + [""]
    if timings:
        md += ["## Time", ""] + _timing_table(timings, "part") + [""]
        if ablation is not None and ablation.timings:
            md += _timing_table(ablation.timings, f"part ({ablation.label})") + [""]
    md += ["## Files", ""]
    md += [f"- [{name} plot]({png})" for name, png in plots.items()]
    md += ["- [all numbers: results.json](results.json)", ""]
    for name, png in plots.items():
        md += [f"![{name}]({png})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]

    def run_json(results, ppl, runs, times) -> dict[str, Any]:
        return {"results_per_stage": dict(results), "perplexity_per_stage": dict(ppl),
                "bit_identical_to_base": _bit_identical(ppl), "timings": dict(times),
                "stage_runs": {s: str(p) for s, p in (runs or {}).items()}}

    payload = {"title": title, "label": label,
               **run_json(results_per_stage, perplexity_per_stage, stage_runs, timings),
               "plots": plots, "notes": notes}
    if ablation is not None:
        payload["ablation"] = {"label": ablation.label, **run_json(ablation.results_per_stage,
                               ablation.perplexity_per_stage, ablation.stage_runs, ablation.timings)}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    report = out_dir / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return report
