"""Where one fused-MoE layer call spends its time: per-kernel µs through torch.profiler, per M and dtype.

    python benchmarks/breakdown.py [--model mixtral-8x7b] [--dtypes fp8,bf16] [--batch-sizes 1,1024,4096]
        [--table FILE_OR_DIR] [--extra '{"fuse_silu": 1}'] [--csv runs/breakdown.csv]

The config at each M is the table's (nearest M; a folder holding vLLM-named tables picks the file for
the dtype), else vLLM's default; --extra merges our knobs into it. Kernel device times are summed by
stage over `--calls` eager calls after a warm-up and divided by the calls: launch gaps are not in them.
Prints one table, stages as columns, so every later kernel change is checked against it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

from moetune.models import get_model, moe_shape
from moetune.tables import ConfigTable, load_table, parse_table_filename, parse_token_counts
from moetune.tuning.bench import KernelBench

# kernel-name fragment -> stage (first match wins)
STAGES = [
    ("moe_gemm_silu", "gemm1+silu"), ("moe_gemm", "gemms"), ("gemv", "gemv"), ("silu_mul", "silu"),
    ("quantize_rows", "quantise"), ("quantize_with_amax", "quantise"), ("route", "route+align"),
    ("align", "route+align"), ("topk_sum", "topk_sum"), ("emset", "memset"), ("fill", "memset"),
]  # fmt: skip


def stage_of(kernel_name: str) -> str:
    return next((stage for frag, stage in STAGES if frag in kernel_name), "other")


def table_for(path: Path | None, dtype: str, E: int, N: int) -> ConfigTable:
    if path is None:
        return ConfigTable.untuned(E)
    if path.is_dir():
        want = "fp8_w8a8" if dtype == "fp8" else None
        for f in sorted(path.glob("*.json")):
            parts = parse_table_filename(f.name)
            if parts and parts["E"] == E and parts["N"] == N and parts["dtype"] == want:
                return ConfigTable(E=E, configs=load_table(f), path=f)
        return ConfigTable.untuned(E)
    return ConfigTable.load(path, E)


def profile_layer(bench: KernelBench, config: dict, M: int, calls: int) -> dict[str, float]:
    for _ in range(3):
        bench.run_once(config, M)
    bench.synchronize()
    on_gpu = bench.device.type == "cuda"  # on a CPU: the plumbing only, kernels show as host time
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(calls):
            bench.run_once(config, M)
        bench.synchronize()
    per_stage: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if not on_gpu or event.device_type == torch.autograd.DeviceType.CUDA:
            per_stage[stage_of(event.name)] += (event.device_time if on_gpu else event.cpu_time) / calls
    return dict(per_stage)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--batch-sizes", default="1,16,64,256,1024,4096")
    p.add_argument("--table", type=Path, default=None, help="a table file, or a folder of vLLM-named tables")
    p.add_argument("--extra", default="[{}]", help="JSON: a dict of extra knobs, or a list of them (one row each)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--csv", default="runs/breakdown.csv")
    args = p.parse_args()
    extras = json.loads(args.extra)
    extras = extras if isinstance(extras, list) else [extras]
    shape = moe_shape(get_model(args.model))
    rows = []
    for dtype in args.dtypes.split(","):
        bench = KernelBench(shape, dtype)
        table = table_for(args.table, dtype, shape.E, shape.N)
        for M in parse_token_counts(args.batch_sizes):
            for extra in extras:
                config = {**table.pick(M), **extra}
                stages = profile_layer(bench, config, M, args.calls)
                rows.append(dict(dtype=dtype, M=M, extra=json.dumps(extra), total=sum(stages.values()), **stages))
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      flush=True)  # fmt: skip
        bench.close()
        del bench
    df = pd.DataFrame(rows).fillna(0.0)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.csv, index=False)
    print(df.round(1).to_string(index=False))


if __name__ == "__main__":
    main()
