"""Runs the model for a scheduled batch: builds the inputs, owns the paged KV cache and the decode CUDA graphs.

Decode is captured once per batch bucket (1, 2, 4, ..., max_num_seqs) into graphs that share one memory
pool and read fixed input buffers; a batch replays the next bucket up. Padding rows write their K/V to a
trash block that no sequence owns and attend to nothing (context length 0), so they cost almost nothing
and disturb nothing. Each graph bakes in the MoE config its bucket size picks from the active table.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from moetune.errors import MoetuneError
from moetune.models import ModelSpec, moe_shape
from moetune.runtime import layers
from moetune.runtime.block_manager import blocks_for
from moetune.runtime.config import RUNTIME_DTYPES, EngineConfig
from moetune.runtime.context import Context, reset_context, set_context
from moetune.runtime.layers import Build, MoeTables
from moetune.runtime.loader import load_safetensors
from moetune.runtime.model import MixtralForCausalLM
from moetune.runtime.sampling import sample
from moetune.runtime.sequence import StepSeq
from moetune.tables import CPU_DEVICE_NAME, ConfigTable, find_table
from moetune.timing import median_us

log = logging.getLogger("moetune")

CPU_KV_CACHE_BYTES = 256 << 20  # a CPU engine is for tests and demos: a small fixed cache
MAX_GRAPH_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes captured as graphs: powers of two below the largest batch, and it."""
    max_bs = min(max_num_seqs, MAX_GRAPH_BATCH)
    return sorted({b for b in (1 << i for i in range(10)) if b < max_bs} | {max_bs})


def moe_tables(cfg: EngineConfig, spec: ModelSpec) -> MoeTables:
    """This rank's MoE tables: looked up for its own expert shard (N = intermediate / tp), as vLLM shards."""
    # fp32 is a CPU test dtype: it reads the 16-bit table, whose file name carries no dtype
    tuned = find_table(
        moe_shape(spec, layers.TP_SIZE),
        "bf16" if cfg.dtype == "fp32" else cfg.dtype,
        device=CPU_DEVICE_NAME if cfg.device == "cpu" else None,
        folders=[cfg.tuned_configs] if cfg.tuned_configs else [],
    )
    return MoeTables(tuned, ConfigTable.untuned(spec.num_experts), "tuned" if cfg.use_tuned_tables else "default")


class ModelRunner:
    """One rank's model. With tensor parallelism every rank runs each call in lockstep (tp.py)."""

    def __init__(self, cfg: EngineConfig, spec: ModelSpec):
        self.cfg, self.spec = cfg, spec
        self.tables = tables = moe_tables(cfg, spec)
        self.is_driver = layers.TP_RANK == 0  # only rank 0 samples
        self.device = torch.device(cfg.device)
        self.dtype, expert_dtype = RUNTIME_DTYPES[cfg.dtype]
        self.block_size = cfg.kvcache_block_size
        self.max_blocks = blocks_for(cfg.max_model_len, self.block_size)  # block-table width
        build = Build(
            self.dtype, expert_dtype, self.device, cfg.moe_backend, tables, dense_fp8=cfg.dense_dtype == "fp8",
            fused=cfg.fused_norm_rope, decode_partition_tokens=cfg.decode_partition_tokens,
            fused_router=cfg.fused_router,
        )  # fmt: skip
        self.model = MixtralForCausalLM(spec, cfg.max_model_len, build)
        t0 = time.perf_counter()
        if cfg.load_format == "dummy":
            self.model.init_dummy(cfg.seed)
        else:
            load_safetensors(self.model, cfg.checkpoint)
        self._sync()
        log.info("%s weights (%s, %s) ready in %.1f s", spec.name, cfg.dtype, cfg.load_format, time.perf_counter() - t0)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.num_kv_blocks = self._allocate_kv_cache()
        # the torch MoE backend syncs with the host (it loops over the experts in use), so it runs eagerly
        self.use_graphs = self.device.type == "cuda" and not cfg.enforce_eager and cfg.moe_backend == "triton"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_inputs: dict[str, Tensor] = {}
        self.graphs_table: str | None = None  # the table (TABLE_CHOICES) the graphs were captured with
        if self.use_graphs:
            self.capture_graphs()

    def release(self) -> None:
        """Drop every tensor this runner owns (graphs and their pool first, then cache and weights)."""
        self.graphs.clear()
        self.graph_inputs = {}
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.kv_cache = None
        self.model = None
        reset_context()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _to_device(self, data: list, dtype: torch.dtype) -> Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------ KV cache

    @torch.inference_mode()
    def _allocate_kv_cache(self) -> int:
        spec, bs = self.spec, self.block_size
        kv_heads = spec.num_kv_heads // layers.TP_SIZE
        block_bytes = 2 * spec.num_layers * bs * kv_heads * spec.head_dim * self.dtype.itemsize
        if self.device.type == "cuda":
            self._profile_prefill()  # the activation peak of the largest prefill must stay free
            free, total = torch.cuda.mem_get_info(self.device)
            stats = torch.cuda.memory_stats(self.device)
            peak_extra = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
            budget = total * self.cfg.gpu_memory_utilization - (total - free) - peak_extra
            # at most max_num_seqs sequences hold blocks at once (scheduler.py), none more than max_blocks: more
            # blocks would never be used, only kept from a second engine in this process (tests build several)
            num_blocks = min(int(budget // block_bytes), self.cfg.max_num_seqs * self.max_blocks)
        else:
            fits = CPU_KV_CACHE_BYTES // block_bytes
            num_blocks = max(self.max_blocks, min(self.cfg.max_num_seqs * self.max_blocks, fits))
        if layers.TP_SIZE > 1:  # rank 0's scheduler hands out block ids for every rank: all need as many
            n = torch.tensor([num_blocks], device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            num_blocks = int(n.item())
        if num_blocks < self.max_blocks:
            raise MoetuneError(
                f"KV cache: room for {max(num_blocks, 0) * bs} tokens after the weights, but one sequence of "
                f"max_model_len={self.cfg.max_model_len} needs {self.max_blocks * bs}; lower max_model_len, raise "
                f"gpu_memory_utilization ({self.cfg.gpu_memory_utilization}) or use dtype fp8"
            )
        # one block more than the scheduler hands out: the trash block that padding rows write to
        # [2 (K, V), layers, blocks, slot, Hkv, D]
        shape = (2, spec.num_layers, num_blocks + 1, bs, kv_heads, spec.head_dim)
        kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv[0, i], kv[1, i]
        self.kv_cache, self.trash_slot = kv, num_blocks * bs
        log.info("KV cache: %d blocks of %d tokens (%.2f GB)", num_blocks, bs, kv.numel() * kv.itemsize / 1e9)
        return num_blocks

    def _profile_prefill(self) -> None:
        """One prefill of max_num_batched_tokens, before the cache exists, to measure the activation peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq_len = min(self.cfg.max_model_len, self.cfg.max_num_batched_tokens)
        n = max(1, min(self.cfg.max_num_batched_tokens // seq_len, self.cfg.max_num_seqs))
        ids = torch.zeros(n * seq_len, dtype=torch.long, device=self.device)
        positions = torch.arange(seq_len, device=self.device).repeat(n)
        set_context(Context(is_prefill=True, cu_seqlens_q=[i * seq_len for i in range(n + 1)], start_positions=[0] * n))
        self.model.compute_logits(self.model(ids, positions)[-n:])
        reset_context()
        self._sync()
        torch.cuda.empty_cache()  # the peak is in the allocator's stats; don't count its cached blocks twice

    # ------------------------------------------------------------------------------------------ prefill

    def _slots(self, seq: StepSeq, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, seqs: list[StepSeq], width: int | None = None) -> Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        return self._to_device([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _prefill_hidden(self, seqs: list[StepSeq]) -> tuple[Tensor, list[int]]:
        """Hidden states of every scheduled token, and cu_seqlens (sequence i owns rows cu[i]:cu[i+1])."""
        ids, positions, slots, cu, starts = [], [], [], [0], []
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            ids += seq.scheduled_token_ids
            positions += range(start, end)
            slots += self._slots(seq, start, end)
            cu.append(cu[-1] + end - start)
            starts.append(start)
        set_context(
            Context(
                is_prefill=True,
                slot_mapping=self._to_device(slots, torch.long),
                cu_seqlens_q=cu,
                start_positions=starts,
                block_tables=self._block_tables(seqs) if any(starts) else None,
            )
        )
        try:
            return self.model(self._to_device(ids, torch.long), self._to_device(positions, torch.long)), cu
        finally:
            reset_context()

    @torch.inference_mode()
    def prefill_logits(self, seq: StepSeq) -> Tensor | None:
        hidden, _ = self._prefill_hidden([seq])
        return self.model.compute_logits(hidden) if self.is_driver else None  # [T, V]

    # ------------------------------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode_logits(self, seqs: list[StepSeq]) -> Tensor | None:
        """One decode step of these sequences together through the serving path (the graph of their batch's
        bucket, or eager): their [B, V] float32 logits on rank 0, on the host (never the graph's output buffer)."""
        logits = self._decode_logits(seqs)
        return logits.float().cpu() if self.is_driver else None

    def _decode_inputs(self, seqs: list[StepSeq]) -> tuple[list[int], list[int], list[int], list[int]]:
        ids = [s.last_token for s in seqs]
        positions = [s.num_cached_tokens for s in seqs]  # a decoding sequence has all but its last token cached
        slots = [self._slots(s, p, p + 1)[0] for s, p in zip(seqs, positions)]
        return ids, positions, slots, [p + 1 for p in positions]

    def _decode_eager(
        self, ids: Tensor, positions: Tensor, slots: Tensor, context_lens: Tensor, tables: Tensor
    ) -> Tensor:
        set_context(Context(slot_mapping=slots, block_tables=tables, context_lens=context_lens))
        try:
            return self.model.compute_logits(self.model(ids, positions))
        finally:
            reset_context()

    def _graph_for(self, batch: int) -> int | None:
        return next((b for b in self.graph_batch_sizes if b >= batch), None) if self.graphs else None

    def _fill_graph_inputs(
        self, bucket: int, ids: Tensor, positions: Tensor, slots: Tensor, context_lens: Tensor, tables: Tensor
    ) -> None:
        B, buf = ids.shape[0], self.graph_inputs
        buf["input_ids"][:B].copy_(ids)
        buf["positions"][:B].copy_(positions)
        buf["slot_mapping"][:B].copy_(slots)
        buf["slot_mapping"][B:bucket].fill_(self.trash_slot)  # padding rows: write to the trash block ...
        buf["context_lens"][:B].copy_(context_lens)
        buf["context_lens"][B:bucket].zero_()  # ... and attend to nothing
        buf["block_tables"][:B, : tables.shape[1]].copy_(tables)

    def _decode_logits(self, seqs: list[StepSeq]) -> Tensor:
        ids, positions, slots, lens = self._decode_inputs(seqs)
        inputs = (
            self._to_device(ids, torch.long),
            self._to_device(positions, torch.long),
            self._to_device(slots, torch.long),
            self._to_device(lens, torch.int32),
        )
        bucket = self._graph_for(len(seqs))
        if bucket is None:
            return self._decode_eager(*inputs, self._block_tables(seqs))
        self._fill_graph_inputs(bucket, *inputs, self._block_tables(seqs))
        self.graphs[bucket].replay()
        return self.graph_inputs["logits"][: len(seqs)]

    def _graph_buffers(self, max_bs: int) -> dict[str, Tensor]:
        """The fixed inputs (and output) every decode graph reads; a replay only copies new values in."""
        dev = self.device
        return {
            "input_ids": torch.zeros(max_bs, dtype=torch.long, device=dev),
            "positions": torch.zeros(max_bs, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((max_bs,), self.trash_slot, dtype=torch.long, device=dev),
            "context_lens": torch.zeros(max_bs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev),
            "logits": torch.zeros(max_bs, self.spec.vocab_size, dtype=torch.float32, device=dev),
        }

    def _run_bucket(self, bs: int) -> None:
        """What a decode graph for bucket bs captures: the first bs rows of the buffers, padding included."""
        buf = self.graph_inputs
        set_context(
            Context(
                slot_mapping=buf["slot_mapping"][:bs],
                block_tables=buf["block_tables"][:bs],
                context_lens=buf["context_lens"][:bs],
            )
        )
        try:
            hidden = self.model(buf["input_ids"][:bs], buf["positions"][:bs])
            buf["logits"][:bs].copy_(self.model.compute_logits(hidden))
        finally:
            reset_context()

    def use_tables(self, which: str) -> None:
        """Switch every MoE layer to one of TABLE_CHOICES; each rank derives the table from its own shard."""
        self.tables.select(which)
        if self.use_graphs:
            self.capture_graphs()  # each graph bakes in the config its batch size picks

    def use_tuned_tables(self, tuned: bool) -> None:
        self.use_tables("tuned" if tuned else "default")

    def table_state(self) -> list[dict] | None:
        """Every rank's MoE table and what its decode graphs baked in, gathered on rank 0 (a collective: under
        tensor parallelism every rank calls it, through LLMEngine._call). For checks; the order is by rank."""
        mine = {"rank": layers.TP_RANK, "which": self.tables.which, "path": self.tables.active.path,
                "graphs": sorted(self.graphs), "graphs_table": self.graphs_table if self.graphs else None}  # fmt: skip
        if layers.TP_SIZE == 1:
            return [mine]
        out: list = [None] * layers.TP_SIZE
        torch.distributed.all_gather_object(out, mine)
        return out if self.is_driver else None

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """(Re)capture one decode graph per bucket, largest first so smaller ones reuse its pool memory."""
        self.graphs = {}
        gc.collect()
        torch.cuda.empty_cache()
        self.graph_batch_sizes = graph_batch_sizes(self.cfg.max_num_seqs)
        max_bs = self.graph_batch_sizes[-1]
        self.graph_inputs = self._graph_buffers(max_bs)
        pool = None
        t0 = time.perf_counter()
        for bs in reversed(self.graph_batch_sizes):
            graph = torch.cuda.CUDAGraph()
            self._run_bucket(bs)  # warm-up: compiles this bucket's kernels outside the capture
            with torch.cuda.graph(graph, pool):
                self._run_bucket(bs)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize(self.device)
        self.graphs_table = self.tables.which
        sizes = self.graph_batch_sizes
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(sizes), sizes, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ steps

    @torch.inference_mode()
    def run(self, seqs: list[StepSeq], is_prefill: bool) -> list[int | None]:
        """One step; a token for each sequence that reached its end (None for a mid-prompt prefill chunk).
        A TP worker only takes its part in the forward's all-reduces and returns []."""
        if is_prefill:
            hidden, cu = self._prefill_hidden(seqs)
            if not self.is_driver:
                return []
            done = [i for i, s in enumerate(seqs) if s.num_cached_tokens + s.num_scheduled_tokens == len(s)]
            if not done:
                return [None] * len(seqs)
            logits = self.model.compute_logits(hidden[[cu[i + 1] - 1 for i in done]])  # last token of each
        else:
            done = list(range(len(seqs)))
            logits = self._decode_logits(seqs)
            if not self.is_driver:
                return []
        sampled = sample(logits, [seqs[i].params for i in done], [seqs[i].generator for i in done], self.generator)
        tokens: list[int | None] = [None] * len(seqs)
        for i, t in zip(done, sampled):
            tokens[i] = t
        return tokens

    @torch.inference_mode()
    def decode_step_time_us(self, batch_size: int, context_len: int, steps: int) -> float:
        """Median µs of one decode step (model + greedy argmax) for batch_size dummy sequences of context_len.

        Uses the same graph (or eager path) as serving. The dummy sequences read distinct KV blocks where the
        cache has room (so attention pays real memory traffic) and write their new K/V to the trash block,
        so live requests are untouched.
        """
        if not 1 <= batch_size <= self.cfg.max_num_seqs:
            raise MoetuneError(f"batch_size must be in 1..max_num_seqs={self.cfg.max_num_seqs}, got {batch_size}")
        if not 1 <= context_len <= self.cfg.max_model_len:
            raise MoetuneError(f"context_len must be in 1..max_model_len={self.cfg.max_model_len}, got {context_len}")
        nb = blocks_for(context_len, self.block_size)
        dev, B = self.device, batch_size
        tables = (torch.arange(B * nb, device=dev) % self.num_kv_blocks).view(B, nb).int()
        gen = torch.Generator(device=dev).manual_seed(self.cfg.seed)
        ids = torch.randint(0, self.spec.vocab_size, (B,), generator=gen, device=dev)
        positions = torch.full((B,), context_len - 1, dtype=torch.long, device=dev)
        slots = torch.full((B,), self.trash_slot, dtype=torch.long, device=dev)
        lens = torch.full((B,), context_len, dtype=torch.int32, device=dev)
        bucket = self._graph_for(B)
        if bucket is None:
            step: Callable[[], object] = lambda: self._decode_eager(ids, positions, slots, lens, tables).argmax(-1)
        else:
            self._fill_graph_inputs(bucket, ids, positions, slots, lens, tables)
            step = lambda: (self.graphs[bucket].replay(), self.graph_inputs["logits"][:B].argmax(-1))
        return median_us(step, reps=max(1, steps), warmup=min(3, steps), cuda=dev.type == "cuda")
