"""benchmarks/decode_step.py's launch counter on the tiny model: the fused kernels cut a decode step's
launches (the full script is smoke-run by hand: `python benchmarks/decode_step.py --model tiny --out X`).
The engines run on DEVICE: the CPU's interpreter, or the GPU (count_launches counts on either)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import DEVICE

from moetune.kernels import activation, fused_moe, linear_fp8
from moetune.runtime import EngineConfig, LLMEngine


@pytest.fixture(autouse=True)
def restore_kernel_switches(monkeypatch):
    """set_options writes module switches (KERNEL_SWITCHES); each test gets them back as they were."""
    for module, attr in ((fused_moe, "FOLD_TOPK_SUM"), (fused_moe, "FOLD_NORM"), (activation, "ROW_PASS_MAX_FEW_ROWS"),
                         (linear_fp8, "DEFAULT_CONFIGS")):  # fmt: skip
        monkeypatch.setattr(module, attr, getattr(module, attr))


def load_bench():
    path = Path(__file__).parents[1] / "benchmarks" / "decode_step.py"
    spec = importlib.util.spec_from_file_location("decode_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_fused_norm_and_rope_cut_launches_per_decode_step():
    bench = load_bench()
    eng = LLMEngine(EngineConfig(model="tiny", device=DEVICE, dtype="bf16", max_model_len=64, enforce_eager=True))
    folds_off = {k: False for k in bench.KERNEL_SWITCHES}
    try:
        bench.set_options(eng, fused=False, partition=128, **folds_off)
        old = bench.count_launches(eng, 16)
        bench.set_options(eng, fused=True, partition=0, **folds_off)
        new = bench.count_launches(eng, 16)
    finally:
        eng.close()
    layers = eng.spec.num_layers
    assert old["total"] - new["total"] >= 30 * layers, (old, new)  # ~39 fewer launches per layer
    assert new["triton"] == old["triton"] + 3 * layers + 1  # 2 norms + rope per layer, final norm


def test_one_launch_router_then_the_decode_folds_cut_launches_with_fp8_experts():
    """The router: -2 launches a layer (the router linear and quantize_rows; route_and_align + quantize_rows
    -> route_decode). Then the folds: top-k sum into GEMM2 (-1), one-pass SiLU + quantise instead of zeroing,
    SiLU and quantise (-2), the post-attention add + RMSNorm inside the router (-1). One engine: each eager
    step takes seconds under the interpreter."""
    bench = load_bench()
    eng = LLMEngine(EngineConfig(model="tiny", device=DEVICE, dtype="fp8", max_model_len=64, enforce_eager=True))
    folds_off = {k: False for k in bench.KERNEL_SWITCHES}
    try:
        bench.count_launches(eng, 16)  # the first step also allocates the split-K counters, once
        bench.set_options(eng, fused=True, partition=0, router=False, **folds_off)
        apart = bench.count_launches(eng, 16)
        bench.set_options(eng, fused=True, partition=0, router=True, **folds_off)
        router = bench.count_launches(eng, 16)
        bench.set_options(eng, fused=True, partition=0)  # the defaults: every fold on
        folded = bench.count_launches(eng, 16)
    finally:
        eng.close()
    layers = eng.spec.num_layers
    assert apart["total"] - router["total"] == 2 * layers, (apart, router)
    assert apart["triton"] - router["triton"] == layers
    assert router["total"] - folded["total"] == 4 * layers, (router, folded)
    assert router["torch_ops"] - folded["torch_ops"] == layers  # the amax buffer's zeroing
