"""Decode-sized MoE on the GPU: the tiled path against the GEMV path, per M, in one run.

    python benchmarks/gemv_vs_tiled.py --dtype fp8 [--model mixtral-8x7b] [--batch-sizes 1,2,4,8,16]

For each M it times a small sweep of each path (CUDA graphs, median) and prints the best of each,
their ratio, and the fraction of the roofline floor measured in the same run. Decides whether the
GEMV knob earns its place and up to which M (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import itertools

import pandas as pd

from moetune.bench import floor_us
from moetune.models import get_model, moe_shape
from moetune.tables import parse_token_counts
from moetune.timing import Ceilings, measure_ceilings, on_gpu
from moetune.tuning.bench import Infeasible, KernelBench

# Small sweeps, each around what won at decode sizes: vLLM's shipped H100 fp8 configs (BM=64) and
# the BM=16 tiles of its bf16 tables; GEMV rows per program x reduction chunk x warps.
TILED = [
    dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in ((64, 64, 128, 8, 5), (64, 128, 256, 4, 4), (64, 128, 256, 4, 3), (16, 128, 128, 4, 5),
                             (16, 64, 256, 4, 3), (16, 64, 128, 4, 4))
]  # fmt: skip
GEMV = [
    dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1, num_warps=w, num_stages=2, kernel="gemv")
    for bn, bk, w in itertools.product((8, 16, 32), (256, 512), (4, 8))
]


def best(bench: KernelBench, M: int, configs: list[dict]) -> tuple[float, dict]:
    results = []
    for cfg in configs:
        try:
            if bench.verify(cfg, M) <= bench.tolerance:
                results.append((bench.time(cfg, M, reps=20), cfg))
        except Infeasible as e:  # a config that cannot compile (shared memory, registers) is skipped
            print(f"  skip {cfg}: {e}")
    return min(results, key=lambda r: r[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--dtype", default="fp8")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--csv", default="runs/gemv_vs_tiled.csv")
    args = p.parse_args()
    shape = moe_shape(get_model(args.model))
    bench = KernelBench(shape, args.dtype)
    ceilings = measure_ceilings(args.dtype) if on_gpu() else Ceilings(3e12, 1e15)  # CPU: smoke test only
    rows = []
    for M in parse_token_counts(args.batch_sizes):
        tiled_us, tiled_cfg = best(bench, M, TILED)
        gemv_us, gemv_cfg = best(bench, M, GEMV)
        floor = floor_us(bench, M, ceilings)
        rows.append(dict(M=M, tiled_us=tiled_us, gemv_us=gemv_us, gemv_speedup=tiled_us / gemv_us, floor_us=floor,
                         tiled_frac=floor / tiled_us, gemv_frac=floor / gemv_us,
                         tiled_cfg=str(tiled_cfg), gemv_cfg=str(gemv_cfg)))  # fmt: skip
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.drop(columns=["tiled_cfg", "gemv_cfg"]).to_string(index=False))
    df.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
