"""Per-step attention metadata, set by the model runner and read by every attention layer.

Keeping it out of the call signature leaves each layer as `forward(positions, hidden_states)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

PAD_WASTE = 2.0  # fresh prompts share one padded attention call while padding at most doubles its work


@dataclass
class PaddedPrefill:
    """Fresh prompts of one prefill step laid out as a padded batch, for one attention call per layer."""

    seqs: set[int]  # which sequences of the step it holds
    rows: Tensor  # [B, L] int64: token index of each position, 0 for padding
    valid: Tensor  # [B, L] bool: a real token
    mask: Tensor  # [B, 1, L, L] bool: causal and padding-aware (every row sees its key 0, so none is empty)


@dataclass
class Context:
    is_prefill: bool = False
    slot_mapping: Tensor | None = None  # [T] int64: cache slot (block * block_size + offset) of each new token
    # prefill: host-side lists, one entry per sequence (prefill runs eagerly, so loops over them are fine)
    cu_seqlens_q: list[int] = field(default_factory=list)  # new tokens of sequence i are [cu[i], cu[i+1])
    start_positions: list[int] = field(default_factory=list)  # tokens already cached before this chunk
    # both: block tables; decode: tokens each sequence attends to, itself included (0 = padding row)
    block_tables: Tensor | None = None  # [B, max_blocks] int32
    context_lens: Tensor | None = None  # [B] int32
    _padded: dict = field(default_factory=dict, repr=False)  # device -> PaddedPrefill | None, built once a step

    def padded_prefill(self, device: torch.device) -> PaddedPrefill | None:
        """The step's fresh prompts as one padded batch, or None when they are fewer than two or padding would
        more than PAD_WASTE-fold their attention work. Built by the first layer, reused by the others."""
        if device not in self._padded:
            self._padded[device] = self._build_padded(device)
        return self._padded[device]

    def _build_padded(self, device: torch.device) -> PaddedPrefill | None:
        fresh = [i for i, start in enumerate(self.start_positions) if start == 0]
        lens = [self.cu_seqlens_q[i + 1] - self.cu_seqlens_q[i] for i in fresh]
        if len(fresh) < 2 or len(fresh) * max(lens) ** 2 > PAD_WASTE * sum(n * n for n in lens):
            return None
        pos = torch.arange(max(lens), device=device)  # [L]
        starts = torch.tensor([self.cu_seqlens_q[i] for i in fresh], device=device)  # [B]
        valid = pos[None, :] < torch.tensor(lens, device=device)[:, None]  # [B, L]
        rows = torch.where(valid, starts[:, None] + pos[None, :], 0)  # [B, L]
        mask = (pos[None, :] <= pos[:, None])[None, None] & valid[:, None, None, :]  # [B, 1, L, L]
        return PaddedPrefill(set(fresh), rows, valid, mask)


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
