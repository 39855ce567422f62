"""RoPE on q and k plus the paged KV-cache write, in one launch.

Eager torch spends about twenty launches per layer here: two cos/sin gathers, casts, four muls, an add
and a sub, a cat and a cast per tensor, then an index_copy each for K and V. One program per token
rotates all its q and k heads in place in the qkv projection's output (so q, k, v stay views of it)
and stores k and v to the token's cache slot.

HF's rotate_half convention: each head's first and second halves are the (real, imaginary) parts.
The rotation runs in float32 with one rounding to the activation dtype, as layers.RotaryEmbedding did.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import downcast, interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous


@triton.jit
def _rotate(ptr, cos, sin, mask, HALF: tl.constexpr, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """Rotate the heads at ptr ([heads, D/2] pointers to first halves) in place; returns both halves."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    r1 = downcast(x1 * cos - x2 * sin, dtype, INTERPRETED)
    r2 = downcast(x2 * cos + x1 * sin, dtype, INTERPRETED)
    tl.store(ptr, r1, mask=mask)
    tl.store(ptr + HALF, r2, mask=mask)
    return r1, r2


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_t, stride_cos, stride_slot, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    WRITE_CACHE: tl.constexpr, INTERPRETED: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype: tl.constexpr = qkv_ptr.dtype.element_ty
    row = qkv_ptr + t * stride_t  # q heads, then k heads, then v heads, each HEAD_DIM wide
    j = tl.arange(0, HALF_PAD)
    wait_previous(USE_PDL)  # qkv comes from the projection; positions and slots from the step's inputs
    pos = tl.load(positions_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]  # [1, D/2] fp32
    sin = tl.load(sin_ptr + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
    h = tl.arange(0, Q_PAD)
    q_mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    _rotate(row + h[:, None] * HEAD_DIM + j[None, :], cos, sin, q_mask, HALF, dtype, INTERPRETED)
    g = tl.arange(0, KV_PAD)
    k_mask = (g[:, None] < NUM_KV_HEADS) & (j[None, :] < HALF)
    k_ptr = row + (NUM_HEADS + g[:, None]) * HEAD_DIM + j[None, :]  # [Hkv, D/2]
    k1, k2 = _rotate(k_ptr, cos, sin, k_mask, HALF, dtype, INTERPRETED)
    if WRITE_CACHE:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        c = slot * stride_slot + g[:, None] * stride_ch  # [Hkv, 1]
        tl.store(k_cache_ptr + c + j[None, :], k1, mask=k_mask)
        tl.store(k_cache_ptr + c + HALF + j[None, :], k2, mask=k_mask)
        d = tl.arange(0, D_PAD)
        v_mask = (g[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
        v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + g[:, None]) * HEAD_DIM + d[None, :], mask=v_mask)
        tl.store(v_cache_ptr + c + d[None, :], v, mask=v_mask)


def rope_and_cache(
    qkv: Tensor,  # [T, (H + 2 Hkv) * D], rotated in place
    positions: Tensor,  # [T] int64
    cos: Tensor,  # [max_positions, D/2] float32
    sin: Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_cache: Tensor | None = None,  # [num_blocks, block_size, Hkv, D]
    v_cache: Tensor | None = None,
    slot_mapping: Tensor | None = None,  # [T] int64: block * block_size + offset
) -> None:
    T, D = qkv.shape[0], cos.shape[1] * 2
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D and qkv.stride(1) == 1 and cos.stride(1) == 1
    write = k_cache is not None
    if write:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (num_kv_heads, D)
    _rope_cache_kernel[(T,)](
        qkv, positions, cos, sin, slot_mapping if write else positions, k_cache if write else qkv,
        v_cache if write else qkv, qkv.stride(0), cos.stride(0),
        k_cache.stride(1) if write else 0, k_cache.stride(2) if write else 0,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=D,
        Q_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads),
        HALF_PAD=triton.next_power_of_2(D // 2), D_PAD=triton.next_power_of_2(D),
        WRITE_CACHE=write, INTERPRETED=interpreting(), num_warps=4, **launch_kwargs(qkv.device),
    )  # fmt: skip


def rope_and_cache_reference(
    qkv: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int,
    k_cache: Tensor | None = None, v_cache: Tensor | None = None, slot_mapping: Tensor | None = None,
) -> None:  # fmt: skip
    """The same in eager torch (the runtime's unfused path)."""
    T, D = qkv.shape[0], cos.shape[1] * 2
    c, s = cos[positions][:, None], sin[positions][:, None]  # [T, 1, D/2]
    rot = qkv[:, : (num_heads + num_kv_heads) * D].view(T, num_heads + num_kv_heads, D)  # q and k heads
    x1, x2 = rot.float().chunk(2, dim=-1)
    rot.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    if k_cache is not None:
        k, v = qkv[:, num_heads * D :].view(T, 2, num_kv_heads, D).unbind(1)
        k_cache.view(-1, num_kv_heads, D).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, num_kv_heads, D).index_copy_(0, slot_mapping, v)
