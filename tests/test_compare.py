"""The tuned-vs-default parity check on the real runtime (tiny model, Triton MoE through the interpreter):
two correct configs agree within tolerance; a deliberately wrong expert on the tuned side is caught."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_engine_config

from moetune import tables
from moetune.errors import MoetuneError
from moetune.runtime import LLMEngine
from moetune.runtime.model_runner import ModelRunner
from moetune.serve import compare as cmp

W = cmp.Workload(batch_sizes=[1], context_len=8, prompt_len=8, steps=1, ttft_reps=1, check_prompts=1,
                 check_tokens=3, check_prompt_len=5)  # fmt: skip
TUNED = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=2, num_stages=2)
# The engine runs the fused kernel on the CPU (a CPU table, the interpreter's rounding: the noise floor between
# two tilings is > 0 there; a GPU's tensor cores may sum both tilings alike). On a GPU the same check runs on
# Mixtral: `python -m moetune.serve` (benchmarks/gpu_session.sh serve).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fused kernel on a CPU needs the interpreter, "
                                "off on a GPU machine; there `python -m moetune.serve` runs this comparison")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    """fp16 with the fused kernels and a tuned table whose config differs from the default (other tiles)."""
    folder = tmp_path_factory.mktemp("tables")
    tables.save_table(folder / tables.table_filename(4, 96, tables.CPU_DEVICE_NAME, "fp16"), {1: TUNED, 64: TUNED})
    eng = LLMEngine(tiny_engine_config(tiny_checkpoint, dtype="fp16", moe_backend="triton", tuned_configs=str(folder)))
    assert eng.moe_table_path is not None
    yield eng
    eng.close()


def test_teacher_forced_decode_logits_equal_prefill_logits(engine):
    prompt, forced = [1, 415, 2936], [9060, 285]
    decode = engine.teacher_forced_logits(prompt, forced)
    prefill = engine.prefill_logits(prompt + forced)[-2:]
    assert decode.shape == (2, engine.spec.vocab_size)
    torch.testing.assert_close(decode, prefill, atol=3e-2, rtol=1e-2)  # fp16: decode and prefill round apart
    assert engine.scheduler.block_manager.num_free == engine.runner.num_kv_blocks


def test_teacher_forced_batch_decodes_the_prompts_together_as_they_would_alone(engine):
    prompts, forced = [[1, 415, 2936], [1, 330, 6312, 28709, 28808]], [[9060, 285], [22557, 28725]]
    batch = engine.teacher_forced_logits_batch(prompts, forced)  # one decode step of batch 2 per forced token
    assert batch.shape == (2, 2, engine.spec.vocab_size)
    for row, p, f in zip(batch, prompts, forced):
        torch.testing.assert_close(row, engine.teacher_forced_logits(p, f), atol=3e-2, rtol=1e-2)
    assert engine.scheduler.block_manager.num_free == engine.runner.num_kv_blocks
    with pytest.raises(MoetuneError, match="one forced list per prompt"):
        engine.teacher_forced_logits_batch(prompts, [[9060], [22557, 28725]])


def test_perturbed_default_changes_only_block_size_m_and_k_and_fuse_silu(engine):
    default = tables.ConfigTable.untuned(4)
    for M in (1, 4, 5, 256):
        a, b = default.pick(M), default.perturbed().pick(M)
        assert {**a, "BLOCK_SIZE_K": b["BLOCK_SIZE_K"], "BLOCK_SIZE_M": b["BLOCK_SIZE_M"], "fuse_silu": 1} == b
        assert b["BLOCK_SIZE_K"] in (32, 64, 128, 256) and b["BLOCK_SIZE_M"] in (16, 64)
        assert b["BLOCK_SIZE_K"] != a["BLOCK_SIZE_K"] and b["BLOCK_SIZE_M"] != a["BLOCK_SIZE_M"]
    assert tables.perturb_rounding(dict(a, fuse_silu=1))["fuse_silu"] == 0
    assert "fuse_silu" not in tables.perturb_rounding(dict(a, kernel="gemv"))
    with pytest.raises(MoetuneError, match="unknown MoE table"):
        engine.use_tables("fastest")


def test_two_correct_configs_match_within_tolerance_and_the_noise_floor_is_measured(engine):
    r = cmp.compare(engine, W)
    p = r["parity"][0]
    assert p["verdict"] == "MATCH" and p["steps"] == 2 * 3 and p["max_abs_logit_diff"] <= p["tolerance"]
    assert p["noise_floor"] > 0  # other tiles move fp16 logits: the runs really used other configs
    assert p["tolerance"] == max(p["rtol_floor"], cmp.NOISE_FACTOR * p["noise_floor"])
    assert engine.moe_table_path is not None  # compare() leaves the tuned table on, for serving
    text = cmp.report(r)
    assert "parity prompt 0: MATCH" in text and f"noise floor {p['noise_floor']:.3g}" in text


def test_a_wrong_expert_on_the_tuned_side_is_caught(engine, monkeypatch):
    moe = engine.runner.model.model.layers[0].block_sparse_moe
    real = ModelRunner.use_tables
    good = moe.w13.data.clone()

    def swap_experts_when_tuned(self, which: str) -> None:  # a "config" that reads expert 1's weights for 0
        moe.w13.data.copy_(good)
        if which == "tuned":
            moe.w13.data[0] = good[1]
        real(self, which)

    monkeypatch.setattr(ModelRunner, "use_tables", swap_experts_when_tuned)
    try:
        r = cmp.compare(engine, W)
    finally:
        moe.w13.data.copy_(good)
    p = r["parity"][0]
    assert p["verdict"] == "MISMATCH" and p["max_abs_logit_diff"] > 5 * p["tolerance"]
    assert p["max_abs_logit_diff"] > 100 * p["noise_floor"] > 0  # far above two correct configs' drift
