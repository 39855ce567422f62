"""Split-K in one launch: each program reduces a K-slice of one output tile, and the last of a tile's
SPLIT_K programs to arrive sums the partials in a fixed order and writes the tile.

    part     [SPLIT_K, M, N] float32   every program's partial (written once, read once by the last)
    counters [tiles] int32             arrivals per output tile; zero between launches

Why: at batch 1 a linear with few output tiles (o_proj: 128 programs of N=32 for 132 SMs; the router:
one program) leaves SMs idle or each with too few bytes in flight. Splitting K gives more programs;
an atomic-add reduction would need a zeroing launch and a cast launch, a two-pass reduction a second
launch, each ~2 µs in a decode step of 4 x 32 linears. Here the reduction is in the epilogue.

Ordering (the CUTLASS semaphore pattern): all threads store their partial, a CTA barrier, then one
thread's acq_rel atomic on the tile's counter releases them; the last arrival's atomic acquires every
other program's release, and its loads go to L2 (.cg), never a stale L1 line. The last one resets the
counter to zero, so the next launch on the stream finds it zero. Two launches sharing the counters
must therefore not run concurrently: this assumes one stream per device, as the runtime has. Under
PDL a launch's first atomic comes after its wait_previous, so the launch before has reset its counters.
The buffer is shared by every kernel of this pattern on a device: split-K linears and split-KV decode
attention (attention.py), which merges the partitions of a (sequence, KV head) the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moetune.errors import MoetuneError

_counters: dict[torch.device, Tensor] = {}
_retired: list[Tensor] = []  # outgrown buffers stay alive: a captured CUDA graph may still point at them


def tile_counters(device: torch.device, tiles: int) -> Tensor:
    """A zeroed int32 buffer of at least `tiles` counters on device, allocated once (outside graph capture)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise MoetuneError(f"{tiles} arrival counters are allocated at the first eager call; "
                               "run the linear or attention once before capturing a CUDA graph")  # fmt: skip
        if buf is not None:
            _retired.append(buf)
        buf = _counters[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return buf


def k_slice(K: int, split_k: int, block_k: int) -> int:
    """K columns per split, a multiple of block_k so that only the last slice needs K masks."""
    return triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k


@triton.jit
def count_arrival(count_ptr, tile):
    """Once this program's partials are stored: count it in on `tile`; returns how many came before it.
    Also the arrival of kernels whose partials are not one [BM, BN] tile (attention.py)."""
    tl.debug_barrier()  # every thread's partial is stored before one thread releases them
    return tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")


@triton.jit
def arrive(acc, part_ptr, count_ptr, rows, cols, M, N, pid_k, tile):
    """Publish this program's [BM, BN] float32 partial; returns how many of the tile's programs came before."""
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(part_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=ok)
    return count_arrival(count_ptr, tile)


@triton.jit
def sum_partials(part_ptr, count_ptr, rows, cols, M, N, tile, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """The last arrival: the tile's SPLIT_K partials summed in split order (run to run the same bits)."""
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + s * M.to(tl.int64) * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(count_ptr + tile, 0)  # ready for the next launch
    return total
