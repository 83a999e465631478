"""A sweep's results: every run's metrics in ``results.csv``, the main ones in ``results.md``, and two plots."""

import csv
import math
from pathlib import Path

from mma.sweep.spec import SweepSpec

COLUMNS = {
    "params": [
        "name",
        "trainable/llm",
        "trainable/vit",
        "trainable/projector",
        "trainable/modality_embedding",
        "trainable",
        "total",
        "trainable_pct",
    ],
    "train": [
        "name",
        "trainable",
        "test/image",
        "test/text",
        "test/all",
        "blind/image",
        "step_time_s",
        "step_time_ratio",
        "peak_rss_mib",
        "peak_cuda_mib",
        "fit_seconds",
    ],
}
LABELS = {
    "trainable/llm": "LLM",
    "trainable/vit": "ViT",
    "trainable/projector": "projector",
    "trainable/modality_embedding": "modality token",
    "trainable_pct": "trainable %",
    "test/image": "image (%)",
    "test/text": "text-only (%)",
    "test/all": "all (%)",
    "blind/image": "blind image (%)",
    "step_time_s": "step (s)",
    "step_time_ratio": "step ratio",
    "peak_rss_mib": "peak RSS (MiB)",
    "peak_cuda_mib": "peak CUDA (MiB)",
    "fit_seconds": "fit (s)",
}
ACCURACY_PREFIXES = ("test/", "blind/", "val/")


def with_step_ratio(rows: list[dict], baseline: str | None) -> list[dict]:
    """Rows with ``step_time_ratio``: step time over the baseline run's, when the sweep names one."""
    base = next((row for row in rows if row["name"] == baseline), None)
    if base is None or "step_time_s" not in base:
        return rows
    return [{**row, "step_time_ratio": row["step_time_s"] / base["step_time_s"]} for row in rows]


def write_csv(rows: list[dict], path: Path) -> None:
    """Every metric of every run; columns in the order they first appear."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def cell(key: str, value) -> str:
    """Accuracies in percent, counts with thousands separators, other numbers to four significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if key.startswith(ACCURACY_PREFIXES):
        return f"{100 * value:.1f}"
    return f"{value:.3f}" if key == "trainable_pct" else f"{value:.4g}"


def markdown_table(rows: list[dict], mode: str) -> str:
    """The mode's main columns (those some run has) as a Markdown table."""
    columns = [c for c in COLUMNS[mode] if any(c in row for row in rows)]
    lines = [
        "| " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" if c == "name" else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metrics: list[str], x: str, xlabel: str, path: Path, log_x: bool = False) -> None:
    """Each metric (an accuracy) against ``x``, one labelled point per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for metric in metrics:
        points = [(row[x], 100 * row[metric], row["name"]) for row in rows if x in row and metric in row]
        axes.scatter([p[0] for p in points], [p[1] for p in points], label=LABELS.get(metric, metric))
        for px, py, name in points:
            axes.annotate(name, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log" if log_x else "linear")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def write_report(rows: list[dict], spec: SweepSpec, root: Path) -> str:
    """Write ``results.csv``, ``results.md`` and, for trained runs, the plots under ``root``; return the table."""
    rows = with_step_ratio(rows, spec.baseline)
    write_csv(rows, root / "results.csv")
    table = markdown_table(rows, spec.mode)
    (root / "results.md").write_text(table)
    if spec.mode == "train":
        plot(rows, spec.plot_metrics, "trainable", "trainable parameters", root / "accuracy_vs_params.png", True)
        plot(rows, spec.plot_metrics, "step_time_s", "training step time (s)", root / "accuracy_vs_step_time.png")
    return table
