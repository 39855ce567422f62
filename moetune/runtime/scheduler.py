"""Continuous batching: prefill first (chunked under a token budget), else one decode step for all running.

Invariant that guarantees progress: at most one sequence is part-way through its prefill, and it is the
head of the waiting queue. Preempted sequences queue behind it, so blocks freed by preemption or by
finished sequences go to the head first, and the head never waits on a sequence queued after it.
"""

from __future__ import annotations

from collections import deque

from moetune.runtime.block_manager import BlockManager
from moetune.runtime.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager, eos_id: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.eos_id = eos_id
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences to run this step and whether the step is a prefill."""
        if seqs := self._schedule_prefill():
            return seqs, True
        if seqs := self._schedule_decode():
            return seqs, False
        if seqs := self._schedule_prefill():  # decode preempted every running sequence: their blocks are free
            return seqs, True
        raise RuntimeError("scheduler made no progress with requests pending")  # a bug, not a user error

    def _schedule_prefill(self) -> list[Sequence]:
        bm, budget = self.block_manager, self.max_num_batched_tokens
        active = len(self.running) + sum(1 for s in self.waiting if s.block_table)  # sequences holding blocks
        scheduled: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table and active >= self.max_num_seqs:
                break
            remaining = len(seq) - seq.num_cached_tokens
            room = (len(seq.block_table) + bm.num_free) * bm.block_size - seq.num_cached_tokens
            chunk = min(remaining, budget, room)
            if chunk <= 0:
                break
            active += not seq.block_table
            bm.grow(seq, seq.num_cached_tokens + chunk)
            seq.num_scheduled_tokens = chunk
            budget -= chunk
            scheduled.append(seq)
            if chunk < remaining:
                break  # stays at the head; the rest of its prompt comes next step
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        bm = self.block_manager
        scheduled: list[Sequence] = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not bm.can_grow(seq, len(seq)):  # the new token's K/V needs a slot
                if self.running:
                    self._preempt(self.running.pop())  # the youngest gives way
                else:
                    self._preempt(seq)
                    break
            else:
                bm.grow(seq, len(seq))
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.release(seq)
        seq.status = SequenceStatus.WAITING
        head_is_partial = bool(self.waiting and self.waiting[0].block_table)
        self.waiting.insert(1 if head_is_partial else 0, seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None]) -> None:
        """Record what the step computed; token None = a prefill chunk that did not reach the end."""
        for seq, token in zip(seqs, token_ids):
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if token is None:
                continue
            seq.token_ids.append(token)
            p = seq.params
            if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
                self._finish(seq, "stop")
            elif seq.num_completion_tokens >= p.max_tokens:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        for seq in (*self.waiting, *self.running):
            if seq.seq_id == seq_id:
                self._finish(seq, "abort")
                return seq
        return None
