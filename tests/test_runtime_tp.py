"""Tensor parallelism on a CPU: 2 gloo ranks (this process + one spawned worker) against the 1-rank engine."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
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
        ref_blocks = one.runner.num_kv_blocks
    with engine(tiny_checkpoint, tensor_parallel_size=2) as two:
        logits, tokens = run_all(two)
        assert two.runner.kv_cache.shape[-2] == 1  # 2 KV heads over 2 ranks
        assert two.runner.num_kv_blocks == ref_blocks
        assert two.decode_step_time_us(2, 10, steps=2) > 0  # every rank times the same dummy batch
    for a, b in zip(logits, ref_logits):
        assert rel_err(a, b) < 1e-5
    assert tokens == ref_tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks on a CPU: the fused kernel needs the interpreter, "
                    "off on a GPU machine (TP on GPUs: `python -m moetune.serve --tp 2`)")
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


TUNED = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=2, num_stages=2)


def save_fused_table(folder, n: int, tp: int) -> None:
    """A tiny fp16 table whose configs run fuse_silu=1 (in its sidecar): SiLU on GEMM1's unrounded output, which
    surely rounds otherwise than the default (other tiles alone may round to the same bits on a short input)."""
    import triton

    from moetune import tables

    path = folder / tables.table_filename(4, n, tables.CPU_DEVICE_NAME, "fp16")
    sidecar = {"table": path.name, "device": tables.CPU_DEVICE_NAME, "dtype": "fp16", "timings_meaningful": False,
               "shape": {"E": 4, "N": n, "K": 64, "top_k": 2, "tp": tp},
               "versions": {"torch": torch.__version__, "triton": triton.__version__, "moetune": "test"},
               "entries": {m: {"config": {**TUNED, "fuse_silu": 1}} for m in ("1", "64")}}  # fmt: skip
    tables.save_table(path, {1: TUNED, 64: TUNED}, sidecar)


def swapped_expert_checkpoint(src, dst):
    """The checkpoint with layer 0's experts 0 and 1 exchanged: a wrong expert, on every rank's shard."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(src / "model.safetensors")
    p = "model.layers.0.block_sparse_moe.experts."
    for w in ("w1", "w2", "w3"):
        sd[f"{p}0.{w}.weight"], sd[f"{p}1.{w}.weight"] = sd[f"{p}1.{w}.weight"], sd[f"{p}0.{w}.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tp2_teacher_forced_logits_follow_the_table_match_tp1_and_catch_a_wrong_expert(tiny_checkpoint, tmp_path):
    """The serve parity check under TP2 (fp16, the fused kernel): its teacher-forced decode logits equal TP1's on
    the same weights, the tuned table (found for each rank's N=48 shard) moves them as on TP1, and a swapped expert
    is a MISMATCH far beyond the tolerance. (2x H200, bf16: tuned vs default and the noise floor were exactly 0;
    not the TP path going blind, on a CPU at least; benchmarks/tp_parity_check.py measures it on the GPUs.)"""
    from moetune.serve import compare as cmp

    save_fused_table(tmp_path, 96, 1)
    save_fused_table(tmp_path, 48, 2)  # each TP2 rank's shard
    prompts, forced = [PROMPTS[0], PROMPTS[3]], [[9060, 285], [330, 6312]]
    kw = dict(dtype="fp16", moe_backend="triton", tuned_configs=str(tmp_path))

    def forced_logits(eng) -> dict:
        out = {}
        for which in ("default", "default-perturbed", "tuned"):
            eng.use_tables(which)  # every rank re-derives its table
            state = eng._call("table_state")
            assert [(r["rank"], r["which"]) for r in state] == [(i, which) for i in range(len(state))]
            assert len({r["path"] for r in state}) == 1  # the same shard's table (None: the default) on each
            out[which] = eng.teacher_forced_logits_batch(prompts, forced)  # [2 prompts, 2 steps, V]: batch 2
        out["one"] = eng.teacher_forced_logits(prompts[0], forced[0])  # batch 1, as compare.py decodes
        return out

    with engine(tiny_checkpoint, **kw) as one:
        ref = forced_logits(one)
    with engine(tiny_checkpoint, tensor_parallel_size=2, **kw) as two:
        assert two.moe_table_path is not None and two.moe_table_path.name.startswith("E=4,N=48,")
        got = forced_logits(two)
    with engine(swapped_expert_checkpoint(tiny_checkpoint, tmp_path / "swapped"), tensor_parallel_size=2, **kw) as bad:
        bad.use_tables("default")
        wrong = bad.teacher_forced_logits_batch(prompts, forced)
    for which in ref:
        assert rel_err(got[which], ref[which]) < 5e-3, which  # partial sums meet in fp16 through the all-reduce
    torch.testing.assert_close(got["one"], got["tuned"][0], atol=3e-2, rtol=1e-2)  # batch 1 == row of batch 2
    moved = (got["tuned"] - got["default"]).abs().max().item()
    assert 0 < moved < 0.05  # the fused SiLU rounds otherwise, on TP2 as on TP1: the switch reaches the TP path

    def run(logits):
        return {"logits": list(logits), "tokens": [r.argmax(-1).tolist() for r in logits]}

    runs = {"default": run(got["default"]), "default-perturbed": run(got["default-perturbed"]), "tuned": run(wrong)}
    for p in cmp.parity(runs, "fp16"):
        assert p.verdict == "MISMATCH" and p.max_abs_logit_diff > 5 * p.tolerance > 0


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


def test_close_frees_the_model_so_a_second_engine_fits(tiny_checkpoint):
    import gc
    import weakref

    eng = LLMEngine(tiny_engine_config(tiny_checkpoint, max_model_len=64))
    refs = [weakref.ref(eng.runner.model), weakref.ref(eng.runner.kv_cache),
            weakref.ref(eng.runner.model.model.layers[0].block_sparse_moe.w13)]  # fmt: skip
    eng.close()
    gc.collect()
    assert all(r() is None for r in refs)  # weights, KV cache: nothing left holding them
    eng.close()  # idempotent


HANG = """
import os, sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_engine_config
from moetune.runtime import LLMEngine, tp
from moetune.runtime.model_runner import ModelRunner
tp.DEATH_GRACE_S = 1.0
eng = LLMEngine(tiny_engine_config({ckpt!r}, tensor_parallel_size=2, max_model_len=64))
ModelRunner.use_tuned_tables = lambda self, tuned: time.sleep(120)  # only here, on rank 0: blocks as in NCCL
worker = eng.workers.procs[0]
import threading
threading.Timer(1.0, os.kill, (worker.pid, 9)).start()
print("calling", flush=True)
eng.workers.call(eng.runner, "use_tuned_tables", True)
print("returned: the watchdog did not fire", flush=True)
"""


def test_a_worker_dying_during_a_blocked_collective_ends_the_process_within_seconds(tiny_checkpoint):
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = HANG.format(tests=str(Path(__file__).parent), ckpt=str(tiny_checkpoint))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert "worker rank 1 died (exit code -9) while rank 0 was blocked" in out.stderr
    assert "returned" not in out.stdout and time.monotonic() - t0 < 90


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="on a GPU machine the CLI serves on the GPUs: --tp 2 needs two")
def test_serve_tp2_stops_on_sigterm_and_leaves_no_worker(tmp_path):
    """`python -m moetune.serve --tp 2` serving: SIGTERM ends it, engine closed, worker gone, within seconds.
    (After a comparison without --port it exits by itself: the same finally closes the engine.)"""
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "moetune.serve", "--model", "tiny", "--tp", "2", "--no-compare", "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # bounded by the timeout below via proc.kill in finally
            lines.append(line)
            if line.startswith("serving"):
                break
        assert lines and lines[-1].startswith("serving"), "".join(lines)
        children = [c for c in _children(proc.pid) if b"resource_tracker" not in _cmdline(c)]  # the TP worker
        assert children, "no TP worker process found"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "server stopped" in rest, rest
        assert time.monotonic() - t0 < 30
        assert not [c for c in children if os.path.exists(f"/proc/{c}") and _state(c) != "Z"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_exit_after_an_abandoned_teardown_skips_the_finalizers_but_keeps_the_code(monkeypatch):
    from moetune.runtime import tp

    exits = []
    monkeypatch.setattr(tp.os, "_exit", exits.append)
    monkeypatch.setattr(tp, "teardown_abandoned", True)
    tp.exit_process(3)
    assert exits == [3]
    monkeypatch.setattr(tp, "teardown_abandoned", False)
    with pytest.raises(SystemExit) as e:
        tp.exit_process(0)
    assert e.value.code == 0 and exits == [3]
