"""Relative error of the fused MoE layer against the float32 reference, per dtype, kernel path and M.

    python benchmarks/accuracy.py [--E 8 --N 512 --K 1024]

Runs on a GPU, or on a CPU through Triton's interpreter (slower; use a small shape). Fresh random
inputs per M; weights at realistic scale (N(0, 1/fan_in)). Prints one row per (dtype, path, M).
"""

from __future__ import annotations

import argparse

import pandas as pd

from moetune.device import use_interpreter_if_no_gpu

use_interpreter_if_no_gpu()

from moetune.models import MoeShape  # noqa: E402
from moetune.tables import default_config  # noqa: E402
from moetune.tuning.bench import KernelBench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--E", type=int, default=8)
    p.add_argument("--N", type=int, default=512)
    p.add_argument("--K", type=int, default=1024)
    p.add_argument("--batch-sizes", default="1,4,33,128")
    args = p.parse_args()
    shape = MoeShape(E=args.E, N=args.N, K=args.K, top_k=2)
    rows = []
    for dtype in ("fp16", "bf16", "fp8"):
        bench = KernelBench(shape, dtype, seed=1)
        for M in map(int, args.batch_sizes.split(",")):
            tiled = dict(default_config(M, shape.E), BLOCK_SIZE_N=64, BLOCK_SIZE_K=64)
            rows.append(dict(dtype=dtype, path="tiled", M=M, rel_err=bench.verify(tiled, M)))
            if M <= 4:
                gemv = dict(tiled, BLOCK_SIZE_N=16, BLOCK_SIZE_K=128, kernel="gemv")
                rows.append(dict(dtype=dtype, path="gemv", M=M, rel_err=bench.verify(gemv, M)))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2e}"))


if __name__ == "__main__":
    main()
