"""Fused residual-add + RMSNorm and RoPE + KV-cache write (Triton: through the interpreter on a CPU, compiled
on a GPU) against float32 torch references: fresh random inputs, odd shapes, outputs poisoned with NaN first.
Inputs are drawn on the CPU (the same values on any machine), then moved to DEVICE."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from moetune.kernels.norm import add_rms_norm, add_rms_norm_reference
from moetune.kernels.rope import rope_and_cache, rope_and_cache_reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture
def poisoned_empty_like(monkeypatch):
    """Every torch.empty_like during the test starts as NaN, so an unwritten output element shows."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("T", "H"), [(1, 64), (5, 96), (3, 200)])
def test_add_rms_norm_matches_float32_reference(dtype, T, H, poisoned_empty_like):
    g = torch.Generator().manual_seed(T * H)
    x, res = (torch.randn(T, H, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype).to(DEVICE)
    for residual in (None, res):
        out, new_res = add_rms_norm(x, w, 1e-5, residual)
        ref_x = x.float() + (residual.float() if residual is not None else 0)
        ref = w.float() * ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + 1e-5)  # float32 truth
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)
        torch.testing.assert_close(new_res.float(), ref_x, atol=TOL[dtype], rtol=TOL[dtype])
        # and the eager path it replaces, to the 16-bit rounding both make
        eager, eager_res = add_rms_norm_reference(x, w, 1e-5, residual)
        torch.testing.assert_close(out, eager, atol=TOL[dtype], rtol=TOL[dtype])
        assert torch.equal(new_res, eager_res)


def _cos_sin(D: int, P: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    f = torch.outer(torch.arange(P).float(), inv)
    return f.cos().to(DEVICE), f.sin().to(DEVICE)


def _rope_float32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [T, h, D] fp32
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "H", "Hkv", "D", "bs"), [(1, 4, 2, 16, 16), (7, 6, 2, 24, 4), (3, 5, 5, 8, 8)])
def test_rope_and_cache_write_match_float32_reference(dtype, T, H, Hkv, D, bs):
    g = torch.Generator().manual_seed(T + H + D)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, 64, (T,), generator=g).to(DEVICE)
    cos, sin = _cos_sin(D)
    nblocks = T + 2
    kc = torch.full((nblocks, bs, Hkv, D), float("nan"), dtype=dtype, device=DEVICE)
    vc = kc.clone()
    slots = torch.randperm(nblocks * bs, generator=g)[:T].to(DEVICE)
    before = qkv.clone()
    rope_and_cache(qkv, positions, cos, sin, H, Hkv, kc, vc, slots)
    q0, k0, v0 = before.float().split([H * D, Hkv * D, Hkv * D], dim=-1)
    q_ref = _rope_float32(q0.view(T, H, D), cos[positions], sin[positions])
    k_ref = _rope_float32(k0.view(T, Hkv, D), cos[positions], sin[positions])
    q, k, v = qkv.float().split([H * D, Hkv * D, Hkv * D], dim=-1)
    tol = TOL[dtype]
    torch.testing.assert_close(q.view(T, H, D), q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k.view(T, Hkv, D), k_ref, atol=tol, rtol=tol)
    assert torch.equal(v, v0)  # v untouched in qkv
    flat_k, flat_v = kc.view(-1, Hkv, D), vc.view(-1, Hkv, D)
    assert torch.equal(flat_k[slots].float(), k.view(T, Hkv, D)) and torch.equal(flat_v[slots].float(), v0.view(T, Hkv, D))
    others = torch.ones(nblocks * bs, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert flat_k[others].isnan().all() and flat_v[others].isnan().all()  # no other slot written
    # the eager path gives the same bits
    qkv2, kc2, vc2 = before.clone(), torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    rope_and_cache_reference(qkv2, positions, cos, sin, H, Hkv, kc2, vc2, slots)
    torch.testing.assert_close(qkv2, qkv, atol=tol, rtol=tol)


def test_rope_without_a_cache_only_rotates():
    qkv = torch.randn(2, (2 + 2) * 8).to(DEVICE)
    ref = qkv.clone()
    cos, sin = _cos_sin(8)
    positions = torch.tensor([0, 3], device=DEVICE)
    rope_and_cache(qkv, positions, cos, sin, 2, 1)
    rope_and_cache_reference(ref, positions, cos, sin, 2, 1)
    torch.testing.assert_close(qkv, ref)
    assert torch.equal(qkv[0], ref[0])  # position 0: the identity rotation
