"""The elementwise passes between and after the GEMMs, each one read of its input.

    quantize_rows        x [T, K] -> e4m3 + one scale per token     one program per row, one pass
                         (with silu: h [S, 2N] -> e4m3 act + one scale per slot, for large S)
    silu_mul             h [S, 2N] -> act [S, N]                     2-D grid: fills the GPU at any S;
                         (fp8: bf16 act and a per-slot |act| max via atomics, then quantize_with_amax)
    quantize_with_amax   bf16 [S, N] + amax [S] -> e4m3 + scale [S]   2-D grid
    topk_sum             y [T * top_k, K] -> out [T, K]              the sum over each token's experts

Why two fp8 SiLU paths: a per-slot scale needs the whole row's max before any value is quantised. With
many slots, one program per row holds the row in registers and makes one pass. With a few dozen slots
that is one busy SM per slot, so the 2-D grid and a second small pass win. With very few (batch-1
decode: 2 slots) the 2-D path's three launches (zeroing amax, SiLU, quantise) cost more than two busy
SMs: the one pass again, up to ROW_PASS_MAX_FEW_ROWS.
Reference: torch expressions in tests/test_activation.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import downcast, interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3
ROW_PASS_MIN_ROWS = 256  # from this many rows on, quantize_rows' one pass fills the GPU
ROW_PASS_MAX_FEW_ROWS = 4  # up to this many rows, one launch beats three (benchmarks/NOTES.md)


@triton.jit
def quantize_row(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """One row's fp32 values [BLOCK] (0 in masked lanes) -> (e4m3 values, scale) with v ~ q * scale,
    scale = max|v| / 448: the row's largest value lands on e4m3's largest."""
    scale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / 448.0
    return downcast(tl.clamp(v / scale, -448.0, 448.0), dtype, INTERPRETED), scale


@triton.jit
def _quantize_rows_kernel(
    in_ptr, out_ptr, scale_ptr, n_cols, stride_in, stride_out,
    BLOCK: tl.constexpr, SILU: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One row: v = in[row] (or silu(in[row, :n]) * in[row, n:2n] with SILU); out = v / s, s = max|v| / 448."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    wait_previous(USE_PDL)
    v = tl.load(in_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        up = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        v = v * tl.sigmoid(v) * up
    q, scale = quantize_row(v, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_out + cols, q, mask=ok)


@triton.jit
def _silu_mul_kernel(
    h_ptr, out_ptr, amax_ptr, N, stride_h, stride_out,
    BLOCK_N: tl.constexpr, AMAX: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    wait_previous(USE_PDL)  # h, and amax zeroed by the memset before (its atomics come after this)
    gate = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + N + cols, mask=ok, other=0.0).to(tl.float32)
    act = downcast(gate * tl.sigmoid(gate) * up, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + row * stride_out + cols, act, mask=ok)
    if AMAX:  # of the values as stored, so quantize_with_amax never leaves the e4m3 range
        tl.atomic_max(amax_ptr + row, tl.max(tl.where(ok, tl.abs(act.to(tl.float32)), 0.0), axis=0))


@triton.jit
def _quantize_with_amax_kernel(
    in_ptr, out_ptr, amax_ptr, scale_ptr, n_cols, stride_in, stride_out,
    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    wait_previous(USE_PDL)  # amax is final only once every atomic of the kernel before has landed
    scale = tl.maximum(tl.load(amax_ptr + row), 1e-12) / 448.0
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + row, scale)
    v = tl.load(in_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    q = downcast(tl.clamp(v / scale, -448.0, 448.0), out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + row * stride_out + cols, q, mask=ok)


@triton.jit
def _topk_sum_kernel(y_ptr, out_ptr, K, stride_y, stride_out, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                     INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < K
    wait_previous(USE_PDL)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # a fixed order: the result does not depend on scheduling
        acc += tl.load(y_ptr + (token * TOP_K + j) * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, downcast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=ok)


def _row_warps(block: int) -> int:
    return min(16, max(4, block // 1024))  # about 32 values of a row per thread


def fp8_rows(rows: int, cols: int, device: torch.device, alloc=torch.empty) -> tuple[Tensor, Tensor]:
    """The buffers of quantised rows: e4m3 values [rows, cols] and one fp32 scale per row [rows]."""
    return alloc((rows, cols), dtype=FP8, device=device), alloc((rows,), dtype=torch.float32, device=device)


def quantize_rows(x: Tensor, alloc=torch.empty, silu: bool = False) -> tuple[Tensor, Tensor]:
    """Rows of x -> (e4m3 rows, scale [rows] fp32) with row ~ q * scale. With silu, x is h [S, 2N]
    and the rows quantised are silu(gate) * up [S, N]."""
    rows, cols = x.shape[0], x.shape[1] // 2 if silu else x.shape[1]
    out, scale = fp8_rows(rows, cols, x.device, alloc)
    block = triton.next_power_of_2(cols)
    if rows:
        _quantize_rows_kernel[(rows,)](
            x, out, scale, cols, x.stride(0), out.stride(0),
            BLOCK=block, SILU=silu, INTERPRETED=interpreting(), num_warps=_row_warps(block), **launch_kwargs(x.device),
        )  # fmt: skip
    return out, scale


def silu_mul(h: Tensor, out: Tensor, amax: Tensor | None = None) -> None:
    """out [S, N] = silu(h[:, :N]) * h[:, N:]; with amax ([S] fp32, zeroed), also its per-row |max|."""
    S, N = out.shape
    block = min(1024, triton.next_power_of_2(N))
    _silu_mul_kernel[(S, triton.cdiv(N, block))](
        h, out, out if amax is None else amax, N, h.stride(0), out.stride(0),
        BLOCK_N=block, AMAX=amax is not None, INTERPRETED=interpreting(), **launch_kwargs(h.device),
    )  # fmt: skip


def quantize_with_amax(v: Tensor, amax: Tensor, alloc=torch.empty) -> tuple[Tensor, Tensor]:
    """bf16 rows whose |max| is already in amax [rows] -> (e4m3 rows, scale [rows])."""
    rows, cols = v.shape
    out, scale = fp8_rows(rows, cols, v.device, alloc)
    block = min(2048, triton.next_power_of_2(cols))
    _quantize_with_amax_kernel[(rows, triton.cdiv(cols, block))](
        v, out, amax, scale, cols, v.stride(0), out.stride(0), BLOCK=block, INTERPRETED=interpreting(),
        **launch_kwargs(v.device),
    )  # fmt: skip
    return out, scale


def silu_mul_fp8(h: Tensor, alloc=torch.empty) -> tuple[Tensor, Tensor]:
    """h [S, 2N] -> e4m3 act [S, N] and its per-slot scale [S], by whichever path fills the GPU."""
    S, N = h.shape[0], h.shape[1] // 2
    if S >= ROW_PASS_MIN_ROWS or S <= ROW_PASS_MAX_FEW_ROWS:
        return quantize_rows(h, alloc, silu=True)
    act = alloc((S, N), dtype=h.dtype, device=h.device)
    amax = torch.zeros(S, dtype=torch.float32, device=h.device)  # atomic_max needs a zero start
    silu_mul(h, act, amax)
    return quantize_with_amax(act, amax, alloc)


def topk_sum(y: Tensor, top_k: int, alloc=torch.empty) -> Tensor:
    """y [T * top_k, K] (each slot already weighted) -> [T, K]."""
    S, K = y.shape
    out = alloc((S // top_k, K), dtype=y.dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(K))
    _topk_sum_kernel[(S // top_k, triton.cdiv(K, block))](
        y, out, K, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block, INTERPRETED=interpreting(),
        **launch_kwargs(y.device),
    )  # fmt: skip
    return out
