"""One request as the scheduler sees it: its tokens, how many are in the KV cache, and where."""

from __future__ import annotations

import itertools
from enum import Enum, auto

import torch

from moetune.runtime.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # needs prefill (new, part-way through a chunked prefill, or preempted)
    RUNNING = auto()  # prefilled; decodes one token per step
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, generator: torch.Generator | None = None):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0  # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0  # tokens this step computes
        self.block_table: list[int] = []
        self.params = params
        self.generator = generator
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]
