"""Paged decode attention: one new query token per sequence against its cached keys and values.

The KV cache is paged as in vLLM: `k_cache[block, slot, kv_head, :]`, and each sequence's block table lists
the blocks holding its tokens in order. Decode is memory-bound, so the kernel only has to read each
sequence's used blocks once, at full bandwidth:

* one program per (sequence, KV head, partition of PARTITION tokens). Its GROUP query heads share every
  K/V load (GQA), and splitting the context over partitions ("split-KV", flash-decoding) keeps the GPU
  busy at batch 1, where sequences x KV heads alone is only 8 programs for Mixtral. The partition size
  follows the batch (partition_tokens): 32 tokens at batch 1 gives 128 programs at a 512-token context;
  big batches have programs enough and take long partitions (fewer partials to merge);
* a program reads its partition in tiles of up to 64 tokens that may span several KV blocks (each row
  looks up its own block), so one iteration has 16-32 KB in flight instead of one 16-token block;
* scores are `sum(q * k)` over the head dimension in float32 rather than `tl.dot`: a decode tile has only
  GROUP (4) rows, below tl.dot's minimum of 16, and the elementwise form also runs correctly under
  Triton's CPU interpreter;
* each partition writes its running max, softmax denominator and unnormalised output; a second kernel
  merges the partitions. Grid sizes depend only on tensor shapes, so the pair is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous

MAX_TILE = 64  # context tokens one loop iteration reads
# triton.jit decides at definition time whether kernels run on the GPU or in the CPU interpreter
INTERPRETED = interpreting()


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale,
    stride_qb,
    stride_qh,  # q [B, H, D]
    stride_cb,
    stride_ct,
    stride_ch,  # caches [num_blocks, BLOCK_SIZE, Hkv, D]
    stride_tb,  # block_tables [B, max_blocks]
    stride_mb,
    stride_mh,  # m, l [B, H, P]
    stride_ab,
    stride_ah,
    stride_ap,  # acc [B, H, P, D]
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PARTITION: tl.constexpr,
    TILE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, TILE)
    heads = kv_head * GROUP + g
    gd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    wait_previous(USE_PDL)  # q and this step's K/V come from the RoPE + cache-write kernel
    ctx = tl.load(context_lens_ptr + b)
    first = part * PARTITION
    last = tl.minimum(first + PARTITION, ctx)  # empty range past the context

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)
    q = q.to(tl.float32) * scale  # [G, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for start in range(first, last, TILE):
        tok = start + t  # [T] context positions
        t_mask = tok < last
        block = tl.load(block_tables_ptr + b * stride_tb + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        row = block * stride_cb + (tok % BLOCK_SIZE) * stride_ct + kv_head * stride_ch  # [T]
        offs = row[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D], issued before the math
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, T]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every visited tile holds a token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [G, T]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, D]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    g_mask = g < GROUP
    tl.store(m_ptr + b * stride_mb + heads * stride_mh + part, m_i, mask=g_mask)
    tl.store(l_ptr + b * stride_mb + heads * stride_mh + part, l_i, mask=g_mask)
    out = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + part * stride_ap + d[None, :]
    tl.store(out, acc, mask=gd_mask)


@triton.jit
def _decode_merge_kernel(
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    context_lens_ptr,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ab,
    stride_ah,
    stride_ap,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
    P_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, BLOCK_D)
    wait_previous(USE_PDL)  # the partials of _decode_partition_kernel
    ctx = tl.load(context_lens_ptr + b)
    num_parts = tl.cdiv(ctx, PARTITION)
    p_mask = p < num_parts
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + p, mask=p_mask, other=float("-inf"))
    total = tl.load(l_ptr + b * stride_mb + h * stride_mh + p, mask=p_mask, other=0.0)
    acc_offs = acc_ptr + b * stride_ab + h * stride_ah + p[:, None] * stride_ap + d[None, :]
    acc = tl.load(acc_offs, mask=p_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # [P, D]
    m_max = tl.maximum(tl.max(m, axis=0), -1e30)  # an empty sequence (padding row) has no finite max
    w = tl.exp(m - m_max)  # [P]; 0 for empty partitions
    denom = tl.maximum(tl.sum(w * total, axis=0), 1e-30)
    out = tl.sum(w[:, None] * acc, axis=0) / denom  # [D]; zeros for a padding row
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def auto_partition_tokens(batch: int, kv_heads: int) -> int:
    """Split the context finely while batch x KV heads alone cannot fill the GPU (132 SMs on an H100);
    coarsely once it can, so big batches write and merge few partials."""
    work = batch * kv_heads
    return 32 if work <= 16 else 64 if work <= 64 else 128 if work <= 256 else 256


def paged_decode_attention(
    q: Tensor,  # [B, H, D]
    k_cache: Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: Tensor,  # [B, max_blocks] int32
    context_lens: Tensor,  # [B] int32; 0 marks a padding row, whose output is zeros
    scale: float | None = None,
    partition_tokens: int = 0,  # context tokens per program; 0: partition_tokens(B, Hkv)
) -> Tensor:
    """Softmax(q K^T * scale) V over each sequence's first context_lens tokens. Returns [B, H, D] q.dtype."""
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    assert H % Hkv == 0 and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert block_size & (block_size - 1) == 0, "the KV block size must be a power of two"
    scale = D**-0.5 if scale is None else scale
    part = triton.next_power_of_2(partition_tokens or auto_partition_tokens(B, Hkv))
    part = min(part, triton.next_power_of_2(block_tables.shape[1] * block_size))  # one partition: no split
    P = triton.cdiv(block_tables.shape[1] * block_size, part)  # from shapes only: graph-capturable
    m = torch.empty(B, H, P, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    acc = torch.empty(B, H, P, D, dtype=torch.float32, device=q.device)
    group = H // Hkv
    meta = dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), PARTITION=part, **launch_kwargs(q.device))
    _decode_partition_kernel[(B, Hkv, P)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        m,
        denom,
        acc,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        m.stride(0),
        m.stride(1),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size,
        TILE=min(part, MAX_TILE),
        **meta,
    )
    out = torch.empty_like(q)
    _decode_merge_kernel[(B, H)](
        out,
        m,
        denom,
        acc,
        context_lens,
        out.stride(0),
        out.stride(1),
        m.stride(0),
        m.stride(1),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        P_PAD=triton.next_power_of_2(P),
        **meta,
    )
    return out


def paged_decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float | None = None,
    partition_tokens: int = 0,  # accepted for the kernel's signature; the reference does not split
) -> Tensor:
    """The same in plain torch, one sequence at a time, softmax in float32. Returns [B, H, D] q.dtype."""
    B, H, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        ctx = int(context_lens[b])
        if ctx == 0:
            continue
        blocks = block_tables[b, : -(-ctx // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(H // Hkv, dim=1)  # [T, H, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(H // Hkv, dim=1)  # [T, H, D]
        s = torch.einsum("hd,thd->ht", q[b].float(), k) * scale  # [H, T]
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return out
