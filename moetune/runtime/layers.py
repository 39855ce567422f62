"""Mixtral's layers as HF defines them: RMSNorm, rotate_half RoPE, GQA attention over a paged KV cache,
and the sparse MoE block on the fused kernel (or the float32 reference).

Every parameter carries a `weight_loader(param, checkpoint_tensor, shard_id)` that cuts this rank's
slice out of a full checkpoint tensor (nano-vllm's scheme), so tensor parallelism only needs TP_RANK and
TP_SIZE set (set_tp, before the model is built) and a process group for the two all-reduces below;
tp.py sets both up. Single-GPU runs keep TP_SIZE = 1 and never touch torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetune.errors import MoetuneError
from moetune.kernels.attention import INTERPRETED, paged_decode_attention, paged_decode_attention_reference
from moetune.kernels.linear_fp8 import FP8, fp8_linear, linear_fp8_reference, quantize_per_channel
from moetune.kernels.norm import add_rms_norm, add_rms_norm_reference
from moetune.kernels.reference import moe_reference
from moetune.kernels.rope import rope_and_cache, rope_and_cache_reference
from moetune.models import ModelSpec
from moetune.runtime.context import PaddedPrefill, get_context
from moetune.tables import ConfigTable

TP_RANK, TP_SIZE = 0, 1  # read through this module (layers.TP_SIZE): `from ... import TP_SIZE` copies it


def set_tp(rank: int, size: int) -> None:
    global TP_RANK, TP_SIZE
    TP_RANK, TP_SIZE = rank, size


def shard(t: Tensor, dim: int) -> Tensor:
    """This rank's contiguous slice of a full checkpoint tensor along dim."""
    size = t.shape[dim] // TP_SIZE
    return t.narrow(dim, TP_RANK * size, size)


def all_reduce(x: Tensor) -> Tensor:
    if TP_SIZE > 1:
        torch.distributed.all_reduce(x)
    return x


def default_loader(param: nn.Parameter, loaded: Tensor, shard_id: object = None) -> None:
    param.data.copy_(loaded)


def new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, loader: Callable = default_loader):
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader
    return param


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """One expert's weight to e4m3 with one float32 scale (amax / 448): the kernel's per-expert layout."""
    from moetune.kernels.fused_moe import quantize_fp8_per_expert

    wq, scale = quantize_fp8_per_expert(w[None])
    return wq[0], scale[0]


def triton_runs(device: torch.device) -> bool:
    """Triton kernels run on a GPU or under Triton's interpreter; a plain CPU takes the torch references."""
    return device.type == "cuda" or INTERPRETED


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, build: Build):
        super().__init__()
        self.eps = eps
        self.weight = new_param((size,), build.act_dtype, build.device)
        self.norm = add_rms_norm if build.fused and triton_runs(build.device) else add_rms_norm_reference

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Normalise x (after adding residual, which then becomes x itself). Float32 inside, as HF."""
        out, residual_out = self.norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, residual_out)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [P, D/2] float32 for kernels/rope.py (HF's rotate_half convention)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, device: torch.device):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)


class Linear(nn.Module):
    """y = x W^T, W [out, in] in the activation dtype, or e4m3 with a float32 scale per output row
    (`weight_scale`). rows(loaded, shard_id) -> (first row, this rank's rows) says where a checkpoint
    tensor goes; per-row scales let each shard (q, k, v) be quantised on its own as it arrives."""

    def __init__(self, out_features: int, in_features: int, build: Build, rows: Callable | None = None):
        super().__init__()
        self.fp8 = build.dense_fp8
        self.weight = new_param((out_features, in_features), FP8 if self.fp8 else build.act_dtype, build.device,
                                self._load)  # fmt: skip
        self.weight_scale = new_param((out_features,), torch.float32, build.device) if self.fp8 else None
        self.rows = rows or (lambda loaded, shard_id: (0, loaded))
        self.fp8_fn = fp8_linear if triton_runs(build.device) else linear_fp8_reference

    def _load(self, param: nn.Parameter, loaded: Tensor, shard_id: object) -> None:
        first, w = self.rows(loaded, shard_id)
        dst = param.data.narrow(0, first, w.shape[0])
        if self.fp8:
            wq, scale = quantize_per_channel(w.to(param.device))
            dst.copy_(wq)
            self.weight_scale.data.narrow(0, first, w.shape[0]).copy_(scale)
        else:
            dst.copy_(w)

    def forward(self, x: Tensor) -> Tensor:
        return self.fp8_fn(x, self.weight, self.weight_scale) if self.fp8 else F.linear(x, self.weight)


def _decode_kernel(device: torch.device) -> Callable[..., Tensor]:
    return paged_decode_attention if triton_runs(device) else paged_decode_attention_reference


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, build: Build):
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads // TP_SIZE, spec.num_kv_heads // TP_SIZE
        self.head_dim = D = spec.head_dim
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        self.qkv_proj = Linear(self.q_size + 2 * self.kv_size, spec.hidden_size, build, self._qkv_rows)
        # row-parallel: each rank holds the columns of its heads
        self.o_proj = Linear(spec.hidden_size, self.q_size, build, lambda loaded, _: (0, shard(loaded, 1)))
        self.rotary = rotary
        self.k_cache: Tensor | None = None  # [num_blocks, block_size, Hkv, D], set by the model runner
        self.v_cache: Tensor | None = None
        fused = build.fused and triton_runs(build.device)
        self.rope_and_cache = rope_and_cache if fused else rope_and_cache_reference
        self.decode_attention = _decode_kernel(build.device)
        self.partition_tokens = build.decode_partition_tokens

    def _qkv_rows(self, loaded: Tensor, shard_id: str) -> tuple[int, Tensor]:
        return {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}[shard_id], shard(loaded, 0)

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        T, D = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        ctx = get_context()
        # q and k rotated in place; K/V written to the cache (None only while the runner profiles memory)
        self.rope_and_cache(qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads, self.num_kv_heads,
                            self.k_cache, self.v_cache, ctx.slot_mapping)  # fmt: skip
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(T, self.num_heads, D), k.view(T, self.num_kv_heads, D), v.view(T, self.num_kv_heads, D)
        if ctx.is_prefill:
            o = self._prefill(q, k, v)
        else:
            o = self.decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens,
                                      partition_tokens=self.partition_tokens)  # fmt: skip
        return all_reduce(self.o_proj(o.reshape(T, self.q_size)))

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal SDPA: fresh prompts of similar lengths in one padded call, the rest per sequence (a later
        chunk of a chunked prefill also sees its cached tokens)."""
        ctx, group = get_context(), self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        padded = ctx.padded_prefill(q.device)
        if padded is not None:
            self._prefill_padded(q, k, v, padded, out)
        for i, start in enumerate(ctx.start_positions):
            if padded is not None and i in padded.seqs:
                continue
            a, b = ctx.cu_seqlens_q[i], ctx.cu_seqlens_q[i + 1]
            if start == 0:
                ks, vs, mask = k[a:b], v[a:b], None  # [t, Hkv, D]
            else:  # this chunk's K/V are already in the cache, after the earlier ones
                end = start + b - a
                blocks = ctx.block_tables[i, : -(-end // self.k_cache.shape[1])].long()
                ks = self.k_cache[blocks].flatten(0, 1)[:end]  # [end, Hkv, D]
                vs = self.v_cache[blocks].flatten(0, 1)[:end]
                query_pos = torch.arange(start, end, device=q.device)
                mask = torch.arange(end, device=q.device)[None, :] <= query_pos[:, None]  # [t, end]
            ks, vs = (t.transpose(0, 1).repeat_interleave(group, dim=0)[None] for t in (ks, vs))  # [1, H, S, D]
            qs = q[a:b].transpose(0, 1)[None]  # [1, H, t, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None)
            out[a:b] = o[0].transpose(0, 1)  # [t, H, D]
        return out

    def _prefill_padded(self, q: Tensor, k: Tensor, v: Tensor, p: PaddedPrefill, out: Tensor) -> None:
        """One SDPA over fresh prompts padded to the longest: [B, H, L, D] with the step's causal, padding-aware
        mask. Why: 256 short prompts cost 256 SDPA calls and their slicing in each of 32 layers, eager Python."""
        group = self.num_heads // self.num_kv_heads
        qs = q[p.rows].transpose(1, 2)  # [B, H, L, D]
        ks, vs = (t[p.rows].repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))  # [B, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask).transpose(1, 2)  # [B, L, H, D]
        out[p.rows[p.valid]] = o[p.valid]


# Which table the MoE layers read: the tuned one, vLLM's default, or the default with BLOCK_SIZE_M/K and fuse_silu
# changed (numerically equivalent, rounds otherwise: the parity check's noise floor). Every rank derives its own.
TABLE_CHOICES = ("tuned", "default", "default-perturbed")


@dataclass
class MoeTables:
    """The config tables every MoE layer reads; one shared object, so one switch flips all layers."""

    tuned: ConfigTable
    untuned: ConfigTable
    which: str = "tuned"  # one of TABLE_CHOICES

    def __post_init__(self) -> None:
        self.select(self.which)

    def select(self, which: str) -> None:
        if which not in TABLE_CHOICES:
            raise MoetuneError(f"unknown MoE table {which!r}; choose one of {', '.join(TABLE_CHOICES)}")
        self.which = which

    @property
    def active(self) -> ConfigTable:
        if self.which == "tuned":
            return self.tuned
        return self.untuned.perturbed() if self.which == "default-perturbed" else self.untuned


@dataclass(frozen=True)
class Build:
    """How every layer is built: activation and expert dtypes, device, MoE backend, the shared tables."""

    act_dtype: torch.dtype
    expert_dtype: torch.dtype
    device: torch.device
    moe_backend: str
    tables: MoeTables
    dense_fp8: bool = False  # qkv, o and lm_head weights in e4m3 (router and embeddings stay 16-bit)
    fused: bool = True  # one Triton kernel each for add + RMSNorm and RoPE + KV write (else eager torch)
    decode_partition_tokens: int = 0  # split-KV partition size of decode attention; 0: by batch size
    fused_router: bool = True  # triton MoE: router linear, routing and fp8 x quantisation in one launch at decode
    #                            sizes (kernels/route_decode.py); else F.linear, then fused_moe from the logits


def _fused_moe() -> tuple[Callable[..., Tensor], Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    """fused_moe (from router logits), fused_moe_routed (from the router weight), fused_moe_normed (from the
    router weight, the add + RMSNorm before it included)."""
    try:
        from moetune.kernels.fused_moe import fused_moe, fused_moe_normed, fused_moe_routed
    except ImportError as e:
        raise MoetuneError(f"moe_backend 'triton' needs moetune.kernels.fused_moe ({e}); use 'torch'") from None
    return fused_moe, fused_moe_routed, fused_moe_normed


class SparseMoeBlock(nn.Module):
    """Router linear -> softmax in float32 -> top-k -> renormalise -> experts: inside fused_moe_routed from the
    router linear on (fused_router), inside fused_moe after it otherwise (or the float32 reference)."""

    def __init__(self, spec: ModelSpec, build: Build):
        super().__init__()
        E, H, self.N = spec.num_experts, spec.hidden_size, spec.intermediate_size // TP_SIZE
        self.top_k, self.backend, self.tables = spec.top_k, build.moe_backend, build.tables
        self.act_dtype = act_dtype = build.act_dtype
        expert_dtype, device = build.expert_dtype, build.device
        self.gate = new_param((E, H), act_dtype, device)  # router: replicated on every rank
        self.w13 = new_param((E, 2 * self.N, H), expert_dtype, device, self._load_expert)  # gate rows, then up
        self.w2 = new_param((E, H, self.N), expert_dtype, device, self._load_expert)
        self.fp8 = expert_dtype == torch.float8_e4m3fn
        self.w13_scale = new_param((E,), torch.float32, device) if self.fp8 else None
        self.w2_scale = new_param((E,), torch.float32, device) if self.fp8 else None
        self._staged: dict[int, tuple[Tensor, set[str]]] = {}  # fp8: w1/w3 of an expert until both arrive
        self.fused_moe, self.fused_moe_routed, self.fused_moe_normed = (
            _fused_moe() if self.backend == "triton" else (None, None, None))
        self.fused_router = build.fused_router  # per layer, so a benchmark can flip it on a built model

    def _load_expert(self, param: nn.Parameter, loaded: Tensor, shard_id: tuple[str, int]) -> None:
        which, e = shard_id
        if which == "w2":
            w = shard(loaded, 1).to(param.device)  # [H, N]
            if self.fp8:
                self.w2.data[e], self.w2_scale.data[e] = quantize_fp8(w)
            else:
                self.w2.data[e].copy_(w)
            return
        rows = slice(0, self.N) if which == "w1" else slice(self.N, 2 * self.N)
        w = shard(loaded, 0).to(param.device)  # [N, H]
        if not self.fp8:
            self.w13.data[e, rows].copy_(w)
            return
        # one scale covers gate and up, so quantise once both are here; stage at most one expert's pair
        if e not in self._staged:
            self._staged[e] = (torch.empty(self.w13.shape[1:], dtype=self.act_dtype, device=w.device), set())
        buf, seen = self._staged[e]
        buf[rows].copy_(w)
        seen.add(which)
        if len(seen) == 2:
            self.w13.data[e], self.w13_scale.data[e] = quantize_fp8(buf)
            del self._staged[e]

    def forward_normed(self, x: Tensor, residual: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """(self(norm(x, residual)[0]), x + residual): the decoder layer's post-attention add + RMSNorm, then
        this block. With the Triton norm and router, the norm runs inside the router's launch at decode sizes
        (fused_moe_normed); otherwise the norm, then forward."""
        if self.backend != "triton" or not self.fused_router or norm.norm is not add_rms_norm:
            x, residual = norm(x, residual)
            return self(x), residual
        config = self.tables.active.pick(x.shape[0])
        out, residual = self.fused_moe_normed(x, residual, norm.weight, norm.eps, self.gate, self.w13, self.w2,
                                              self.top_k, config, self.w13_scale, self.w2_scale)  # fmt: skip
        return all_reduce(out), residual

    def forward(self, x: Tensor) -> Tensor:  # [T, H]
        experts = (self.w13, self.w2, self.top_k)
        if self.backend == "torch":
            out = moe_reference(x, F.linear(x, self.gate), *experts, self.w13_scale, self.w2_scale).to(x.dtype)
            return all_reduce(out)
        config = self.tables.active.pick(x.shape[0])  # host-side: a CUDA graph bakes in its batch's config
        if self.fused_router:  # the router linear inside (one launch with routing at decode sizes)
            out = self.fused_moe_routed(x, self.gate, *experts, config, self.w13_scale, self.w2_scale)
        else:
            out = self.fused_moe(x, F.linear(x, self.gate), *experts, config, self.w13_scale, self.w2_scale)
        return all_reduce(out)
