"""Compile every Triton kernel of moetune for an H100/H200 (sm_90) on this CPU-only machine.

Triton's wheel carries ptxas, so a kernel can go all the way to a cubin without a GPU. That catches
what the interpreter cannot: code the GPU compiler rejects, and which instructions (wgmma) it picks.
Every variant is compiled twice: as a plain launch, and as a PDL launch (USE_PDL=True, launch_pdl=True;
see moetune/kernels/pdl.py), whose PTX must wait (griddepcontrol.wait) before its global memory accesses.
Registers and spills come from the cubin (the wheel's cuobjdump -res-usage).
Run as a script with TRITON_INTERPRET unset (the interpreter replaces kernels with Python objects);
prints one JSON object per kernel variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: compiling needs real kernels"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moetune.kernels import (  # noqa: E402
    activation,
    attention,
    linear_fp8,
    moe_gemm,
    moe_gemm_silu,
    moe_gemv,
    norm,
    rope,
    route_decode,
    routing,
)
from moetune.tables import default_config  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


# Mixtral-8x7B TP1 sizes and strides (K=4096, N=14336), for the int arguments Triton specialises on
MIXTRAL_INTS = dict(N=14336, K=4096, stride_am=4096, stride_ak=1, stride_be=28672 * 4096, stride_bn=4096,
                    stride_bk=1, stride_cm=28672, stride_cn=1, stride_om=14336, stride_on=1, stride_h=28672, stride_out=14336,
                    stride_in=28672, K_SPLIT=1024,
                    stride_xt=4096, stride_we=28672 * 4096, stride_wn=4096, stride_wk=14336, stride_ot=4096,
                    stride_ge=4096, stride_qt=4096,
                    # decode attention at batch 1, max_model_len 4096, KV blocks of 16, split-KV partitions of 32:
                    # q and out [B, 32, 128] (q a view of qkv), caches [blocks, 16, 8, 128] (also rope's stride_ch), P=128
                    stride_qb=6144, stride_qh=128, stride_ob=4096, stride_oh=128, stride_cb=16384, stride_ct=1024,
                    stride_ch=128, stride_tb=256, stride_mb=4096, stride_mh=128, stride_ab=32 * 128 * 128,
                    stride_ah=128 * 128, stride_ap=128)  # fmt: skip


def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                       pdl: bool = False):  # fmt: skip
    """Compile as a launch on Mixtral-sized tensors would: Triton's JIT specialises pointers as 16-byte
    aligned, an int equal to 1 as a constant and an int divisible by 16 as such. Without those hints
    loads cannot become cp.async and the software pipeline (num_stages) silently does nothing.
    Arguments not named in types or constexprs are int32 scalars (token-dependent sizes).
    pdl: USE_PDL, and the launch option that goes with it (every kernel of ours takes USE_PDL)."""
    assert "USE_PDL" in kernel.arg_names, f"{kernel.fn.__name__} takes no USE_PDL"
    consts = dict(constexprs, USE_PDL=pdl)
    consts.update({n: 1 for n in kernel.arg_names if MIXTRAL_INTS.get(n) == 1 and n not in types})
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
    aligned = [n for n in kernel.arg_names if n not in consts and
               (signature[n].startswith("*") or MIXTRAL_INTS.get(n, 1) % 16 == 0)]  # fmt: skip
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(n),): v
                                                                for n, v in consts.items()}, attrs=attrs)  # fmt: skip
    return triton.compile(src, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl))


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(cubin: bytes) -> dict:
    """Registers a thread, and bytes of stack and local memory (spills) from the cubin; {} without cuobjdump."""
    if not CUOBJDUMP.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3))) if m else {}


GLOBAL_ACCESS = re.compile(r"\b(ld\.global|st\.global|cp\.async\.[a-z]+\.shared\.global|atom\.|red\.)")


def pdl_facts(ptx: str) -> dict:
    """Whether the PTX waits and lets the next grid launch, and the global accesses laid out before the
    wait (opcodes, in order). Triton lays a kernel's blocks out in program order, and the wait sits at
    the kernel's top level, so what comes before it in the text runs before it."""
    wait = ptx.find("griddepcontrol.wait")
    before = [m.group(1) for m in GLOBAL_ACCESS.finditer(ptx[: max(wait, 0)])]
    return dict(gdc_wait=wait >= 0, gdc_launch="griddepcontrol.launch_dependents" in ptx, before_wait=before,
                global_loads=ptx.count("ld.global"), prefetch_before_wait=ptx[: max(wait, 0)].count("prefetch.global"))


def gemm_variants():
    tuned = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=16, num_warps=8, num_stages=4)
    for dtype in ("bf16", "fp16", "fp8"):
        w = "fp8e4nv" if dtype == "fp8" else dtype
        act = "bf16" if dtype == "fp8" else dtype
        for name, cfg in (("default-small-M", default_config(1, 8)), ("default-large-M", default_config(64, 8)),
                          ("tuned-like", tuned)):  # fmt: skip
            for gemm, a_type, row_div, routed, c_div in (("gemm1", w, 2, False, 1), ("gemm2", w, 1, True, 1),
                                                         ("gemm2-topk-sum", w, 1, True, 2)):  # fmt: skip
                types = {"a_ptr": f"*{a_type}", "b_ptr": f"*{w}", "c_ptr": f"*{act}", "a_scale_ptr": "*fp32",
                         "b_scale_ptr": "*fp32", "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                         "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32"}  # fmt: skip
                consts = {k: cfg[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")}
                consts.update(A_ROW_DIV=row_div, C_ROW_DIV=c_div, MUL_ROUTED_WEIGHT=routed, USE_FP8=dtype == "fp8", EVEN_K=True,
                              INDEX_64=False, INTERPRETED=False, UPCAST_DOT=False)  # fmt: skip
                yield (f"moe_gemm/{dtype}/{gemm}/{name}", moe_gemm._moe_gemm_kernel, types, consts,
                       cfg["num_warps"], cfg["num_stages"])  # fmt: skip
            types = {"a_ptr": f"*{w}", "b_ptr": f"*{w}", "out_ptr": f"*{act}", "a_scale_ptr": "*fp32",
                     "b_scale_ptr": "*fp32", "amax_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                     "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32"}  # fmt: skip
            consts = {k: cfg[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")}
            consts.update(TOP_K=2, USE_FP8=dtype == "fp8", EVEN_K=True, INDEX_64=False, INTERPRETED=False, UPCAST_DOT=False)
            yield (f"moe_gemm_silu/{dtype}/{name}", moe_gemm_silu._moe_gemm_silu_kernel, types, consts,
                   cfg["num_warps"], cfg["num_stages"])  # fmt: skip


def other_variants():
    for align in (True, False):
        yield (f"route_align/align={align}", routing._route_align_kernel,
               {"logits_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i32", "sorted_ids_ptr": "*i32",
                "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32"},
               dict(TOP_K=2, BLOCK_M=64, E_PAD=8, BLOCK_T=128, BLOCK_S=256, BLOCK_FILL=1024, ALIGN=align), 4, 1)  # fmt: skip
    for tokens, align, quant in ((1, True, True), (16, True, True), (1, False, False)):  # tiled fp8 / bf16, GEMV
        yield (f"route_decode/T={tokens}/align={align}/quant={quant}", route_decode._route_decode_kernel,
               {"x_ptr": "*bf16", "gate_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i32", "sorted_ids_ptr": "*i32",
                "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "xq_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32",
                "zero_ptr": "*bf16", "res_ptr": "*bf16", "norm_w_ptr": "*bf16", "xn_ptr": "*bf16",
                "res_out_ptr": "*bf16"},
               dict(TOP_K=2, BLOCK_M=64, E_PAD=8, BLOCK_T=tokens, BLOCK_K=4096, **routing.align_blocks(8), ALIGN=align,
                    QUANT=quant, ZERO=align, NORM=align, INTERPRETED=False) | ({"T": 1} if tokens == 1 else {}),
               route_decode.decode_warps(8, 4096), 1)  # fmt: skip
    for out, amax in (("bf16", False), ("bf16", True)):
        yield (f"silu_mul/amax={amax}", activation._silu_mul_kernel,
               {"h_ptr": "*bf16", "out_ptr": f"*{out}", "amax_ptr": "*fp32"},
               dict(BLOCK_N=1024, AMAX=amax, INTERPRETED=False), 4, 1)  # fmt: skip
    for silu, block in ((False, 4096), (True, 16384)):
        yield (f"quantize_rows/silu={silu}", activation._quantize_rows_kernel,
               {"in_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
               dict(BLOCK=block, SILU=silu, INTERPRETED=False), activation._row_warps(block), 1)  # fmt: skip
    yield ("quantize_with_amax", activation._quantize_with_amax_kernel,
           {"in_ptr": "*bf16", "out_ptr": "*fp8e4nv", "amax_ptr": "*fp32", "scale_ptr": "*fp32"},
           dict(BLOCK=2048, INTERPRETED=False), 4, 1)  # fmt: skip
    yield ("topk_sum", activation._topk_sum_kernel, {"y_ptr": "*bf16", "out_ptr": "*bf16"},
           dict(TOP_K=2, BLOCK=1024, INTERPRETED=False), 4, 1)  # fmt: skip
    yield ("route_count", routing._route_count_kernel,
           {"logits_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i32", "counts_ptr": "*i32", "pos_ptr": "*i32"},
           dict(TOP_K=2, E_PAD=8, BLOCK_T=32, BLOCK_S=64), 4, 1)  # fmt: skip
    yield ("align_place", routing._align_place_kernel,
           {"ids_ptr": "*i32", "counts_ptr": "*i32", "pos_ptr": "*i32", "sorted_ids_ptr": "*i32",
            "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32"},
           dict(BLOCK_M=64, E_PAD=8, BLOCK=1024), 4, 1)  # fmt: skip
    for w in ("bf16", "fp8e4nv"):
        fp8 = w == "fp8e4nv"
        yield (f"gemv_gate_up/{w}", moe_gemv._gemv_gate_up_kernel,
               {"x_ptr": "*bf16", "w_ptr": f"*{w}", "w_scale_ptr": "*fp32", "ids_ptr": "*i32", "act_ptr": "*fp32"},
               dict(TOP_K=2, BLOCK_N=16, BLOCK_K=256, USE_FP8=fp8), 4, 2)  # fmt: skip
        yield (f"gemv_down/{w}", moe_gemv._gemv_down_kernel,
               {"act_ptr": "*fp32", "w_ptr": f"*{w}", "w_scale_ptr": "*fp32", "ids_ptr": "*i32",
                "topk_weights_ptr": "*fp32", "out_ptr": "*bf16"},
               dict(TOP_K=2, BLOCK_N=16, BLOCK_K=256, USE_FP8=fp8, INTERPRETED=False), 4, 2)  # fmt: skip
    for part in (32, 256):  # batch 1 (auto_partition_tokens), big batches
        tile = min(part, attention.MAX_TILE)
        yield (f"decode_attention/partition={part}", attention._decode_partition_kernel,
               {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32",
                "context_lens_ptr": "*i32", "out_ptr": "*bf16", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
                "count_ptr": "*i32", "scale": "fp32"},
               dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, PARTITION=part, TILE=tile,
                    MERGE_CHUNK=16), 4 if part <= attention.MAX_TILE else attention.LOOP_WARPS, 3)  # fmt: skip
    for dtype in ("bf16", "fp16"):
        yield (f"add_rms_norm/{dtype}", norm._add_rms_norm_kernel,
               {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                "res_out_ptr": f"*{dtype}", "eps": "fp32"},
               dict(HAS_RESIDUAL=True, BLOCK_H=4096, INTERPRETED=False), 8, 1)  # fmt: skip
        yield (f"rope_cache/{dtype}", rope._rope_cache_kernel,
               {"qkv_ptr": f"*{dtype}", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                "slots_ptr": "*i64", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}"},
               dict(NUM_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, Q_PAD=32, KV_PAD=8, HALF_PAD=64, D_PAD=128,
                    WRITE_CACHE=True, INTERPRETED=False), 4, 1)  # fmt: skip
    split = linear_fp8.W8A16Config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4, SPLIT_K=4)
    default = linear_fp8.default_w8a16_config
    small = default(1, 4096)  # the decode row; the two ways to fetch weights before the wait, both off by default
    for name, cfg in (("small-M", small), ("small-M/prefetch", dataclasses.replace(small, PREFETCH=4)),
                      ("small-M/preload", dataclasses.replace(small, PRELOAD=1)),
                      ("router", default(1, 8)), ("mid-M", default(64, 4096)), ("large-M", default(512, 4096)),
                      ("split-K", split)):  # fmt: skip
        yield (f"linear_w8a16/{name}", linear_fp8._w8a16_kernel,
               {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "out_ptr": "*bf16", "part_ptr": "*fp32",
                "count_ptr": "*i32"},
               dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K,
                    PRELOAD=cfg.PRELOAD, PREFETCH=cfg.PREFETCH, UPCAST_DOT=False, INTERPRETED=False),
               cfg.num_warps, cfg.num_stages)  # fmt: skip


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, kernel, types, consts, warps, stages in [*gemm_variants(), *other_variants()]:
        for pdl in (False, True):
            full = name + ("/pdl" if pdl else "")
            if only not in full:
                continue
            try:
                k = compile_for_hopper(kernel, types, consts, warps, stages, pdl)
                ptx = k.asm["ptx"]
                row = dict(name=full, ok=True, shared=k.metadata.shared, wgmma="wgmma" in ptx,
                           cp_async="cp.async" in ptx, stages=stages, warps=warps, launch_pdl=k.metadata.launch_pdl,
                           acq_rel="atom.global.gpu.acq_rel" in ptx, cg_loads=ptx.count("ld.global.cg"),
                           **pdl_facts(ptx), **resources(k.asm["cubin"]))  # fmt: skip
            except Exception as e:  # reported, not raised: the test names every kernel that fails
                row = dict(name=full, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
