"""Dense linear layers with fp8 (e4m3) weights and one float32 scale per output channel: y = x W^T.

Why: at batch 1 the dense layers (qkv, o, lm_head) only stream their weights, 2.95 GB a step in bf16 for
Mixtral-8x7B; fp8 halves the bytes. Two paths:

* w8a16 (this Triton kernel, any M): fp8 weight tiles are widened in registers and multiplied with
  the 16-bit activations (tl.dot, float32 accumulation); the per-channel scale is applied once after
  the K loop. No activation quantisation, so it is as accurate as the weights.
* w8a8 (`torch._scaled_mm`, CUDA only, large M): activations quantised per row, fp8 tensor cores.
  Used above W8A8_MIN_M once a first call has agreed with the w8a16 kernel (see Fp8Linear); else w8a16.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.activation import FP8, FP8_MAX
from moetune.kernels.interp import downcast, interpreting

log = logging.getLogger("moetune")
W8A8_MIN_M = 128  # below this the step is weight-bound and w8a16 reads the same bytes with no quant pass


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]: W^T's tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        if UPCAST_DOT:  # the CPU interpreter's 16-bit dot is wrong; fp8 -> fp32 is exact
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:  # fp8 -> bf16/fp16 is exact too: e4m3 fits both
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, downcast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=(rows < M)[:, None] & (cols < N)[None, :])


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] weight -> (e4m3 [N, K], float32 scale [N]) with each row's amax mapped to 448."""
    amax = w.float().abs().amax(dim=1).clamp_min(1e-12)  # [N]
    scale = amax / FP8_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _blocks(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Small M streams weights: narrow N tiles give Mixtral's
    qkv (N=6144) 192 programs and o_proj (N=4096) 128, about one per SM, each reading K in long chunks."""
    if M <= 16:
        return 16, 32, 256, 4
    if M <= 64:
        return 64, 64, 128, 4
    return 64, 128, 64, 8


def linear_w8a16(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] (bf16/fp16/fp32), w [N, K] e4m3, scale [N] float32 -> [M, N] in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and w.dtype == FP8 and x.stride(1) == 1 and w.stride(1) == 1
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = _blocks(M)
    interp = interpreting()
    _w8a16_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, w, scale, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST_DOT=interp or x.dtype == torch.float32,
        INTERPRETED=interp, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def linear_w8a8_scaled_mm(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """CUDA only: per-row dynamic activation scales and fp8 tensor cores (torch._scaled_mm, rowwise)."""
    xs = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [M, 1]
    xq = (x.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=x.dtype)


def linear_fp8_reference(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """float32 x @ dequantised W^T, cast to x's dtype."""
    return (x.float() @ (w.float() * scale[:, None]).t()).to(x.dtype)


_w8a8_ok: bool | None = None  # None: not tried yet in this process


def fp8_linear(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """The runtime's fp8 linear. w8a16 always works; w8a8 (_scaled_mm) takes M >= W8A8_MIN_M on CUDA once
    its first result agrees with w8a16: a torch without rowwise scales, or a wrong layout, then falls
    back with a log line instead of failing a run. The first large-M call is an eager prefill (the
    runner profiles one before capturing graphs), so the check's .item() never runs inside a capture."""
    global _w8a8_ok
    if x.device.type != "cuda" or x.shape[0] < W8A8_MIN_M or _w8a8_ok is False:
        return linear_w8a16(x, w, scale)
    if _w8a8_ok is None:
        ref = linear_w8a16(x, w, scale)
        try:
            out = linear_w8a8_scaled_mm(x, w, scale)
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
            _w8a8_ok = err < 0.1  # activation quantisation adds a few %; a wrong layout gives ~1.4
            log.info("fp8 dense w8a8 (_scaled_mm) %s: rel err %.3g vs w8a16", "on" if _w8a8_ok else "off", err)
        except (RuntimeError, TypeError) as e:
            _w8a8_ok, out = False, ref
            log.info("fp8 dense w8a8 (_scaled_mm) off: %s", str(e).splitlines()[0])
        return out if _w8a8_ok else ref
    return linear_w8a8_scaled_mm(x, w, scale)
