"""Pure-torch float32 reference of the whole Mixtral MoE layer: the ground truth for every test."""

from __future__ import annotations

import torch
from torch import Tensor


def route_reference(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral routing: softmax in float32, top-k, renormalise. Returns weights [T, k] and ids [T, k]."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    return weights / weights.sum(dim=-1, keepdim=True), ids


def dequantize(w: Tensor, scale: Tensor | None) -> Tensor:
    """Weights as float32; fp8 weights carry one scale per expert ([E])."""
    if scale is None:
        return w.float()
    return w.float() * scale.float().view(-1, *([1] * (w.dim() - 1)))


def moe_reference(
    x: Tensor,  # [T, K]
    router_logits: Tensor,  # [T, E]
    w13: Tensor,  # [E, 2N, K]: gate (w1) rows, then up (w3) rows
    w2: Tensor,  # [E, K, N]
    top_k: int,
    w13_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
) -> Tensor:
    """sum_k weight_k * W2_e (silu(W1_e x) * W3_e x), all in float32. Returns [T, K] float32."""
    weights, ids = route_reference(router_logits, top_k)
    w13f, w2f = dequantize(w13, w13_scale), dequantize(w2, w2_scale)
    N = w2.shape[2]
    xf = x.float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        h = xf[token] @ w13f[e].T  # [t, 2N]
        act = torch.nn.functional.silu(h[:, :N]) * h[:, N:]  # [t, N]
        out.index_add_(0, token, (act @ w2f[e].T) * weights[token, slot, None])
    return out


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref||, the accuracy measure used everywhere in moetune."""
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
