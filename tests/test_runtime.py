"""The bundled runtime on a CPU against transformers' Mixtral: same logits, same greedy tokens, under batching.
The engines with Triton kernels (moe_backend="triton") run on DEVICE: the GPU (CUDA graphs and all) when there
is one, else the CPU through the interpreter; the fp32 torch engines stay on the CPU on any machine."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tiny_engine_config

from moetune.kernels.reference import rel_err
from moetune.runtime import EngineConfig, LLMEngine, SamplingParams
from moetune.runtime import model_runner as model_runner_module

SENTENCE = [349, 264, 1369, 302, 1133, 1552, 5123, 28725, 395, 1215, 28723]
PROMPTS = [
    [1, 22557, 28725, 19630, 434, 282, 28808],
    [1, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272, 17898, 3914, 28723, 415, 2936, 9060, 285, 1142],
    [1, 330],
    [1, 1014] + SENTENCE + ([851] + SENTENCE) * 2,  # one sentence three times: a longer prompt
    [1, 6312, 28709, 28808, 16693],
]


def make_engine(checkpoint, **overrides) -> LLMEngine:
    return LLMEngine(tiny_engine_config(checkpoint, **overrides))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return make_engine(tiny_checkpoint)


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits)  # [n, V]


def test_prefill_logits_match_transformers(engine, tiny_hf_model):
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = tiny_hf_model(torch.tensor([prompt])).logits[0]
        out = engine.prefill_logits(prompt)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert engine.scheduler.block_manager.num_free == engine.runner.num_kv_blocks  # no state left behind


def test_greedy_decode_matches_transformers_token_for_token_with_close_logits(engine, tiny_hf_model, monkeypatch):
    seen: list[torch.Tensor] = []
    sample = model_runner_module.sample
    monkeypatch.setattr(
        model_runner_module, "sample", lambda logits, *a: seen.append(logits.clone()) or sample(logits, *a)
    )
    prompt, n = PROMPTS[1], 12
    tokens = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
    ref_tokens, ref_logits = hf_greedy(tiny_hf_model, prompt, n)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.cat(seen), ref_logits, atol=5e-5, rtol=1e-4)  # 1 prefill + 11 decode steps


def test_many_requests_batched_give_the_same_tokens_as_one_at_a_time(engine, tiny_checkpoint):
    # 3 slots for 5 requests, and a 10-token prefill budget: queueing, chunked prefill and decode interleave
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (6, 3, 9, 5, 7)]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params)]
    batched = make_engine(tiny_checkpoint, max_num_seqs=3, max_num_batched_tokens=10)
    assert batched.generate(PROMPTS, params) == alone
    assert [len(t) for t in alone] == [6, 3, 9, 5, 7]
    assert batched.scheduler.block_manager.num_free == batched.runner.num_kv_blocks


def test_preemption_when_kv_blocks_run_out_keeps_the_tokens(engine, tiny_checkpoint, monkeypatch):
    from moetune.runtime.block_manager import BlockManager
    from moetune.runtime.scheduler import Scheduler

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[1]]  # 19, 14, 17 and 30 tokens at the end: 7 blocks
    expected = [engine.generate([p], params)[0] for p in prompts]
    eng = make_engine(tiny_checkpoint)
    eng.scheduler.block_manager = BlockManager(4, eng.config.kvcache_block_size)
    preempted = []
    original = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq: preempted.append(seq.seq_id) or original(self, seq))
    assert eng.generate(prompts, params) == expected
    assert preempted
    assert eng.scheduler.block_manager.num_free == 4


def test_stop_tokens_eos_and_max_tokens(engine):
    prompt = PROMPTS[0]
    greedy = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop = greedy[3]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=[stop]))[0]
    assert out == greedy[: greedy.index(stop) + 1]  # the stop token itself is returned, as vLLM does

    rid = engine.add_request(prompt, SamplingParams(max_tokens=3))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert [o.new_token_ids[0] for o in outs] == greedy[:3]
    assert [o.finished for o in outs] == [False, False, True] and outs[-1].finish_reason == "length"

    eos, engine.scheduler.eos_id = engine.scheduler.eos_id, greedy[0]  # pretend the first token is EOS
    try:
        assert engine.generate([prompt], SamplingParams(max_tokens=8))[0] == greedy[:1]
        assert engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0] == greedy
    finally:
        engine.scheduler.eos_id = eos


def test_abort_frees_blocks_and_stops_outputs(engine):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    keep, drop = engine.add_request(PROMPTS[0], params), engine.add_request(PROMPTS[1], params)
    engine.step()
    engine.abort(drop)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {keep}
    assert engine.scheduler.block_manager.num_free == engine.runner.num_kv_blocks


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=123, ignore_eos=True)
    alone = engine.generate([PROMPTS[2]], sp)[0]
    other = SamplingParams(temperature=1.0, max_tokens=5)
    assert engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[2]], [other, sp, sp])[1:] == [alone, alone]
    greedy = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert alone != greedy  # it did sample
    top_only = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, ignore_eos=True)  # keeps just the top token
    assert engine.generate([PROMPTS[2]], top_only)[0] == greedy


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "empty"),
        ([1] * 100, SamplingParams(max_tokens=29), "exceeds max_model_len"),
        ([1, 32000], SamplingParams(), "token ids"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(top_p=0), "top_p"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_error(engine, prompt, params, message):
    from moetune.errors import MoetuneError

    with pytest.raises(MoetuneError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


def test_decode_step_timing_leaves_running_requests_untouched(engine):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = engine.generate([PROMPTS[1]], params)[0]
    rid = engine.add_request(PROMPTS[1], params)
    tokens = [t for o in engine.step() + engine.step() for t in o.new_token_ids]
    us = engine.decode_step_time_us(batch_size=4, context_len=100, steps=2)
    assert us > 0
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    assert tokens == expected


def test_dummy_weights_are_seeded_and_generate(tiny_checkpoint):
    a = LLMEngine(EngineConfig(model="tiny", device=DEVICE, max_model_len=64, max_num_seqs=4, seed=1))
    b = LLMEngine(EngineConfig(model="tiny", device=DEVICE, max_model_len=64, max_num_seqs=4, seed=1))
    assert a.config.load_format == "dummy" and a.config.dtype == "bf16"  # the fused kernel takes 16-bit
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    out = a.generate([PROMPTS[0]], params)
    assert out == b.generate([PROMPTS[0]], params) and len(out[0]) == 4
    logits = a.prefill_logits(PROMPTS[3])
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10  # a sane scale, not blown up by depth


def test_fp8_experts_stay_close_to_the_float32_model(tiny_checkpoint, tiny_hf_model):
    eng = make_engine(tiny_checkpoint, dtype="fp8", dense_dtype="bf16")  # the experts alone (fp8 dense: test_linear_fp8)
    moe = eng.runner.model.model.layers[0].block_sparse_moe
    assert moe.w13.dtype == torch.float8_e4m3fn and moe.w13_scale.shape == (4,) and (moe.w13_scale > 0).all()
    prompt = PROMPTS[3]
    with torch.no_grad():
        ref = tiny_hf_model(torch.tensor([prompt])).logits[0]
    assert rel_err(eng.prefill_logits(prompt), ref) < 0.08


@pytest.mark.parametrize(("dtype", "tol"), [("fp16", 5e-3), ("bf16", 3e-2), ("fp8", 0.08)])
def test_fused_moe_backend_matches_transformers(tiny_checkpoint, tiny_hf_model, dtype, tol):
    """The GPU configuration (Triton MoE + Triton decode attention): through the interpreter on a CPU, compiled
    (decode through the CUDA graphs) on a GPU."""
    eng = make_engine(tiny_checkpoint, dtype=dtype, moe_backend="triton", device=DEVICE,
                      dense_dtype="bf16" if dtype == "fp8" else "auto")  # fmt: skip
    prompt, n = PROMPTS[1], 8
    with torch.no_grad():
        ref = tiny_hf_model(torch.tensor([prompt])).logits[0]
    assert rel_err(eng.prefill_logits(prompt).cpu(), ref) < tol
    if dtype == "fp16":  # 16-bit rounding flips late bf16 tokens of a random model; fp16 stays exact here
        tokens = eng.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert tokens == hf_greedy(tiny_hf_model, prompt, n)[0]


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_one_launch_router_gives_the_logits_of_the_router_linear(tiny_checkpoint, dtype, monkeypatch):
    """fused_router on (route_decode up to 16 tokens) and off (F.linear, then fused_moe): the same logits,
    bit for bit, for prompts of 1 to 7 tokens (one launch) and 18 (F.linear inside fused_moe_routed). Eager
    decode (enforce_eager) on a GPU too, so every decode step calls route_decode, as on the CPU."""
    from moetune.kernels import fused_moe

    calls = []
    real = fused_moe.route_decode
    monkeypatch.setattr(fused_moe, "route_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    engines = {on: make_engine(tiny_checkpoint, dtype=dtype, moe_backend="triton", dense_dtype="bf16", fused_router=on,
                               device=DEVICE, enforce_eager=True) for on in (True, False)}  # fmt: skip
    assert [e.runner.model.model.layers[0].block_sparse_moe.fused_router for e in engines.values()] == [True, False]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for prompt in (PROMPTS[2][:1], PROMPTS[0], PROMPTS[1]):
        on, off = (engines[k].prefill_logits(prompt) for k in (True, False))
        assert torch.equal(on, off), f"{len(prompt)} tokens"
    assert engines[True].generate([PROMPTS[4]], params) == engines[False].generate([PROMPTS[4]], params)
    assert len(calls) == 2 * (2 + 4)  # 2 layers x (prompts of 1 and 7 tokens, 4 steps making 4 tokens)


def test_fp32_with_the_fused_kernel_is_refused(tiny_checkpoint):
    from moetune.errors import MoetuneError

    with pytest.raises(MoetuneError, match="fp32 runs only with moe_backend='torch'"):
        make_engine(tiny_checkpoint, moe_backend="triton")


def test_padded_graph_bucket_gives_the_eager_logits_and_only_writes_the_trash_block(engine):
    """What a decode CUDA graph replays, run eagerly: 3 real rows padded to a bucket of 4."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    for p in PROMPTS[:3]:
        engine.add_request(p, params)
    engine.step(), engine.step()  # prefill, then one decode
    seqs, r = list(engine.scheduler.running), engine.runner
    ids, positions, slots, lens = r._decode_inputs(seqs)
    inputs = (torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), torch.tensor(lens, dtype=torch.int32))
    tables = r._block_tables(seqs)
    with torch.inference_mode():  # as the runner's own methods run
        eager = r._decode_eager(*inputs, tables).clone()  # writes the real rows' K/V; the replay rewrites the same
        cache = r.kv_cache.clone()
        r.graph_inputs = r._graph_buffers(8)
        r.graph_inputs["context_lens"].fill_(7)  # stale rows from an earlier, bigger batch
        r._fill_graph_inputs(4, *inputs, tables)
        r._run_bucket(4)
    torch.testing.assert_close(r.graph_inputs["logits"][:3], eager)
    assert torch.isfinite(r.graph_inputs["logits"][3]).all()
    torch.testing.assert_close(r.kv_cache[:, :, :-1], cache[:, :, :-1])  # only the trash block changed
    for s in seqs:
        engine.abort(s.seq_id)
    assert engine.scheduler.block_manager.num_free == r.num_kv_blocks


def test_fresh_prompts_in_one_padded_attention_call_match_one_call_per_prompt(monkeypatch):
    """Prefill attention: the padded batch (fresh prompts of similar lengths) against the per-sequence loop,
    on odd lengths and a one-token prompt (GQA: 2 query heads per KV head)."""
    from types import SimpleNamespace

    from moetune.runtime import context as context_module
    from moetune.runtime import layers
    from moetune.runtime.context import Context, reset_context, set_context

    H, Hkv, D, lens = 4, 2, 8, [5, 1, 7, 6]
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    attn = SimpleNamespace(num_heads=H, num_kv_heads=Hkv)
    attn._prefill_padded = lambda *a: layers.Attention._prefill_padded(attn, *a)
    cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
    step = lambda: set_context(Context(is_prefill=True, cu_seqlens_q=cu, start_positions=[0] * len(lens)))  # noqa: E731
    step()
    try:
        calls = []
        real = layers.F.scaled_dot_product_attention
        monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        padded = layers.Attention._prefill(attn, q, k, v)
        assert len(calls) == 1  # one call for all four prompts
        assert layers.Attention._prefill(attn, q, k, v).equal(padded) and len(calls) == 2  # a second layer: same layout
        monkeypatch.setattr(context_module, "PAD_WASTE", 0.0)  # never pad: the per-sequence loop
        step()  # a new step's context: the layout is decided per step
        looped = layers.Attention._prefill(attn, q, k, v)
        assert len(calls) == 2 + len(lens)
    finally:
        reset_context()
    assert rel_err(padded, looped) < 1e-6


def test_warm_up_runs_every_shape_and_leaves_the_engine_idle(engine):
    bm = engine.scheduler.block_manager
    free = bm.num_free
    engine.warm_up()
    assert not engine.has_unfinished() and bm.num_free == free
    assert engine.generate([[1, 5, 9]], SamplingParams(max_tokens=2))  # still serves
