"""What the tuner measures: the whole fused-MoE layer for one config at one token count M.

The tuner only talks to the `Bench` protocol, so tests swap in a synthetic objective and never need
the kernel. `KernelBench` is the real one: fixed seeded weights, the same seeded inputs for every
config of an M, the float32 reference as the correctness gate, CUDA-graph medians as the timing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import torch

from moetune.models import DTYPES, MoeShape
from moetune.tables import Config
from moetune.timing import time_us
from moetune.tuning.compile import CompilePool, describe

# rel_err a config may have against the float32 reference before it is called wrong
TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp8": 6e-2}


class Infeasible(Exception):
    """This config cannot run here (or runs wrong); the message says why. The run goes on."""


class DeviceBroken(Exception):
    """A config left the GPU context unusable (a sticky CUDA error): this process cannot go on."""


class Bench(Protocol):
    tolerance: float
    timings_meaningful: bool

    def compile(self, configs: Sequence[Config], M: int, timeout_s: float | None = None) -> list[str | None]:
        """Compile ahead of timing; None per config that compiled, else why it cannot run. `timeout_s`
        caps the wait (the time budget's deadline); a config it cuts off is reported like a hang."""
        ...

    def verify(self, config: Config, M: int) -> float:
        """rel_err of the layer's output against the float32 reference at M."""
        ...

    def time(self, config: Config, M: int, reps: int) -> float:
        """Median µs of the whole layer."""
        ...

    def close(self) -> None: ...


def bytes_per_elem(dtype: str) -> int:
    """Bytes of the operands a GEMM tile holds in shared memory (fp8 quantises activations too)."""
    return 1 if dtype == "fp8" else 2


class KernelBench:
    """The real fused_moe on this process's device."""

    def __init__(
        self,
        shape: MoeShape,
        dtype: str,
        *,
        seed: int = 0,
        device: str | None = None,
        compile_workers: int = 0,
        compile_timeout_s: float = 300.0,
        compile_only: bool = False,
    ):
        # Imported here, not at module level: the CLI must set TRITON_INTERPRET before Triton sees the kernel.
        from moetune.kernels.fused_moe import fused_moe, quantize_fp8_per_expert

        self._fused_moe = fused_moe
        seed %= 2**32  # any --seed: torch generators want 0 <= seed < 2**64, and seed * 1_000_003 + M must fit
        self.shape, self.dtype, self.seed = shape, dtype, seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            # Triton launches on the current device, and compile processes must know which GPU is ours.
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        self.tolerance = TOLERANCE[dtype]
        self.timings_meaningful = self.device.type == "cuda"
        self.act_dtype, w_dtype, _ = DTYPES[dtype]
        E, N, K = shape.E, shape.N, shape.K
        if compile_only:  # a compile needs shapes, dtypes and strides, not values (zeros: no NaN to chew on)
            self.w13 = torch.zeros(E, 2 * N, K, dtype=w_dtype, device=self.device)
            self.w2 = torch.zeros(E, K, N, dtype=w_dtype, device=self.device)
            ones = torch.ones(E, device=self.device) if w_dtype == torch.float8_e4m3fn else None
            self.s13 = self.s2 = ones
        else:
            g = torch.Generator(self.device).manual_seed(seed)
            # scaled so that every layer output is O(1): rel_err then measures the kernel, not overflow
            w13 = torch.randn(E, 2 * N, K, generator=g, device=self.device, dtype=self.act_dtype) / K**0.5
            w2 = torch.randn(E, K, N, generator=g, device=self.device, dtype=self.act_dtype) / N**0.5
            if w_dtype == torch.float8_e4m3fn:
                (self.w13, self.s13), (self.w2, self.s2) = quantize_fp8_per_expert(w13), quantize_fp8_per_expert(w2)
            else:
                self.w13, self.w2, self.s13, self.s2 = w13, w2, None, None
        self._M: int | None = None
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the float32 temporaries of quantisation: free them for the compile processes
        if compile_workers > 0 and self.device.type == "cuda":
            factory = functools.partial(
                KernelBench, shape, dtype, seed=seed, device=str(self.device), compile_only=True
            )
            self._pool = CompilePool(factory, compile_workers, compile_timeout_s)

    def inputs(self, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same x and router logits for every config of an M (only one M is kept at a time)."""
        if self._M != M:
            g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + M)
            self._x = torch.randn(M, self.shape.K, generator=g, device=self.device, dtype=self.act_dtype)
            # float32 logits: bf16 ones tie often, and a tie may route differently from the reference
            self._logits = torch.randn(M, self.shape.E, generator=g, device=self.device)
            self._ref = None
            self._M = M
        return self._x, self._logits

    def _reference(self, M: int) -> torch.Tensor:
        from moetune.kernels.reference import moe_reference

        x, logits = self.inputs(M)
        if self._ref is None:
            self._ref = moe_reference(x, logits, self.w13, self.w2, self.shape.top_k, self.s13, self.s2)
            if self.device.type == "cuda":  # hand the float32 weight copies back, for the compile processes
                torch.cuda.empty_cache()
        return self._ref

    def run_once(self, config: Config, M: int) -> torch.Tensor:
        x, logits = self.inputs(M)
        return self._fused_moe(x, logits, self.w13, self.w2, self.shape.top_k, config, self.s13, self.s2)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _guarded(self, fn):
        """Run fn; turn any failure into Infeasible, or DeviceBroken when the GPU context is gone."""
        try:
            result = fn()
            self.synchronize()
            return result
        except Exception as e:
            reason = describe(e)
            try:
                self.synchronize()
            except Exception:
                raise DeviceBroken(reason) from e
            raise Infeasible(reason) from e

    def compile(self, configs: Sequence[Config], M: int, timeout_s: float | None = None) -> list[str | None]:
        if self._pool is None:  # CPU interpreter (nothing to compile) or compile in-process on first launch
            return [None] * len(configs)
        return self._pool.compile(configs, M, timeout_s)

    def verify(self, config: Config, M: int) -> float:
        from moetune.kernels.reference import rel_err

        ref = self._reference(M)
        return rel_err(self._guarded(lambda: self.run_once(config, M)), ref)

    def time(self, config: Config, M: int, reps: int) -> float:
        return self._guarded(lambda: time_us(lambda: self.run_once(config, M), reps=reps))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
