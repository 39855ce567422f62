"""The scheduler and block manager alone (no model): chunking, slots, preemption and progress."""

from __future__ import annotations

from moetune.runtime.block_manager import BlockManager
from moetune.runtime.sampling import SamplingParams
from moetune.runtime.scheduler import Scheduler
from moetune.runtime.sequence import Sequence, SequenceStatus


def make(num_blocks=8, block_size=4, max_num_seqs=4, budget=100) -> Scheduler:
    return Scheduler(max_num_seqs, budget, BlockManager(num_blocks, block_size), eos_id=2)


def seq(n: int, max_tokens: int = 4) -> Sequence:
    return Sequence([5] * n, SamplingParams(max_tokens=max_tokens))


def test_prefill_is_chunked_under_the_token_budget_and_resumes_at_the_head():
    s = make(budget=6)
    a, b = seq(4), seq(7)
    s.add(a), s.add(b)
    batch, prefill = s.schedule()
    assert prefill and batch == [a, b] and (a.num_scheduled_tokens, b.num_scheduled_tokens) == (4, 2)
    s.postprocess(batch, [9, None])  # a finished its prompt and sampled; b is part-way
    assert list(s.running) == [a] and list(s.waiting) == [b] and b.num_cached_tokens == 2
    batch, prefill = s.schedule()
    assert prefill and batch == [b] and b.num_scheduled_tokens == 5  # prefill first, decode waits
    s.postprocess(batch, [9])
    batch, prefill = s.schedule()
    assert not prefill and batch == [a, b]


def test_max_num_seqs_caps_the_running_batch():
    s = make(max_num_seqs=2)
    for _ in range(3):
        s.add(seq(3))
    batch, _ = s.schedule()
    assert len(batch) == 2 and len(s.waiting) == 1


def test_decode_preempts_the_youngest_and_it_is_prefilled_again_later():
    s = make(num_blocks=2, block_size=4)
    a, b = seq(4, max_tokens=3), seq(4, max_tokens=3)
    s.add(a), s.add(b)
    s.postprocess(*_run(s))  # both prefilled: one full block each
    batch, prefill = s.schedule()  # each now needs a second block; there is none
    assert not prefill and batch == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_cached_tokens == 0
    assert list(s.waiting) == [b] and len(b) == 5  # keeps its sampled token, recomputed on re-prefill


def test_a_lone_decode_that_preempts_itself_hands_its_blocks_to_the_partial_prefill():
    s = make(num_blocks=3, block_size=4)
    a, b = seq(4), seq(10)
    a.token_ids.append(9)  # running with one block, needs a second for its new token
    a.status, a.num_cached_tokens, a.block_table = SequenceStatus.RUNNING, 4, [0]
    b.num_cached_tokens, b.block_table = 8, [1, 2]  # part-way through its prompt, holding the other blocks
    s.block_manager.free.clear()
    s.running.append(a), s.waiting.append(b)
    batch, prefill = s.schedule()
    assert prefill and batch == [b] and b.num_scheduled_tokens == 2
    assert list(s.waiting) == [a] and a.block_table == []


def _run(s: Scheduler):
    batch, _ = s.schedule()
    return batch, [9] * len(batch)
