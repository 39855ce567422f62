"""The fused Mixtral MoE layer: the launcher that strings the kernels together.

    route_and_align   (1 or 3 launches) softmax -> top-k -> renormalise; slots grouped by expert and
                                        padded to BLOCK_SIZE_M (routing.py)
    [fp8] quantize x  (1 launch)  one scale per token, one pass (activation.py)
      or, through fused_moe_routed at decode sizes, one launch for the router linear, routing and
      quantising x                                                                      (route_decode.py)
    GEMM1             (1 launch)  h[slot] = x[token] @ W13[e].T              [S, 2N]   (moe_gemm.py)
    silu_mul          (1-2)       act = silu(h[:, :N]) * h[:, N:]            [S, N]    (activation.py)
      or, with the knob fuse_silu=1, GEMM1 writes act directly                          (moe_gemm_silu.py)
    GEMM2             (1 launch)  y[slot] = w_slot * act[slot] @ W2[e].T     [S, K]    (moe_gemm.py)
    topk_sum          (1 launch)  out[token] = sum_k y[token * top_k + k]    [T, K]    (activation.py)
      or, through route_decode with top_k = 2, none: route_decode zeroes out and GEMM2 adds each slot's
      row into its token's (16-bit atomics, FOLD_TOPK_SUM)
    or, with kernel="gemv", routing (either way) and the decode path of moe_gemv.py.
fused_moe_normed adds the decoder layer's add + RMSNorm in front: inside route_decode at decode sizes.

Why the top-k sum folds only there: two bf16 adds onto a zero, y0 then y1 or y1 then y0, round once to
the same value topk_sum gives (it adds in float32 and rounds once), so the fold is bitwise equal to the
separate sum; with three or more slots the order of the atomics would change the rounding. The zeroing
needs a launch of its own unless one already runs before GEMM2: route_decode, at decode sizes, is it.

S = T * top_k slots. Both GEMMs share one config of vLLM's six knobs, because the sorted slot list is
padded to one BLOCK_SIZE_M: that is what makes our tables loadable by vLLM and SGLang. Nothing here
reads a device value on the host, so the layer can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moetune.errors import MoetuneError
from moetune.kernels.activation import FP8_MAX, quantize_rows, quantize_with_amax, silu_mul, silu_mul_fp8, topk_sum
from moetune.kernels.interp import interpreting
from moetune.kernels.knobs import FUSE_SILU_MIN_BLOCK_N, check_config
from moetune.kernels.moe_gemm import FP8, moe_gemm
from moetune.kernels.moe_gemm_silu import moe_gemm_silu
from moetune.kernels.moe_gemv import fused_moe_gemv
from moetune.kernels.norm import add_rms_norm
from moetune.kernels.route_decode import RouterNorm, one_launch, route_decode
from moetune.kernels.routing import route_and_align
from moetune.tables import default_config

# Tests swap this for an allocator that fills buffers with garbage, to prove nothing unwritten is read.
alloc = torch.empty
# Switches for A/B runs (benchmarks/decode_step.py), both where route_decode routes (decode sizes):
FOLD_TOPK_SUM = True  # GEMM2 sums each token's two slots (docstring)
FOLD_NORM = True  # fused_moe_normed's add + RMSNorm inside route_decode


def quantize_fp8_per_expert(w: Tensor) -> tuple[Tensor, Tensor]:
    """Weights [E, ...] -> (e4m3 weights, scale [E] fp32), one scale per expert (vLLM's w8a8 layout)."""
    amax = w.abs().float().amax(dim=tuple(range(1, w.dim())))
    scale = amax.clamp_min(1e-12) / FP8_MAX
    wq = (w.float() / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return wq, scale


def check_moe_inputs(x: Tensor, router_logits: Tensor | None, w13: Tensor, w2: Tensor, top_k: int,
                     w13_scale: Tensor | None, w2_scale: Tensor | None,
                     gate: Tensor | None = None) -> None:  # fmt: skip
    """Shape and dtype checks on metadata only (no device reads): a wrong call fails with a clear message.
    The router comes as its logits or (gate) its weight."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise MoetuneError(f"expected x [T, K], w13 [E, 2N, K], w2 [E, K, N]; got {list(x.shape)}, "
                           f"{list(w13.shape)}, {list(w2.shape)}")  # fmt: skip
    T, K = x.shape
    E, two_n, K1 = w13.shape
    if K1 != K or w2.shape[0] != E or w2.shape[1] != K or w2.shape[2] * 2 != two_n:
        raise MoetuneError(f"MoE shapes disagree: x {list(x.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    if router_logits is not None and router_logits.shape != (T, E):
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
    if gate is not None and (gate.shape != (E, K) or gate.dtype != x.dtype):
        raise MoetuneError(f"gate (the router weight) must be [E={E}, K={K}] in x's dtype {x.dtype}; "
                           f"got {list(gate.shape)} {gate.dtype}")  # fmt: skip


_checked_configs: dict[tuple, dict[str, Any]] = {}


def _checked(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config, checked once per distinct config (the check would otherwise run on every eager
    layer call). The key holds each value's type: 16.0 == 16 in Python, but 16.0 is no block size."""
    try:
        key = tuple(sorted((k, type(v), v) for k, v in config.items()))
        hash(key)
    except (AttributeError, TypeError):  # not a mapping, or unhashable values: _check says why
        return _check(config)
    if key not in _checked_configs:
        _checked_configs[key] = _check(config)
    return _checked_configs[key]


def _check(config: Mapping[str, Any]) -> dict[str, Any]:
    config = check_config(config, "config passed to fused_moe")
    if config.get("fuse_silu") and config["BLOCK_SIZE_N"] < FUSE_SILU_MIN_BLOCK_N:
        raise MoetuneError(f"fuse_silu=1 needs BLOCK_SIZE_N >= {FUSE_SILU_MIN_BLOCK_N} (half gate, half up columns); "
                           f"got BLOCK_SIZE_N={config['BLOCK_SIZE_N']}")  # fmt: skip
    return config


def fused_moe(
    x: Tensor,  # [T, K] bf16 / fp16
    router_logits: Tensor,  # [T, E]
    w13: Tensor,  # [E, 2N, K]: gate rows then up rows; x.dtype or fp8 e4m3
    w2: Tensor,  # [E, K, N]
    top_k: int,
    config: Mapping[str, Any] | None = None,
    w13_scale: Tensor | None = None,  # [E] fp32, fp8 only
    w2_scale: Tensor | None = None,  # [E] fp32, fp8 only
) -> Tensor:
    """The whole Mixtral MoE layer (vLLM's signature). Returns [T, K] in x.dtype."""
    check_moe_inputs(x, router_logits, w13, w2, top_k, w13_scale, w2_scale)
    return _moe_layer(x, w13, w2, top_k, config, w13_scale, w2_scale, logits=router_logits)


def fused_moe_routed(
    x: Tensor,  # [T, K] bf16 / fp16
    gate: Tensor,  # [E, K] in x.dtype: the router's weight
    w13: Tensor,
    w2: Tensor,
    top_k: int,
    config: Mapping[str, Any] | None = None,
    w13_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
) -> Tensor:
    """fused_moe(x, F.linear(x, gate), ...), same result: up to ONE_LAUNCH_MAX_TOKENS tokens one launch
    computes the logits, routes, aligns and (fp8) quantises x (route_decode.py); more take F.linear."""
    check_moe_inputs(x, None, w13, w2, top_k, w13_scale, w2_scale, gate=gate)
    return _moe_layer(x, w13, w2, top_k, config, w13_scale, w2_scale, gate=gate)


def fused_moe_normed(
    x: Tensor,  # [T, K] bf16 / fp16: the attention output
    residual: Tensor,  # [T, K] the residual stream before the MoE block
    norm_weight: Tensor,  # [K] the post-attention RMSNorm's weight
    eps: float,
    gate: Tensor,
    w13: Tensor,
    w2: Tensor,
    top_k: int,
    config: Mapping[str, Any] | None = None,
    w13_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(fused_moe_routed(RMSNorm(x + residual) * norm_weight, gate, ...), x + residual): the decoder layer's
    add + RMSNorm and MoE block, same results as add_rms_norm then fused_moe_routed. At decode sizes the
    add + RMSNorm runs inside route_decode's launch (RouterNorm), else add_rms_norm runs first."""
    check_moe_inputs(x, None, w13, w2, top_k, w13_scale, w2_scale, gate=gate)
    T, K = x.shape
    if residual.shape != x.shape or residual.dtype != x.dtype or norm_weight.shape != (K,):
        raise MoetuneError(f"residual must be {list(x.shape)} {x.dtype} like x and norm_weight [{K}]; got "
                           f"{list(residual.shape)} {residual.dtype}, {list(norm_weight.shape)}")  # fmt: skip
    if not FOLD_NORM or not one_launch(T, gate.shape[0], K):
        xn, residual = add_rms_norm(x.contiguous(), norm_weight, eps, residual.contiguous())
        return _moe_layer(xn, w13, w2, top_k, config, w13_scale, w2_scale, gate=gate), residual
    norm = RouterNorm(residual.contiguous(), norm_weight, eps, alloc((T, K), dtype=x.dtype, device=x.device),
                      alloc((T, K), dtype=x.dtype, device=x.device))  # fmt: skip
    return _moe_layer(x, w13, w2, top_k, config, w13_scale, w2_scale, gate=gate, norm=norm), norm.residual_out


def _moe_layer(x: Tensor, w13: Tensor, w2: Tensor, top_k: int, config: Mapping[str, Any] | None,
               w13_scale: Tensor | None, w2_scale: Tensor | None, logits: Tensor | None = None,
               gate: Tensor | None = None, norm: RouterNorm | None = None) -> Tensor:  # fmt: skip
    """The entries' layer, inputs checked: routing from the logits or the gate (after the norm, if given,
    which only route_decode takes), then the experts."""
    T, K = x.shape
    if T == 0:
        return x.new_empty((0, K))
    config = _checked(config or default_config(T, w13.shape[0]))
    x = x.contiguous()
    gemv = config.get("kernel") == "gemv"
    quant = w13.dtype == FP8 and not gemv  # GEMV is w8a16: x stays 16-bit
    decode = gate is not None and one_launch(T, gate.shape[0], K)
    fold_sum = decode and FOLD_TOPK_SUM and top_k == 2 and not gemv
    out = alloc((T, K), dtype=x.dtype, device=x.device) if fold_sum else None  # [T, K], zeroed by route_decode
    routing, (a1, a1_scale) = _route(x, logits, gate, top_k, config["BLOCK_SIZE_M"], align=not gemv, quant=quant,
                                     decode=decode, zero=out, norm=norm)  # fmt: skip
    x = norm.out if norm is not None else x  # the rows routed: GEMM1's (16-bit) or the GEMV's input
    if gemv:
        return fused_moe_gemv(x, *routing, w13, w2, top_k, config, w13_scale, w2_scale, alloc, interpreting())
    return _tiled_experts(x, a1, a1_scale, routing, w13, w2, top_k, config, w13_scale, w2_scale, out)


def _route(x: Tensor, logits: Tensor | None, gate: Tensor | None, top_k: int, block_m: int, align: bool,
           quant: bool, decode: bool, zero: Tensor | None,
           norm: RouterNorm | None) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor | None]]:  # fmt: skip
    """(routing as route_and_align returns it, GEMM1's input and its per-token scale): x in e4m3 with
    quant, else (x, None). From the gate at decode sizes in one launch, which also zeroes `zero` and
    first normalises x (norm); else from the logits, computed if only the gate was given."""
    if decode:
        routing, quantised = route_decode(x, gate, top_k, block_m, alloc, align=align, quant=quant, zero=zero,
                                          norm=norm)  # fmt: skip
        return routing, quantised or (norm.out if norm is not None else x, None)
    if logits is None:
        logits = F.linear(x, gate)  # [T, E]
    routing = route_and_align(logits, top_k, block_m, alloc=alloc, align=align)
    return routing, quantize_rows(x, alloc) if quant else (x, None)  # [T, K], [T]


def _tiled_experts(x: Tensor, a1: Tensor, a1_scale: Tensor | None, routing: tuple[Tensor, ...], w13: Tensor,
                   w2: Tensor, top_k: int, config: dict[str, Any], w13_scale: Tensor | None,
                   w2_scale: Tensor | None, out: Tensor | None) -> Tensor:  # fmt: skip
    """GEMM1 -> SiLU x up -> GEMM2 over the aligned slots, then the sum over top_k: into `out` by GEMM2
    itself when given (zeroed), else by topk_sum. Returns [T, K] in x.dtype."""
    topk_weights, _, *aligned = routing  # aligned: sorted_ids, expert_ids, num_padded
    (T, K), N = x.shape, w2.shape[2]
    S, dev, use_fp8 = T * top_k, x.device, w13.dtype == FP8
    if config.get("fuse_silu"):
        act = alloc((S, N), dtype=x.dtype, device=dev)  # [S, N]
        amax = torch.zeros(S, dtype=torch.float32, device=dev) if use_fp8 else None  # atomic_max starts at 0
        moe_gemm_silu(a1, w13, act, a1_scale, w13_scale, amax, *aligned, top_k=top_k, config=config)
        act, act_scale = quantize_with_amax(act, amax, alloc) if use_fp8 else (act, None)
    else:
        h = alloc((S, 2 * N), dtype=x.dtype, device=dev)  # [S, 2N]
        moe_gemm(a1, w13, h, a1_scale, w13_scale, topk_weights, *aligned, a_row_div=top_k,
                 mul_routed_weight=False, config=config)  # fmt: skip
        if use_fp8:
            act, act_scale = silu_mul_fp8(h, alloc)  # [S, N] e4m3, [S]
        else:
            act, act_scale = alloc((S, N), dtype=x.dtype, device=dev), None
            silu_mul(h, act)

    if out is not None:  # out[token] += each of its slots' rows
        moe_gemm(act, w2, out, act_scale, w2_scale, topk_weights, *aligned, a_row_div=1, mul_routed_weight=True,
                 config=config, c_row_div=top_k)  # fmt: skip
        return out
    y = alloc((S, K), dtype=x.dtype, device=dev)  # [S, K], each slot already weighted
    moe_gemm(act, w2, y, act_scale, w2_scale, topk_weights, *aligned, a_row_div=1, mul_routed_weight=True,
             config=config)  # fmt: skip
    return topk_sum(y, top_k, alloc) if top_k > 1 else y
