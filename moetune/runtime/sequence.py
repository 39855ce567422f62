"""One request as the scheduler sees it: its tokens, how many are in the KV cache, and where."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
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

    @property
    def scheduled_token_ids(self) -> list[int]:
        """The tokens this step computes: the next prefill chunk, or the last token in a decode."""
        start = self.num_cached_tokens
        return self.token_ids[start : start + self.num_scheduled_tokens]

    def __reduce__(self) -> tuple:
        # sent to tensor-parallel workers each step: this step's tokens only (the history grows every
        # decode step and the KV cache already holds it) and no sampling state (only rank 0 samples)
        return ScheduledSeq, (
            self.num_cached_tokens,
            self.num_scheduled_tokens,
            self.block_table,
            self.scheduled_token_ids,
        )


@dataclass(slots=True)
class ScheduledSeq:
    """A worker's view of a Sequence: all that the model runner reads to build one step's inputs."""

    num_cached_tokens: int
    num_scheduled_tokens: int
    block_table: list[int]
    scheduled_token_ids: list[int]

    @property
    def last_token(self) -> int:
        return self.scheduled_token_ids[-1]


StepSeq = Sequence | ScheduledSeq  # what ModelRunner builds a step from: rank 0's sequence or a worker's view
