"""Paged decode attention: one new query token per sequence against its cached keys and values.

The KV cache is paged as in vLLM: `k_cache[block, slot, kv_head, :]`, and each sequence's block table lists
the blocks holding its tokens in order. Decode is memory-bound, so the kernel only has to read each
sequence's used blocks once, at full bandwidth:

* one program per (sequence, KV head, partition of PARTITION tokens). Its GROUP query heads share every
  K/V load (GQA), and splitting the context over partitions ("split-KV", flash-decoding) keeps the GPU
  busy at batch 1, where sequences x KV heads alone is only 8 programs for Mixtral. The partition size
  follows the batch (partition_tokens): 32 tokens at batch 1 gives 128 programs at a 512-token context;
  big batches have programs enough and take long partitions (fewer partials to merge);
* a program reads its partition in tiles of up to MAX_TILE (32) tokens that may span several KV blocks (each row
  looks up its own block), so one iteration has 16 KB in flight instead of one 16-token block;
* scores are `sum(q * k)` over the head dimension in float32 rather than `tl.dot`: a decode tile has only
  GROUP (4) rows, below tl.dot's minimum of 16, and the elementwise form also runs correctly under
  Triton's CPU interpreter;
* one launch a layer, merge included. A sequence whose context fits one partition is done by that program
  alone (output = acc / denominator). Otherwise each partition writes its running max, softmax denominator
  and unnormalised output (float32), then counts itself in on its (sequence, KV head)'s arrival counter; the
  last of the sequence's partitions to arrive merges them all (for its GROUP heads), writes the output and
  resets the counter to zero. That is splitk.py's pattern and ordering (CTA barrier, acq_rel atomic, .cg
  loads), on its shared counter buffer. Why: the merge was a second kernel of ~2 µs a layer at batch 1,
  most of it the launch boundary (the first grid's tail, the second's ramp-up), not its few KB of loads.
  Programs past a sequence's context do nothing, so a short sequence in a long batch costs no partials.
  Grid sizes depend only on tensor shapes and no counter needs a reset launch: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.interp import interpreting
from moetune.kernels.pdl import launch_kwargs, wait_previous
from moetune.kernels.splitk import count_arrival, tile_counters

# Context tokens one loop iteration reads, and the warps: [GROUP, TILE, D] float32 products sit in registers.
# 64-token tiles with 4 warps spilled 2 KB of stack a thread (sm_90), and at batch 256, context 512, attention
# took 55 ms of an 80 ms step on an H100 (2026-11-26). 32-token tiles fit 4 warps when the loop runs once (a
# 32-token partition: batch 1), but a loop over several tiles still spilled 112 B; 8 warps hold it (254
# registers, no stack; tests/test_hopper_compile.py).
MAX_TILE = 32
LOOP_WARPS = 8  # warps of a program whose partition spans several tiles
MAX_MERGE_TILE = 8192  # float32 partials one merge iteration loads ([GROUP, chunk, D]): a 64 x 128 K tile's worth
# triton.jit decides at definition time whether kernels run on the GPU or in the CPU interpreter
INTERPRETED = interpreting()


@triton.jit
def _attend(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, kv_head, first, last, stride_cb, stride_ct,
            stride_ch, stride_tb, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
    """Online softmax of the scaled q [G, D] over context tokens [first, last) of sequence b: returns the
    running max [G], the softmax denominator [G] and the unnormalised output [G, D], all float32."""
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, TILE)
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
    return m_i, l_i, acc


@triton.jit
def _merge(m_ptrs, l_ptrs, acc_ptrs, num_parts, stride_ap, g_mask, d_mask, GROUP_PAD: tl.constexpr,
           BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """The last arrival: the output [G, D] of the num_parts partials that m_ptrs, l_ptrs [G] and acc_ptrs
    [G, D] point at (partition 0's). Flash-decoding's softmax-weighted merge, CHUNK partitions at a time
    (rescaled online as in _attend; with one chunk it is the plain formula). Loads go to L2 (.cg), where
    the other programs' partials are (splitk.py)."""
    c = tl.arange(0, CHUNK)
    m_run = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_run = tl.zeros([GROUP_PAD], tl.float32)
    o_run = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for p0 in range(0, num_parts, CHUNK):
        p = p0 + c  # [C]
        ok = g_mask[:, None] & (p < num_parts)[None, :]  # [G, C]
        m = tl.load(m_ptrs[:, None] + p[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")  # [G, C]
        denom = tl.load(l_ptrs[:, None] + p[None, :], mask=ok, other=0.0, cache_modifier=".cg")  # [G, C]
        a_ptrs = acc_ptrs[:, None, :] + p[None, :, None] * stride_ap
        a = tl.load(a_ptrs, mask=ok[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")  # [G, C, D]
        m_new = tl.maximum(tl.maximum(m_run, tl.max(m, axis=1)), -1e30)  # padding heads have no finite max
        alpha = tl.exp(m_run - m_new)
        w = tl.exp(m - m_new[:, None])  # [G, C]; 0 past num_parts
        l_run = l_run * alpha + tl.sum(w * denom, axis=1)
        o_run = o_run * alpha[:, None] + tl.sum(w[:, :, None] * a, axis=1)  # [G, D]
        m_run = m_new
    return o_run / tl.maximum(l_run, 1e-30)[:, None]


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    count_ptr,
    scale,
    stride_qb,
    stride_qh,  # q [B, H, D]
    stride_ob,
    stride_oh,  # out [B, H, D]
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
    MERGE_CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    gd_mask = g_mask[:, None] & d_mask[None, :]
    wait_previous(USE_PDL)  # q and this step's K/V come from the RoPE + cache-write kernel
    ctx = tl.load(context_lens_ptr + b)
    # partitions holding tokens (at most the grid's); a padding row (ctx 0) keeps one, to write its zeros
    num_parts = tl.minimum(tl.maximum(tl.cdiv(ctx, PARTITION), 1), tl.num_programs(2))
    if part < num_parts:  # programs past the context write nothing, so they do not arrive either
        first = part * PARTITION
        last = tl.minimum(first + PARTITION, ctx)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)
        q = q.to(tl.float32) * scale  # [G, D]
        m_i, l_i, acc = _attend(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, b, kv_head, first, last, stride_cb,
                                stride_ct, stride_ch, stride_tb, GROUP_PAD, HEAD_DIM, BLOCK_D, BLOCK_SIZE, TILE)
        out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]  # [G, D]
        if num_parts == 1:  # the whole context is this program's: no partials, no counter
            out = acc / tl.maximum(l_i, 1e-30)[:, None]  # zeros for a padding row
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
        else:
            ml_offs = b * stride_mb + heads * stride_mh  # [G], partition 0's
            acc_ptrs = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + d[None, :]  # [G, D], partition 0's
            tl.store(m_ptr + ml_offs + part, m_i, mask=g_mask)
            tl.store(l_ptr + ml_offs + part, l_i, mask=g_mask)
            tl.store(acc_ptrs + part * stride_ap, acc, mask=gd_mask)
            pair = b * tl.num_programs(1) + kv_head
            if count_arrival(count_ptr, pair) == num_parts - 1:  # the last: every other partial is visible
                out = _merge(m_ptr + ml_offs, l_ptr + ml_offs, acc_ptrs, num_parts, stride_ap, g_mask, d_mask,
                             GROUP_PAD, BLOCK_D, MERGE_CHUNK)  # fmt: skip
                tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
                tl.store(count_ptr + pair, 0)  # ready for the next launch


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
    """Softmax(q K^T * scale) V over each sequence's first context_lens tokens. Returns [B, H, D] q.dtype.
    One launch; its arrival counters (splitk.tile_counters) are allocated at the first call, so make one
    before capturing a CUDA graph."""
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    assert H % Hkv == 0 and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert block_size & (block_size - 1) == 0, "the KV block size must be a power of two"
    scale = D**-0.5 if scale is None else scale
    part = triton.next_power_of_2(partition_tokens or auto_partition_tokens(B, Hkv))
    part = min(part, triton.next_power_of_2(block_tables.shape[1] * block_size))  # one partition: no split
    P = triton.cdiv(block_tables.shape[1] * block_size, part)  # from shapes only: graph-capturable
    group, block_d = H // Hkv, triton.next_power_of_2(D)
    group_pad = triton.next_power_of_2(group)
    out = torch.empty_like(q)
    m = torch.empty(B, H, P, dtype=torch.float32, device=q.device)  # partials: written only where P > 1
    denom = torch.empty_like(m)
    acc = torch.empty(B, H, P, D, dtype=torch.float32, device=q.device)
    counters = tile_counters(q.device, B * Hkv)  # one per (sequence, KV head)
    _decode_partition_kernel[(B, Hkv, P)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m,
        denom,
        acc,
        counters,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
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
        GROUP_PAD=group_pad,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        PARTITION=part,
        TILE=min(part, MAX_TILE),
        MERGE_CHUNK=max(1, min(triton.next_power_of_2(P), MAX_MERGE_TILE // (group_pad * block_d))),
        num_warps=4 if part <= MAX_TILE else LOOP_WARPS,
        **launch_kwargs(q.device),
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
