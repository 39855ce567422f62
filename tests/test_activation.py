"""The elementwise kernels between the GEMMs (activation.py) against their torch expressions, on fresh random
inputs with poisoned outputs, through Triton's interpreter (or compiled, on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from moetune.kernels import activation as act
from moetune.kernels.reference import rel_err


def poisoned(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(123456789)


def silu_mul_ref(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 100), (3, 4096)])
def test_quantize_rows_scales_each_row_to_the_e4m3_range(rows, cols):
    x = (torch.randn(rows, cols, device=DEVICE) * torch.logspace(-2, 2, rows, device=DEVICE)[:, None]).bfloat16()
    q, scale = act.quantize_rows(x, alloc=poisoned)
    assert q.dtype == act.FP8 and scale.shape == (rows,)
    assert torch.allclose(scale, x.float().abs().amax(1) / act.FP8_MAX, rtol=1e-6)
    assert rel_err(dequant(q, scale), x) < 0.04  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("S,N", [(1, 96), (7, 130)])
def test_both_fp8_silu_paths_match_silu_times_up(S, N, monkeypatch):
    h = torch.randn(S, 2 * N, device=DEVICE).bfloat16()
    ref = silu_mul_ref(h)
    # the 2-D grid with atomics, the one-pass row kernel for many rows, then for few
    for min_rows, max_few in ((10**9, 0), (1, 0), (10**9, 10**9)):
        monkeypatch.setattr(act, "ROW_PASS_MIN_ROWS", min_rows)
        monkeypatch.setattr(act, "ROW_PASS_MAX_FEW_ROWS", max_few)
        q, scale = act.silu_mul_fp8(h, alloc=poisoned)
        assert q.shape == (S, N) and scale.shape == (S,)
        assert rel_err(dequant(q, scale), ref) < 0.05


def test_silu_mul_writes_every_column_and_its_row_max():
    h = torch.randn(4, 2 * 1500, device=DEVICE).bfloat16()  # N = 1500: two column blocks, the second ragged
    out = poisoned((4, 1500), torch.bfloat16, DEVICE)
    amax = torch.zeros(4, device=DEVICE)
    act.silu_mul(h, out, amax)
    ref = silu_mul_ref(h)
    assert torch.isfinite(out.float()).all() and rel_err(out, ref) < 1e-2
    assert torch.allclose(amax, out.float().abs().amax(1))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_sum_adds_each_tokens_slots(top_k):
    T, K = 5, 1100
    y = torch.randn(T * top_k, K, device=DEVICE).bfloat16()
    out = act.topk_sum(y, top_k, alloc=poisoned)
    assert rel_err(out, y.float().view(T, top_k, K).sum(1)) < 1e-2
