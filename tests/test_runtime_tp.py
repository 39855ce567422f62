"""Tensor parallelism on a CPU: 2 gloo ranks (this process + one spawned worker) against the 1-rank engine."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch.distributed as dist
from conftest import tiny_engine_config

from moetune.errors import MoetuneError
from moetune.kernels.reference import rel_err
from moetune.runtime import EngineConfig, LLMEngine, SamplingParams
from moetune.runtime.sequence import ScheduledSeq, Sequence

PROMPTS = [
    [1, 22557, 28725, 19630, 434, 282, 28808],
    [1, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272, 17898, 3914, 28723],
    [1, 330],
    [1, 6312, 28709, 28808, 16693],
]


@contextmanager
def engine(checkpoint, **overrides) -> Iterator[LLMEngine]:
    queueing = dict(max_model_len=64, max_num_seqs=3, max_num_batched_tokens=16)  # + chunked prefill
    eng = LLMEngine(tiny_engine_config(checkpoint, **(queueing | overrides)))
    try:
        yield eng
    finally:
        eng.close()


def run_all(eng: LLMEngine, n: int = 6) -> tuple[list, list[list[int]]]:
    logits = [eng.prefill_logits(p) for p in PROMPTS[:2]]
    tokens = eng.generate(PROMPTS, [SamplingParams(max_tokens=n - i, ignore_eos=True) for i in range(len(PROMPTS))])
    return logits, tokens


def test_a_worker_is_sent_only_the_tokens_of_this_step():
    seq = Sequence(list(range(100)), SamplingParams())
    seq.num_cached_tokens, seq.num_scheduled_tokens, seq.block_table = 99, 1, [3, 5, 8, 9, 11, 12, 13]
    view = pickle.loads(pickle.dumps(seq))
    assert isinstance(view, ScheduledSeq) and view.scheduled_token_ids == [99] and view.last_token == 99
    assert (view.num_cached_tokens, view.block_table) == (99, seq.block_table)


def test_tp2_matches_tp1_logits_and_batched_greedy_tokens(tiny_checkpoint):
    with engine(tiny_checkpoint) as one:
        ref_logits, ref_tokens = run_all(one)
    with engine(tiny_checkpoint, tensor_parallel_size=2) as two:
        logits, tokens = run_all(two)
        assert two.runner.kv_cache.shape[-2] == 1  # 2 KV heads over 2 ranks
        assert two.runner.num_kv_blocks == one.runner.num_kv_blocks
        assert two.decode_step_time_us(2, 10, steps=2) > 0  # every rank times the same dummy batch
    for a, b in zip(logits, ref_logits):
        assert rel_err(a, b) < 1e-5
    assert tokens == ref_tokens


def test_tp2_with_the_fused_kernel_matches_tp1_greedy_tokens(tiny_checkpoint):
    """fp16 (bf16 rounding flips late greedy tokens of a random model, with or without TP)."""
    kw = dict(dtype="fp16", moe_backend="triton")
    with engine(tiny_checkpoint, **kw) as one:
        ref_logits, ref_tokens = run_all(one, n=4)
    with engine(tiny_checkpoint, tensor_parallel_size=2, **kw) as two:
        assert two.moe_table_path is None  # the tiny shard (N=48) has no tuned table: vLLM's default
        two.use_tuned_tables(False)  # mirrored on the worker
        logits, tokens = run_all(two, n=4)
    for a, b in zip(logits, ref_logits):
        assert rel_err(a, b) < 5e-3  # partial sums meet in fp16 through the all-reduce
    assert tokens == ref_tokens


@pytest.mark.parametrize(("tp", "message"), [(3, "does not divide tiny's num_heads"), (0, "at least 1")])
def test_bad_tensor_parallel_size_is_refused(tiny_checkpoint, tp, message):
    with pytest.raises(MoetuneError, match=message):
        LLMEngine(EngineConfig(model="tiny", checkpoint=str(tiny_checkpoint), device="cpu", tensor_parallel_size=tp))


def test_close_joins_the_workers_and_a_dead_worker_is_a_clear_error(tiny_checkpoint):
    with engine(tiny_checkpoint, tensor_parallel_size=2) as eng:
        procs = list(eng.workers.procs)
    assert not any(p.is_alive() for p in procs) and not multiprocessing.active_children()
    assert not dist.is_initialized()
    with engine(tiny_checkpoint, tensor_parallel_size=2) as eng:  # a second engine starts after the first
        worker = eng.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(MoetuneError, match=r"worker rank 1 \(exit code -9\) died"):
            eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2))
    assert not multiprocessing.active_children() and not dist.is_initialized()
    with engine(tiny_checkpoint) as one:  # back to a single process
        assert one.generate([PROMPTS[2]], SamplingParams(max_tokens=2, ignore_eos=True))[0]
