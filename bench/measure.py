"""What the benchmarks measure besides time: the machine's matmul throughput, peak memory, and per-step figures
(real tokens per second, padding share, model FLOPs per second and their share of the matmul throughput: MFU).
Model FLOPs and real tokens are counted by ``mma.throughput``."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mma.throughput import real_tokens, train_step_flops


def matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` matmul in ``dtype``: the ceiling that MFU is measured against."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or on CPU the process's peak resident set (``VmHWM``), which
    Linux resets when ``5`` is written to ``/proc/self/clear_refs``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA tensors allocated, or the CPU process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class StepStats:
    """Training steps of one setting, accumulated: seconds, real tokens, padded positions, model FLOPs, peak MB."""

    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    positions: int = 0
    flops: float = 0.0
    peak_mb: float = 0.0

    def add(self, model, batch: dict, seconds: float, peak_mb: float) -> None:
        self.seconds.append(seconds)
        self.tokens += real_tokens(batch)
        self.positions += batch["attention_mask"].numel()
        self.flops += train_step_flops(model, batch)
        self.peak_mb = max(self.peak_mb, peak_mb)

    @property
    def padding(self) -> float:
        return 1 - self.tokens / self.positions

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / sum(self.seconds)

    @property
    def gflops(self) -> float:
        return self.flops / sum(self.seconds) / 1e9

    def line(self, peak_gflops: float) -> str:
        """``real tokens/s  padding  GFLOP/s  MFU  peak MB`` as one aligned line."""
        return (
            f"{self.tokens_per_second:10.0f} {100 * self.padding:7.1f}% {self.gflops:8.2f} "
            f"{100 * self.gflops / peak_gflops:5.1f}% {self.peak_mb:8.0f}"
        )


HEADER = "real tok/s  padding  GFLOP/s   MFU  peak MB"
