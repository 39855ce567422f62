"""Residual add + RMSNorm in one launch (HF Mixtral's numerics).

Eager torch spends about nine launches on `x + residual` and a float32 RMSNorm (add, casts, pow, mean,
add eps, rsqrt, two muls); in a batch-1 decode step each is a 1-2 µs launch on a few KB. One program
per row here reads x and residual once, writes the new residual and the normalised row once.

Rounding follows HF exactly: the residual sum is rounded to the activation dtype (HF adds in it), the
norm runs in float32 on that rounded sum, is rounded to the activation dtype, then multiplied by the
weight in that dtype (a product of two 16-bit floats is exact in float32, so one final rounding gives
torch's result).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import downcast, interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous


@triton.jit
def rms_norm_row(x, w, H, eps, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """One row: x [BLOCK] fp32 (0 in masked lanes), w [BLOCK] fp32 the weight -> RMSNorm(x) * w in dtype,
    rounded as HF rounds. Shared with route_decode.py, which normalises the rows it routes."""
    var = tl.sum(x * x, axis=0) / H
    y = downcast(x * (1.0 / tl.sqrt(var + eps)), dtype, INTERPRETED).to(tl.float32)
    return downcast(w * y, dtype, INTERPRETED)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, H, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: no kernel writes it
    wait_previous(USE_PDL)  # x and the residual come from the kernels before
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [H]
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = downcast(x, dtype, INTERPRETED)  # the new residual stream, in the activation dtype
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, rms_norm_row(x, w, H, eps, dtype, INTERPRETED), mask=mask)


def add_rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); without residual, (RMSNorm(x) * weight, x).
    x, residual [T, H] with unit stride along H; the outputs are new tensors. weight [H] is read before the
    PDL wait (pdl.py), so the kernel just before must not write it: a model parameter, never an activation."""
    T, H = x.shape
    assert x.stride(1) == 1 and weight.shape == (H,) and (residual is None or residual.stride(1) == 1)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(H)
    _add_rms_norm_kernel[(T,)](
        x, residual if residual is not None else x, weight, out, res_out, H, eps,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_H=block, INTERPRETED=interpreting(),
        num_warps=min(16, max(1, block // 512)), **launch_kwargs(x.device),
    )  # fmt: skip
    return out, res_out


def add_rms_norm_reference(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The same in eager torch, as HF's MixtralRMSNorm plus the decoder layer's residual add."""
    if residual is not None:
        x = x + residual
    var = x.float().pow(2).mean(-1, keepdim=True)  # [T, 1]
    return weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype), x
