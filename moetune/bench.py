"""`moetune bench`: time the whole MoE layer (routing through the top-k sum) per token count M, with
the default config and with a table's config, against the roofline floor measured in the same run.

    floor(M) = max(bytes of the experts actually touched / read bandwidth, FLOPs / matmul peak)

Timings are CUDA-graph replays after warm-up, median of many. Inputs are random, never zeros.
The tuner's finalists are timed by the same KernelBench.time, so a sidecar's tuned_us and this
command's table_us for that config agree. `--against TABLE` adds a column timing another table's
config (vLLM's shipped file, say) on our kernel in the same run, and the ratio per M. The two configs
are then timed in alternating rounds (A B, B A, ...), medians of the rounds: at large M the layer is
compute-bound and the clock sags with heat, so back-to-back timings of one config twice differed by
up to 9% on an H100 (2026-11-26); alternation lets that drift hit both alike.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from moetune.errors import MoetuneError
from moetune.models import DEFAULT_DTYPE, DTYPES, MoeShape, check_dtype, get_model, moe_shape
from moetune.tables import (
    CPU_TABLES_DIR,
    CPU_TOKEN_COUNTS,
    TOKEN_COUNTS,
    ConfigTable,
    atomic_write_text,
    default_config,
    device_name,
    find_table,
    load_sidecar,
    parse_table_filename,
    parse_token_counts,
)
from moetune.timing import Ceilings, measure_ceilings, on_gpu
from moetune.tuning.bench import KernelBench

log = logging.getLogger("moetune")
BENCH_TOKEN_COUNTS = (1, 16, 64, 256, 1024, 4096)  # the M values of the target table; CPU: CPU_TOKEN_COUNTS
ROUNDS = 5  # --against: alternating rounds of the two configs
GPU_REPS, CPU_REPS = 50, 4  # the interpreter takes seconds a call at M=64: CPU defaults finish in well under a minute


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixtral-8x7b", help="model preset (default: mixtral-8x7b)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"bf16, fp16 or fp8 (default: {DEFAULT_DTYPE})")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: shards N as vLLM does")
    p.add_argument("--table", type=Path, help="config table to time (default: the one found for this GPU)")
    p.add_argument("--against", type=Path, help="another table (e.g. vLLM's shipped file) whose configs are timed on "
                   "our kernel in the same run; prints against_us and the ratio against_us / table_us per M")
    p.add_argument("--strict", action="store_true",
                   help="refuse a --table/--against whose E, N, dtype or device differ from this run's (default: warn)")
    counts, cpu = ",".join(map(str, BENCH_TOKEN_COUNTS)), ",".join(map(str, CPU_TOKEN_COUNTS))
    p.add_argument("--batch-sizes", help=f"token counts M (default: {counts} on a GPU, {cpu} on the CPU; "
                   "'all' for vLLM's 18)")  # fmt: skip
    p.add_argument("--csv", type=Path, help="where to write the rows (default: runs/bench/<model>-<dtype>-tp<N>.csv)")
    p.add_argument("--reps", type=int, help=f"timed graph replays per config, median reported (default: {GPU_REPS}; "
                   f"{CPU_REPS} on the CPU, where timings mean nothing)")  # fmt: skip
    p.add_argument("--rounds", type=int, help=f"with --against: alternating rounds of the two configs (default: "
                   f"{ROUNDS}; 1 on the CPU)")  # fmt: skip


def floor_us(bench: KernelBench, M: int, ceilings: Ceilings) -> float:
    """Roofline floor at M: the experts this routing actually touches, x in and out, and the FLOPs."""
    s = bench.shape
    x, logits = bench.inputs(M)
    touched = torch.topk(logits, s.top_k, dim=-1).indices.unique().numel()
    weight_bytes = touched * 3 * s.N * s.K * bench.w13.element_size()
    flops = 2 * M * s.top_k * 3 * s.N * s.K
    return ceilings.floor_us(weight_bytes + 2 * x.numel() * x.element_size(), flops)


def _checked(bench: KernelBench, config: dict, M: int, what: str) -> float:
    err = bench.verify(config, M)
    if not err <= bench.tolerance:
        raise MoetuneError(f"M={M}: {what} config {config} is wrong here (rel err {err:.3g}); fix that table entry")
    return err


def paired_us(bench: KernelBench, a: dict, b: dict, M: int, reps: int, rounds: int) -> tuple[float, float]:
    """Median µs of configs a and b over `rounds` alternating rounds (a b, b a, a b, ...)."""
    samples: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            samples[i].append(bench.time((a, b)[i], M, reps))
    return statistics.median(samples[0]), statistics.median(samples[1])


def bench_one(bench: KernelBench, M: int, table: ConfigTable, ceilings: Ceilings, reps: int,
              against: ConfigTable | None = None, rounds: int = ROUNDS) -> dict:  # fmt: skip
    """One row: check the table's config against the reference at this M, then time the configs."""
    tuned_cfg, default_cfg = table.pick(M), default_config(M, bench.shape.E)
    err = _checked(bench, tuned_cfg, M, "the table's")
    default_us = bench.time(default_cfg, M, reps)
    if against is not None:  # the table's config is timed in the alternating rounds only
        other = against.pick(M)
        _checked(bench, other, M, f"--against {against.path.name}'s")
        tuned_us, against_us = paired_us(bench, tuned_cfg, other, M, reps, rounds)
    else:
        tuned_us = bench.time(tuned_cfg, M, reps) if table.path else default_us
    floor = floor_us(bench, M, ceilings)
    row = dict(
        M=M, default_us=default_us, table_us=tuned_us, speedup=default_us / tuned_us, floor_us=floor,
        frac_of_floor=floor / tuned_us, rel_err=err, config="/".join(str(tuned_cfg[k]) for k in tuned_cfg),
    )  # fmt: skip
    if against is not None:
        row["against_us"], row["ratio"] = against_us, against_us / tuned_us  # ratio >= 1: ours is at least as fast
    return row


def check_table_matches(path: Path, flag: str, shape: MoeShape, dtype: str, device: str, strict: bool) -> None:
    """Warn (or, with --strict, refuse) when a table was made for another layer, dtype or device,
    naming what the table says and what this run is."""
    parts = parse_table_filename(path.name) or {}
    sidecar = load_sidecar(path) if path.is_file() else None
    theirs = {"E": parts.get("E"), "N": parts.get("N"), "device": parts.get("device"),
              "dtype": sidecar["dtype"] if sidecar else parts.get("dtype")}  # fmt: skip
    ours = {"E": shape.E, "N": shape.N, "device": device, "dtype": dtype if sidecar else DTYPES[dtype][2]}
    diff = [k for k in ours if theirs[k] != ours[k]]
    if not diff:
        return
    said = ", ".join(f"{k}={theirs[k]!r}" for k in diff)
    want = ", ".join(f"{k}={ours[k]!r}" for k in diff)
    message = f"{flag} {path} is for {said}, but this bench is for {want}"
    if strict:
        raise MoetuneError(f"{message}; pass the matching table, or drop --strict to time it anyway")
    log.warning("%s; timing it anyway (--strict refuses)", message)


def bench_main(args: argparse.Namespace) -> int:
    model, dtype = get_model(args.model), check_dtype(args.dtype)
    shape = moe_shape(model, args.tp)
    if args.reps is None:
        args.reps = GPU_REPS if on_gpu() else CPU_REPS
    if args.rounds is None:
        args.rounds = ROUNDS if on_gpu() else 1
    for flag, value in (("--reps", args.reps), ("--rounds", args.rounds)):
        if value < 1:
            raise MoetuneError(f"{flag} {value} is out of range; give a whole number of at least 1")
    if args.batch_sizes is None:
        counts = list(BENCH_TOKEN_COUNTS if on_gpu() else CPU_TOKEN_COUNTS)
    else:
        counts = list(TOKEN_COUNTS) if args.batch_sizes == "all" else parse_token_counts(args.batch_sizes)
    if not on_gpu() and model.name != "tiny":
        raise MoetuneError("no CUDA GPU found: `moetune bench` times kernels on a GPU; --model tiny runs on a CPU")
    device = device_name()
    for flag, path in (("--table", args.table), ("--against", args.against)):
        if path is not None:
            check_table_matches(path, flag, shape, dtype, device, args.strict)
    folders = [] if on_gpu() else [CPU_TABLES_DIR]  # where `moetune run --model tiny` writes
    table = ConfigTable.load(args.table, shape.E) if args.table else find_table(shape, dtype, folders=folders)
    against = ConfigTable.load(args.against, shape.E) if args.against else None
    bench = KernelBench(shape, dtype)
    ceilings = measure_ceilings(dtype) if on_gpu() else Ceilings(bandwidth=3.0e12, matmul_flops=1.0e15)
    print(f"{model.name} {dtype} tp={args.tp}: E={shape.E} N={shape.N} K={shape.K} top_k={shape.top_k}")
    print(f"table: {table.path or 'none found (tuned column = default)'}")
    if against is not None:
        print(f"against: {against.path} (its configs on our kernel; ratio = against_us / table_us, >= 1 is a win)")
    if on_gpu():
        print(f"device: {torch.cuda.get_device_name()}; measured {ceilings.bandwidth / 1e12:.2f} TB/s read, "
              f"{ceilings.matmul_flops / 1e12:.0f} TFLOP/s {dtype} matmul")  # fmt: skip
    else:
        print("CPU (Triton interpreter): timings and floors are meaningless; this only proves the pipeline runs")

    bar = tqdm(counts, desc="bench", unit="M", leave=False)
    df = pd.DataFrame([bench_one(bench, M, table, ceilings, args.reps, against, args.rounds) for M in bar])
    ratios = {c: (lambda v: f"{v:.3f}") for c in ("speedup", "frac_of_floor", "ratio") if c in df}  # 1.0 hides 0.96
    print(df.to_string(index=False, formatters=ratios, float_format=lambda v: f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"))
    out = args.csv or Path("runs/bench") / f"{model.name}-{dtype}-tp{args.tp}.csv"
    meta = dict(model=model.name, dtype=dtype, tp=args.tp, E=shape.E, N=shape.N, device=device,
                torch=torch.__version__)  # fmt: skip
    atomic_write_text(out, df.assign(**meta).to_csv(index=False))
    print(f"wrote {out}")
    return 0
