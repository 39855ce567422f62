"""The expert GEMM: C[slot] = A[row(slot)] @ W[expert(slot)].T over the expert-sorted slot list.

Both GEMMs of the layer run this kernel with one config (vLLM's structure, so the six knobs in our
tables mean the same to vLLM's kernel):
    GEMM1  h[slot]  = x[slot // top_k] @ W13[e].T              [S, 2N]
    GEMM2  y[slot]  = w_slot * act[slot] @ W2[e].T             [S, K]
      or   out[slot // top_k] += w_slot * act[slot] @ W2[e].T  [T, K]   (C_ROW_DIV = top_k: the top-k sum
           folded in, for decode; out zeroed before, 16-bit atomic adds, see fused_moe.py)
fp8 (w8a8): A is e4m3 with one scale per A row (per token for x, per slot for act), W is e4m3 with one
scale per expert; both are applied once after the K loop.

`tile_coords`, `tile_rows` and `k_loop` are shared with the fused-SiLU GEMM1 (moe_gemm_silu.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.activation import FP8
from moetune.kernels.interp import add_into, downcast, interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous


@triton.jit
def tile_coords(EM, N_COLS, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """(pid_m, pid_n) of this program. GROUP_SIZE_M swizzle: consecutive programs walk down
    GROUP_SIZE_M row-blocks before moving right, so the weight tiles they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N_COLS, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, num_slots, BLOCK_SIZE_M: tl.constexpr, INDEX_64: tl.constexpr):
    """The slots of row-block pid_m, which of them are real (padding holds num_slots), and the block's
    expert (int64: expert x expert stride passes 2**31 at Mixtral sizes). Slots stay int32 unless an
    A or C offset can pass 2**31 (INDEX_64, decided on the host): 64-bit row math costs registers in
    every program, for tensors few layers ever see."""
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M))
    if INDEX_64:
        slots = slots.to(tl.int64)
    return slots, slots < num_slots, tl.load(expert_ids_ptr + pid_m).to(tl.int64)


@triton.jit
def operand_ptrs(a_ptr, b_ptr, a_rows, b_rows, expert, stride_am, stride_ak, stride_be, stride_bn, stride_bk,
                 BLOCK_SIZE_K: tl.constexpr):  # fmt: skip
    """The first K step's A tile [BM, BK] (rows a_rows) and B tile [BK, BN] (expert's weight rows b_rows).
    Offsets are summed before one pointer add: two chained adds cost the pipelined loop extra 64-bit
    pointer arithmetic on its critical path (SASS: IMAD.WIDE + moves per stage)."""
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + expert * stride_be + (offs_k[:, None] * stride_bk + b_rows[None, :] * stride_bn)
    return a_ptrs, b_ptrs


@triton.jit
def k_loop(a_ptrs, b_ptrs, slot_ok, K, stride_ak, stride_bk, BLOCK_SIZE_M: tl.constexpr,
           BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 [BM, BN] = sum over K of A tile @ B tile; rows of A outside slot_ok read as zeros."""
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=slot_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_SIZE_K
            a = tl.load(a_ptrs, mask=slot_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST_DOT:  # bf16 under the CPU interpreter, whose bf16 dot is wrong
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    return acc


@triton.jit(do_not_specialize=["EM", "num_slots"])  # one compile per config, whatever the token count
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, EM, num_slots,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    A_ROW_DIV: tl.constexpr,  # GEMM1 reads token = slot // top_k; GEMM2 reads its own slot row (1)
    C_ROW_DIV: tl.constexpr,  # 1: C[slot] = ...; top_k: C[slot // top_k] += ... (C zeroed before)
    MUL_ROUTED_WEIGHT: tl.constexpr, USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, INDEX_64: tl.constexpr,
    INTERPRETED: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """C[slot, :] = A[slot // A_ROW_DIV, :] @ B[expert].T for one BLOCK_SIZE_M x BLOCK_SIZE_N tile."""
    pid_m, pid_n = tile_coords(EM, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
    wait_previous(USE_PDL)  # the routing (num_padded, slots, experts) and A come from earlier kernels
    # The grid is sized for the worst-case padding; blocks past the real end have nothing to do.
    if pid_m * BLOCK_SIZE_M >= tl.load(num_padded_ptr):
        return
    slots, slot_ok, expert = tile_rows(sorted_ids_ptr, expert_ids_ptr, pid_m, num_slots, BLOCK_SIZE_M, INDEX_64)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_bn = offs_n % N  # wrap instead of masking the weight loads; wrapped columns are never stored
    a_rows = slots // A_ROW_DIV
    a_ptrs, b_ptrs = operand_ptrs(a_ptr, b_ptr, a_rows, offs_bn, expert, stride_am, stride_ak, stride_be, stride_bn,
                                  stride_bk, BLOCK_SIZE_K)  # fmt: skip

    acc = k_loop(a_ptrs, b_ptrs, slot_ok, K, stride_ak, stride_bk,
                 BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, EVEN_K, UPCAST_DOT)  # fmt: skip

    if USE_FP8:  # dequantise once, after the K loop: a per-A-row x per-expert scale
        acc = acc * tl.load(a_scale_ptr + a_rows, mask=slot_ok, other=0.0)[:, None] * tl.load(b_scale_ptr + expert)
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=slot_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + (slots // C_ROW_DIV)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = slot_ok[:, None] & (offs_n[None, :] < N)
    if C_ROW_DIV == 1:
        tl.store(c_ptrs, downcast(acc, c_ptr.dtype.element_ty, INTERPRETED), mask=c_mask)
    else:  # each slot rounded as the stored y would be, then summed: topk_sum's result for top_k = 2
        add_into(c_ptrs, downcast(acc, c_ptr.dtype.element_ty, INTERPRETED), c_mask, INTERPRETED)


def dot_flags(a: Tensor, c: Tensor, block_k: int) -> dict[str, bool]:
    """Constexprs every GEMM launch passes, decided on the host: whether the K loop needs masks,
    whether row offsets into A or C need 64 bits, and the interpreter's workarounds."""
    return dict(EVEN_K=a.shape[1] % block_k == 0,
                INDEX_64=max(a.shape[0] * a.stride(0), c.shape[0] * c.stride(0)) >= 2**31,
                INTERPRETED=interpreting(), UPCAST_DOT=interpreting() and a.dtype == torch.bfloat16)  # fmt: skip


def moe_gemm(
    a: Tensor, w: Tensor, c: Tensor, a_scale: Tensor | None, w_scale: Tensor | None, topk_weights: Tensor,
    sorted_ids: Tensor, expert_ids: Tensor, num_padded: Tensor, a_row_div: int, mul_routed_weight: bool,
    config: Mapping[str, int], c_row_div: int = 1,
) -> None:
    """One expert GEMM into c. a_scale: [rows of a] fp32 when w is fp8. c_row_div > 1 adds each slot's row
    into c[slot // c_row_div] (16-bit c, zeroed by the caller)."""
    E, N, K = w.shape
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    EM = sorted_ids.shape[0]
    use_fp8 = w.dtype == FP8
    _moe_gemm_kernel[(triton.cdiv(EM, bm) * triton.cdiv(N, bn),)](
        a, w, c, a_scale if use_fp8 else a, w_scale if use_fp8 else a, topk_weights,
        sorted_ids, expert_ids, num_padded,
        N, K, EM, topk_weights.numel(),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=config["GROUP_SIZE_M"],
        A_ROW_DIV=a_row_div, C_ROW_DIV=c_row_div, MUL_ROUTED_WEIGHT=mul_routed_weight, USE_FP8=use_fp8,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **dot_flags(a, c, bk),
        **launch_kwargs(a.device),
    )  # fmt: skip
