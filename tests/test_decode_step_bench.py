"""benchmarks/decode_step.py's launch counter on the tiny model: the fused kernels cut a decode step's
launches (the full script is smoke-run by hand: `python benchmarks/decode_step.py --model tiny --out X`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from moetune.runtime import EngineConfig, LLMEngine


def test_fused_norm_and_rope_cut_launches_per_decode_step():
    path = Path(__file__).parents[1] / "benchmarks" / "decode_step.py"
    spec = importlib.util.spec_from_file_location("decode_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    eng = LLMEngine(EngineConfig(model="tiny", device="cpu", dtype="bf16", max_model_len=64, enforce_eager=True))
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
