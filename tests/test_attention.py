"""Paged decode attention: the Triton kernel (through the interpreter on a CPU, compiled on a GPU) against the
torch reference. Inputs are drawn on the CPU (the same values on any machine), then moved to DEVICE."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from moetune.kernels import attention, splitk
from moetune.kernels.attention import auto_partition_tokens, paged_decode_attention, paged_decode_attention_reference


def _case(
    B: int, H: int, Hkv: int, D: int, block_size: int, context_lens: list[int], dtype: torch.dtype, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // block_size) for c in context_lens) + 1
    num_blocks = B * max_blocks + 3
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    # scattered, non-contiguous blocks, as after many allocations and frees
    tables = torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks).int()
    return tuple(t.to(DEVICE) for t in (q, k, v, tables, torch.tensor(context_lens, dtype=torch.int32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference_with_gqa_partial_blocks_and_several_partitions(dtype):
    # lengths: one token, a block boundary, a partial last block, and more than one partition
    lens = [1, 16, 37, 128 + 21]
    q, k, v, tables, ctx = _case(B=4, H=4, Hkv=2, D=16, block_size=16, context_lens=lens, dtype=dtype)
    out = paged_decode_attention(q, k, v, tables, ctx)
    ref = paged_decode_attention_reference(q, k, v, tables, ctx)
    assert out.dtype == dtype and out.shape == q.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_kernel_handles_non_power_of_two_head_dim_and_group():
    q, k, v, tables, ctx = _case(B=2, H=6, Hkv=2, D=24, block_size=8, context_lens=[9, 30], dtype=torch.float32)
    torch.testing.assert_close(
        paged_decode_attention(q, k, v, tables, ctx), paged_decode_attention_reference(q, k, v, tables, ctx)
    )


def test_padding_rows_with_zero_context_give_zeros_not_nan():
    q, k, v, tables, ctx = _case(B=3, H=4, Hkv=1, D=16, block_size=16, context_lens=[5, 0, 20], dtype=torch.float32)
    out = paged_decode_attention(q, k, v, tables, ctx)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    torch.testing.assert_close(out, paged_decode_attention_reference(q, k, v, tables, ctx))


def test_kernel_reads_only_the_blocks_of_the_context():
    q, k, v, tables, ctx = _case(B=2, H=4, Hkv=2, D=16, block_size=16, context_lens=[20, 3], dtype=torch.float32)
    before = paged_decode_attention(q, k, v, tables, ctx)
    used = {int(b) for row, n in zip(tables, (2, 1)) for b in row[:n]}
    unused = torch.tensor(sorted(set(range(k.shape[0])) - used), device=DEVICE)
    k[unused] = float("nan")  # poison everything outside the sequences' used blocks
    v[unused] = float("nan")
    k[tables[0, 1], 4:] = float("nan")  # and the unused slots of a partial last block
    torch.testing.assert_close(paged_decode_attention(q, k, v, tables, ctx), before)


@pytest.mark.parametrize("partition", [0, 16, 32, 128, 1 << 20])  # auto, split-KV sizes, one partition (no split)
@pytest.mark.parametrize(("block_size", "H", "Hkv"), [(4, 8, 2), (16, 4, 4), (32, 6, 3)])
def test_split_kv_matches_reference_at_any_partition_and_context(partition, block_size, H, Hkv, monkeypatch):
    lens = [1, 15, 16, 17, 64, 100, 300]
    q, k, v, tables, ctx = _case(B=len(lens), H=H, Hkv=Hkv, D=40, block_size=block_size, context_lens=lens,
                                 dtype=torch.bfloat16, seed=partition + block_size)  # fmt: skip
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))  # poisoned scratch
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, **kw: real(t.shape, dtype=t.dtype, device=t.device).fill_(float("nan")))
    out = paged_decode_attention(q, k, v, tables, ctx, partition_tokens=partition)
    ref = paged_decode_attention_reference(q, k, v, tables, ctx)
    torch.testing.assert_close(out.float(), ref.float(), atol=1.6e-2, rtol=1.6e-2)


def test_auto_partition_splits_small_batches_finely():
    assert auto_partition_tokens(1, 8) == 32 and auto_partition_tokens(256, 8) == 256
    assert [auto_partition_tokens(b, 8) for b in (1, 2, 4, 8, 16, 32, 64)] == sorted(
        auto_partition_tokens(b, 8) for b in (1, 2, 4, 8, 16, 32, 64)
    )


# ------------------------------------------------------- one launch: partials merged by the last partition to arrive


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like fill with NaN: the output and the partials hold garbage until the kernel writes them."""
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, **kw: real(t.shape, dtype=t.dtype, device=t.device).fill_(float("nan")))


def _rel_err(out, q, k, v, tables, ctx) -> float:
    """||out - ref|| / ||ref|| against the reference on float32 inputs (float64 norms)."""
    ref = paged_decode_attention_reference(q.float(), k.float(), v.float(), tables, ctx).double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def _launches(monkeypatch) -> list[str]:
    """Names of the Triton kernels launched from now on (interpreted or compiled)."""
    import triton
    import triton.runtime.interpreter

    launched = []
    jit = triton.runtime.interpreter.InterpretedFunction if DEVICE == "cpu" else triton.runtime.jit.JITFunction
    real = jit.run

    def record(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jit, "run", record)
    return launched


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative Frobenius error vs float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("lens", "partition"), [
    ([37], 1 << 20),  # one partition: the program writes the output itself, no counter
    ([20], 32),  # one partition of a split grid (P=2: the other program has no tokens)
    ([1000], 16),  # 63 partitions, the last one partial
    ([64], 16),  # 4 full partitions
    ([5, 0, 200, 33, 1], 32),  # a batch: 1 to 7 partitions, a padding row, a partial last partition
])  # fmt: skip
def test_one_launch_matches_float32_reference(dtype, lens, partition, poisoned, monkeypatch):
    q, k, v, tables, ctx = _case(B=len(lens), H=8, Hkv=2, D=32, block_size=16, context_lens=lens, dtype=dtype,
                                 seed=sum(lens) + partition)  # fmt: skip
    launched = _launches(monkeypatch)
    out = paged_decode_attention(q, k, v, tables, ctx, partition_tokens=partition)
    assert launched == ["_decode_partition_kernel"]  # the merge is in the same launch
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, q, k, v, tables, ctx) < TOL[dtype]
    assert not splitk.tile_counters(q.device, 1).any()  # every last arrival reset its counter


@pytest.mark.parametrize("merge_tile", [0, 1])  # the default merge chunk; 1: one partition per merge iteration
@pytest.mark.parametrize(("H", "Hkv", "D", "block_size"), [(6, 2, 24, 8), (5, 1, 40, 4), (12, 4, 80, 32)])
def test_odd_shapes_and_merges_over_several_chunks(H, Hkv, D, block_size, merge_tile, poisoned, monkeypatch):
    """GROUP 3 and 5 (padded to 4 and 8 heads), head dims 24/40/80 (padded to 32/64/128); merge_tile=1 makes
    the last arrival merge one partition an iteration, rescaling online across iterations."""
    if merge_tile:
        monkeypatch.setattr(attention, "MAX_MERGE_TILE", 1)
    lens = [3, 130, 71]
    q, k, v, tables, ctx = _case(B=3, H=H, Hkv=Hkv, D=D, block_size=block_size, context_lens=lens,
                                 dtype=torch.float32, seed=D)  # fmt: skip
    out = paged_decode_attention(q, k, v, tables, ctx, partition_tokens=16)
    assert _rel_err(out, q, k, v, tables, ctx) < TOL[torch.float32]


def test_twice_in_a_row_the_counters_have_reset():
    """The last arrival zeroes its counter, so a second launch (same inputs, or another batch with other
    lengths) merges correctly with no reset launch between, and the same inputs give the same bits."""
    q, k, v, tables, ctx = _case(B=3, H=8, Hkv=2, D=32, block_size=16, context_lens=[100, 17, 250],
                                 dtype=torch.bfloat16)  # fmt: skip
    first = paged_decode_attention(q, k, v, tables, ctx, partition_tokens=32)
    counters = splitk.tile_counters(q.device, 1)
    assert not counters.any()
    assert torch.equal(paged_decode_attention(q, k, v, tables, ctx, partition_tokens=32), first)
    other = _case(B=2, H=8, Hkv=2, D=32, block_size=16, context_lens=[300, 64], dtype=torch.bfloat16, seed=1)
    assert _rel_err(paged_decode_attention(*other, partition_tokens=32), *other) < TOL[torch.bfloat16]
    assert torch.equal(paged_decode_attention(q, k, v, tables, ctx, partition_tokens=32), first)
    assert not counters.any()
