"""Routing and block alignment: softmax -> top-k -> renormalise, then group the token x top-k slots by
expert, each group padded to BLOCK_SIZE_M. No host synchronisation, so the layer is CUDA-graph safe.

Two ways, one result:
  one program    (T <= PARALLEL_MIN_TOKENS) a single CTA routes, counts, scans and places: one launch,
                 the cheapest at decode sizes, where the whole layer is a few hundred microseconds.
  three launches (larger T) memset of the counts; `_route_count_kernel` routes blocks of tokens in
                 parallel, takes each block's offset inside every expert with one atomic add per
                 expert and records each slot's position there; `_align_place_kernel` scans the E
                 counts again in every program, then scatters slots and writes the padding. One CTA
                 took 243 µs at T=4096 on an H100; this is meant to take about 10.
Within an expert the slot order may differ between the two (atomics), which changes no result: each
GEMM row depends only on its own slot. route_decode.py is the one-program path again, for decode
sizes, starting from the router weight (it computes the logits too): it shares route_logits and
align_slots, so its decisions and layout are the one-program path's.

Output layout (what the expert GEMM reads):
  sorted_ids [max_padded]   slot indices (token * top_k + k), grouped by expert; padding = T * top_k
  expert_ids [max_blocks]   expert of each BLOCK_SIZE_M block; -1 past the last used block
  num_padded [1]            number of used entries in sorted_ids (a multiple of BLOCK_SIZE_M)
The parallel path's token-count arguments are not specialised (`do_not_specialize`), nor the expert
GEMMs': Triton would otherwise compile again for a count not divisible by 16, and on an H100 the first
prefill of 63 prompts (1,071 tokens) stalled every request for 2.1 s while it did. The one-program path
keeps its specialisation (T=1 at decode folds its loops; its few variants compile at graph capture and
in the serving warm-up).
Reference: route_reference in reference.py; tests/test_fused_moe.py checks the layout itself, both paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.kernels.pdl import launch_kwargs, wait_previous

PARALLEL_MIN_TOKENS = 128  # above this many tokens, the parallel path


@triton.jit
def route_block(logits_ptr, stride_lt, weights_ptr, ids_ptr, tokens, T, E, TOP_K: tl.constexpr,
                E_PAD: tl.constexpr):  # fmt: skip
    """Route a block of tokens from logits in memory: store their top-k weights and expert ids; return
    per-expert counts."""
    experts = tl.arange(0, E_PAD)
    valid = (tokens < T)[:, None] & (experts < E)[None, :]
    # rows past T read zeros (not -inf) so no NaN is ever formed; they are never stored
    logits = tl.load(logits_ptr + tokens[:, None] * stride_lt + experts[None, :], mask=valid, other=0.0)
    return route_logits(logits, weights_ptr, ids_ptr, tokens, T, E, TOP_K, E_PAD)


@triton.jit
def route_logits(logits, weights_ptr, ids_ptr, tokens, T, E, TOP_K: tl.constexpr, E_PAD: tl.constexpr):
    """Route a block of tokens from their logits [BT, E_PAD] (finite everywhere; values past T or E are
    ignored): softmax, top-k (ties to the lower expert, as tl.argmax), renormalise; store weights and
    ids; return per-expert counts."""
    experts = tl.arange(0, E_PAD)
    valid = (tokens < T)[:, None] & (experts < E)[None, :]
    logits = tl.where((experts < E)[None, :], logits.to(tl.float32), -float("inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = tl.where(valid, probs / tl.sum(probs, axis=1)[:, None], -1.0)  # [BT, E_PAD]
    # top-k by repeated argmax; a first pass only for the renormalising sum
    remaining = probs
    total = tl.zeros_like(tl.max(probs, axis=1))
    for _ in tl.static_range(TOP_K):
        total += tl.max(remaining, axis=1)
        remaining = tl.where(experts[None, :] == tl.argmax(remaining, axis=1)[:, None], -1.0, remaining)
    remaining = probs
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        pick = tl.argmax(remaining, axis=1).to(tl.int32)
        chosen = experts[None, :] == pick[:, None]
        remaining = tl.where(chosen, -1.0, remaining)
        counts += tl.sum((chosen & (tokens < T)[:, None]).to(tl.int32), axis=0)
        tl.store(weights_ptr + tokens * TOP_K + k, best / total, mask=tokens < T)
        tl.store(ids_ptr + tokens * TOP_K + k, pick, mask=tokens < T)
    return counts


@triton.jit
def slot_ranks(ids, E_PAD: tl.constexpr):
    """For a block of slot expert ids: one-hot [BS, E_PAD] and each slot's rank among the block's
    slots of its expert (stable)."""
    onehot = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    return onehot, tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1


@triton.jit
def padded_layout(counts, BLOCK_M: tl.constexpr):
    """Per-expert start and end of each padded group, and the used length."""
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    return ends - padded, ends, tl.sum(padded, axis=0)


@triton.jit
def block_owner(positions, ends, num_padded):
    """Expert of each sorted position: the number of experts whose padded range ends at or before it;
    -1 at or past num_padded."""
    owner = tl.sum((positions[:, None] >= ends[None, :]).to(tl.int32), axis=1)
    return tl.where(positions < num_padded, owner, -1)


@triton.jit
def align_slots(
    counts, ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_slots, max_padded, max_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_FILL: tl.constexpr,
):
    """One program's alignment, once every slot's expert id is stored (by this program): the padded
    layout, the padding fill and the block -> expert map, then every slot placed in its group."""
    starts, ends, num_padded = padded_layout(counts, BLOCK_M)
    tl.store(num_padded_ptr, num_padded)
    for s0 in range(0, max_padded, BLOCK_FILL):
        offs = s0 + tl.arange(0, BLOCK_FILL)
        tl.store(sorted_ids_ptr + offs, tl.full([BLOCK_FILL], 0, tl.int32) + num_slots, mask=offs < max_padded)
    for b0 in range(0, max_blocks, BLOCK_FILL):
        blocks = b0 + tl.arange(0, BLOCK_FILL)
        tl.store(expert_ids_ptr + blocks, block_owner(blocks * BLOCK_M, ends, num_padded), mask=blocks < max_blocks)
    tl.debug_barrier()  # the placing below rereads ids and overwrites the padding fill, across threads

    # Place each slot at its expert's start + its rank among that expert's slots (stable).
    placed = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, num_slots, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        onehot, rank = slot_ranks(tl.load(ids_ptr + slots, mask=slots < num_slots, other=E_PAD), E_PAD)
        base = tl.sum(onehot * (starts + placed)[None, :], axis=1)
        tl.store(sorted_ids_ptr + base + rank, slots, mask=slots < num_slots)
        placed += tl.sum(onehot, axis=0)


@triton.jit  # T stays specialised: unspecialised, routing in a batch-1 step went 0.33 -> 0.41 ms (H100)
def _route_align_kernel(
    logits_ptr, stride_lt, weights_ptr, ids_ptr,  # [T, E] in, [T, TOP_K] out (fp32, int32)
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    T, E, max_padded, max_blocks,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_FILL: tl.constexpr, ALIGN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_previous(USE_PDL)  # the router's logits come from the kernel before
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):  # pass 1: route every token, count slots per expert
        counts += route_block(logits_ptr, stride_lt, weights_ptr, ids_ptr, t0 + tl.arange(0, BLOCK_T), T, E,
                              TOP_K, E_PAD)  # fmt: skip
    if ALIGN:  # the decode GEMV path only needs the routing
        align_slots(counts, ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, T * TOP_K, max_padded,
                    max_blocks, BLOCK_M, E_PAD, BLOCK_S, BLOCK_FILL)  # fmt: skip


@triton.jit(do_not_specialize=["T"])
def _route_count_kernel(
    logits_ptr, stride_lt, weights_ptr, ids_ptr, counts_ptr, pos_ptr, T, E,
    TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    wait_previous(USE_PDL)  # logits, and the counts zeroed by the memset before
    route_block(logits_ptr, stride_lt, weights_ptr, ids_ptr, tokens, T, E, TOP_K, E_PAD)
    tl.debug_barrier()  # reread this block's ids, written by other threads of this program
    lane = tl.arange(0, BLOCK_S)  # BLOCK_S = next power of two of BLOCK_T * TOP_K
    slots = tl.program_id(0) * BLOCK_T * TOP_K + lane
    ok = (lane < BLOCK_T * TOP_K) & (slots < T * TOP_K)
    onehot, rank = slot_ranks(tl.load(ids_ptr + slots, mask=ok, other=E_PAD), E_PAD)
    experts = tl.arange(0, E_PAD)
    # one atomic per expert: where this block's slots of that expert begin inside the expert's group
    offset = tl.atomic_add(counts_ptr + experts, tl.sum(onehot, axis=0), mask=experts < E)
    tl.store(pos_ptr + slots, rank + tl.sum(onehot * offset[None, :], axis=1), mask=ok)


@triton.jit(do_not_specialize=["num_slots", "max_padded", "max_blocks", "fill_programs"])
def _align_place_kernel(
    ids_ptr, counts_ptr, pos_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    num_slots, E, max_padded, max_blocks, fill_programs,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    wait_previous(USE_PDL)  # the counts, ids and positions of _route_count_kernel
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    starts, ends, num_padded = padded_layout(counts, BLOCK_M)
    pid = tl.program_id(0)
    if pid < fill_programs:  # padding entries and the block -> expert map; real slots are never touched
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        owner = block_owner(offs, ends, num_padded)
        onehot = (owner[:, None] == experts[None, :]).to(tl.int32)
        is_pad = offs - tl.sum(onehot * starts[None, :], axis=1) >= tl.sum(onehot * counts[None, :], axis=1)
        tl.store(sorted_ids_ptr + offs, tl.full([BLOCK], 0, tl.int32) + num_slots,
                 mask=(offs < max_padded) & (is_pad | (owner < 0)))  # fmt: skip
        first = offs % BLOCK_M == 0
        tl.store(expert_ids_ptr + offs // BLOCK_M, owner, mask=first & (offs // BLOCK_M < max_blocks))
        if pid == 0:
            tl.store(num_padded_ptr, num_padded)
    else:
        slots = (pid - fill_programs) * BLOCK + tl.arange(0, BLOCK)
        ok = slots < num_slots
        ids = tl.load(ids_ptr + slots, mask=ok, other=0)
        start = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32) * starts[None, :], axis=1)
        tl.store(sorted_ids_ptr + start + tl.load(pos_ptr + slots, mask=ok, other=0), slots, mask=ok)


def padded_sizes(num_slots: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Upper bounds known on the host without looking at the routing: entries and blocks."""
    max_padded = num_slots + num_experts * (block_m - 1)
    return max_padded, triton.cdiv(max_padded, block_m)


def routing_buffers(T: int, E: int, top_k: int, block_m: int, align: bool, device: torch.device,
                    alloc=torch.empty) -> tuple[Tensor, ...]:  # fmt: skip
    """The outputs of routing: topk_weights [T, k] fp32, topk_ids [T, k] int32, sorted_ids, expert_ids
    and num_padded [1] (sorted_ids and expert_ids of size 0 without align)."""
    max_padded, max_blocks = padded_sizes(T * top_k, E, block_m) if align else (0, 0)
    return (
        alloc((T, top_k), dtype=torch.float32, device=device),
        alloc((T, top_k), dtype=torch.int32, device=device),
        alloc((max_padded,), dtype=torch.int32, device=device),
        alloc((max_blocks,), dtype=torch.int32, device=device),
        alloc((1,), dtype=torch.int32, device=device),
    )


def align_blocks(e_pad: int) -> dict[str, int]:
    """align_slots' block sizes: slots placed per step (one-hot [BLOCK_S, E_PAD] of ~2K values), entries
    filled per step."""
    return dict(BLOCK_S=max(16, 2048 // e_pad), BLOCK_FILL=1024)


def route_and_align(
    router_logits: Tensor, top_k: int, block_m: int, alloc=torch.empty, align: bool = True,
    parallel: bool | None = None,
) -> tuple[Tensor, ...]:
    """Returns topk_weights [T, k] fp32, topk_ids [T, k] int32, then (if align) sorted_ids,
    expert_ids, num_padded [1]. parallel: None picks by T (see the module docstring)."""
    router_logits = router_logits.contiguous()  # the kernels assume unit stride over experts
    T, E = router_logits.shape
    dev = router_logits.device
    weights, ids, sorted_ids, expert_ids, num_padded = routing_buffers(T, E, top_k, block_m, align, dev, alloc)
    max_padded, max_blocks = sorted_ids.numel(), expert_ids.numel()
    e_pad = triton.next_power_of_2(E)
    pdl = launch_kwargs(dev)
    if parallel is None:
        parallel = T > PARALLEL_MIN_TOKENS
    if align and parallel:
        counts = torch.zeros(E, dtype=torch.int32, device=dev)  # the atomics need a zero start
        pos = alloc((T * top_k,), dtype=torch.int32, device=dev)
        block_t = 1 << max(4, (512 // (e_pad * top_k)).bit_length() - 1)  # a power of two, >= 16
        _route_count_kernel[(triton.cdiv(T, block_t),)](
            router_logits, router_logits.stride(0), weights, ids, counts, pos, T, E,
            TOP_K=top_k, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_S=triton.next_power_of_2(block_t * top_k), num_warps=4,
            **pdl,
        )  # fmt: skip
        block = 1024
        fill_programs = triton.cdiv(max_blocks * block_m, block)
        _align_place_kernel[(fill_programs + triton.cdiv(T * top_k, block),)](
            ids, counts, pos, sorted_ids, expert_ids, num_padded, T * top_k, E, max_padded, max_blocks,
            fill_programs, BLOCK_M=block_m, E_PAD=e_pad, BLOCK=block, num_warps=4, **pdl,
        )  # fmt: skip
        return weights, ids, sorted_ids, expert_ids, num_padded
    _route_align_kernel[(1,)](
        router_logits, router_logits.stride(0), weights, ids,
        sorted_ids, expert_ids, num_padded,
        T, E, max_padded, max_blocks,
        TOP_K=top_k, BLOCK_M=block_m, E_PAD=e_pad, BLOCK_T=max(16, 1024 // e_pad), ALIGN=align,
        **align_blocks(e_pad), num_warps=4, **pdl,
    )  # fmt: skip
    return (weights, ids, sorted_ids, expert_ids, num_padded) if align else (weights, ids)
