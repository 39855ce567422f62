"""Per-request sampling parameters and the sampler: greedy, or temperature with top-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moetune.errors import MoetuneError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # a per-request generator: the same tokens whatever else is in the batch

    def validate(self) -> None:
        if self.temperature < 0:
            raise MoetuneError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoetuneError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise MoetuneError(f"max_tokens must be at least 1, got {self.max_tokens}")


def sample(
    logits: Tensor,  # [B, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],  # per row; None = the engine's generator
    default: torch.Generator,
) -> list[int]:
    """One token per row. Greedy rows are one batched argmax; only sampled rows pay for softmax."""
    out = logits.argmax(dim=-1)  # [B]
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)  # [V]
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always survives)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(drop, 0.0))
        out[i] = torch.multinomial(probs, 1, generator=generators[i] or default)[0]
    return out.tolist()
