"""Where a training step's time goes: MFU and the top ops by self time of one step per method.

    python bench/profile_step.py [--config recipes/demo.yaml] [--methods none lora memvp] [--steps 5] [--rows 12]

Builds the recipe's model once per method (registered names, default settings; MemVP's memory sized to the visual
tokens as in ``train_step.py``), times ``--steps`` training steps of each at batch 4 x 256 tokens after a warm-up,
alternating between methods, and prints the median step, what it achieves (``measure.py``: real tokens/s, model
GFLOP/s and MFU against a 1024² matmul timed at start) and, from one more step under ``torch.profiler``, the ops
that took the most time themselves (self time: an op's own work, not that of the ops it called). Run it alone.
"""

import argparse
import statistics

import torch
from measure import HEADER, StepStats, matmul_gflops  # bench/ is on sys.path
from torch.profiler import ProfilerActivity, profile
from train_step import (
    BATCH,
    TOKENS,
    adamw,
    build_all,
    compute_dtype,
    measured_step,
    samples,
    time_train_step,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/demo.yaml")
    parser.add_argument("--methods", nargs="+", default=["none", "lora"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    runs = {}
    for method, (model, collator, precision) in build_all(args.config, args.methods).items():
        model.train()
        runs[method] = dict(model=model, batch=collator(samples(collator, TOKENS)), opt=adamw(model))
        runs[method] |= dict(precision=precision, stats=StepStats())
    device = next(model.parameters()).device
    peak = matmul_gflops(compute_dtype(precision), device)
    print(f"{args.config}: batch {BATCH} x {TOKENS} tokens, {args.threads} threads, {precision.precision}")
    print(f"matmul throughput (1024^2): {peak:.1f} GFLOP/s")

    for run in runs.values():  # warm-up: allocator, first-call overheads
        time_train_step(run["model"], run["batch"], run["opt"], run["precision"])
    for _ in range(args.steps):
        for run in runs.values():
            measured_step(run["model"], run["batch"], run["opt"], run["precision"], run["stats"])
    print(f"{'':>10}  step s  {HEADER}")
    for method, run in runs.items():
        print(f"{method:>10}: {statistics.median(run['stats'].seconds):6.3f} {run['stats'].line(peak)}")

    for method, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            measured_step(run["model"], run["batch"], run["opt"], run["precision"], StepStats())
        print(f"\n{method}: top {args.rows} ops by self time, one step")
        print(
            profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48)
        )


if __name__ == "__main__":
    main()
