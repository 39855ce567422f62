"""Dense linear layers with fp8 (e4m3) weights and one float32 scale per output channel: y = x W^T.

Why: at batch 1 the dense layers (qkv, o, lm_head) only stream their weights, 2.95 GB a step in bf16 for
Mixtral-8x7B; fp8 halves the bytes. Two paths:

* w8a16 (this Triton kernel, any M): fp8 weight tiles are widened in registers and multiplied with
  the 16-bit activations (tl.dot, float32 accumulation); the per-channel scale is applied once after
  the K loop. No activation quantisation, so it is as accurate as the weights. Launch knobs: a
  W8A16Config (blocks, warps, stages, SPLIT_K: K split over programs, reduced in the same launch by
  splitk.py); DEFAULT_CONFIGS by M and N, swept by benchmarks/linear_fp8_sweep.py.
* w8a8 (`torch._scaled_mm`, CUDA only, large M): activations quantised per row, fp8 tensor cores.
  Used above W8A8_MIN_M once a first call has agreed with the w8a16 kernel (see Fp8Linear); else w8a16.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.errors import MoetuneError
from moetune.kernels.activation import FP8, FP8_MAX
from moetune.kernels.interp import downcast, interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous
from moetune.kernels.splitk import arrive, k_slice, sum_partials, tile_counters

log = logging.getLogger("moetune")
W8A8_MIN_M = 128  # below this the step is weight-bound and w8a16 reads the same bytes with no quant pass


@triton.jit
def _prefetch_l2(ptrs, ok):
    """Start moving the cache line (128 B) holding each address where ok into L2: a hint, no registers held,
    no data returned, nothing to wait for. Before the PDL wait it is harmless even for memory a kernel
    still writes (L2 is where those writes land), though here it only ever takes weights."""
    return tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; "
                                     "mov.u32 $0, 0; }", "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _k_step(acc, x, w, UPCAST_DOT: tl.constexpr):
    """acc + x @ w for one K step: x [BM, BK] 16/32-bit, w [BK, BN] e4m3."""
    if UPCAST_DOT:  # the CPU interpreter's 16-bit dot is wrong; fp8 -> fp32 is exact. "ieee": a GPU would
        # otherwise round float32 activations to tf32 (10-bit mantissa): ~1e-3 error in an fp32 linear
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:  # fp8 -> bf16/fp16 is exact too: e4m3 fits both
        acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size: M only masks rows
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, part_ptr, count_ptr, M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRELOAD: tl.constexpr, PREFETCH: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if SPLIT_K == 1:
        k_lo, k_hi = 0, K
    else:  # this program's K-slice (splitk.py); K_SPLIT is a multiple of BLOCK_K
        k_lo = tl.program_id(2) * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + (k_lo + offs_k)[:, None]  # [BK, BN]: W^T's tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Before the wait, under PDL while the kernel before (a norm, an attention merge) still runs, only weights:
    # PREFETCH: the first PREFETCH K steps of this program's slice of W start moving into L2 (a hint, not
    # under the interpreter). PRELOAD: the weight tile of the slice's first K step (and the scales) is loaded
    # into registers; that step is then peeled off the K loop, same dot order: the same bits as PRELOAD=0.
    # A non-empty slice has at least one step, so the loop's own mask (K - k0) keeps it inside the slice.
    if PREFETCH and not INTERPRETED:
        lines = tl.arange(0, PREFETCH * BLOCK_K // 128) * 128  # byte offsets of 128-byte lines (fp8: 1 B each)
        _prefetch_l2(w_ptr + cols[:, None].to(tl.int64) * stride_wn + (k_lo + lines)[None, :],
                     (cols < N)[:, None] & (lines < k_hi - k_lo)[None, :])  # fmt: skip
    if PRELOAD:
        w0 = tl.load(w_ptrs, mask=(offs_k < K - k_lo)[:, None] & (cols < N)[None, :], other=0.0)
        sc = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
    wait_previous(USE_PDL)  # x, and the split-K partials and tile counters the linear before still uses
    if PRELOAD:
        x = tl.load(x_ptrs, mask=(rows < M)[:, None] & (offs_k < K - k_lo)[None, :], other=0.0)
        acc = _k_step(acc, x, w0, UPCAST_DOT)
    x_ptrs += PRELOAD * BLOCK_K
    w_ptrs += PRELOAD * BLOCK_K
    for k0 in range(k_lo + PRELOAD * BLOCK_K, k_hi, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(rows < M)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        acc = _k_step(acc, x, w, UPCAST_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    if SPLIT_K == 1:
        if PRELOAD == 0:
            sc = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
        acc = acc * sc[None, :]
        tl.store(out, downcast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=ok)
    else:
        tile = pid_m * tl.num_programs(1) + pid_n
        if arrive(acc, part_ptr, count_ptr, rows, cols, M, N, tl.program_id(2), tile) == SPLIT_K - 1:
            acc = sum_partials(part_ptr, count_ptr, rows, cols, M, N, tile, SPLIT_K, BLOCK_M, BLOCK_N)
            if PRELOAD == 0:  # else loaded before the wait, by every program of the tile
                sc = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
            acc = acc * sc[None, :]
            tl.store(out, downcast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=ok)


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] weight -> (e4m3 [N, K], float32 scale [N]) with each row's amax mapped to 448."""
    amax = w.float().abs().amax(dim=1).clamp_min(1e-12)  # [N]
    scale = amax / FP8_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@dataclass(frozen=True)
class W8A16Config:
    """One launch of the w8a16 kernel. SPLIT_K > 1: each output tile's K is split over that many
    programs, reduced in the same launch (splitk.py). Weights a program may fetch before its PDL wait, while
    the kernel before still runs (they pay only under PDL; the same bits either way):
    PRELOAD=1: the weight tile of its first K step (BLOCK_K x BLOCK_N bytes) and its scales, into registers.
    PREFETCH=n (0 or a power of two, n x BLOCK_K >= 128): its slice's first n K steps into L2 (a hint)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int = 3
    SPLIT_K: int = 1
    PRELOAD: int = 0
    PREFETCH: int = 0

    def __post_init__(self) -> None:
        for knob in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "SPLIT_K"):
            v = getattr(self, knob)
            if type(v) is not int or v < (16 if knob.startswith("BLOCK") else 1) or v & (v - 1):
                raise MoetuneError(f"W8A16Config: {knob}={v!r}; blocks are powers of two >= 16 (tl.dot), "
                                   "num_warps and SPLIT_K powers of two >= 1")  # fmt: skip
        if type(self.num_stages) is not int or self.num_stages < 1:
            raise MoetuneError(f"W8A16Config: num_stages={self.num_stages!r} must be an int >= 1")
        if type(self.PRELOAD) is not int or self.PRELOAD not in (0, 1):
            raise MoetuneError(f"W8A16Config: PRELOAD={self.PRELOAD!r} must be 0 or 1 (weight tiles loaded "
                               "into registers before the PDL wait)")  # fmt: skip
        p = self.PREFETCH
        if type(p) is not int or p < 0 or p & (p - 1) or 0 < p * self.BLOCK_K < 128:
            raise MoetuneError(f"W8A16Config: PREFETCH={p!r} must be 0 or a power of two with PREFETCH x "
                               "BLOCK_K >= 128 (K steps prefetched into L2, in 128-byte lines)")  # fmt: skip


# (largest M, largest N, config): the first row that holds launches. At M <= 16 the kernel only streams
# weights; `benchmarks/linear_fp8_sweep.py` on an H100 (2026-11-26, 324 configs) found every qkv / o_proj /
# lm_head launch latency-bound with one program per 32 columns: SPLIT_K=4 gives 4x the programs and bytes in
# flight (qkv 15.6 -> 13.3 µs, o_proj 12.2 -> 10.4, lm_head 59 -> 51), and the router (N=8, one program
# before) wants SPLIT_K=8 (11.5 -> 4.2 µs). A decode step's dense linears: 1,320 -> 940 µs. Rows with a
# small largest N go before the row they refine.
# PREFETCH and PRELOAD stay 0. PREFETCH=4 at M <= 16 (each program's whole K-slice at K=4096 into L2 before
# the PDL wait, while the kernel before still runs; no register cost) was predicted to save ~1-1.5 µs a call
# and measured the other way in the decode step: w8a16 12.8 -> 15.8 µs a call, batch-1 decode 175.2 -> 170.4
# tok/s (H100, 2026-11-26, benchmarks/NOTES.md). PRELOAD=1 holds the first tile in registers instead: 89
# registers under PDL, 5 programs an SM, so qkv's 768 programs no longer fit in one wave of 132 SMs
# (tests/hopper_compile.py); not measured.
ANY = sys.maxsize
DEFAULT_CONFIGS: tuple[tuple[int, int, W8A16Config], ...] = (
    (16, 64, W8A16Config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=8)),  # router
    (16, ANY, W8A16Config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3, SPLIT_K=4)),
    (64, ANY, W8A16Config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)),
    (ANY, ANY, W8A16Config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
)


def default_w8a16_config(M: int, N: int) -> W8A16Config:
    return next(cfg for max_m, max_n, cfg in DEFAULT_CONFIGS if M <= max_m and N <= max_n)


def linear_w8a16(x: Tensor, w: Tensor, scale: Tensor, config: W8A16Config | None = None) -> Tensor:
    """x [M, K] (bf16/fp16/fp32), w [N, K] e4m3, scale [N] float32 -> [M, N] in x's dtype.
    config: the launch (default: DEFAULT_CONFIGS by M and N)."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and w.dtype == FP8 and x.stride(1) == 1 and w.stride(1) == 1
    cfg = config or default_w8a16_config(M, N)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N), cfg.SPLIT_K)
    if cfg.SPLIT_K == 1:
        part, counters, k_split = out, out, K  # unused
    else:
        part = torch.empty(cfg.SPLIT_K, M, N, dtype=torch.float32, device=x.device)
        counters, k_split = tile_counters(x.device, grid[0] * grid[1]), k_slice(K, cfg.SPLIT_K, cfg.BLOCK_K)
    interp = interpreting()
    _w8a16_kernel[grid](
        x, w, scale, out, part, counters, M, N, K, k_split, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K, PRELOAD=cfg.PRELOAD,
        PREFETCH=cfg.PREFETCH, UPCAST_DOT=interp or x.dtype == torch.float32, INTERPRETED=interp,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(x.device),
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
