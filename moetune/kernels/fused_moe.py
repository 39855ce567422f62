"""The fused Mixtral MoE layer in Triton, with vLLM's six launch knobs.

    route_and_align  (1 launch)  softmax -> top-k -> renormalise; slots grouped by expert, padded to BLOCK_SIZE_M
    [fp8] quantise x (2 launches) per-tensor dynamic scale, amax / 448
    GEMM1            (1 launch)  h[slot] = x[token] @ W13[e].T              [S, 2N]
    silu_mul         (1 launch)  act = silu(h[:, :N]) * h[:, N:]            [S, N]  (fp8: per-row scale)
    GEMM2            (1 launch)  y[slot] = w_slot * act[slot] @ W2[e].T     [S, K]
    sum over top-k   (1 launch)  out[token] = sum_k y[token * top_k + k]    [T, K]

S = T * top_k slots. Both GEMMs run the same kernel and share one config, because the sorted slot
list is padded to one BLOCK_SIZE_M: that is what makes our tables loadable by vLLM and SGLang.
Nothing here reads a device value on the host, so the layer can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.errors import MoetuneError
from moetune.kernels.interp import downcast, interpreting
from moetune.kernels.moe_gemv import fused_moe_gemv
from moetune.kernels.routing import route_and_align
from moetune.tables import default_config

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn

# Tests swap this for an allocator that fills buffers with garbage, to prove nothing unwritten is read.
alloc = torch.empty



@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, EM, num_slots,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_as,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    A_ROW_DIV: tl.constexpr,  # GEMM1 reads token = slot // top_k; GEMM2 reads its own slot row (1)
    MUL_ROUTED_WEIGHT: tl.constexpr, USE_FP8: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """C[slot, :] = A[slot // A_ROW_DIV, :] @ B[expert].T for one BLOCK_SIZE_M x BLOCK_SIZE_N tile."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    # GROUP_SIZE_M swizzle: consecutive programs walk down GROUP_SIZE_M row-blocks before moving
    # right, so the weight tiles they share stay in L2.
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # The grid is sized for the worst-case padding; blocks past the real end have nothing to do.
    if pid_m * BLOCK_SIZE_M >= tl.load(num_padded_ptr):
        return
    offs_sorted = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    slots = tl.load(sorted_ids_ptr + offs_sorted).to(tl.int64)
    slot_ok = slots < num_slots  # padding entries hold num_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_bn = offs_n % N  # wrap instead of masking the weight loads; wrapped columns are never stored
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_rows = slots // A_ROW_DIV
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

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

    if USE_FP8:  # dequantise once, after the K loop: a per-row (or per-tensor, stride 0) x per-expert scale
        a_scale = tl.load(a_scale_ptr + a_rows * stride_as, mask=slot_ok, other=0.0)
        acc = acc * a_scale[:, None] * tl.load(b_scale_ptr + expert)
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=slot_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, downcast(acc, c_ptr.dtype.element_ty, INTERPRETED), mask=slot_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _silu_mul_kernel(
    h_ptr, out_ptr, scale_ptr, N, stride_h, stride_out,
    BLOCK_N: tl.constexpr, QUANT_FP8: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """act = silu(gate) * up for one slot row; with QUANT_FP8 also quantise the row with its own scale.

    A per-row scale needs no grid-wide reduction (a per-tensor one would need another launch) and is
    more accurate; GEMM2 applies it in its epilogue.
    """
    row = tl.program_id(0).to(tl.int64)
    h_row = h_ptr + row * stride_h
    amax = tl.zeros([BLOCK_N], dtype=tl.float32)
    if QUANT_FP8:
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            gate = tl.load(h_row + offs, mask=offs < N, other=0.0).to(tl.float32)
            up = tl.load(h_row + N + offs, mask=offs < N, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(gate * tl.sigmoid(gate) * up))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
        tl.store(scale_ptr + row, scale)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        gate = tl.load(h_row + offs, mask=offs < N, other=0.0).to(tl.float32)
        up = tl.load(h_row + N + offs, mask=offs < N, other=0.0).to(tl.float32)
        act = gate * tl.sigmoid(gate) * up
        if QUANT_FP8:
            act = tl.clamp(act / scale, -448.0, 448.0)
        act = downcast(act, out_ptr.dtype.element_ty, INTERPRETED)
        tl.store(out_ptr + row * stride_out + offs, act, mask=offs < N)


@triton.jit
def _absmax_kernel(x_ptr, amax_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0))


@triton.jit
def _quant_fp8_kernel(x_ptr, out_ptr, amax_ptr, scale_ptr, numel, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.maximum(tl.load(amax_ptr), 1e-12) / 448.0
    if pid == 0:
        tl.store(scale_ptr, scale)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    q = downcast(tl.clamp(x / scale, -448.0, 448.0), out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + offs, q, mask=offs < numel)


def quantize_fp8_per_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-tensor e4m3 quantisation on the device: (x_fp8, scale[1]) with x ~ x_fp8 * scale."""
    block = 1024
    grid = (triton.cdiv(x.numel(), block),)
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)  # atomic_max needs a zero start
    _absmax_kernel[grid](x, amax, x.numel(), BLOCK=block)
    out, scale = alloc(x.shape, dtype=FP8, device=x.device), alloc((1,), dtype=torch.float32, device=x.device)
    _quant_fp8_kernel[grid](x, out, amax, scale, x.numel(), BLOCK=block, INTERPRETED=interpreting())
    return out, scale


def quantize_fp8_per_expert(w: Tensor) -> tuple[Tensor, Tensor]:
    """Weights [E, ...] -> (e4m3 weights, scale [E] fp32), one scale per expert (vLLM's w8a8 layout)."""
    amax = w.abs().float().amax(dim=tuple(range(1, w.dim())))
    scale = amax.clamp_min(1e-12) / FP8_MAX
    wq = (w.float() / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return wq, scale


def _moe_gemm(
    a: Tensor, w: Tensor, c: Tensor, a_scale: Tensor | None, w_scale: Tensor | None, topk_weights: Tensor,
    sorted_ids: Tensor, expert_ids: Tensor, num_padded: Tensor, a_row_div: int, mul_routed_weight: bool,
    config: Mapping[str, int],
) -> None:
    E, N, K = w.shape
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    EM = sorted_ids.shape[0]
    grid = (triton.cdiv(EM, bm) * triton.cdiv(N, bn),)
    use_fp8 = w.dtype == FP8
    _moe_gemm_kernel[grid](
        a, w, c, a_scale if use_fp8 else a, w_scale if use_fp8 else a, topk_weights,
        sorted_ids, expert_ids, num_padded,
        N, K, EM, topk_weights.numel(),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        a_scale.stride(0) if use_fp8 and a_scale.numel() > 1 else 0,  # per-row scale, or per-tensor
        BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=config["GROUP_SIZE_M"],
        A_ROW_DIV=a_row_div, MUL_ROUTED_WEIGHT=mul_routed_weight, USE_FP8=use_fp8,
        EVEN_K=K % bk == 0, INTERPRETED=interpreting(), UPCAST_DOT=interpreting() and a.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


def check_moe_inputs(x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int,
                     w13_scale: Tensor | None, w2_scale: Tensor | None) -> None:  # fmt: skip
    """Shape and dtype checks on metadata only (no device reads): a wrong call fails with a clear message."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise MoetuneError(f"expected x [T, K], w13 [E, 2N, K], w2 [E, K, N]; got {list(x.shape)}, "
                           f"{list(w13.shape)}, {list(w2.shape)}")  # fmt: skip
    T, K = x.shape
    E, two_n, K1 = w13.shape
    if K1 != K or w2.shape[0] != E or w2.shape[1] != K or w2.shape[2] * 2 != two_n:
        raise MoetuneError(f"MoE shapes disagree: x {list(x.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    if router_logits.shape != (T, E):
        raise MoetuneError(f"router_logits must be [T={T}, E={E}], got {list(router_logits.shape)}")
    if not 1 <= top_k <= E:
        raise MoetuneError(f"top_k={top_k} must be between 1 and the number of experts ({E})")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise MoetuneError(f"x must be bf16 or fp16, got {x.dtype}")
    has_scales = w13_scale is not None and w2_scale is not None
    if (w13.dtype == FP8) != (w2.dtype == FP8) or (w13.dtype == FP8) != has_scales:
        raise MoetuneError("fp8 needs both weights in float8_e4m3fn and both per-expert scales")
    if w13.dtype != FP8 and w13.dtype != x.dtype:
        raise MoetuneError(f"weights are {w13.dtype} but x is {x.dtype}; they must match (or weights fp8)")


def fused_moe(
    x: Tensor,  # [T, K] bf16 / fp16
    router_logits: Tensor,  # [T, E]
    w13: Tensor,  # [E, 2N, K]: gate rows then up rows; x.dtype or fp8 e4m3
    w2: Tensor,  # [E, K, N]
    top_k: int,
    config: Mapping[str, int] | None = None,
    w13_scale: Tensor | None = None,  # [E] fp32, fp8 only
    w2_scale: Tensor | None = None,  # [E] fp32, fp8 only
) -> Tensor:
    """The whole Mixtral MoE layer. Returns [T, K] in x.dtype."""
    check_moe_inputs(x, router_logits, w13, w2, top_k, w13_scale, w2_scale)
    T, K = x.shape
    E, N = w2.shape[0], w2.shape[2]
    if T == 0:
        return x.new_empty((0, K))
    config = config or default_config(T, E)
    x = x.contiguous()
    if config.get("kernel") == "gemv":  # an extra knob of ours, kept in the sidecar (moe_gemv.py)
        return fused_moe_gemv(x, router_logits, w13, w2, top_k, config, w13_scale, w2_scale, alloc, interpreting())
    topk_weights, _, sorted_ids, expert_ids, num_padded = route_and_align(
        router_logits, top_k, config["BLOCK_SIZE_M"], alloc=alloc
    )
    S, dev = T * top_k, x.device
    routing = (topk_weights, sorted_ids, expert_ids, num_padded)
    use_fp8 = w13.dtype == FP8

    a1, a1_scale = quantize_fp8_per_tensor(x) if use_fp8 else (x, None)
    h = alloc((S, 2 * N), dtype=x.dtype, device=dev)  # [S, 2N]
    _moe_gemm(a1, w13, h, a1_scale, w13_scale, *routing, a_row_div=top_k, mul_routed_weight=False, config=config)

    act = alloc((S, N), dtype=FP8 if use_fp8 else x.dtype, device=dev)  # [S, N]
    act_scale = alloc((S,), dtype=torch.float32, device=dev) if use_fp8 else None
    _silu_mul_kernel[(S,)](
        h, act, act_scale if use_fp8 else h, N, h.stride(0), act.stride(0),
        BLOCK_N=min(1024, triton.next_power_of_2(N)), QUANT_FP8=use_fp8, INTERPRETED=interpreting(),
    )  # fmt: skip

    y = alloc((S, K), dtype=x.dtype, device=dev)  # [S, K], each slot already weighted
    _moe_gemm(act, w2, y, act_scale, w2_scale, *routing, a_row_div=1, mul_routed_weight=True, config=config)
    return y.view(T, top_k, K).sum(dim=1) if top_k > 1 else y
