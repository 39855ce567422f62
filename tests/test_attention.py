"""Paged decode attention: the Triton kernel (through the interpreter on a CPU, compiled on a GPU) against the
torch reference. Inputs are drawn on the CPU (the same values on any machine), then moved to DEVICE."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

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
