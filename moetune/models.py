"""Model shapes, tensor-parallel sharding and dtype names: the one place for these facts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.errors import MoetuneError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    top_k: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2


PRESETS: dict[str, ModelSpec] = {
    "mixtral-8x7b": ModelSpec(
        name="mixtral-8x7b", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=32000, num_experts=8, top_k=2,
    ),
    "mixtral-8x22b": ModelSpec(
        name="mixtral-8x22b", hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, vocab_size=32000, num_experts=8, top_k=2, max_position_embeddings=65536,
    ),
    # Small enough for Triton's CPU interpreter; keeps the real vocabulary so the real tokenizer works.
    "tiny": ModelSpec(
        name="tiny", hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, vocab_size=32000, num_experts=4, top_k=2, max_position_embeddings=1024,
    ),
}


def get_model(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise MoetuneError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class MoeShape:
    """What one rank's fused-MoE layer computes: E experts, hidden K, per-rank intermediate N."""

    E: int
    N: int
    K: int
    top_k: int


def moe_shape(model: ModelSpec, tp: int = 1) -> MoeShape:
    """vLLM shards each expert's intermediate dimension evenly over the TP ranks."""
    if tp < 1:
        raise MoetuneError(f"--tp {tp}: the tensor-parallel degree must be at least 1")
    if model.intermediate_size % tp:
        raise MoetuneError(
            f"--tp {tp} does not divide {model.name}'s intermediate size {model.intermediate_size}; "
            f"use a divisor such as 1, 2, 4 or 8"
        )
    return MoeShape(E=model.num_experts, N=model.intermediate_size // tp, K=model.hidden_size, top_k=model.top_k)


# CLI name -> (activation dtype, weight dtype, suffix vLLM puts in the table file name)
DTYPES: dict[str, tuple[torch.dtype, torch.dtype, str | None]] = {
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "fp16": (torch.float16, torch.float16, None),
    "fp8": (torch.bfloat16, torch.float8_e4m3fn, "fp8_w8a8"),
}


# What `moetune run`, `moetune bench` (and, to follow, serve) use when --dtype is not given: one
# default, so a bench finds the table a run just made. fp8 w8a8 is what Hopper deployments serve.
DEFAULT_DTYPE = "fp8"


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise MoetuneError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return name
