"""A sweep's results: every run's metrics in ``results.csv``, the main ones in ``results.md``, and two plots.

A sweep with ``seeds`` reports each run over its seeds: mean ± standard deviation and n in ``results.md`` and as
error bars in the plots, and a comparison with the baseline that marks differences smaller than the spread.
"""

import csv
import math
import statistics
from dataclasses import dataclass
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
    "train": ["name", "trainable", "step_time_s", "step_time_ratio", "peak_rss_mib", "peak_cuda_mib", "fit_seconds"],
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
    "test/shape": "shape (%)",
    "test/colour": "colour (%)",
    "test/yes/no": "yes/no (%)",
    "blind/shape": "blind shape (%)",
    "blind/colour": "blind colour (%)",
    "blind/yes/no": "blind yes/no (%)",
    "step_time_s": "step (s)",
    "step_time_ratio": "step ratio",
    "peak_rss_mib": "peak RSS (MiB)",
    "peak_cuda_mib": "peak CUDA (MiB)",
    "fit_seconds": "fit (s)",
}
ACCURACY_PREFIXES = ("test/", "blind/", "val/")


@dataclass
class Group:
    """The rows of one run of the sweep file: one per seed (a single row without seeds)."""

    name: str
    rows: list[dict]

    def values(self, key: str) -> list[float]:
        """The finite numbers the rows hold under ``key``."""
        found = [row.get(key) for row in self.rows]
        return [v for v in found if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def sd(self, key: str) -> float | None:
        """Sample standard deviation over the seeds; None below two values."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None


def group_rows(rows: list[dict]) -> list[Group]:
    """Rows grouped by the run they repeat (``run``; the row's own name without seeds), in order of appearance."""
    groups: dict[str, Group] = {}
    for row in rows:
        name = row.get("run", row["name"])
        groups.setdefault(name, Group(name, [])).rows.append(row)
    return list(groups.values())


def with_step_ratio(rows: list[dict], baseline: str | None) -> list[dict]:
    """Rows with ``step_time_ratio``: step time over the baseline run's (its mean over seeds), when the sweep
    names one."""
    base = next((group for group in group_rows(rows) if group.name == baseline), None)
    mean = base.mean("step_time_s") if base is not None else None
    if mean is None:
        return rows
    return [{**row, "step_time_ratio": row["step_time_s"] / mean} for row in rows]


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


def main_columns(spec: SweepSpec) -> list[str]:
    """The columns of ``results.md``: a trained run's accuracies (``spec.metrics``) after its name and size."""
    columns = COLUMNS[spec.mode]
    return [*columns[:2], *spec.metrics, *columns[2:]] if spec.mode == "train" else columns


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The main columns (those some run has) as a Markdown table."""
    columns = [c for c in columns if any(c in row for row in rows)]
    lines = [
        "| " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" if c == "name" else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def spread_cell(key: str, values: list[float]) -> str:
    """``mean ± sd`` over the seeds; a lone value, or a count every seed agrees on, as ``cell`` writes it."""
    if not values:
        return "-"
    if len(values) == 1 or (len(set(values)) == 1 and all(isinstance(v, int) for v in values)):
        return cell(key, values[0])
    return f"{cell(key, statistics.fmean(values))} ± {cell(key, statistics.stdev(values))}"


def seeded_table(groups: list[Group], columns: list[str]) -> str:
    """The main columns, each run's mean ± standard deviation over its seeds and their number n."""
    columns = [c for c in columns[1:] if any(group.values(c) for group in groups)]
    lines = [
        "| " + " | ".join(["name", "n", *(LABELS.get(c, c) for c in columns)]) + " |",
        "|---|" + "|".join("---:" for _ in range(len(columns) + 1)) + "|",
    ]
    for group in groups:
        cells = [group.name, str(len(group.rows)), *(spread_cell(c, group.values(c)) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def difference(group: Group, reference: Group, metric: str) -> str:
    """``+1.2`` percentage points from the reference's mean; `` ~`` when smaller than the spread (the ± sd bars
    overlap: |difference| < sd + sd of the reference), `` ?`` when either has a single seed."""
    mean, base = group.mean(metric), reference.mean(metric)
    if mean is None or base is None:
        return "-"
    sd, base_sd = group.sd(metric), reference.sd(metric)
    if sd is None or base_sd is None:
        mark = " ?"
    else:
        mark = " ~" if abs(mean - base) < sd + base_sd else ""
    return f"{100 * (mean - base):+.1f}{mark}"


def comparison_table(groups: list[Group], metrics: list[str], baseline: str | None) -> str:
    """Every run against the baseline (else the first run) on each plotted metric it has; empty without any."""
    metrics = [m for m in metrics if any(group.values(m) for group in groups)]
    if not metrics or len(groups) < 2:
        return ""
    reference = next((g for g in groups if g.name == baseline), groups[0])
    lines = [
        f"Difference from **{reference.name}** in percentage points, means over seeds. `~`: smaller than the spread "
        "(|difference| < the two standard deviations added: the ± sd bars overlap), no evidence of a difference; "
        "`?`: a run with one seed has no spread.",
        "",
        "| " + " | ".join(["name", "n", *(f"Δ {LABELS.get(m, m)}" for m in metrics)]) + " |",
        "|---|" + "|".join("---:" for _ in range(len(metrics) + 1)) + "|",
    ]
    for group in groups:
        cells = ["reference" if group is reference else difference(group, reference, m) for m in metrics]
        lines.append("| " + " | ".join([group.name, str(len(group.rows)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: list[Group], metrics: list[str], x: str, xlabel: str, path: Path, log_x: bool = False) -> None:
    """Each metric (an accuracy) against ``x``, one labelled point per run: the mean over its seeds with ± sd
    error bars on both axes (none for a single seed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for metric in metrics:
        shown = [g for g in groups if g.values(x) and g.values(metric)]
        xs, ys = [g.mean(x) for g in shown], [100 * g.mean(metric) for g in shown]
        x_err = [g.sd(x) or 0.0 for g in shown]
        y_err = [100 * (g.sd(metric) or 0.0) for g in shown]
        axes.errorbar(xs, ys, yerr=y_err, xerr=x_err, fmt="o", capsize=3, label=LABELS.get(metric, metric))
        for px, py, group in zip(xs, ys, shown, strict=True):
            label = group.name if len(group.rows) == 1 else f"{group.name} (n={len(group.rows)})"
            axes.annotate(label, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
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
    groups = group_rows(rows)
    if any("seed" in row for row in rows):
        comparison = comparison_table(groups, spec.plot_metrics, spec.baseline)
        table = seeded_table(groups, main_columns(spec)) + (f"\n{comparison}" if comparison else "")
    else:
        table = markdown_table(rows, main_columns(spec))
    (root / "results.md").write_text(table)
    if spec.mode == "train":
        plot(groups, spec.plot_metrics, "trainable", "trainable parameters", root / "accuracy_vs_params.png", True)
        plot(groups, spec.plot_metrics, "step_time_s", "training step time (s)", root / "accuracy_vs_step_time.png")
    return table
