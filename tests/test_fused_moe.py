"""The fused MoE kernel against the float32 reference, on fresh random inputs with poisoned buffers."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from moetune.errors import MoetuneError
from moetune.kernels import fused_moe as fm
from moetune.kernels.reference import moe_reference, rel_err
from moetune.kernels.routing import route_and_align
from moetune.tables import default_config

TOL = {"fp16": 1e-2, "bf16": 1e-2, "fp8": 6e-2}


def poisoned_alloc(shape, dtype, device):
    """Every buffer the layer allocates starts as garbage, so reading an unwritten element shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(123456789)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(fm, "alloc", poisoned_alloc)


def make_layer(T, E, N, K, dtype, seed, dead_experts=()):
    g = torch.Generator().manual_seed(seed)
    act_dtype = torch.bfloat16 if dtype == "fp8" else {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    x = torch.randn(T, K, generator=g).to(act_dtype)
    logits = torch.randn(T, E, generator=g)
    logits[:, list(dead_experts)] = -1e4  # these experts receive no token
    w13 = torch.randn(E, 2 * N, K, generator=g) / K**0.5
    w2 = torch.randn(E, K, N, generator=g) / N**0.5
    x, logits, w13, w2 = (t.to(DEVICE) for t in (x, logits, w13, w2))
    if dtype == "fp8":
        (w13, s13), (w2, s2) = fm.quantize_fp8_per_expert(w13), fm.quantize_fp8_per_expert(w2)
        return x, logits, w13, w2, dict(w13_scale=s13, w2_scale=s2)
    return x, logits, w13.to(act_dtype), w2.to(act_dtype), {}


def config(bm, bn=32, bk=64, group=4):
    return dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=group, num_warps=4, num_stages=2)


def check(T, E, N, K, top_k, dtype, cfg, seed=0, dead=()):
    x, logits, w13, w2, scales = make_layer(T, E, N, K, dtype, seed, dead)
    out = fm.fused_moe(x, logits, w13, w2, top_k, cfg, **scales)
    ref = moe_reference(x, logits, w13, w2, top_k, **scales)
    assert out.shape == (T, K) and out.dtype == x.dtype
    assert torch.isfinite(out.float()).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3g} over {TOL[dtype]} ({dtype}, T={T}, cfg={cfg})"
    return err


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_reference_across_dtypes_token_counts_and_top_k(dtype, T, top_k):
    check(T, E=8, N=96, K=128, top_k=top_k, dtype=dtype, cfg=config(16), seed=T * 10 + top_k)


@pytest.mark.parametrize("bm", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_every_block_size_m_in_the_search_space_is_correct(bm, dtype):
    check(T=53, E=4, N=64, K=64, top_k=2, dtype=dtype, cfg=config(bm, bn=64, bk=64), seed=bm)


@pytest.mark.parametrize("dtype", ["fp16", "fp8"])
def test_experts_that_receive_no_token(dtype):
    check(T=19, E=8, N=64, K=64, top_k=2, dtype=dtype, cfg=config(16), dead=(0, 3, 4, 7))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("T,top_k", [(1, 2), (3, 2), (4, 1)])
def test_decode_gemv_path_matches_reference(dtype, T, top_k):
    cfg = dict(config(16, bn=16, bk=32), kernel="gemv")
    err = check(T, E=8, N=72, K=80, top_k=top_k, dtype=dtype, cfg=cfg, seed=T)
    if dtype == "fp8":  # weights dequantised in registers, activations never quantised: w8a16 numerics
        assert err < 1e-2


def test_expert_count_that_is_not_a_power_of_two():
    check(T=29, E=6, N=64, K=64, top_k=2, dtype="fp16", cfg=config(16))


def test_non_contiguous_activations():
    x, logits, w13, w2, _ = make_layer(12, 4, 32, 64, "fp16", 3)
    wide = torch.zeros(12, 128, dtype=x.dtype, device=x.device)
    wide[:, ::2] = x  # same values, row stride 128 and column stride 2
    out = fm.fused_moe(wide[:, ::2], logits, w13, w2, 2, config(16))
    assert rel_err(out, moe_reference(x, logits, w13, w2, 2)) < TOL["fp16"]


def test_k_and_n_not_multiples_of_the_blocks():
    check(T=23, E=4, N=72, K=80, top_k=2, dtype="fp16", cfg=config(32, bn=64, bk=64))


def test_large_token_count():
    check(T=700, E=8, N=32, K=32, top_k=2, dtype="fp16", cfg=config(128, bn=32, bk=32, group=8))


def test_default_config_is_used_when_none_given():
    check(T=9, E=8, N=64, K=64, top_k=2, dtype="bf16", cfg=None)
    assert default_config(9, 8)["BLOCK_SIZE_M"] == 64 and default_config(8, 8)["BLOCK_SIZE_M"] == 16


def test_zero_tokens_returns_empty():
    x, logits, w13, w2, _ = make_layer(1, 4, 32, 32, "fp16", 0)
    out = fm.fused_moe(x[:0], logits[:0], w13, w2, 2)
    assert out.shape == (0, 32)


@pytest.mark.parametrize("parallel", [False, True], ids=["one-program", "parallel"])
@pytest.mark.parametrize("bm", [16, 64])
@pytest.mark.parametrize("T,E,top_k", [(1, 8, 2), (37, 8, 2), (300, 4, 1), (5, 16, 3), (11, 6, 2), (70, 6, 3)])
def test_alignment_groups_every_slot_once_by_expert(T, E, top_k, bm, parallel):
    logits = torch.randn(T, E, device=DEVICE)
    logits[: T // 2, 1] = -1e4  # an expert few tokens pick
    weights, ids, sorted_ids, expert_ids, num_padded = route_and_align(
        logits, top_k, bm, alloc=poisoned_alloc, parallel=parallel
    )
    ref_w, ref_ids = torch.topk(torch.softmax(logits, -1), top_k)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w / ref_w.sum(-1, keepdim=True))

    counts = torch.bincount(ids.flatten().long(), minlength=E)
    padded = (counts + bm - 1) // bm * bm
    assert num_padded.item() == padded.sum().item()
    used = sorted_ids[: num_padded.item()]
    real = used[used < T * top_k]
    assert sorted(real.tolist()) == list(range(T * top_k)), "each slot exactly once"
    assert (used[used >= T * top_k] == T * top_k).all(), "padding holds the sentinel"
    for b in range(num_padded.item() // bm):
        block = used[b * bm : (b + 1) * bm]
        block = block[block < T * top_k]
        assert (ids.flatten()[block.long()] == expert_ids[b]).all(), "a block holds one expert's slots"
    assert (expert_ids[num_padded.item() // bm :] == -1).all()


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("T,top_k,bm,bn", [(1, 2, 16, 32), (37, 2, 32, 64), (29, 1, 64, 64), (150, 2, 16, 64)])
def test_fused_silu_gemm1_matches_reference(dtype, T, top_k, bm, bn):
    check(T, E=6, N=72, K=80, top_k=top_k, dtype=dtype, cfg=dict(config(bm, bn=bn, bk=32), fuse_silu=1), seed=T)


@pytest.mark.parametrize("fuse", [0, 1])
def test_fp8_with_experts_that_receive_no_token_and_many_slots(fuse):
    # S = 300 slots takes the one-pass SiLU+quantise path; experts 2 and 5 get nothing
    check(T=150, E=8, N=64, K=64, top_k=2, dtype="fp8", cfg=dict(config(64, bn=64), fuse_silu=fuse), dead=(2, 5))


@pytest.mark.parametrize(
    "cfg,message",
    [
        (dict(config(16), BLOCK_SIZE_M=16.0), "BLOCK_SIZE_M=16.0"),
        (dict(config(16), BLOCK_SIZE_Q=4), "unknown knob 'BLOCK_SIZE_Q'"),
        (dict(config(16), fuse_silu=2), "fuse_silu=2"),
        (dict(config(16), kernel="cutlass"), "kernel='cutlass'"),
        (dict(config(16, bn=16), fuse_silu=1), "BLOCK_SIZE_N >= 32"),
        ({"BLOCK_SIZE_M": 16}, "missing knob"),
        (dict(config(16), num_warps=[4]), "num_warps"),
    ],
)
def test_bad_config_is_rejected_before_launch_naming_the_knob(cfg, message):
    x, logits, w13, w2, _ = make_layer(3, 4, 32, 32, "fp16", 0)
    with pytest.raises(MoetuneError, match=message.replace("[", r"\[").replace("(", r"\(")):
        fm.fused_moe(x, logits, w13, w2, 2, cfg)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.update(w2=a["w2"][:, :, :-1]), "shapes disagree"),
        (lambda a: a.update(router_logits=a["router_logits"][:, :-1]), "router_logits"),
        (lambda a: a.update(top_k=9), "top_k"),
        (lambda a: a.update(x=a["x"].float()), "bf16 or fp16"),
    ],
)
def test_bad_inputs_get_a_clear_error(mutate, message):
    x, logits, w13, w2, _ = make_layer(3, 8, 32, 32, "fp16", 0)
    args = dict(x=x, router_logits=logits, w13=w13, w2=w2, top_k=2)
    mutate(args)
    with pytest.raises(MoetuneError, match=message):
        fm.fused_moe(**args)


def test_fp8_without_scales_is_rejected():
    x, logits, w13, w2, _ = make_layer(3, 4, 32, 32, "fp8", 0)
    with pytest.raises(MoetuneError, match="scales"):
        fm.fused_moe(x, logits, w13, w2, 2)


def test_fp8_weight_quantisation_round_trips_within_e4m3_precision():
    w = torch.randn(4, 64, 32, device=DEVICE) * torch.tensor([0.01, 1.0, 30.0, 500.0], device=DEVICE).view(4, 1, 1)
    wq, scale = fm.quantize_fp8_per_expert(w)
    assert wq.dtype == torch.float8_e4m3fn and scale.shape == (4,)
    assert rel_err(wq.float() * scale.view(4, 1, 1), w) < 0.04
