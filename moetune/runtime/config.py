"""Every knob of the bundled runtime in one dataclass, and how the "auto" values are resolved."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moetune.errors import MoetuneError
from moetune.kernels import attention
from moetune.models import DTYPES, ModelSpec, get_model

log = logging.getLogger("moetune")

# activation dtype, expert-weight dtype: the kernel's dtypes, plus fp32 for the torch reference path on a CPU
RUNTIME_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    name: (act, weight) for name, (act, weight, _) in DTYPES.items()
} | {"fp32": (torch.float32, torch.float32)}


@dataclass(slots=True)
class EngineConfig:
    model: str = "mixtral-8x7b"  # preset name from moetune.models.PRESETS
    checkpoint: str | None = None  # HF safetensors folder; its config.json, if any, overrides the preset's shapes
    load_format: str = "auto"  # "auto" (safetensors if checkpoint else dummy) | "dummy" | "safetensors"
    dtype: str = "auto"  # "bf16" | "fp16" | "fp8" (e4m3 experts, per-expert scale, rest bf16) | "fp32" | "auto"
    device: str = "auto"  # "cuda" | "cpu" | "auto"
    tuned_configs: str | None = None  # extra folder searched first for MoE config tables
    use_tuned_tables: bool = True
    moe_backend: str = "triton"  # "triton" (fused kernel) | "torch" (float32 reference path)
    tensor_parallel_size: int = 1  # ranks (GPUs; processes on a CPU) that each hold 1/tp of every layer
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096  # prefill chunk budget per step
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.90
    kvcache_block_size: int = 16
    enforce_eager: bool = False  # no CUDA graphs
    dense_dtype: str = "auto"  # qkv/o/lm_head weights: "fp8" (e4m3, per-row scale) | "bf16"/"fp16" (= dtype's
    #                            activations) | "auto": fp8 when dtype is fp8
    fused_norm_rope: bool = True  # Triton add+RMSNorm and RoPE+KV-write kernels; False: the eager torch ops
    decode_partition_tokens: int = 0  # split-KV decode attention: tokens per program; 0 = chosen by batch size
    fused_router: bool = True  # triton MoE at decode sizes: router linear + routing + fp8 x quant in one launch
    seed: int = 0


_INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
             "bos_token_id", "eos_token_id")  # fmt: skip
CONFIG_TYPES: dict[str, type | tuple[type, ...]] = dict.fromkeys(_INT_KEYS, int) | {
    "rms_norm_eps": (int, float), "rope_theta": (int, float)}  # fmt: skip


def spec_from_checkpoint(preset: ModelSpec, folder: Path) -> ModelSpec:
    """The preset, with shapes taken from the checkpoint's config.json when it has one."""
    path = folder / "config.json"
    if not path.is_file():
        return preset
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoetuneError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(hf, dict):
        raise MoetuneError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    for key, value in hf.items():  # a wrong type would otherwise fail far away, in a tensor shape
        want = CONFIG_TYPES.get(key)
        if want and value is not None and (isinstance(value, bool) or not isinstance(value, want)):
            kind = "an integer" if want is int else "a number"
            raise MoetuneError(f"{path}: {key} must be {kind}, found {type(value).__name__} {value!r}")
    if hf.get("model_type", "mixtral") != "mixtral":
        raise MoetuneError(f"{path}: model_type is {hf.get('model_type')!r}; this runtime runs Mixtral only")
    if hf.get("tie_word_embeddings"):
        raise MoetuneError(f"{path}: tied input/output embeddings are not supported (Mixtral does not tie them)")
    heads = hf.get("num_attention_heads", preset.num_heads)
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    spec = dataclasses.replace(
        preset,
        hidden_size=hf.get("hidden_size", preset.hidden_size),
        intermediate_size=hf.get("intermediate_size", preset.intermediate_size),
        num_layers=hf.get("num_hidden_layers", preset.num_layers),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", preset.num_kv_heads),
        head_dim=hf.get("head_dim") or hf.get("hidden_size", preset.hidden_size) // heads,
        vocab_size=hf.get("vocab_size", preset.vocab_size),
        num_experts=hf.get("num_local_experts", preset.num_experts),
        top_k=hf.get("num_experts_per_tok", preset.top_k),
        rms_norm_eps=hf.get("rms_norm_eps", preset.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", preset.rope_theta))),
        max_position_embeddings=hf.get("max_position_embeddings", preset.max_position_embeddings),
        bos_token_id=hf.get("bos_token_id") or preset.bos_token_id,
        eos_token_id=hf.get("eos_token_id") or preset.eos_token_id,
    )
    if spec != preset:
        spec = dataclasses.replace(spec, name=f"{preset.name}@{folder.name}")
        log.info("model shapes come from %s", path)
    return spec


def bf16_weight_bytes(spec: ModelSpec) -> int:
    H, D = spec.hidden_size, spec.head_dim
    attn = H * (spec.num_heads + 2 * spec.num_kv_heads) * D + spec.num_heads * D * H
    moe = spec.num_experts * (3 * H * spec.intermediate_size + H)
    return 2 * (2 * spec.vocab_size * H + spec.num_layers * (attn + moe + 2 * H) + H)


def resolve(config: EngineConfig) -> tuple[EngineConfig, ModelSpec]:
    """A copy of config with every "auto" replaced by what will be used, and the model's shapes."""
    cfg = dataclasses.replace(config)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device not in ("cuda", "cpu"):
        raise MoetuneError(f"unknown device {cfg.device!r}; choose cuda or cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MoetuneError("device 'cuda' was asked for but torch sees no GPU; use device='cpu'")
    if cfg.load_format == "auto":
        cfg.load_format = "safetensors" if cfg.checkpoint else "dummy"
    if cfg.load_format not in ("dummy", "safetensors"):
        raise MoetuneError(f"unknown load_format {cfg.load_format!r}; choose auto, dummy or safetensors")
    if cfg.load_format == "safetensors" and not cfg.checkpoint:
        raise MoetuneError("load_format 'safetensors' needs a checkpoint folder")
    if cfg.checkpoint and not Path(cfg.checkpoint).is_dir():
        raise MoetuneError(f"checkpoint folder {cfg.checkpoint} does not exist")
    if cfg.tuned_configs and not Path(cfg.tuned_configs).is_dir():
        raise MoetuneError(f"tuned_configs folder {cfg.tuned_configs} does not exist; pass the folder of tables")
    if cfg.moe_backend not in ("triton", "torch"):
        raise MoetuneError(f"unknown moe_backend {cfg.moe_backend!r}; choose triton or torch")
    spec = get_model(cfg.model)
    if cfg.checkpoint:
        spec = spec_from_checkpoint(spec, Path(cfg.checkpoint))
    _check_tp(cfg, spec)
    if cfg.dtype == "auto":
        # on a CPU: float32 for the torch reference; the fused kernel takes 16-bit activations only
        cpu_dtype = "fp32" if cfg.moe_backend == "torch" else "bf16"
        cfg.dtype = cpu_dtype if cfg.device == "cpu" else _auto_gpu_dtype(spec, cfg)
    if cfg.dtype not in RUNTIME_DTYPES:
        raise MoetuneError(f"unknown dtype {cfg.dtype!r}; choose one of: auto, {', '.join(RUNTIME_DTYPES)}")
    if cfg.dtype == "fp32" and cfg.moe_backend == "triton":
        raise MoetuneError("dtype fp32 runs only with moe_backend='torch'; the fused kernel takes bf16/fp16/fp8")
    if cfg.device == "cpu" and cfg.moe_backend == "triton" and not attention.INTERPRETED:
        raise MoetuneError(
            "moe_backend 'triton' on a CPU runs in Triton's interpreter: set TRITON_INTERPRET=1 before Python "
            "imports moetune, or use moe_backend='torch'"
        )
    act = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[RUNTIME_DTYPES[cfg.dtype][0]]
    if cfg.dense_dtype == "auto":
        cfg.dense_dtype = "fp8" if cfg.dtype == "fp8" else act
    if cfg.dense_dtype not in ("fp8", act):
        raise MoetuneError(f"dense_dtype {cfg.dense_dtype!r} with dtype {cfg.dtype}: choose auto, fp8 or {act}")
    if cfg.decode_partition_tokens < 0:
        raise MoetuneError(f"decode_partition_tokens must be 0 (auto) or positive, got {cfg.decode_partition_tokens}")
    if cfg.max_model_len > spec.max_position_embeddings:
        log.info("max_model_len %d capped at the model's %d positions", cfg.max_model_len, spec.max_position_embeddings)
        cfg.max_model_len = spec.max_position_embeddings
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kvcache_block_size"):
        if getattr(cfg, name) < 1:
            raise MoetuneError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.kvcache_block_size & (cfg.kvcache_block_size - 1):
        raise MoetuneError(f"kvcache_block_size must be a power of two, got {cfg.kvcache_block_size}")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise MoetuneError(f"gpu_memory_utilization must be in (0, 1], got {cfg.gpu_memory_utilization}")
    return cfg, spec


def _check_tp(cfg: EngineConfig, spec: ModelSpec) -> None:
    tp = cfg.tensor_parallel_size
    if tp < 1:
        raise MoetuneError(f"tensor_parallel_size must be at least 1, got {tp}")
    for what in ("num_heads", "num_kv_heads", "intermediate_size"):  # each rank holds whole heads, equal N
        if getattr(spec, what) % tp:
            raise MoetuneError(
                f"tensor_parallel_size {tp} does not divide {spec.name}'s {what} ({getattr(spec, what)})"
            )
    if cfg.device == "cuda" and tp > torch.cuda.device_count():
        raise MoetuneError(f"tensor_parallel_size {tp} needs {tp} GPUs; torch sees {torch.cuda.device_count()}")


def _auto_gpu_dtype(spec: ModelSpec, cfg: EngineConfig) -> str:
    """bf16 when its weights leave room for KV cache and activations, else fp8 experts (half the bytes)."""
    budget = torch.cuda.get_device_properties(0).total_memory * cfg.gpu_memory_utilization
    # per rank: ~1/tp of the weights (embeddings and lm_head are replicated, a small share of Mixtral's)
    need = bf16_weight_bytes(spec) / cfg.tensor_parallel_size * 1.1  # 10% for activations, graphs, KV cache
    dtype = "bf16" if need <= budget else "fp8"
    log.info("dtype auto: %s (bf16 weights %.1f GB, budget %.1f GB)", dtype, need / 1.1e9, budget / 1e9)
    return dtype
