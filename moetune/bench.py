"""`moetune bench`: time the whole MoE layer (routing through the top-k sum) per token count M, with
the default config and with a table's config, against the roofline floor measured in the same run.

    floor(M) = max(bytes of the experts actually touched / copy bandwidth, FLOPs / matmul peak)

Timings are CUDA-graph replays after warm-up, median of many. Inputs are random, never zeros.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from moetune.errors import MoetuneError
from moetune.models import check_dtype, get_model, moe_shape
from moetune.tables import (
    TOKEN_COUNTS,
    ConfigTable,
    atomic_write_text,
    default_config,
    device_name,
    find_table,
    parse_token_counts,
)
from moetune.timing import Ceilings, measure_ceilings, on_gpu
from moetune.tuning.bench import KernelBench

BENCH_TOKEN_COUNTS = (1, 16, 64, 256, 1024, 4096)  # the M values of the target table


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixtral-8x7b", help="model preset (default: mixtral-8x7b)")
    p.add_argument("--dtype", default="fp8", help="bf16, fp16 or fp8 (default: fp8)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: shards N as vLLM does")
    p.add_argument("--table", type=Path, help="config table to time (default: the one found for this GPU)")
    counts = ",".join(map(str, BENCH_TOKEN_COUNTS))
    p.add_argument("--batch-sizes", default=counts, help=f"token counts M (default: {counts}; 'all' for all 18)")
    p.add_argument("--csv", type=Path, help="where to write the rows (default: runs/bench/<model>-<dtype>-tp<N>.csv)")
    p.add_argument("--reps", type=int, default=50, help="timed graph replays per config (median reported)")


def floor_us(bench: KernelBench, M: int, ceilings: Ceilings) -> float:
    """Roofline floor at M: the experts this routing actually touches, x in and out, and the FLOPs."""
    s = bench.shape
    x, logits = bench.inputs(M)
    touched = torch.topk(logits, s.top_k, dim=-1).indices.unique().numel()
    weight_bytes = touched * 3 * s.N * s.K * bench.w13.element_size()
    flops = 2 * M * s.top_k * 3 * s.N * s.K
    return ceilings.floor_us(weight_bytes + 2 * x.numel() * x.element_size(), flops)


def bench_one(bench: KernelBench, M: int, table: ConfigTable, ceilings: Ceilings, reps: int) -> dict:
    """One row: check the table's config against the reference at this M, then time both configs."""
    tuned_cfg, default_cfg = table.pick(M), default_config(M, bench.shape.E)
    err = bench.verify(tuned_cfg, M)
    if err > bench.tolerance:
        raise MoetuneError(f"M={M}: config {tuned_cfg} is wrong here (rel err {err:.3g}); fix the table entry")
    default_us = bench.time(default_cfg, M, reps)
    tuned_us = bench.time(tuned_cfg, M, reps) if table.path else default_us
    floor = floor_us(bench, M, ceilings)
    return dict(
        M=M, default_us=default_us, table_us=tuned_us, speedup=default_us / tuned_us, floor_us=floor,
        frac_of_floor=floor / tuned_us, rel_err=err, config="/".join(str(tuned_cfg[k]) for k in tuned_cfg),
    )  # fmt: skip


def bench_main(args: argparse.Namespace) -> int:
    model, dtype = get_model(args.model), check_dtype(args.dtype)
    shape = moe_shape(model, args.tp)
    counts = list(TOKEN_COUNTS) if args.batch_sizes == "all" else parse_token_counts(args.batch_sizes)
    if not on_gpu() and model.name != "tiny":
        raise MoetuneError("no CUDA GPU found: `moetune bench` times kernels on a GPU; --model tiny runs on a CPU")
    table = ConfigTable.load(args.table, shape.E) if args.table else find_table(shape, dtype)
    bench = KernelBench(shape, dtype)
    ceilings = measure_ceilings(dtype) if on_gpu() else Ceilings(bandwidth=3.0e12, matmul_flops=1.0e15)
    print(f"{model.name} {dtype} tp={args.tp}: E={shape.E} N={shape.N} K={shape.K} top_k={shape.top_k}")
    print(f"table: {table.path or 'none found (tuned column = default)'}")
    if on_gpu():
        print(f"device: {torch.cuda.get_device_name()}; measured {ceilings.bandwidth / 1e12:.2f} TB/s copy, "
              f"{ceilings.matmul_flops / 1e12:.0f} TFLOP/s {dtype} matmul")  # fmt: skip
    else:
        print("CPU (Triton interpreter): timings and floors are meaningless; this only proves the pipeline runs")

    df = pd.DataFrame([bench_one(bench, M, table, ceilings, args.reps) for M in counts])
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"))
    out = args.csv or Path("runs/bench") / f"{model.name}-{dtype}-tp{args.tp}.csv"
    meta = dict(model=model.name, dtype=dtype, tp=args.tp, E=shape.E, N=shape.N, device=device_name(),
                torch=torch.__version__)  # fmt: skip
    atomic_write_text(out, df.assign(**meta).to_csv(index=False))
    print(f"wrote {out}")
    return 0
