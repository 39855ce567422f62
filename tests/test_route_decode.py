"""The one-launch decode router (route_decode.py) against the unfused path it replaces (F.linear, then
route_and_align and quantize_rows), and fused_moe_routed against fused_moe and the float32 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from test_fused_moe import TOL, config, poisoned_alloc

from moetune.errors import MoetuneError
from moetune.kernels import fused_moe as fm
from moetune.kernels.activation import quantize_rows
from moetune.kernels.norm import add_rms_norm
from moetune.kernels.reference import moe_reference, rel_err
from moetune.kernels.route_decode import ONE_LAUNCH_MAX_TOKENS, route_decode
from moetune.kernels.routing import route_and_align


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(fm, "alloc", poisoned_alloc)


def router_inputs(T, E, K, seed, dtype=torch.bfloat16):
    """Random x [T, K] and router weight [E, K] on grids (x in 1/8ths, gate in 1/32nds, small integers over
    those): every product and partial sum is exact in float32, so any summation order (cuBLAS's, the
    kernel's, the CPU's) gives the same logits and routing must agree exactly, on any device. Logits ~2
    at K=256."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, K, generator=g) * 4).round() / 8
    gate = (torch.randn(E, K, generator=g) * 8).round() / 32
    return x.to(dtype).to(DEVICE), gate.to(dtype).to(DEVICE)


def unfused(x, gate, top_k, bm, align=True, quant=True):
    """What route_decode replaces: the router linear, route_and_align, quantize_rows."""
    routing = route_and_align(F.linear(x, gate), top_k, bm, alloc=poisoned_alloc, align=align)
    return routing, quantize_rows(x, alloc=poisoned_alloc) if quant else None


def assert_same_routing(routing, ref):
    (weights, ids, *aligned), (ref_weights, ref_ids, *ref_aligned) = routing, ref
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)  # fp32 rounding at most
    for name, a, b in zip(("sorted_ids", "expert_ids", "num_padded"), aligned, ref_aligned):
        assert torch.equal(a, b), name  # whole buffers: padding and the -1 tail too


@pytest.mark.parametrize("quant", [False, True], ids=["bf16-experts", "fp8-experts"])
@pytest.mark.parametrize("bm", [16, 64])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("E", [4, 8])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 16])
def test_one_launch_routes_exactly_as_the_unfused_path(T, E, top_k, bm, quant):
    x, gate = router_inputs(T, E, 256, seed=T * 100 + E * 10 + top_k)
    routing, quantised = route_decode(x, gate, top_k, bm, alloc=poisoned_alloc, quant=quant)
    ref_routing, ref_quantised = unfused(x, gate, top_k, bm, quant=quant)
    assert_same_routing(routing, ref_routing)
    if quant:
        (xq, scale), (ref_xq, ref_scale) = quantised, ref_quantised
        assert torch.equal(xq.view(torch.uint8), ref_xq.view(torch.uint8)) and torch.equal(scale, ref_scale)
    else:
        assert quantised is None


@pytest.mark.parametrize("T,E,K", [(1, 8, 200), (5, 6, 96), (16, 8, 130)])
def test_one_launch_on_plain_random_inputs_and_ragged_sizes(T, E, K):
    """randn inputs (sums rounded in float32), K not a power of two, E not one, fp16, routing only."""
    g = torch.Generator().manual_seed(T)
    x, gate = torch.randn(T, K, generator=g).half().to(DEVICE), torch.randn(E, K, generator=g).half().to(DEVICE)
    routing, quantised = route_decode(x, gate, 2, 16, alloc=poisoned_alloc, align=False, quant=True)
    ref_routing, (ref_xq, ref_scale) = unfused(x, gate, 2, 16, align=False)
    assert_same_routing(routing, ref_routing)
    assert torch.equal(quantised[0].view(torch.uint8), ref_xq.view(torch.uint8))
    assert torch.equal(quantised[1], ref_scale)


@pytest.mark.parametrize("top_k", [1, 2])
def test_tied_experts_go_to_the_lower_index_in_both_routers(top_k):
    """Experts 2 and 3 copy the router rows of 0 and 1: their logits tie exactly."""
    x, gate = router_inputs(7, 2, 256, seed=5)
    gate = torch.cat([gate, gate])  # [4, K]: rows 0, 1, 0, 1
    routing, _ = route_decode(x, gate, top_k, 16, alloc=poisoned_alloc)
    assert_same_routing(routing, unfused(x, gate, top_k, 16, quant=False)[0])
    logits = F.linear(x, gate).float()
    best = (logits[:, 1] > logits[:, 0]).int()  # the lower copy of the larger logit
    expected = torch.stack([best, best + 2], dim=1)[:, :top_k]
    assert torch.equal(routing[1].cpu(), expected.cpu())
    if top_k == 2:
        torch.testing.assert_close(routing[0], torch.full_like(routing[0], 0.5))


def layer(T, E, N, K, dtype, seed):
    x, gate = router_inputs(T, E, K, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w13 = (torch.randn(E, 2 * N, K, generator=g) / K**0.5).to(DEVICE)
    w2 = (torch.randn(E, K, N, generator=g) / N**0.5).to(DEVICE)
    if dtype == "fp8":
        (w13, s13), (w2, s2) = fm.quantize_fp8_per_expert(w13), fm.quantize_fp8_per_expert(w2)
        return x, gate, w13, w2, dict(w13_scale=s13, w2_scale=s2)
    return x, gate, w13.to(x.dtype), w2.to(x.dtype), {}


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize(
    "T,cfg",
    [(1, config(16)), (3, config(64, bn=64)), (16, config(16)), (1, dict(config(16, bn=16, bk=32), kernel="gemv")),
     (3, dict(config(16, bn=32), fuse_silu=1)), (ONE_LAUNCH_MAX_TOKENS + 1, config(16))],
    ids=["T1", "T3-bm64", "T16", "T1-gemv", "T3-fuse_silu", "T17-unfused"],
)  # fmt: skip
def test_fused_moe_routed_is_fused_moe_from_the_router_logits(dtype, T, cfg):
    x, gate, w13, w2, scales = layer(T, E=8, N=64, K=256, dtype=dtype, seed=T)
    top_k = 2
    out = fm.fused_moe_routed(x, gate, w13, w2, top_k, cfg, **scales)
    logits = F.linear(x, gate)
    assert torch.equal(out, fm.fused_moe(x, logits, w13, w2, top_k, cfg, **scales))  # same routing, same GEMMs
    err = rel_err(out, moe_reference(x, logits, w13, w2, top_k, **scales))
    assert err < TOL[dtype], f"rel err {err:.3g} ({dtype}, T={T}, cfg={cfg})"


@pytest.mark.parametrize(
    "gate_of,message",
    [
        (lambda g: g[:, :-1], r"gate \(the router weight\) must be \[E=8, K=256\]"),
        (lambda g: g[:-1], r"\[7, 256\]"),
        (lambda g: g[0], r"\[256\]"),
        (lambda g: g.float(), "torch.float32"),
    ],
    ids=["short-K", "missing-expert", "1-D", "float32"],
)
def test_bad_router_weight_gets_a_clear_error(gate_of, message):
    x, gate, w13, w2, _ = layer(3, E=8, N=32, K=256, dtype="bf16", seed=0)
    with pytest.raises(MoetuneError, match=message):
        fm.fused_moe_routed(x, gate_of(gate), w13, w2, 2)


def test_route_decode_refuses_more_tokens_than_one_program_takes():
    x, gate = router_inputs(ONE_LAUNCH_MAX_TOKENS + 1, 8, 256, seed=0)
    with pytest.raises(MoetuneError, match="route_decode takes 1 to 16 tokens"):
        route_decode(x, gate, 2, 16)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("T,top_k", [(1, 2), (5, 2), (16, 2), (3, 3)], ids=["T1", "T5", "T16", "T3-top3"])
def test_top_k_sum_folded_into_gemm2_is_bitwise_the_separate_sum(monkeypatch, dtype, T, top_k):
    """route_decode zeroes the output and GEMM2 adds each token's slots into it (top_k = 2 only: three
    slots would round in the order the atomics land). Equal to the separate topk_sum, bit for bit."""
    x, gate, w13, w2, scales = layer(T, E=8, N=64, K=256, dtype=dtype, seed=40 + T)
    cfg = config(16, bn=64)
    folded = fm.fused_moe_routed(x, gate, w13, w2, top_k, cfg, **scales)
    monkeypatch.setattr(fm, "FOLD_TOPK_SUM", False)
    separate = fm.fused_moe_routed(x, gate, w13, w2, top_k, cfg, **scales)
    assert torch.equal(folded, separate)
    err = rel_err(folded, moe_reference(x, F.linear(x, gate), w13, w2, top_k, **scales))
    assert err < TOL[dtype], f"rel err {err:.3g} ({dtype}, T={T})"


def test_route_decode_zeroes_the_buffer_it_is_given():
    x, gate = router_inputs(3, 8, 256, seed=7)
    zero = poisoned_alloc((3, 256), torch.bfloat16, DEVICE)
    route_decode(x, gate, 2, 16, alloc=poisoned_alloc, zero=zero)
    assert torch.equal(zero, torch.zeros_like(zero))
    with pytest.raises(MoetuneError, match=r"zero buffer must be \[T=3, K=256\]"):
        route_decode(x, gate, 2, 16, zero=zero[:, :128])


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 4, ONE_LAUNCH_MAX_TOKENS, ONE_LAUNCH_MAX_TOKENS + 1])
def test_add_rms_norm_inside_the_router_is_the_norm_then_the_layer(dtype, T):
    """fused_moe_normed: route_decode adds the residual and normalises (norm.py's rounding) before routing;
    above 16 tokens add_rms_norm runs first. Same outputs and residual as the two steps apart."""
    x, gate, w13, w2, scales = layer(T, E=8, N=64, K=256, dtype=dtype, seed=60 + T)
    g = torch.Generator().manual_seed(T)
    residual = torch.randn(T, 256, generator=g).to(x.dtype).to(DEVICE)
    weight = (1 + torch.rand(256, generator=g)).to(x.dtype).to(DEVICE)
    cfg = config(16, bn=64)
    out, res = fm.fused_moe_normed(x, residual, weight, 1e-5, gate, w13, w2, 2, cfg, **scales)
    xn, ref_res = add_rms_norm(x, weight, 1e-5, residual)
    ref = fm.fused_moe_routed(xn, gate, w13, w2, 2, cfg, **scales)
    assert torch.equal(res, ref_res)
    if DEVICE == "cpu":  # one summation order; on a GPU the two kernels' norm reductions may round apart
        assert torch.equal(out, ref)
    logits = F.linear(xn, gate)
    err = rel_err(out, moe_reference(xn, logits, w13, w2, 2, **scales))
    assert err < TOL[dtype], f"rel err {err:.3g} ({dtype}, T={T})"


def test_router_norm_with_mismatched_tensors_gets_a_clear_error():
    x, gate, w13, w2, _ = layer(2, E=8, N=32, K=256, dtype="bf16", seed=0)
    with pytest.raises(MoetuneError, match=r"residual must be \[2, 256\]"):
        fm.fused_moe_normed(x, x[:1], x[0], 1e-5, gate, w13, w2, 2)
