"""Programmatic dependent launch on a Hopper GPU: switching it on must not change a single bit.

PDL (moetune/kernels/pdl.py) only lets a grid start before the previous one has finished; every kernel waits
(griddepcontrol.wait) before it touches memory that an earlier kernel writes. The same kernels then run in the
same order on the same data, so PDL on and PDL off must give identical results, to the bit: any difference is
a race (a load before the wait, a program that skips it, split-K tile counters reused too early). Checked

* on the runtime: the tiny model, bf16 and fp8 (fp8 dense linears: split-K), on cuda; teacher-forced decode
  steps through the decode CUDA graphs that serving replays, batch 1 and a batch of 3 padded to the graph of 4,
  each step writing its token's K/V to the cache that the next step reads; graphs captured with PDL on, off,
  and on again (re-captured each time, as benchmarks/decode_step.py's set_options does);
* on a hand-built chain of decode layers (add+RMSNorm -> fp8 qkv linear -> RoPE + KV write -> split-KV paged
  attention -> fp8 o linear -> add+RMSNorm -> one-launch router + fp8 experts, 4 layers) in one CUDA graph,
  replayed 200 times with PDL, each replay against the PDL-off graph's result; and eagerly.

Needs a CUDA GPU of compute capability 9.0 or later (compiled kernels, no interpreter); skipped elsewhere.
tests/test_pdl.py checks the rule itself on the kernels' source, on any machine. The chain has the tiny model's
shapes, so the two parts mostly share compiled kernels (each compiles with and without PDL).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_engine_config

from moetune.kernels import pdl
from moetune.kernels.attention import paged_decode_attention
from moetune.kernels.fused_moe import fused_moe_routed, quantize_fp8_per_expert
from moetune.kernels.linear_fp8 import linear_w8a16, quantize_per_channel
from moetune.kernels.norm import add_rms_norm
from moetune.kernels.rope import rope_and_cache
from moetune.runtime import LLMEngine
from moetune.runtime.block_manager import blocks_for

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.skipif(not HOPPER, reason="PDL needs a CUDA GPU of compute capability 9.0 or later")


@pytest.fixture(autouse=True)
def restore_pdl(monkeypatch):
    monkeypatch.setattr(pdl, "_enabled", pdl.enabled())  # the tests switch it; back to this after each


def switch(on: bool) -> None:
    pdl.set_enabled(on)
    assert pdl.launch_kwargs(torch.device("cuda"))["launch_pdl"] is on


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = a != b
    return f"{int(bad.sum())} of {bad.numel()} values differ, max |diff| {(a.float() - b.float()).abs().max():.3g}"


# ------------------------------------------------------------------------------------- the runtime's decode graphs

STEPS = 12
STARTS = [5, 17, 30]  # tokens already in each row's cache; the steps cross block boundaries (block size 16)


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def engine(request, tiny_checkpoint):
    # max_num_seqs=4: decode graphs of 1, 2 and 4 rows. max_num_batched_tokens=4: the memory-profiling prefill
    # has 4 tokens, so its kernels are mostly the decode graph of 4's (fewer variants to compile)
    eng = LLMEngine(tiny_engine_config(tiny_checkpoint, device="cuda", dtype=request.param, moe_backend="triton",
                                       max_model_len=64, max_num_seqs=4, max_num_batched_tokens=4))  # fmt: skip
    assert eng.runner.use_graphs and eng.runner.graph_batch_sizes == [1, 2, 4]
    assert eng.config.dense_dtype == ("fp8" if request.param == "fp8" else "bf16")
    yield eng
    eng.close()


def teacher_forced(engine: LLMEngine, batch: int, cache0: torch.Tensor) -> torch.Tensor:
    """[STEPS, batch, vocab] logits of decode steps replayed from the decode graph of batch's bucket (as
    ModelRunner._decode_logits replays them), fed fixed random tokens; each row owns its KV blocks, which
    start as cache0, and each step writes its token's K/V to a real slot that the next step attends to."""
    r, dev = engine.runner, engine.runner.device
    bs, starts = r.block_size, torch.tensor(STARTS[:batch])
    width = blocks_for(max(STARTS) + STEPS, bs)
    tables = torch.arange(batch * width, dtype=torch.int32).view(batch, width)
    assert batch * width <= r.num_kv_blocks and width <= r.max_blocks
    ids = torch.randint(3, engine.spec.vocab_size, (STEPS, batch), generator=torch.Generator().manual_seed(batch))
    bucket = r._graph_for(batch)
    assert bucket == (1 if batch == 1 else 4)
    rows = []
    with torch.inference_mode():
        r.kv_cache.copy_(cache0)
        for s in range(STEPS):
            pos = starts + s
            slots = tables[torch.arange(batch), pos // bs].long() * bs + pos % bs
            inputs = (ids[s], pos, slots, (pos + 1).int(), tables)
            r._fill_graph_inputs(bucket, *(t.to(dev) for t in inputs))
            r.graphs[bucket].replay()
            rows.append(r.graph_inputs["logits"][:batch].clone())
    return torch.stack(rows)


def test_decode_graphs_give_the_same_bits_with_pdl_on_and_off(engine):
    r = engine.runner
    g = torch.Generator(device="cuda").manual_seed(0)
    cache0 = torch.randn(r.kv_cache.shape, generator=g, device="cuda").to(r.kv_cache.dtype)  # earlier tokens' K/V
    runs = {}
    for name, on in (("on", True), ("off", False), ("on again", True)):
        switch(on)
        r.capture_graphs()  # PDL is read at each launch: a capture bakes in the setting of its time
        runs[name] = {batch: teacher_forced(engine, batch, cache0) for batch in (1, 3)}
    for batch in (1, 3):
        on, off, again = (runs[name][batch] for name in ("on", "off", "on again"))
        assert torch.isfinite(on).all() and not torch.equal(on[0], on[1])  # real logits, changing with the steps
        assert torch.equal(on, off), f"{engine.config.dtype}, batch {batch}, PDL on vs off: {differ(on, off)}"
        assert torch.equal(on, again), f"{engine.config.dtype}, batch {batch}, two PDL runs: {differ(on, again)}"


# ------------------------------------------------------------------------------- a chain of kernels in one graph

H, HKV, D, HIDDEN, E, N, TOP_K, LAYERS, BLOCK = 4, 2, 16, 64, 4, 96, 2, 4, 16  # the tiny model's shapes
LENS = [1, 70, 300, 0]  # context per row with the new token: 1, 3 and 10 partitions of 32 tokens, a padding row
REPLAYS = 200


def chain_inputs() -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).cuda()

    B, width = len(LENS), blocks_for(max(LENS), BLOCK)
    num_blocks = B * width + 1  # the last one is the trash block the padding row writes to
    layers = [dict(w_in=(1 + 0.1 * rand(HIDDEN)).bfloat16(), w_post=(1 + 0.1 * rand(HIDDEN)).bfloat16(),
                   qkv=quantize_per_channel(rand((H + 2 * HKV) * D, HIDDEN, scale=HIDDEN**-0.5)),
                   o=quantize_per_channel(rand(HIDDEN, H * D, scale=(H * D) ** -0.5)),
                   gate=rand(E, HIDDEN, scale=HIDDEN**-0.5).bfloat16(),
                   w13=quantize_fp8_per_expert(rand(E, 2 * N, HIDDEN, scale=HIDDEN**-0.5)),
                   w2=quantize_fp8_per_expert(rand(E, HIDDEN, N, scale=N**-0.5)),
                   k_cache=rand(num_blocks, BLOCK, HKV, D).bfloat16(), v_cache=rand(num_blocks, BLOCK, HKV, D).bfloat16())
              for _ in range(LAYERS)]  # fmt: skip
    tables = torch.arange(B * width, dtype=torch.int32).view(B, width)
    lens = torch.tensor(LENS, dtype=torch.int32)
    pos = (lens - 1).clamp_min(0).long()
    slots = torch.where(lens > 0, tables[torch.arange(B), pos // BLOCK].long() * BLOCK + pos % BLOCK, B * width * BLOCK)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.outer(torch.arange(max(LENS)).float(), inv)
    return dict(x=rand(B, HIDDEN).bfloat16(), w_final=(1 + 0.1 * rand(HIDDEN)).bfloat16(), layers=layers,
                tables=tables.cuda(), lens=lens.cuda(), positions=pos.cuda(), slots=slots.cuda(),
                cos=angles.cos().cuda(), sin=angles.sin().cuda())  # fmt: skip


def decode_layers(inp: dict) -> torch.Tensor:
    """LAYERS decode layers of Triton kernels back to back, each reading what the one before wrote."""
    x, res = inp["x"], None
    for p in inp["layers"]:
        h, res = add_rms_norm(x, p["w_in"], 1e-5, res)
        qkv = linear_w8a16(h, *p["qkv"])  # M=4: split-K (tile counters, atomics)
        rope_and_cache(qkv, inp["positions"], inp["cos"], inp["sin"], H, HKV, p["k_cache"], p["v_cache"], inp["slots"])
        q = qkv[:, : H * D].view(-1, H, D)
        attn = paged_decode_attention(q, p["k_cache"], p["v_cache"], inp["tables"], inp["lens"])  # reads the new K/V
        h, res = add_rms_norm(linear_w8a16(attn.view(-1, H * D), *p["o"]), p["w_post"], 1e-5, res)
        (w13, s13), (w2, s2) = p["w13"], p["w2"]
        x = fused_moe_routed(h, p["gate"], w13, w2, TOP_K, None, s13, s2)
    return add_rms_norm(x, inp["w_final"], 1e-5, res)[0]


def captured(fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    fn()  # eagerly first: compiles this PDL setting's variants and allocates the split-K counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_a_chain_of_decode_kernels_replayed_with_pdl_gives_the_bits_it_gives_without():
    inp = chain_inputs()
    run = lambda: decode_layers(inp)  # noqa: E731
    switch(False)
    graph_off, out_off = captured(run)
    graph_off.replay()
    ref = out_off.clone()
    assert torch.isfinite(ref).all() and ref.float().abs().sum(1).gt(0).all()  # real rows, not zeros
    assert torch.equal(run(), ref), "PDL off: eager and graph differ"  # the same kernels either way

    switch(True)
    eager = run()
    assert torch.equal(eager, ref), f"eager launches with PDL: {differ(eager, ref)}"
    graph_on, out_on = captured(run)
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(REPLAYS):  # no sync in the loop: the replays run back to back
        graph_on.replay()
        bad += (out_on != ref).any()
    bad_off = torch.zeros_like(bad)
    for _ in range(20):
        graph_off.replay()
        bad_off += (out_off != ref).any()
    assert bad_off.item() == 0, f"{bad_off.item()} of 20 PDL-off replays differ: not deterministic without PDL"
    assert bad.item() == 0, f"{bad.item()} of {REPLAYS} replays with PDL differ from the result without (a race)"
