"""Ablation sweeps: a base recipe and a grid or list of overrides, run one after another, resumable, reported."""

from mma.sweep.report import write_report
from mma.sweep.runs import execute, is_done, read_metrics, run_folder
from mma.sweep.spec import Run, SweepSpec, load_sweep, resolve_all

__all__ = [
    "Run",
    "SweepSpec",
    "execute",
    "is_done",
    "load_sweep",
    "read_metrics",
    "resolve_all",
    "run_folder",
    "write_report",
]
