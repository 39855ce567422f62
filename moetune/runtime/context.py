"""Per-step attention metadata, set by the model runner and read by every attention layer.

Keeping it out of the call signature leaves each layer as `forward(positions, hidden_states)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
