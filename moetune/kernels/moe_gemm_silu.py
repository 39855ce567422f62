"""GEMM1 with SiLU x up in its epilogue (our knob `fuse_silu`): act[slot] = silu(x W1_e.T) * (x W3_e.T).

One program computes the gate and the up values of the same BLOCK_SIZE_N // 2 intermediate columns in
one accumulator: its B tile gathers BLOCK_SIZE_N // 2 gate rows and the matching up rows of W13, so
the main loop, accumulator size and register budget are the unfused GEMM1's with the same config
(two half-width dots measured 26% slower at M=4096 fp8: A was read from shared memory twice). It
then splits the accumulator and writes silu(gate) * up. The [S, 2N]
intermediate never reaches memory: at M=4096 in bf16 that is 470 MB written and read back, and one
launch, saved.

fp8: the activation needs one scale per slot before GEMM2 can take it as e4m3, but a program sees only
its own columns. So it writes bf16 and folds its columns' |act| max into amax[slot] with an atomic
max; `quantize_with_amax` (activation.py) then makes the e4m3 rows. The scale is per slot, as in the
unfused path, so the accuracy is the same.

Reference: moe_reference in reference.py (the whole layer).
"""

from __future__ import annotations

from collections.abc import Mapping

import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import downcast
from moetune.kernels.moe_gemm import FP8, dot_flags, k_loop, operand_ptrs, tile_coords, tile_rows
from moetune.kernels.pdl import launch_kwargs, wait_previous


@triton.jit(do_not_specialize=["EM", "num_slots"])  # as _moe_gemm_kernel: one compile per config
def _moe_gemm_silu_kernel(
    a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, amax_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, EM, num_slots,  # N: intermediate size; W13 holds N gate rows then N up rows
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_om, stride_on,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, TOP_K: tl.constexpr, USE_FP8: tl.constexpr, EVEN_K: tl.constexpr,
    INDEX_64: tl.constexpr, INTERPRETED: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_PDL: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_SIZE_N // 2
    pid_m, pid_n = tile_coords(EM, N, BLOCK_SIZE_M, HALF, GROUP_SIZE_M)
    wait_previous(USE_PDL)  # routing, A and the zeroed amax come from earlier launches
    if pid_m * BLOCK_SIZE_M >= tl.load(num_padded_ptr):
        return
    slots, slot_ok, expert = tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, num_slots, BLOCK_SIZE_M, INDEX_64)

    # One B tile whose left half is gate rows and right half the up rows of the same columns: the
    # main loop is then exactly the unfused GEMM1's (one wgmma of the full BLOCK_SIZE_N per K step).
    cols = tl.arange(0, BLOCK_SIZE_N)
    offs_n = pid_n * HALF + tl.arange(0, HALF)  # intermediate columns this program writes
    w_rows = (pid_n * HALF + cols % HALF) % N + (cols // HALF) * N  # wrapped columns are never stored
    tokens = slots // TOP_K
    a_ptrs, b_ptrs = operand_ptrs(a_ptr, b_ptr, tokens, w_rows, expert, stride_am, stride_ak, stride_be, stride_bn,
                                  stride_bk, BLOCK_SIZE_K)  # fmt: skip

    acc = k_loop(a_ptrs, b_ptrs, slot_ok, K, stride_ak, stride_bk,
                 BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, EVEN_K, UPCAST_DOT)  # fmt: skip

    if USE_FP8:
        acc = acc * tl.load(a_scale_ptr + tokens, mask=slot_ok, other=0.0)[:, None] * tl.load(b_scale_ptr + expert)
    # [BM, BN] -> [BM, 2, HALF] -> [BM, HALF, 2] -> gate, up [BM, HALF]
    gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_SIZE_M, 2, HALF)), (0, 2, 1)))
    act = downcast(gate * tl.sigmoid(gate) * up, out_ptr.dtype.element_ty, INTERPRETED)  # [BM, HALF]
    store_ok = slot_ok[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptr + slots[:, None] * stride_om + offs_n[None, :] * stride_on, act, mask=store_ok)
    if USE_FP8:  # of the values as stored, so the later quantisation never exceeds the e4m3 range
        row_max = tl.max(tl.where(store_ok, tl.abs(act.to(tl.float32)), 0.0), axis=1)
        tl.atomic_max(amax_ptr + slots, row_max, mask=slot_ok)


def moe_gemm_silu(
    a: Tensor, w13: Tensor, out: Tensor, a_scale: Tensor | None, w13_scale: Tensor | None, amax: Tensor | None,
    sorted_ids: Tensor, expert_ids: Tensor, num_padded: Tensor, top_k: int, config: Mapping[str, int],
) -> None:
    """out [S, N] = silu(gate) * up. fp8: a_scale [T] per token, amax [S] zeroed beforehand."""
    E, two_n, K = w13.shape
    N = two_n // 2
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    EM = sorted_ids.shape[0]
    use_fp8 = w13.dtype == FP8
    _moe_gemm_silu_kernel[(triton.cdiv(EM, bm) * triton.cdiv(N, bn // 2),)](
        a, w13, out, a_scale if use_fp8 else a, w13_scale if use_fp8 else a, amax if use_fp8 else a,
        sorted_ids, expert_ids, num_padded,
        N, K, EM, out.shape[0],
        a.stride(0), a.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), out.stride(0), out.stride(1),
        BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=config["GROUP_SIZE_M"],
        TOP_K=top_k, USE_FP8=use_fp8,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **dot_flags(a, out, bk),
        **launch_kwargs(a.device),
    )  # fmt: skip
