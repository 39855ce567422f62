"""Timing on the GPU (CUDA graphs, events, medians) and the roofline ceilings measured in the same run.

On a CPU (Triton's interpreter) the same calls fall back to wall-clock medians; those numbers only
prove the pipeline runs and are labelled meaningless wherever they are shown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def time_us(fn: Callable[[], object], *, reps: int = 20, inner: int = 5, warmup: int = 3) -> float:
    """Median µs of one call of fn.

    On a GPU, fn is captured `inner` times into one CUDA graph (so launch overhead is what a
    graph-replaying engine sees), and each of `reps` replays is timed with CUDA events.
    """
    if not on_gpu():
        return median_us(fn, reps=max(1, reps // 4), warmup=min(warmup, 1), cuda=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(start, end):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 / inner for s, e in zip(start, end))


def median_us(fn: Callable[[], object], *, reps: int, warmup: int, cuda: bool) -> float:
    """Median µs of fn, each call timed on its own: CUDA events (no host sync between calls) for work
    on a GPU, e.g. a graph replay; wall clock otherwise."""
    for _ in range(warmup):
        fn()
    if not cuda:
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


@dataclass(frozen=True)
class Ceilings:
    """What this GPU reaches right now: read bandwidth (bytes/s; the MoE layer streams its weights, it
    does not copy them) and dense matmul rate (FLOP/s)."""

    bandwidth: float
    matmul_flops: float

    def floor_us(self, bytes_moved: float, flops: float) -> float:
        return max(bytes_moved / self.bandwidth, flops / self.matmul_flops) * 1e6


def measure_ceilings(dtype: str) -> Ceilings:
    """Read bandwidth (a sum over 512 MiB of bf16) and the matmul peak for dtype, on random data (never zeros)."""
    n = 1 << 28  # 512 MiB of bf16: far beyond L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    read_us = time_us(lambda: src.sum(dtype=torch.float32), reps=10, inner=2)
    bandwidth = src.numel() * src.element_size() / (read_us * 1e-6)
    src = None  # free it before the matmul

    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    if dtype == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T.contiguous().T
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        a, b = (a.half(), b.half()) if dtype == "fp16" else (a, b)
        fn = lambda: a @ b
    mm_us = time_us(fn, reps=10, inner=2)
    return Ceilings(bandwidth=bandwidth, matmul_flops=2 * size**3 / (mm_us * 1e-6))
