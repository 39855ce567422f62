"""Our expert GEMM against vLLM's fused_moe_kernel, GEMM by GEMM, on identical inputs and routing.

    python benchmarks/gemm_parity.py [--anchor .anchor] [--batch-sizes 1024,4096] [--dtypes bf16,fp8]

Isolates the GEMMs from the glue around them: both kernels read the same x (or act), weights and
sorted slot list, with the vLLM table's config at that M. vLLM's kernel comes from a git-ignored
folder (--anchor, see ../shared/tools/vllm_side_by_side.py); no vLLM code is part of moetune.
Also writes each kernel's TTGIR under --dump for reading what the compiler did.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from moetune.kernels import moe_gemm as gemm_module
from moetune.kernels.activation import quantize_rows
from moetune.kernels.moe_gemm import moe_gemm
from moetune.kernels.routing import route_and_align
from moetune.models import get_model, moe_shape
from moetune.tables import nearest, parse_token_counts
from moetune.timing import median_us, time_us
from moetune.tuning.bench import KernelBench

VLLM_TABLES = {"bf16": "E=8,N=14336,device_name=NVIDIA_H200.json",
               "fp8": "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"}  # fmt: skip


VARIANTS = ("ours", "ours64", "ours_maskk", "vllm")


def eager_us(fn, reps: int) -> float:
    """Median µs of single launches, each between two events (no graph)."""
    fn()
    return median_us(fn, reps=reps, warmup=2, cuda=torch.cuda.is_available())


def dump_ttgir(folder: Path, tag: str, vllm_kernel) -> None:
    """The TTGIR of the kernels just compiled, to read wgmma use and pipelining offline."""
    from moetune.kernels.moe_gemm import _moe_gemm_kernel

    folder.mkdir(parents=True, exist_ok=True)
    for name, kernel in (("ours", _moe_gemm_kernel), ("vllm", vllm_kernel)):
        try:  # Triton's JIT cache layout is internal and changes between versions
            compiled = list(kernel.device_caches[torch.cuda.current_device()][0].values())
        except (AttributeError, KeyError, IndexError, TypeError, RuntimeError, AssertionError) as e:
            print(f"no TTGIR dump for {name}: {e!r}")
            continue
        for i, k in enumerate(compiled[-2:]):
            (folder / f"{name}_{tag}_{i}.ttgir").write_text(k.asm["ttgir"])


def gemm_launches(bench: KernelBench, cfg: dict, M: int, vllm_kernel) -> dict[tuple[str, int], object]:
    """(ours|vllm, gemm 1|2) -> a no-argument launch, all on the same buffers and routing."""
    fp8, s = bench.dtype == "fp8", bench.shape
    x, logits = bench.inputs(M)
    weights, _, sorted_ids, expert_ids, num_padded = route_and_align(logits, s.top_k, cfg["BLOCK_SIZE_M"])
    S, EM, dev = M * s.top_k, sorted_ids.numel(), x.device
    a1, a1_scale = quantize_rows(x) if fp8 else (x, None)
    act = torch.randn(S, s.N, device=dev, dtype=torch.bfloat16).to(a1.dtype)  # random, never zeros
    act_scale = torch.ones(S, device=dev) if fp8 else None
    h = torch.empty(S, 2 * s.N, device=dev, dtype=torch.bfloat16)
    y = torch.empty(S, s.K, device=dev, dtype=torch.bfloat16)
    # (a, w, out, a_scale, w_scale, a_row_div, mul_routed_weight); vLLM takes one per-tensor a scale
    args = {1: (a1, bench.w13, h, a1_scale, bench.s13, s.top_k, False),
            2: (act, bench.w2, y, act_scale, bench.s2, 1, True)}
    routing = (weights, sorted_ids, expert_ids, num_padded)

    def ours(a, w, c, sa, sw, div, mul):
        return lambda: moe_gemm(a, w, c, sa, sw, *routing, div, mul, cfg)

    def ours_with(**forced):  # ours, with some host-decided constexprs forced (64-bit offsets, K masks)
        def make(a, w, c, sa, sw, div, mul):
            def run():
                flags = gemm_module.dot_flags
                gemm_module.dot_flags = lambda *args: {**flags(*args), **forced}
                try:
                    moe_gemm(a, w, c, sa, sw, *routing, div, mul, cfg)
                finally:
                    gemm_module.dot_flags = flags
            return run
        return make

    def vllm(a, w, c, sa, sw, div, mul):
        grid = (triton.cdiv(EM, cfg["BLOCK_SIZE_M"]) * triton.cdiv(w.shape[1], cfg["BLOCK_SIZE_N"]),)
        sa = sa.max().reshape(1) if fp8 else None
        return lambda: vllm_kernel[grid](
            a, w, c, sa, sw, *routing, w.shape[1], w.shape[2], EM, S,
            a.stride(0), a.stride(1), w.stride(0), w.stride(2), w.stride(1), c.stride(0), c.stride(1),
            0, 0, 0, 0, 0, 0, 0, MUL_ROUTED_WEIGHT=mul, top_k=div, compute_type=tl.bfloat16,
            use_fp8_w8a8=fp8, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False, **cfg)  # fmt: skip

    makers = (("ours", ours), ("ours64", ours_with(INDEX_64=True)), ("ours_maskk", ours_with(EVEN_K=False)),
              ("vllm", vllm))
    return {(name, g): make(*args[g]) for name, make in makers for g in (1, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--anchor", default=".anchor")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--batch-sizes", default="1024,4096")
    p.add_argument("--dump", default="runs/ttgir")
    p.add_argument("--model", default="mixtral-8x7b", help="tiny: a CPU smoke test through the interpreter")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.anchor).resolve()))
    from vllm_kernel import fused_moe_kernel

    shape = moe_shape(get_model(args.model))
    rows = []
    for dtype in args.dtypes.split(","):
        bench = KernelBench(shape, dtype)
        table = json.loads((Path(args.anchor) / "configs" / VLLM_TABLES[dtype]).read_text())
        table = {int(k): v for k, v in table.items() if k != "triton_version"}
        for M in parse_token_counts(args.batch_sizes):
            cfg = table[nearest(table, M)]
            launches = gemm_launches(bench, cfg, M, fused_moe_kernel)
            for gemm in (1, 2):
                # interleaved rounds, median per kernel: clock and power drift hit every kernel alike
                times = {name: [] for name in VARIANTS}
                eager = {name: [] for name in VARIANTS}
                for _ in range(args.rounds):
                    for name in times:
                        times[name].append(time_us(launches[name, gemm], reps=10, inner=4))
                        eager[name].append(eager_us(launches[name, gemm], reps=10))
                rows.append(dict(dtype=dtype, M=M, gemm=gemm, config=json.dumps(cfg),
                                 **{f"{n}_us": statistics.median(v) for n, v in times.items()},
                                 **{f"{n}_eager_us": statistics.median(v) for n, v in eager.items()}))  # fmt: skip
                rows[-1]["ratio"] = rows[-1]["vllm_us"] / rows[-1]["ours_us"]
                print(json.dumps(rows[-1]), flush=True)
            if torch.cuda.is_available():
                dump_ttgir(Path(args.dump), f"{dtype}_M{M}", fused_moe_kernel)
        del bench
    cols = [f"{n}{kind}_us" for kind in ("", "_eager") for n in VARIANTS]
    print("\ngraph: CUDA-graph replays; eager: one launch between events. " + "dtype M gemm " + " ".join(cols))
    for r in rows:
        us = " ".join(f"{r[c]:9.1f}" for c in cols)
        print(f"{r['dtype']:5} {r['M']:5d} {r['gemm']:4d} {us} {r['ratio']:6.3f}")


if __name__ == "__main__":
    main()
