"""Every Triton kernel compiles for an H100/H200 (sm_90) on this CPU-only machine, and the expert
GEMM gets Hopper's fast path: wgmma for 64-row tiles and a cp.async software pipeline. Every kernel
also compiles as a PDL launch (USE_PDL), which waits before its global accesses and changes nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).with_name("hopper_compile.py")
H100_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
    pytest.skip("this Triton build carries no ptxas to compile for sm_90", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(SCRIPT.parents[1]))
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


def test_every_kernel_compiles_for_hopper(compiled):
    failed = {name: r["error"] for name, r in compiled.items() if not r["ok"]}
    assert not failed
    assert len(compiled) >= 30
    assert all(r["shared"] <= H100_SHARED_LIMIT for r in compiled.values())


def test_gemm_uses_wgmma_for_64_row_tiles(compiled):
    for name, r in compiled.items():
        if name.startswith("moe_gemm/") and not name.removesuffix("/pdl").endswith("default-small-M"):
            assert r["wgmma"], f"{name} fell back from wgmma"


def test_gemm_weight_loads_are_software_pipelined(compiled):
    for dtype, elem in (("bf16", 2), ("fp16", 2), ("fp8", 1)):
        r = compiled[f"moe_gemm/{dtype}/gemm1/tuned-like"]  # BM=64 BN=128 BK=128, 4 stages
        one_stage = (64 * 128 + 128 * 128) * elem
        assert r["cp_async"] and r["shared"] >= r["stages"] * one_stage, f"{dtype}: loads not multi-buffered"


def test_w8a16_weight_loads_are_software_pipelined_with_and_without_split_k(compiled):
    """BLOCK_M=16 x tile once, weight tiles in num_stages - 1 buffers (measured layout of Triton 3.9's pipeliner)."""
    for name in ("small-M", "small-M/preload", "split-K"):  # preload: the K loop after the peeled step too
        r = compiled[f"linear_w8a16/{name}"]
        bn, bk = (64, 256) if name == "split-K" else (32, 256)
        assert r["cp_async"] and r["shared"] >= (r["stages"] - 1) * bk * bn, f"{name}: weight loads not multi-buffered"


def test_arrival_counters_release_and_acquire_and_the_last_program_reads_l2(compiled):
    """Split-K linears and split-KV attention reduce in the launch (moetune/kernels/splitk.py): an acq_rel
    atomic on the counter, then the partials loaded past L1 (.cg)."""
    for name in ("linear_w8a16/split-K", "decode_attention/partition=32", "decode_attention/partition=256"):
        for r in (compiled[name], compiled[name + "/pdl"]):
            assert r["acq_rel"] and r["cg_loads"] > 0, r


def test_decode_attention_does_not_spill_at_any_batch(compiled):
    """Its K/V loop already holds ~255 registers a thread; the merge after it must not push any to the stack.
    64-token tiles did: 2 KB of stack a thread at big batches, where the step then spent 55 ms of 80 in
    attention at batch 256 (H100, 2026-11-26); tiles are 32 tokens since."""
    for name in ("decode_attention/partition=32", "decode_attention/partition=32/pdl",
                 "decode_attention/partition=256", "decode_attention/partition=256/pdl"):  # fmt: skip
        if "stack" in compiled[name]:  # cuobjdump came with Triton
            assert compiled[name]["stack"] == 0, compiled[name]


def test_pdl_variants_wait_before_any_global_access_and_keep_the_pipeline(compiled):
    """USE_PDL=True: griddepcontrol.wait, then launch_dependents; no global load, store or atomic laid out
    before the wait but the fused norm's weight row, the decode router's weight and the w8a16 weight tile with
    PRELOAD=1 (loaded before it on purpose, moetune/kernels/pdl.py); shared memory, cp.async and wgmma as
    without PDL. Without USE_PDL, no griddepcontrol at all."""
    pdl = {name.removesuffix("/pdl"): r for name, r in compiled.items() if name.endswith("/pdl")}
    assert pdl.keys() == {name for name in compiled if not name.endswith("/pdl")}
    for name, r in pdl.items():
        base = compiled[name]
        assert r["launch_pdl"] and r["gdc_wait"] and r["gdc_launch"], name
        assert not (base["launch_pdl"] or base["gdc_wait"] or base["gdc_launch"]), name
        allowed = {"ld.global"} if name.startswith(("add_rms_norm/", "route_decode/", "linear_w8a16/small-M/preload"))\
            else set()  # fmt: skip
        assert set(r["before_wait"]) <= allowed, (name, r["before_wait"])
        assert {k: r[k] for k in ("shared", "cp_async", "wgmma")} == {k: base[k] for k in ("shared", "cp_async", "wgmma")}
    for dtype in ("bf16", "fp16"):  # of its three row loads (weight, x, residual), only the weight's
        r = compiled[f"add_rms_norm/{dtype}/pdl"]
        assert 0 < len(r["before_wait"]) <= r["global_loads"] / 3, r


def test_w8a16_fetches_weights_before_the_pdl_wait_as_configured(compiled):
    """PREFETCH=4 prefetches each program's K-slice into L2 before the wait (one 128-byte line per element:
    32 rows x 1 KB over 128 threads = 2 a thread); PRELOAD=1 loads one weight tile (32 x 256 B: four 16-byte
    loads a thread) and the scales; the default rows (both off: the prefetch measured slower) fetch nothing early."""
    for name, prefetches, loads in (("small-M", 0, 0), ("router", 0, 0), ("small-M/prefetch", 2, 0),
                                    ("small-M/preload", 0, 5), ("mid-M", 0, 0), ("large-M", 0, 0)):  # fmt: skip
        r = compiled[f"linear_w8a16/{name}/pdl"]
        assert (r["prefetch_before_wait"], len(r["before_wait"])) == (prefetches, loads), name


def test_w8a16_spills_nothing_and_decode_programs_fit_one_wave(compiled):
    """No w8a16 variant uses local memory or a stack frame. The decode row's programs fit the SMs at once:
    qkv at M=1 is 6144 / 32 x SPLIT_K 4 = 768 programs over 132 SMs, so it needs 6 an SM. Measured (triton 3.9,
    ptxas sm_90): 64 registers with or without the L2 prefetch (8 an SM); PRELOAD=1 takes 89 under PDL (5 an SM:
    660 < 768, a second wave), one reason the decode rows do not preload."""
    rows = {n: r for n, r in compiled.items() if n.startswith("linear_w8a16/")}
    if not all("regs" in r for r in rows.values()):
        pytest.skip("no cuobjdump in this Triton build")
    assert all(r["stack"] == 0 and r["local"] == 0 for r in rows.values()), rows

    def per_sm(r):  # registers are allocated 8 a thread at a time; 1 KB of shared memory is reserved a block
        regs = -(-r["regs"] // 8) * 8 * 32 * r["warps"]
        return min(65536 // regs, 233472 // (r["shared"] + 1024), 2048 // (32 * r["warps"]), 32)

    assert 132 * per_sm(rows["linear_w8a16/small-M/pdl"]) >= 768
    assert rows["linear_w8a16/small-M/prefetch/pdl"]["regs"] <= rows["linear_w8a16/small-M/pdl"]["regs"]
