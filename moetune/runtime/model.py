"""Mixtral: embeddings -> N x (RMSNorm, attention, RMSNorm, sparse MoE) with residuals -> RMSNorm -> lm_head.

Parameter names follow the HF checkpoint, except that q/k/v are merged into `qkv_proj` and each layer's
experts are stacked into `w13` [E, 2N, H] and `w2` [E, H, N], the layouts the fused kernel reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetune.models import ModelSpec
from moetune.runtime.layers import Attention, Build, Linear, RMSNorm, RotaryEmbedding, SparseMoeBlock, new_param


class Embedding(nn.Module):  # vocabulary sharding would go here for TP > 1; Mixtral's is small enough to replicate
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = new_param((vocab, hidden), dtype, device)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, build: Build):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, build)
        self.self_attn = Attention(spec, rotary, build)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, build)
        self.block_sparse_moe = SparseMoeBlock(spec, build)

    def forward(self, positions: Tensor, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        return self.block_sparse_moe.forward_normed(x, residual, self.post_attention_layernorm)


class MixtralModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int, build: Build):
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size, build.act_dtype, build.device)
        rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, build.device)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary, build) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, build)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class MixtralForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int, build: Build):
        super().__init__()
        self.spec = spec
        self.model = MixtralModel(spec, max_positions, build)
        self.lm_head = Linear(spec.vocab_size, spec.hidden_size, build)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:  # [T] -> hidden states [T, H]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: Tensor) -> Tensor:  # [T, H] -> [T, V] float32
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def init_dummy(self, seed: int) -> None:
        """Random weights made on the model's device (no host copy): N(0, 1/fan_in) keeps every layer's
        output near unit scale through any depth, so timings see realistic routing and no inf/NaN."""
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        params = dict(self.named_parameters())
        for name, p in params.items():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("_scale"):  # fp8 weights: N(0, 1) in e4m3 times this scale
                p.fill_(params[name.removesuffix("_scale")].shape[-1] ** -0.5)
            elif p.dtype == torch.float8_e4m3fn:  # N(0, 1), in chunks of rows to bound the bf16 scratch
                rows = p.view(-1, p.shape[-1])
                step = max(1, (1 << 26) // p.shape[-1])
                for i in range(0, rows.shape[0], step):
                    n = min(step, rows.shape[0] - i)
                    rows[i : i + n].copy_(torch.randn(n, p.shape[-1], dtype=torch.bfloat16, device=p.device,
                                                      generator=gen))  # fmt: skip
            else:
                p.normal_(0.0, 1.0 if name.endswith("embed_tokens.weight") else p.shape[-1] ** -0.5, generator=gen)

    @staticmethod
    def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF Mixtral checkpoint must hold, with its full (unsharded) shape, in layer order."""
        H, N, D, V = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (H,)
            shapes[p + "post_attention_layernorm.weight"] = (H,)
            shapes[p + "self_attn.q_proj.weight"] = (spec.num_heads * D, H)
            shapes[p + "self_attn.k_proj.weight"] = (spec.num_kv_heads * D, H)
            shapes[p + "self_attn.v_proj.weight"] = (spec.num_kv_heads * D, H)
            shapes[p + "self_attn.o_proj.weight"] = (H, spec.num_heads * D)
            shapes[p + "block_sparse_moe.gate.weight"] = (spec.num_experts, H)
            for e in range(spec.num_experts):
                shapes[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (N, H)
                shapes[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (N, H)
                shapes[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (H, N)
        shapes["model.norm.weight"] = (H,)
        shapes["lm_head.weight"] = (V, H)
        return shapes

    @staticmethod
    def param_for(hf_name: str) -> tuple[str, object]:
        """(our parameter name, shard id for its weight_loader) for one checkpoint tensor."""
        parts = hf_name.split(".")
        if "experts" in parts:  # model.layers.i.block_sparse_moe.experts.e.w1.weight
            e, which = int(parts[-3]), parts[-2]
            return ".".join(parts[:-4] + ["w2" if which == "w2" else "w13"]), (which, e)
        if parts[-2] in ("q_proj", "k_proj", "v_proj"):
            return ".".join(parts[:-2] + ["qkv_proj", "weight"]), parts[-2][0]
        if parts[-2] == "gate":
            return ".".join(parts[:-1]), None
        return hf_name, None
