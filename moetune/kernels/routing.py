"""Routing and block alignment in one Triton program: softmax -> top-k -> renormalise, then group the
token x top-k slots by expert, each group padded to BLOCK_SIZE_M.

Why one program: at small M the whole MoE layer is a few hundred microseconds, and the torch version
of this step (softmax, topk, sort, cumsum, scatter, searchsorted) is a dozen launches. A single CTA
does it in one launch with no host synchronisation, so the layer can be captured in a CUDA graph.

Output layout (what the expert GEMM reads):
  sorted_ids [max_padded]   slot indices (token * top_k + k), grouped by expert; padding = T * top_k
  expert_ids [max_blocks]   expert of each BLOCK_SIZE_M block; -1 past the last used block
  num_padded [1]            number of used entries in sorted_ids (a multiple of BLOCK_SIZE_M)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _route_align_kernel(
    logits_ptr, stride_lt, weights_ptr, ids_ptr,  # [T, E] in, [T, TOP_K] out (fp32, int32)
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    T, E, max_padded, max_blocks,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_FILL: tl.constexpr, ALIGN: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)

    # Pass 1: route every token, count slots per expert.
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        valid = (tokens < T)[:, None] & (experts < E)[None, :]
        # rows past T read zeros (not -inf) so no NaN is ever formed; they are never stored
        logits = tl.load(logits_ptr + tokens[:, None] * stride_lt + experts[None, :], mask=valid, other=0.0)
        logits = tl.where((experts < E)[None, :], logits.to(tl.float32), -float("inf"))
        probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = tl.where(valid, probs / tl.sum(probs, axis=1)[:, None], -1.0)  # [BT, E_PAD]
        # top-k by repeated argmax; first pass only for the renormalising sum
        remaining = probs
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        for _ in tl.static_range(TOP_K):
            total += tl.max(remaining, axis=1)
            pick = tl.argmax(remaining, axis=1)
            remaining = tl.where(experts[None, :] == pick[:, None], -1.0, remaining)
        remaining = probs
        for k in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=1)
            pick = tl.argmax(remaining, axis=1).to(tl.int32)
            chosen = experts[None, :] == pick[:, None]
            remaining = tl.where(chosen, -1.0, remaining)
            counts += tl.sum((chosen & (tokens < T)[:, None]).to(tl.int32), axis=0)
            tl.store(weights_ptr + tokens * TOP_K + k, best / total, mask=tokens < T)
            tl.store(ids_ptr + tokens * TOP_K + k, pick, mask=tokens < T)
    if not ALIGN:  # the decode GEMV path only needs the routing
        return

    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [E_PAD]
    starts = ends - padded
    num_padded = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, num_padded)

    num_slots = T * TOP_K
    for s0 in range(0, max_padded, BLOCK_FILL):
        offs = s0 + tl.arange(0, BLOCK_FILL)
        tl.store(sorted_ids_ptr + offs, tl.full([BLOCK_FILL], 0, tl.int32) + num_slots, mask=offs < max_padded)
    for b0 in range(0, max_blocks, BLOCK_FILL):
        blocks = b0 + tl.arange(0, BLOCK_FILL)
        # the owner of a block is the number of experts whose padded range ends at or before it
        owner = tl.sum(((blocks * BLOCK_M)[:, None] >= ends[None, :]).to(tl.int32), axis=1)
        owner = tl.where(blocks * BLOCK_M < num_padded, owner, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < max_blocks)
    tl.debug_barrier()  # pass 2 rereads ids and overwrites the padding fill, across threads

    # Pass 2: place each slot at its expert's start + its rank among that expert's slots (stable).
    placed = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, num_slots, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=E_PAD)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BS, E_PAD]
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        base = tl.sum(onehot * (starts + placed)[None, :], axis=1)
        tl.store(sorted_ids_ptr + base + rank, slots, mask=slots < num_slots)
        placed += tl.sum(onehot, axis=0)


def padded_sizes(num_slots: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Upper bounds known on the host without looking at the routing: entries and blocks."""
    max_padded = num_slots + num_experts * (block_m - 1)
    return max_padded, triton.cdiv(max_padded, block_m)


def route_and_align(
    router_logits: Tensor, top_k: int, block_m: int, alloc=torch.empty, align: bool = True
) -> tuple[Tensor, ...]:
    """Returns topk_weights [T, k] fp32, topk_ids [T, k] int32, then (if align) sorted_ids,
    expert_ids, num_padded [1]."""
    router_logits = router_logits.contiguous()  # the kernel assumes unit stride over experts
    T, E = router_logits.shape
    dev = router_logits.device
    max_padded, max_blocks = padded_sizes(T * top_k, E, block_m) if align else (0, 0)
    weights = alloc((T, top_k), dtype=torch.float32, device=dev)
    ids = alloc((T, top_k), dtype=torch.int32, device=dev)
    sorted_ids = alloc((max_padded,), dtype=torch.int32, device=dev)
    expert_ids = alloc((max_blocks,), dtype=torch.int32, device=dev)
    num_padded = alloc((1,), dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(E)
    _route_align_kernel[(1,)](
        router_logits, router_logits.stride(0), weights, ids,
        sorted_ids, expert_ids, num_padded,
        T, E, max_padded, max_blocks,
        TOP_K=top_k, BLOCK_M=block_m, E_PAD=e_pad,
        BLOCK_T=max(16, 1024 // e_pad), BLOCK_S=max(16, 2048 // e_pad), BLOCK_FILL=1024, ALIGN=align,
        num_warps=4,
    )  # fmt: skip
    return (weights, ids, sorted_ids, expert_ids, num_padded) if align else (weights, ids)
