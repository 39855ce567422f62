"""Decode-sized routing in one launch: the router linear, softmax -> top-k -> renormalise, the block
alignment and (fp8 experts) the per-token e4m3 quantisation of x, all in one program.

    logits [T, E] = x [T, K] @ gate [E, K].T   float32 accumulation, rounded to x.dtype as F.linear's are
    routing                                    route_logits + align_slots (routing.py): route_and_align's
                                               layout and decisions, ties to the lower expert included
    xq [T, K] e4m3, x_scale [T]                quantize_row (activation.py): quantize_rows' outputs
    zero [T, K] = 0                            the layer's output, which GEMM2 adds each token's slots
                                               into (the top-k sum folded away, fused_moe.py)
    optionally first, x <- RMSNorm(x + res)    the decoder layer's add + RMSNorm before the MoE block
                                               (norm.py's rounding), one launch fewer (RouterNorm)

Why: at batch-1 decode the MoE block spent three launches before its first GEMM (the router's cuBLAS
GEMV ~4 µs, route_and_align ~4.8, quantize_rows ~3.3 on an H100), each mostly launch ramp on a few KB.
Here one CTA reads the router weight once (Mixtral: 8 x 4096 bf16 = 64 KB, held in registers across
the tokens) and x once. Predicted: 2 launches fewer per layer with fp8 experts on the tiled path
(1 with 16-bit experts or the GEMV path), ~12 -> ~6-7 µs a layer, ~0.2 ms of a 6.3 ms batch-1 step.

Why at most ONE_LAUNCH_MAX_TOKENS = 16 tokens: one SM does all T x E x K multiply-adds and quantises
the T rows one after the other, ~0.3 µs a token at Mixtral's sizes (32K FMAs, two block reductions):
at 16 tokens that is about the launches saved; beyond it cuBLAS and T quantize_rows programs spread
the work over many SMs. Larger batches take the unfused path (fused_moe_routed decides).
The router weight must fit in registers: E_PAD x K_PAD <= ONE_LAUNCH_MAX_TILE values (8 x 8192 at 16
warps is 128 values a thread; Mixtral 8x7B and 8x22B both fit).
T stays specialised (routing.py says why); its few variants compile at graph capture.
Reference: the unfused path (F.linear, route_and_align, quantize_rows); tests/test_route_decode.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.errors import MoetuneError
from moetune.kernels.activation import fp8_rows, quantize_row
from moetune.kernels.interp import downcast, interpreting
from moetune.kernels.norm import rms_norm_row
from moetune.kernels.pdl import launch_kwargs, wait_previous
from moetune.kernels.routing import align_blocks, align_slots, route_logits, routing_buffers

ONE_LAUNCH_MAX_TOKENS = 16
ONE_LAUNCH_MAX_TILE = 8 * 8192  # router weight values held by the one program


def one_launch(T: int, E: int, K: int) -> bool:
    """Whether route_decode takes T tokens of hidden size K routed over E experts (host-side shapes only)."""
    tile = triton.next_power_of_2(E) * triton.next_power_of_2(K)
    return 1 <= T <= ONE_LAUNCH_MAX_TOKENS and tile <= ONE_LAUNCH_MAX_TILE


@triton.jit
def _route_decode_kernel(
    x_ptr, gate_ptr, weights_ptr, ids_ptr,  # [T, K], [E, K] in; [T, TOP_K] out (fp32, int32)
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,  # routing.py's layout (ALIGN)
    xq_ptr, x_scale_ptr,  # [T, K] e4m3, [T] fp32 out (QUANT)
    zero_ptr,  # [T, K] 16-bit, zeroed (ZERO): the MoE output GEMM2 then adds each token's slots into
    res_ptr, norm_w_ptr, xn_ptr, res_out_ptr, eps,  # NORM: x + res -> res_out; RMSNorm of it * norm_w -> xn
    T, K, E, max_padded, max_blocks, stride_xt, stride_ge, stride_qt, stride_zt,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_FILL: tl.constexpr, ALIGN: tl.constexpr, QUANT: tl.constexpr,
    ZERO: tl.constexpr, NORM: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    experts, cols, tokens = tl.arange(0, E_PAD), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_T)
    dtype = x_ptr.dtype.element_ty
    k_ok = cols < K
    gate = tl.load(gate_ptr + experts[:, None] * stride_ge + cols[None, :],
                   mask=(experts < E)[:, None] & k_ok[None, :], other=0.0)  # [E_PAD, BLOCK_K], read once  # fmt: skip
    if NORM:  # [BLOCK_K], a weight too
        norm_w = tl.load(norm_w_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
    wait_previous(USE_PDL)  # the router weight is a weight (read above, during the previous kernel's tail); x is not
    logits = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)  # rows past T stay 0: finite, never stored
    for t in range(T):
        x = tl.load(x_ptr + t * stride_xt + cols, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        if NORM:  # norm.py's add + RMSNorm, the same rounding; the rows are contiguous (stride K)
            x = downcast(x + tl.load(res_ptr + t * K + cols, mask=k_ok, other=0.0).to(tl.float32), dtype, INTERPRETED)
            tl.store(res_out_ptr + t * K + cols, x, mask=k_ok)
            x = rms_norm_row(x.to(tl.float32), norm_w, K, eps, dtype, INTERPRETED)
            tl.store(xn_ptr + t * K + cols, x, mask=k_ok)
            x = x.to(tl.float32)
        row = tl.sum(gate.to(tl.float32) * x[None, :], axis=1)  # [E_PAD]
        logits = tl.where((tokens == t)[:, None], row[None, :], logits)
        if QUANT:
            q, scale = quantize_row(x, xq_ptr.dtype.element_ty, INTERPRETED)
            tl.store(x_scale_ptr + t, scale)
            tl.store(xq_ptr + t * stride_qt + cols, q, mask=k_ok)
        if ZERO:
            tl.store(zero_ptr + t * stride_zt + cols, tl.zeros([BLOCK_K], dtype=zero_ptr.dtype.element_ty), mask=k_ok)
    # F.linear(x, gate) rounds its float32 sums to x.dtype, and routing reads those: so does this one
    logits = downcast(logits, dtype, INTERPRETED).to(tl.float32)
    counts = route_logits(logits, weights_ptr, ids_ptr, tokens, T, E, TOP_K, E_PAD)
    if ALIGN:  # align_slots' barrier orders its rereading of the ids after the stores above
        align_slots(counts, ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, T * TOP_K, max_padded,
                    max_blocks, BLOCK_M, E_PAD, BLOCK_S, BLOCK_FILL)  # fmt: skip


class RouterNorm(NamedTuple):
    """The add + RMSNorm before the MoE block, done by route_decode: out = RMSNorm(x + residual) * weight
    and residual_out = x + residual (norm.py's add_rms_norm), into the caller's [T, K] buffers. x is then
    the attention output and `out` what gets routed and (fp8) quantised."""

    residual: Tensor
    weight: Tensor
    eps: float
    out: Tensor
    residual_out: Tensor


def route_decode(
    x: Tensor, gate: Tensor, top_k: int, block_m: int, alloc=torch.empty, align: bool = True, quant: bool = False,
    zero: Tensor | None = None, norm: RouterNorm | None = None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor] | None]:
    """x [T, K] and the router weight gate [E, K] (same 16-bit dtype; checked by the caller) ->
    (routing, quantised): routing as route_and_align(F.linear(x, gate), top_k, block_m, align=align)
    returns it; quantised = quantize_rows(x) if quant, else None. zero ([T, K], unit stride along K) is
    filled with zeros in the same launch. With norm, x is first replaced by norm.out (RouterNorm)."""
    T, K = x.shape
    E = gate.shape[0]
    if not one_launch(T, E, K):
        raise MoetuneError(f"route_decode takes 1 to {ONE_LAUNCH_MAX_TOKENS} tokens and a router weight of at most "
                           f"{ONE_LAUNCH_MAX_TILE} values padded; got T={T}, E={E}, K={K}")  # fmt: skip
    x, gate = x.contiguous(), gate.contiguous()  # unit stride along K
    routing = routing_buffers(T, E, top_k, block_m, align, x.device, alloc)
    xq, x_scale = fp8_rows(T, K, x.device, alloc) if quant else (x, routing[0])  # unused without quant
    if zero is not None and (zero.shape != (T, K) or zero.stride(1) != 1):
        raise MoetuneError(f"route_decode's zero buffer must be [T={T}, K={K}] with unit stride along K; "
                           f"got {list(zero.shape)}, strides {zero.stride()}")  # fmt: skip
    if norm is not None:
        _check_norm(norm, x)
    n = norm or RouterNorm(x, x, 0.0, x, x)  # unused without norm
    e_pad, block_k = triton.next_power_of_2(E), triton.next_power_of_2(K)
    _route_decode_kernel[(1,)](
        x, gate, *routing, xq, x_scale, x if zero is None else zero, n.residual, n.weight, n.out, n.residual_out, n.eps,
        T, K, E, routing[2].numel(), routing[3].numel(), x.stride(0), gate.stride(0), xq.stride(0),
        0 if zero is None else zero.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, E_PAD=e_pad, BLOCK_T=triton.next_power_of_2(T), BLOCK_K=block_k,
        **align_blocks(e_pad), ALIGN=align, QUANT=quant, ZERO=zero is not None, NORM=norm is not None,
        INTERPRETED=interpreting(), num_warps=decode_warps(e_pad, block_k), **launch_kwargs(x.device),
    )  # fmt: skip
    return routing if align else routing[:2], (xq, x_scale) if quant else None


def _check_norm(norm: RouterNorm, x: Tensor) -> None:
    rows = (norm.residual, norm.out, norm.residual_out)
    if any(t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous() for t in rows):
        raise MoetuneError(f"route_decode's norm tensors (residual, out, residual_out) must be contiguous "
                           f"{list(x.shape)} {x.dtype} like x")  # fmt: skip
    if norm.weight.shape != (x.shape[1],) or norm.weight.dtype != x.dtype:
        raise MoetuneError(f"route_decode's norm weight must be [{x.shape[1]}] {x.dtype}; "
                           f"got {list(norm.weight.shape)} {norm.weight.dtype}")  # fmt: skip


def decode_warps(e_pad: int, block_k: int) -> int:
    """4 to 16 warps, ~128 router weight values a thread (Mixtral 8x7B: 8 warps)."""
    return min(16, max(4, e_pad * block_k // 4096))
