"""benchmarks/decode_step.py's launch counter on the tiny model: the fused kernels cut a decode step's
launches (the full script is smoke-run by hand: `python benchmarks/decode_step.py --model tiny --out X`).
The engines run on DEVICE: the CPU's interpreter, or the GPU (count_launches counts on either)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import DEVICE

from moetune.runtime import EngineConfig, LLMEngine


def load_bench():
    path = Path(__file__).parents[1] / "benchmarks" / "decode_step.py"
    spec = importlib.util.spec_from_file_location("decode_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_fused_norm_and_rope_cut_launches_per_decode_step():
    bench = load_bench()
    eng = LLMEngine(EngineConfig(model="tiny", device=DEVICE, dtype="bf16", max_model_len=64, enforce_eager=True))
    try:
        bench.set_options(eng, fused=False, partition=128)
        old = bench.count_launches(eng, 16)
        bench.set_options(eng, fused=True, partition=0)
        new = bench.count_launches(eng, 16)
    finally:
        eng.close()
    layers = eng.spec.num_layers
    assert old["total"] - new["total"] >= 30 * layers, (old, new)  # ~39 fewer launches per layer
    assert new["triton"] == old["triton"] + 3 * layers + 1  # 2 norms + rope per layer, final norm


def test_one_launch_router_cuts_two_launches_per_layer_with_fp8_experts():
    bench = load_bench()
    eng = LLMEngine(EngineConfig(model="tiny", device=DEVICE, dtype="fp8", max_model_len=64, enforce_eager=True))
    try:
        bench.count_launches(eng, 16)  # the first step also allocates the split-K counters, once
        bench.set_options(eng, fused=True, partition=0, router=False)
        old = bench.count_launches(eng, 16)
        bench.set_options(eng, fused=True, partition=0, router=True)
        new = bench.count_launches(eng, 16)
    finally:
        eng.close()
    layers = eng.spec.num_layers
    assert old["total"] - new["total"] == 2 * layers, (old, new)  # the router linear and quantize_rows
    assert old["triton"] - new["triton"] == layers  # route_and_align + quantize_rows -> route_decode
