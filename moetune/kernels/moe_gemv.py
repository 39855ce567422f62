"""Decode-sized MoE (a few tokens): two GEMV kernels instead of the tiled path's block alignment.

    route            (1 launch)  softmax -> top-k -> renormalise, by the caller (fused_moe: routing.py, or
                                 from the router weight route_decode.py, which also does the router linear)
    gate/up + SiLU   (1 launch)  act[slot] = silu(W1_e x) * (W3_e x)                 [S, N] fp32
    down + top-k sum (1 launch)  out[t] = sum_k w_k * W2_e(k) act[t * top_k + k]     [T, K]

Why: at M=1 the layer only streams the weights of top_k experts, so its floor is bandwidth, and
the tiled path spends 5-8 launches and pads each slot to a BLOCK_SIZE_M tile. Here each weight row
is read once, contiguously along its reduction axis; fp8 weights are dequantised in registers, so
activations are never quantised (w8a16 numerics: more accurate than w8a8). Selected per M by the
sidecar knob {"kernel": "gemv"}; vLLM's table entry for that M stays a tiled config vLLM can use.
The knobs reused: BLOCK_SIZE_N = weight rows per program, BLOCK_SIZE_K = reduction chunk,
num_warps, num_stages.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import downcast
from moetune.kernels.pdl import launch_kwargs, wait_previous


@triton.jit
def _gemv_gate_up_kernel(
    x_ptr, w_ptr, w_scale_ptr, ids_ptr, act_ptr, N, K,
    stride_xt, stride_we, stride_wn, stride_as,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (slot // TOP_K) * stride_xt + offs_k
    wait_previous(USE_PDL)  # the expert ids (routing) and x come from earlier kernels
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    gate_ptrs = w_ptr + expert * stride_we + rows[:, None] * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + N * stride_wn
    # Accumulate [BLOCK_N, BLOCK_K] partial products; reduce across K once at the end.
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w_ok = (rows < N)[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc_gate += tl.load(gate_ptrs, mask=w_ok, other=0.0).to(tl.float32) * x
        acc_up += tl.load(up_ptrs, mask=w_ok, other=0.0).to(tl.float32) * x
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    gate, up = tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1)
    if USE_FP8:
        scale = tl.load(w_scale_ptr + expert)
        gate, up = gate * scale, up * scale
    tl.store(act_ptr + slot * stride_as + rows, gate * tl.sigmoid(gate) * up, mask=rows < N)


@triton.jit
def _gemv_down_kernel(
    act_ptr, w_ptr, w_scale_ptr, ids_ptr, topk_weights_ptr, out_ptr, N, K,
    stride_as, stride_we, stride_wk, stride_ot,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_FP8: tl.constexpr,
    INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns of this token
    offs = tl.arange(0, BLOCK_K)
    wait_previous(USE_PDL)  # routing and act come from earlier kernels
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # both experts of a token in one program: no atomics, no sum kernel
        slot = token * TOP_K + j
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        weight = tl.load(topk_weights_ptr + slot)
        if USE_FP8:
            weight = weight * tl.load(w_scale_ptr + expert)
        a_ptrs = act_ptr + slot * stride_as + offs
        w_ptrs = w_ptr + expert * stride_we + rows[:, None] * stride_wk + offs[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            n_ok = offs < N - n0
            a = tl.load(a_ptrs, mask=n_ok, other=0.0)
            acc += tl.load(w_ptrs, mask=(rows < K)[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * a[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out += weight * tl.sum(acc, axis=1)
    tl.store(out_ptr + token * stride_ot + rows, downcast(out, out_ptr.dtype.element_ty, INTERPRETED), mask=rows < K)


def fused_moe_gemv(
    x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor, top_k: int, config: Mapping[str, int],
    w13_scale: Tensor | None, w2_scale: Tensor | None, alloc=torch.empty, interpreted: bool = False,
) -> Tensor:
    """fused_moe's layer from its routing (topk_weights [T, k] fp32, topk_ids [T, k] int32, routed by
    fused_moe, which also checked the inputs). Returns [T, K] in x.dtype."""
    T, K = x.shape
    N = w2.shape[2]
    use_fp8 = w13.dtype == torch.float8_e4m3fn
    bn, bk, warps, stages = config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"], config["num_warps"], config["num_stages"]
    act = alloc((T * top_k, N), dtype=torch.float32, device=x.device)  # [S, N]
    _gemv_gate_up_kernel[(T * top_k, triton.cdiv(N, bn))](
        x, w13, w13_scale if use_fp8 else w13, topk_ids, act, N, K,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, USE_FP8=use_fp8, num_warps=warps, num_stages=stages,
        **launch_kwargs(x.device),
    )  # fmt: skip
    out = alloc((T, K), dtype=x.dtype, device=x.device)
    _gemv_down_kernel[(T, triton.cdiv(K, bn))](
        act, w2, w2_scale if use_fp8 else w2, topk_ids, topk_weights, out, N, K,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, USE_FP8=use_fp8, INTERPRETED=interpreted,
        num_warps=warps, num_stages=stages, **launch_kwargs(x.device),
    )  # fmt: skip
    return out
