"""Start-up check of the active MoE config table: a server that says it is healthy must not answer 500.

A table can pass its JSON schema and still break the kernel (`"BLOCK_SIZE_M": 16.0` equals 16 for the
schema but is a float to Triton; a sidecar entry can lack a knob). So before the weights load, run the fused
kernel once with the config every decode batch bucket and every table entry a prefill can reach picks, on
random weights of the served shape, and compare it with the float32 reference. The first failure stops
start-up with one line naming the file and M. It also compiles every config before the first request:
measured on an H100, a first wave of 64 requests otherwise waited 5.8 s (p50) for its first token.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from moetune.errors import MoetuneError
from moetune.models import ModelSpec
from moetune.runtime.config import RUNTIME_DTYPES, EngineConfig, resolve
from moetune.runtime.model_runner import graph_batch_sizes, moe_tables
from moetune.tables import ConfigTable, nearest, sidecar_path

log = logging.getLogger("moetune")

TOLERANCE = 0.1  # relative error: far above fp8/bf16 rounding, far below what a wrong config computes


def _source(table: ConfigTable, M: int) -> str:
    """The file the config for M comes from: the sidecar for our extra-knob configs, else the table."""
    assert table.path is not None
    return str(sidecar_path(table.path) if nearest(table.configs, M) in table.ours else table.path)


def check_moe_table(config: EngineConfig) -> None:
    """Raise MoetuneError naming the file and M if any config the server can pick fails or computes garbage."""
    cfg, spec = resolve(config)
    if cfg.moe_backend != "triton":
        return
    # the table a rank reads is for its expert shard (N = intermediate / tp), as moe_tables looks it up
    shard = dataclasses.replace(spec, intermediate_size=spec.intermediate_size // cfg.tensor_parallel_size)
    table = moe_tables(cfg, shard).active
    if table.path is None:
        return  # vLLM's default configs: nothing of the user's to check
    try:
        _run_buckets(cfg, spec, shard.intermediate_size, table)
    finally:  # hand the check's memory back: the KV cache is sized from what the GPU has free
        if cfg.device == "cuda":
            torch.cuda.empty_cache()


def _run_buckets(cfg: EngineConfig, spec: ModelSpec, N: int, table: ConfigTable) -> None:
    from moetune.kernels.fused_moe import fused_moe, quantize_fp8_per_expert
    from moetune.kernels.reference import moe_reference, rel_err

    act, expert = RUNTIME_DTYPES[cfg.dtype]
    act = torch.bfloat16 if act == torch.float32 else act  # the kernel takes 16-bit activations only
    dev, E, H = torch.device(cfg.device), spec.num_experts, spec.hidden_size
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * N, H, generator=g, device=dev, dtype=act) / H**0.5
    w2 = torch.randn(E, H, N, generator=g, device=dev, dtype=act) / N**0.5
    s13 = s2 = None
    if expert == torch.float8_e4m3fn:
        (w13, s13), (w2, s2) = quantize_fp8_per_expert(w13), quantize_fp8_per_expert(w2)
    t0 = time.perf_counter()
    prefill = {m for m in table.configs if m <= cfg.max_num_batched_tokens}
    buckets = sorted(set(graph_batch_sizes(cfg.max_num_seqs)) | prefill)
    for M in buckets:
        x = torch.randn(M, H, generator=g, device=dev, dtype=act)
        logits = torch.randn(M, E, generator=g, device=dev, dtype=torch.float32)
        conf = table.pick(M)
        try:
            err = rel_err(fused_moe(x, logits, w13, w2, spec.top_k, conf, s13, s2),
                          moe_reference(x, logits, w13, w2, spec.top_k, s13, s2))  # fmt: skip
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise MoetuneError(
                f"{_source(table, M)}: M={M}: config {conf} fails in the fused-MoE kernel ({type(e).__name__}: {first})"
            ) from None
        if not err < TOLERANCE:
            raise MoetuneError(f"{_source(table, M)}: M={M}: config {conf} computes wrong results "
                               f"(relative error {err:.3g} against the reference)")  # fmt: skip
    log.info("MoE table %s: token counts %s run and match the reference (%.1f s)",
             table.path, buckets, time.perf_counter() - t0)  # fmt: skip
