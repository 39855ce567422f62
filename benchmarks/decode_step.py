"""Runtime v2 decode benchmark: batch-1 tok/s per option, a per-category step profile, batch tok/s and TTFT.

    python benchmarks/decode_step.py --out runs/decode_step.json               # Mixtral-8x7B fp8, one H100, ~3-4 min
    python benchmarks/decode_step.py --model tiny --out /tmp/d.json            # CPU smoke run: timings meaningless

Two engines, one after the other in this process (close() must free the first): dense linears bf16,
then fp8. On each, the batch-1 decode CUDA graph is re-captured per option (fused add+RMSNorm and
RoPE+KV-write on/off, split-KV partition size, one-launch MoE router on/off, programmatic dependent
launch (PDL) off/on), since the options are per-layer function choices or, for PDL, read at each launch
(moetune/kernels/pdl.py).
Dummy weights; decode context --context-len tokens. Prints the compact table last; writes JSON + CSV.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from moetune.kernels import activation, fused_moe, linear_fp8, pdl  # noqa: E402
from moetune.kernels.norm import add_rms_norm, add_rms_norm_reference  # noqa: E402
from moetune.kernels.rope import rope_and_cache, rope_and_cache_reference  # noqa: E402
from moetune.runtime import EngineConfig, LLMEngine  # noqa: E402
from moetune.runtime.layers import Attention, RMSNorm, SparseMoeBlock  # noqa: E402
from moetune.serve.compare import fixed_prompt, time_ttft_ms  # noqa: E402

# the step profile's rows, matched against kernel names (first hit wins); the rest is "small torch kernels"
CATEGORIES = [
    ("MoE GEMMs", ("_moe_gemm", "_gemv_gate_up", "_gemv_down")),
    ("SiLU x up", ("_silu_mul",)),
    ("routing + top-k sum / fp8 act quant", ("_route", "_align_place", "_quantize", "_topk_sum", "sum", "reduce")),
    ("dense linears", ("_w8a16", "gemm", "gemv", "cutlass", "nvjet", "xmma", "scaled_mm", "sm90")),
    ("paged decode attention", ("_decode_partition",)),  # merge included (one launch a layer)
    ("fused add+RMSNorm, RoPE+KV write", ("_add_rms_norm", "_rope_cache")),
]
VIEW_OPS = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select", "t", "transpose",
            "expand", "detach", "alias", "unsqueeze", "squeeze", "permute", "as_strided", "empty", "empty_like",
            "empty_strided", "unbind", "chunk", "narrow", "_reshape_alias", "lift_fresh"}  # fmt: skip


# The third session's decode changes, module switches read at every launch:
# name -> (module, attribute, value on, value off, on by default)
KERNEL_SWITCHES = {
    "fold_sum": (fused_moe, "FOLD_TOPK_SUM", True, False, True),  # GEMM2 adds each token's slots (no topk_sum)
    "silu_one_pass": (activation, "ROW_PASS_MAX_FEW_ROWS", activation.ROW_PASS_MAX_FEW_ROWS, 0, True),  # 1 launch
    "fold_norm": (fused_moe, "FOLD_NORM", True, False, True),  # post-attention add + RMSNorm inside route_decode
    # w8a16 weights into L2 before the PDL wait (PREFETCH=4 at M <= 16): measured slower, so off by default
    "dense_prefetch": (linear_fp8, "DEFAULT_CONFIGS", tuple((m, n, dataclasses.replace(c, PREFETCH=4) if m <= 16 else c)
                                                            for m, n, c in linear_fp8.DEFAULT_CONFIGS),
                       linear_fp8.DEFAULT_CONFIGS, False),
}


def set_options(engine: LLMEngine, fused: bool, partition: int, router: bool = True,
                use_pdl: bool = pdl.DEFAULT, **switches: bool) -> None:  # fmt: skip
    """Switch every layer's norm/rope functions, attention partition size and MoE router (one launch with
    routing, or F.linear before it), PDL for every launch (on only where the GPU has it; default:
    MOETUNE_PDL's choice) and the KERNEL_SWITCHES (each at its default unless given), then re-capture the graphs."""
    pdl.set_enabled(use_pdl)
    for name, (module, attr, on, off, default) in KERNEL_SWITCHES.items():
        setattr(module, attr, on if switches.pop(name, default) else off)
    if switches:
        raise ValueError(f"unknown switches {sorted(switches)}; known: {sorted(KERNEL_SWITCHES)}")
    for m in engine.runner.model.modules():
        if isinstance(m, RMSNorm):
            m.norm = add_rms_norm if fused else add_rms_norm_reference
        elif isinstance(m, Attention):
            m.rope_and_cache = rope_and_cache if fused else rope_and_cache_reference
            m.partition_tokens = partition
        elif isinstance(m, SparseMoeBlock):
            m.fused_router = router
    if engine.runner.use_graphs:
        engine.runner.capture_graphs()


def _decode_inputs(engine: LLMEngine, batch: int, context_len: int) -> tuple:
    r, dev = engine.runner, engine.runner.device
    nb = -(-context_len // r.block_size)
    tables = (torch.arange(batch * nb, device=dev) % r.num_kv_blocks).view(batch, nb).int()
    ids = torch.randint(3, engine.spec.vocab_size, (batch,), device=dev)
    positions = torch.full((batch,), context_len - 1, dtype=torch.long, device=dev)
    slots = torch.full((batch,), r.trash_slot, dtype=torch.long, device=dev)
    return ids, positions, slots, torch.full((batch,), context_len, dtype=torch.int32, device=dev), tables


def count_launches(engine: LLMEngine, context_len: int) -> dict[str, int]:
    """Kernel launches of one eager batch-1 decode step, counted on any device: every dispatched torch op
    that computes (views and allocations launch nothing) plus every Triton launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()
    inside_triton = [False]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside_triton[0] and name not in VIEW_OPS:
                counts["torch:" + name] += 1
            return func(*args, **(kwargs or {}))

    import triton.runtime.interpreter as interp  # the GPU path counts JITFunction.run instead
    from triton.runtime.jit import JITFunction

    patched = []
    for cls, attr in ((interp.InterpretedFunction, "run"), (JITFunction, "run")):
        real = getattr(cls, attr)

        def wrapped(self, *a, _real=real, **kw):
            counts["triton:" + getattr(getattr(self, "fn", None), "__name__", "kernel")] += 1
            inside_triton[0] = True
            try:
                return _real(self, *a, **kw)
            finally:
                inside_triton[0] = False

        setattr(cls, attr, wrapped)
        patched.append((cls, attr, real))
    try:
        with torch.inference_mode(), Count():
            engine.runner._decode_eager(*_decode_inputs(engine, 1, context_len))
    finally:
        for cls, attr, real in patched:
            setattr(cls, attr, real)
    torch_n = sum(v for k, v in counts.items() if k.startswith("torch:"))
    return {"total": sum(counts.values()), "torch_ops": torch_n, "triton": sum(counts.values()) - torch_n}


def step_profile(engine: LLMEngine, context_len: int, batch: int = 1) -> tuple[list[dict], list[dict]]:
    """torch.profiler over 3 eager decode steps at `batch`: device ms per step and launches per category,
    and per kernel name (the 25 costliest: where the next change should go)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = _decode_inputs(engine, batch, context_len)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.inference_mode():
        engine.runner._decode_eager(*inputs)  # warm-up
        with profile(activities=acts) as prof:
            for _ in range(3):
                engine.runner._decode_eager(*inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    rows: dict[str, list[float]] = {name: [0.0, 0] for name, _ in CATEGORIES} | {"small torch kernels": [0.0, 0]}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) if torch.cuda.is_available() else e.self_cpu_time_total
        if us <= 0 or (not torch.cuda.is_available() and not e.key.startswith("aten::")):
            continue
        cat = next((c for c, keys in CATEGORIES if any(k in e.key for k in keys)), "small torch kernels")
        rows[cat][0] += us / 3 / 1e3
        rows[cat][1] += e.count / 3
    events = prof.key_averages()
    per_kernel = sorted(((e.key, getattr(e, "self_device_time_total", 0) / 3, e.count / 3) for e in events),
                        key=lambda r: -r[1])  # fmt: skip
    kernels = [{"kernel": k[:70], "us": round(us, 1), "launches": round(n), "us_each": round(us / max(n, 1), 2)}
               for k, us, n in per_kernel[:25] if us > 0]  # fmt: skip
    return [{"part": k, "ms": round(v[0], 4), "launches": round(v[1])} for k, v in rows.items()], kernels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral-8x7b", help="mixtral-8x7b (GPU) or tiny (CPU smoke run)")
    p.add_argument("--out", type=Path, required=True, help="JSON path; a CSV goes beside it")
    p.add_argument("--context-len", type=int, help="decode context (default 512; tiny 16)")
    p.add_argument("--steps", type=int, help="timed graph replays per figure (default 50; tiny 2)")
    p.add_argument("--tuned-configs", help="folder of tuned MoE tables (default: moetune's search path)")
    args = p.parse_args()
    gpu, tiny = torch.cuda.is_available(), args.model == "tiny"
    ctx, steps = args.context_len or (16 if tiny else 512), args.steps or (2 if tiny else 50)
    batches, prompt_len = ([1, 2, 4], 32) if tiny else ([1, 16, 64, 256], 2048)
    base = dict(model=args.model, dtype="fp8" if gpu else "bf16", device="cuda" if gpu else "cpu",
                max_model_len=128 if tiny else 4096, max_num_batched_tokens=max(4096, prompt_len),
                tuned_configs=args.tuned_configs, enforce_eager=not gpu)  # fmt: skip
    t_start, results = time.perf_counter(), {"decode_b1": [], "batch": [], "launches": {}, "profile": []}

    def tok_s(engine: LLMEngine, batch: int) -> float:
        return batch * 1e6 / engine.decode_step_time_us(batch, ctx, steps)

    def b1(engine: LLMEngine, name: str, fused: bool, partition: int, router: bool, use_pdl: bool,
           **switches: bool) -> None:  # fmt: skip
        set_options(engine, fused, partition, router, use_pdl, **switches)
        row = {"option": name, "dense": engine.config.dense_dtype, "fused_norm_rope": fused,
               "partition_tokens": partition or "auto", "fused_router": router,
               "pdl": pdl.launch_kwargs(engine.runner.device)["launch_pdl"], "tok_s": tok_s(engine, 1),
               **{k: switches.get(k, v[4]) for k, v in KERNEL_SWITCHES.items()}}  # fmt: skip
        results["decode_b1"].append(row)
        print(f"  {name:<44} {row['tok_s']:8.1f} tok/s", flush=True)

    print(f"== dense bf16 ({args.model}, {base['dtype']} experts)", flush=True)
    eng = LLMEngine(EngineConfig(**base, dense_dtype="bf16", max_num_seqs=1))
    old = {k: False for k in KERNEL_SWITCHES}  # the switches of this session, off
    results["launches"]["old (eager norm/rope)"] = (set_options(eng, False, 128, **old), count_launches(eng, ctx))[1]
    results["launches"]["new (fused norm/rope)"] = (set_options(eng, True, 0, **old), count_launches(eng, ctx))[1]
    b1(eng, "v1-like: eager norm/rope, split-KV 128 tok", False, 128, router=False, use_pdl=False, **old)
    b1(eng, "+ fused norm/rope", True, 128, router=False, use_pdl=False, **old)
    b1(eng, "+ split-KV by batch (32 tokens at b=1)", True, 0, router=False, use_pdl=False, **old)
    eng.close()
    del eng
    gc.collect()

    print("== dense fp8 (the new default with dtype fp8)", flush=True)
    eng = LLMEngine(EngineConfig(**base, dense_dtype="fp8", max_num_seqs=max(batches)))
    b1(eng, "+ fp8 dense (w8a16)", True, 0, router=False, use_pdl=False, **old)
    results["launches"]["fp8 dense, router apart"] = count_launches(eng, ctx)
    b1(eng, "+ one-launch router", True, 0, router=True, use_pdl=False, **old)
    b1(eng, "+ PDL (programmatic dependent launch)", True, 0, router=True, use_pdl=True, **old)
    results["launches"]["fp8 dense, one-launch router, PDL"] = count_launches(eng, ctx)
    b1(eng, "  same, PDL off again (drift check)", True, 0, router=True, use_pdl=False, **old)
    on: dict[str, bool] = {}
    for name, label in (("fold_sum", "+ top-k sum folded into GEMM2"), ("silu_one_pass", "+ one-pass SiLU at decode"),
                        ("fold_norm", "+ add+RMSNorm inside the router"),
                        ("dense_prefetch", "  + dense weights into L2 before the wait (not default)")):  # fmt: skip
        on[name] = True
        b1(eng, label, True, 0, router=True, use_pdl=True, **(old | on))
    b1(eng, "  same, this session's folds off (drift check)", True, 0, router=True, use_pdl=True, **old)
    set_options(eng, True, 0)  # the defaults: one-launch router, PDL where the GPU has it, the folds, no prefetch
    results["launches"]["this session's defaults"] = count_launches(eng, ctx)
    results["profile"], results["kernels"] = step_profile(eng, ctx)
    results["profile_big"], results["kernels_big"] = step_profile(eng, ctx, max(batches))
    for b in batches:
        results["batch"].append({"batch": b, "tok_s": tok_s(eng, b)})
    prompt = fixed_prompt(prompt_len, eng.spec.vocab_size, seed=1)
    results["ttft_ms"] = {"prompt_len": prompt_len, "ms": time_ttft_ms(eng, prompt, 1 if tiny else 3)}
    device = torch.cuda.get_device_name() if gpu else "cpu (timings meaningless)"
    seconds = round(time.perf_counter() - t_start, 1)
    on = pdl.launch_kwargs(eng.runner.device)["launch_pdl"]  # for the profile and batch rows
    results.update(model=args.model, device=device, context_len=ctx, torch=torch.__version__, seconds=seconds, pdl=on)
    eng.close()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "name", "value", "unit"])
        w.writerows(("decode_b1", r["option"], r["tok_s"], "tok/s") for r in results["decode_b1"])
        w.writerows(("batch", r["batch"], r["tok_s"], "tok/s") for r in results["batch"])
        w.writerows(("profile", r["part"], r["ms"], "ms/step") for r in results["profile"])
        w.writerow(("ttft", prompt_len, results["ttft_ms"]["ms"], "ms"))
        w.writerows(("launches", k, v["total"], "per step") for k, v in results["launches"].items())

    print(f"\nstep profile, eager batch-1 decode at context {ctx} (torch.profiler; graphs replay the same kernels)")
    print(f"{'part':<40} {'ms':>8} {'launches':>9}")
    for r in results["profile"]:
        print(f"{r['part']:<40} {r['ms']:>8.3f} {r['launches']:>9}")
    for key, batch in (("kernels", 1), ("kernels_big", max(batches))):
        print(f"\n{f'kernel (costliest per step, batch {batch})':<70} {'us':>8} {'launches':>9} {'us each':>8}")
        for r in results[key][: 25 if batch == 1 else 12]:
            print(f"{r['kernel']:<70} {r['us']:>8.1f} {r['launches']:>9} {r['us_each']:>8.2f}")
    print(f"\nstep profile at batch {max(batches)}: " + ", ".join(f"{r['part']} {r['ms']:.2f} ms"
                                                         for r in results["profile_big"]))  # fmt: skip
    print(f"\n{results['device']}, {args.model}, context {ctx}, {results['seconds']} s")
    for k, v in results["launches"].items():
        print(f"launches per decode step, {k}: {v['total']} ({v['torch_ops']} torch ops, {v['triton']} Triton)")
    print(f"{'batch-1 option':<46} {'tok/s':>8}  PDL launched (off where the GPU lacks it)")
    for r in results["decode_b1"]:
        print(f"{r['option']:<46} {r['tok_s']:>8.1f}  {'on' if r['pdl'] else 'off'}")
    print(f"PDL {'on' if on else 'off'} in the profile and batch rows")
    print("batch " + "  ".join(f"{r['batch']}: {r['tok_s']:.0f} tok/s" for r in results["batch"]))
    print(f"TTFT at {prompt_len} tokens: {results['ttft_ms']['ms']:.1f} ms")
    print(f"results: {args.out} {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
