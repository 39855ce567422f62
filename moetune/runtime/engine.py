"""LLMEngine: requests in, tokens out. One step = schedule -> run the model -> record the tokens."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moetune.errors import MoetuneError
from moetune.models import ModelSpec
from moetune.runtime import layers
from moetune.runtime.block_manager import BlockManager, blocks_for
from moetune.runtime.config import EngineConfig, resolve
from moetune.runtime.model_runner import ModelRunner
from moetune.runtime.sampling import SamplingParams
from moetune.runtime.scheduler import Scheduler
from moetune.runtime.sequence import Sequence, SequenceStatus
from moetune.runtime.tokenizer import Tokenizer, find_tokenizer_model
from moetune.runtime.tp import TPWorkers

log = logging.getLogger("moetune")


@dataclass
class StepOutput:
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    error: str | None = None  # set when this request alone failed inside a step and was aborted


class LLMEngine:
    """With tensor_parallel_size > 1 this process is rank 0 and owns tp-1 worker processes: close() them."""

    def __init__(self, config: EngineConfig):
        self.config: EngineConfig  # a copy with every "auto" resolved (device, dtype, load_format, max_model_len)
        self.spec: ModelSpec
        self.config, self.spec = resolve(config)
        cfg = self.config
        self.tokenizer = Tokenizer(find_tokenizer_model(cfg.checkpoint))
        if self.tokenizer.vocab_size > self.spec.vocab_size:
            raise MoetuneError(
                f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} tokens, "
                f"more than the model's vocabulary of {self.spec.vocab_size}"
            )
        self.workers: TPWorkers | None = None
        if cfg.tensor_parallel_size > 1:
            self.workers = TPWorkers(cfg, self.spec)
            try:
                self.runner = self.workers.run(lambda: ModelRunner(cfg, self.spec))
            except BaseException:
                self.close()
                raise
        elif layers.TP_SIZE > 1:  # the layers' rank is per process: this model would be built sharded
            raise MoetuneError("a tensor-parallel engine is open in this process; close() it first")
        else:
            self.runner = ModelRunner(cfg, self.spec)
        block_manager = BlockManager(self.runner.num_kv_blocks, cfg.kvcache_block_size)
        self.scheduler = Scheduler(cfg.max_num_seqs, cfg.max_num_batched_tokens, block_manager, self.tokenizer.eos_id)

    @property
    def moe_table_path(self) -> Path | None:
        """The table file every MoE layer reads now; None = vLLM's untuned default."""
        return self.runner.tables.active.path  # rank 0's; every rank reads the table for the same shard

    def use_tables(self, which: str) -> None:
        """Switch every MoE layer to the "tuned" table, the untuned "default", or "default-perturbed" (the
        default with BLOCK_SIZE_M/K and fuse_silu changed: equal up to rounding, for the parity check's noise floor).
        Re-captures the decode graphs (each bakes in its batch size's config); weights and KV cache stay."""
        if which not in layers.TABLE_CHOICES:  # before any rank switches
            raise MoetuneError(f"unknown MoE table {which!r}; choose one of {', '.join(layers.TABLE_CHOICES)}")
        self._call("use_tables", which)
        perturbed = ", BLOCK_SIZE_K perturbed" if which == "default-perturbed" else ""
        log.info("MoE configs: %s", self.moe_table_path or f"untuned default{perturbed}")

    def use_tuned_tables(self, tuned: bool) -> None:
        """use_tables("tuned") or use_tables("default")."""
        self.use_tables("tuned" if tuned else "default")

    def _call(self, method: str, *args: Any) -> Any:
        """runner.method(*args): on this process alone, or on every rank in lockstep (only rank 0's result)."""
        if self.workers is None:
            return getattr(self.runner, method)(*args)
        return self.workers.call(self.runner, method, *args)

    def close(self) -> None:
        """Stop the tensor-parallel workers, leave the process group and free this process's weights, KV cache
        and CUDA graphs, so another engine fits in the same process. Idempotent; the engine is unusable after."""
        if getattr(self, "workers", None) is not None:
            self.workers.close()
        runner = self.__dict__.pop("runner", None)
        if runner is not None:
            runner.release()
            del runner
            gc.collect()  # the model's modules hold reference cycles (weight_loader closures)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ requests

    def _check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        n, limit = len(prompt_token_ids), self.config.max_model_len
        if n == 0:
            raise MoetuneError("the prompt is empty; it needs at least one token (e.g. BOS)")
        if n + params.max_tokens > limit:
            raise MoetuneError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len ({limit})"
            )
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.spec.vocab_size:
            raise MoetuneError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        if blocks_for(n + params.max_tokens, self.config.kvcache_block_size) > self.runner.num_kv_blocks:
            raise MoetuneError(
                f"prompt + max_tokens needs more KV cache than the engine has "
                f"({self.runner.num_kv_blocks * self.config.kvcache_block_size} tokens)"
            )

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        self._check(prompt_token_ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(prompt_token_ids, params, generator)
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        """One prefill or decode step; an output for every request that got a token."""
        if not self.scheduler.has_unfinished():
            return []
        seqs, is_prefill = self.scheduler.schedule()
        rng = _rng_states(seqs)
        failed: dict[int, str] = {}
        try:
            tokens = self._call("run", seqs, is_prefill)
        except Exception as e:
            seqs, tokens, failed = self._run_without_failing(seqs, is_prefill, rng, e)
        self.scheduler.postprocess(seqs, tokens)
        return [
            StepOutput(s.seq_id, [t], s.status == SequenceStatus.FINISHED, s.finish_reason)
            for s, t in zip(seqs, tokens)
            if t is not None
        ] + [StepOutput(i, [], True, "abort", error=msg) for i, msg in failed.items()]

    # ---- step isolation (serve): one request that breaks a step must not fail the others
    def _run_without_failing(
        self, seqs: list[Sequence], is_prefill: bool, rng: dict[int, Tensor], error: Exception
    ) -> tuple[list[Sequence], list[int | None], dict[int, str]]:
        """The batch failed: run each sequence alone to find those that fail by themselves, abort them, and
        rerun the rest together, so they get the tokens they would have got without the failing ones.
        Re-running a step is safe: it rewrites the same K/V slots, and seeded generators are rewound."""
        failed: dict[int, str] = {}
        for s in seqs:
            _set_rng_states(seqs, rng)
            try:
                self._call("run", [s], is_prefill)
            except Exception as e:
                failed[s.seq_id] = f"request failed inside the engine step: {type(e).__name__}: {e}"
        if len(failed) == len(seqs):
            raise error  # no sequence runs even alone: the engine is broken, not a request
        if failed:
            log.warning("aborting %d request(s) that fail inside a step: %s", len(failed), failed)
        for i in failed:
            self.scheduler.abort(i)
        good = [s for s in seqs if s.seq_id not in failed]
        _set_rng_states(good, rng)
        return good, self._call("run", good, is_prefill), failed

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run the prompts to completion (together with anything already queued); generated ids per prompt."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise MoetuneError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for p, sp in zip(prompts, params):
            self._check(p, sp)  # all or nothing: no half-added batch on a bad prompt
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        out: dict[int, list[int]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id] += o.new_token_ids
                    if o.finished:
                        pending.discard(o.request_id)
        return [out[i] for i in ids]

    def warm_up(self) -> None:
        """Prefill (and decode a token) at the token counts whose kernels Triton compiles apart: one token, a
        few, a multiple of 16 or not, past each dense-linear tile bucket, and several sequences in one step.
        Serving calls it before it listens, so no client waits for a compile (on an H100, prefills of a new shape
        stalled every request in flight for 1-2 s while they compiled). Call it when idle."""
        budget = min(self.config.max_num_batched_tokens, self.config.max_model_len - 2)
        lengths = [n for n in (1, 5, 16, 37, 48, 100, 128, 300, 512) if n <= budget]
        batches = [[n] for n in lengths] + [[17] * k for k in (3, 16, 64) if 17 * k <= budget]
        greedy = SamplingParams(max_tokens=2, ignore_eos=True)
        for batch in batches:
            k = min(len(batch), self.config.max_num_seqs)
            self.generate([[1 + (7 * i + j) % 1000 for j in range(n)] for i, n in enumerate(batch[:k])], greedy)

    # ------------------------------------------------------------------------------------------ measurement

    def prefill_logits(self, token_ids: list[int]) -> Tensor:
        """[T, vocab] float32 logits of a fresh sequence, from one prefill; leaves no state behind."""
        if not 1 <= len(token_ids) <= self.config.max_model_len:
            raise MoetuneError(f"prefill_logits needs 1 to max_model_len={self.config.max_model_len} tokens")
        seq = Sequence(token_ids, SamplingParams())
        bm = self.scheduler.block_manager
        if not bm.can_grow(seq, len(seq)):
            raise MoetuneError("prefill_logits: the KV cache is full with running requests; call it when idle")
        bm.grow(seq, len(seq))
        seq.num_scheduled_tokens = len(seq)
        try:
            return self._call("prefill_logits", seq)
        finally:
            bm.release(seq)

    def teacher_forced_logits(self, prompt: list[int], forced: list[int]) -> Tensor:
        """[len(forced), vocab] float32: row i is the next-token logits after prompt + forced[: i + 1], each
        computed by the decode step serving uses (its CUDA graph where there is one), not by a prefill.
        The prompt is prefilled once; the sequence's blocks are released after. Call it when idle."""
        return self.teacher_forced_logits_batch([prompt], [forced])[0]

    def teacher_forced_logits_batch(self, prompts: list[list[int]], forced: list[list[int]]) -> Tensor:
        """[B, steps, vocab] float32: teacher_forced_logits of B prompts decoded together, so each step is one
        decode step of batch B (the graph of B's bucket and the MoE config that bucket picks; batch 1 only
        exercises the table's M=1 entry). Each prompt is prefilled alone; every forced list has `steps` tokens."""
        if not prompts or len(prompts) != len(forced) or len({len(f) for f in forced}) != 1:
            raise MoetuneError("teacher_forced_logits_batch needs one forced list per prompt, all of one length")
        for prompt, f in zip(prompts, forced):
            if not prompt or len(prompt) + len(f) > self.config.max_model_len:
                raise MoetuneError(f"teacher_forced_logits needs 1 to max_model_len={self.config.max_model_len} tokens")
        bm, seqs = self.scheduler.block_manager, []
        try:
            for prompt, f in zip(prompts, forced):
                seq = Sequence(prompt, SamplingParams())
                if not bm.can_grow(seq, len(prompt) + len(f)):
                    raise MoetuneError(
                        "teacher_forced_logits: the KV cache is full with running requests; call it when idle"
                    )
                bm.grow(seq, len(prompt) + len(f))
                seqs.append(seq)
            for seq in seqs:
                seq.num_scheduled_tokens = len(seq)
                self._call("prefill_logits", seq)  # fills the cache; its logits are not the decode path's
            rows = []
            for step in range(len(forced[0])):
                for seq, f in zip(seqs, forced):
                    seq.num_cached_tokens, seq.num_scheduled_tokens = len(seq), 1
                    seq.token_ids.append(f[step])
                rows.append(self._call("decode_logits", seqs))  # [B, vocab]
            return torch.stack(rows, dim=1)
        finally:
            for seq in seqs:
                bm.release(seq)

    def decode_step_time_us(self, batch_size: int, context_len: int, steps: int = 20) -> float:
        """Median µs of one decode step over batch_size sequences at context_len (model forward + greedy pick).

        Built for benchmarks: it replays the same CUDA graph serving uses (eager on CPU / enforce_eager) on
        dummy sequences, so it measures the model without scheduling, host-side input building or sampling
        noise. CUDA events on a GPU, wall clock on a CPU. Safe to call while requests are running.
        """
        return self._call("decode_step_time_us", batch_size, context_len, steps)


def _rng_states(seqs: list[Sequence]) -> dict[int, Tensor]:
    """Seeded sampling generators before a step, so a retried step draws the same numbers (cheap: few seeded)."""
    return {s.seq_id: s.generator.get_state() for s in seqs if s.generator is not None and s.params.temperature}


def _set_rng_states(seqs: list[Sequence], states: dict[int, Tensor]) -> None:
    for s in seqs:
        if s.seq_id in states:
            s.generator.set_state(states[s.seq_id])
