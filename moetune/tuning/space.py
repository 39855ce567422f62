"""The search space of the launch knobs, as Optuna sees it.

Power-of-two knobs are searched as their log2 exponents (ordered integers), so TPE learns that 64
lies between 32 and 128 instead of treating each size as an unrelated category. The space is a
superset of vLLM's 1,920-config grid: it also holds BLOCK_SIZE_K=32 and GROUP_SIZE_M 2..8, because
vLLM's default config uses them and every study starts from that default.

Our extra knobs come from kernels/knobs.py's EXTRA_KNOBS, so a knob the kernel gains is searched with
no change here: integer-valued ones as an ordered index into their values (split-K 1 < 2 < 4), the
rest as categories. A config carries an extra knob only where it differs from the value that means
"vLLM's structure", so a six-knob config and the same config with explicit defaults are one config.

`--space` pins knobs (`parse_space`): a pinned knob keeps one value in the space whichever sampler
searches it, so a brute-force grid and TPE can be compared on a space small enough to enumerate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from moetune.errors import MoetuneError
from moetune.kernels.knobs import EXTRA_KNOBS, VLLM_KNOBS
from moetune.models import MoeShape
from moetune.tables import KNOBS, Config

# knob -> (Optuna parameter, smallest, largest exponent); num_stages is searched as itself
LOG2_KNOBS = {
    "BLOCK_SIZE_M": ("BLOCK_SIZE_M_log2", 4, 8),  # 16..256
    "BLOCK_SIZE_N": ("BLOCK_SIZE_N_log2", 5, 8),  # 32..256
    "BLOCK_SIZE_K": ("BLOCK_SIZE_K_log2", 5, 8),  # 32..256
    "GROUP_SIZE_M": ("GROUP_SIZE_M_log2", 0, 6),  # 1..64
    "num_warps": ("num_warps_log2", 2, 3),  # 4, 8
}
STAGES = (2, 5)
# Hopper's wgmma works on 64-row tiles, so BLOCK_SIZE_M=64 can win even when most rows are padding.
MIN_USEFUL_BLOCK_M = 64
# Extra-knob values that only make sense up to some M: (knob, value) -> largest M searched.
EXTRA_MAX_M: dict[tuple[str, Any], int] = {("kernel", "gemv"): 8}  # the GEMV path is for decode batches
# A thread's fp32 accumulator registers beyond which the tile must spill (255 registers per thread).
MAX_ACC_REGISTERS = 256


def _ordered(values: tuple[Any, ...]) -> bool:
    """Integer knob values are searched in order (index), so TPE learns 2 lies between 1 and 4."""
    return all(type(v) is int for v in values)


def _extra_param(knob: str) -> str:
    return f"{knob}_idx" if _ordered(EXTRA_KNOBS[knob][0]) else knob


def extra_choices(M: int) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """Each extra knob with the values worth searching at M (the vLLM-structure value always kept)."""
    out = []
    for knob, (values, default) in EXTRA_KNOBS.items():
        allowed = tuple(v for v in values if v == default or M <= EXTRA_MAX_M.get((knob, v), M))
        out.append((knob, allowed))
    return tuple(out)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass(frozen=True)
class Space:
    """Inclusive integer ranges of the Optuna parameters for one M."""

    ranges: tuple[tuple[str, int, int], ...]
    extras: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (knob, values searched); one value: not searched

    def _searched_extras(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The extra knobs that are Optuna parameters: several values, or one pinned off vLLM's structure."""
        return [(knob, v) for knob, v in self.extras if len(v) > 1 or v[0] != EXTRA_KNOBS[knob][1]]

    def distributions(self) -> dict[str, BaseDistribution]:
        out: dict[str, BaseDistribution] = {name: IntDistribution(lo, hi) for name, lo, hi in self.ranges}
        for knob, values in self._searched_extras():
            if _ordered(values):
                index = [EXTRA_KNOBS[knob][0].index(v) for v in values]
                out[_extra_param(knob)] = IntDistribution(min(index), max(index))
            else:
                out[knob] = CategoricalDistribution(values)
        return out

    def grid(self) -> dict[str, list[Any]]:
        return {
            name: list(d.choices) if isinstance(d, CategoricalDistribution) else list(range(d.low, d.high + 1))
            for name, d in self.distributions().items()
        }

    def size(self) -> int:
        return math.prod(len(values) for values in self.grid().values())

    def configs(self) -> list[Config]:
        """Every config of the space, in grid order."""
        grid = self.grid()
        return [to_config(dict(zip(grid, values))) for values in itertools.product(*grid.values())]

    def params(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A config (e.g. from an old table or a neighbouring M) moved to the nearest point of this space."""
        out: dict[str, Any] = {}
        for name, lo, hi in self.ranges:
            knob = name.removesuffix("_log2")
            value = int(config[knob])
            out[name] = min(hi, max(lo, round(math.log2(value)) if name.endswith("_log2") else value))
        for knob, values in self._searched_extras():
            all_values, default = EXTRA_KNOBS[knob]
            value = config.get(knob, default)
            value = value if value in values else default if default in values else values[0]
            out[_extra_param(knob)] = all_values.index(value) if _ordered(values) else value
        return out


def space_for(M: int, shape: MoeShape, pins: Mapping[str, Any] | None = None) -> Space:
    """The space for token count M, with blocks that can only add padding clamped away.

    Top-k picks distinct experts, so no expert receives more than M slots: a BLOCK_SIZE_M above
    next_pow2(M) only pads every block further (kept >= 64 for wgmma). Likewise BLOCK_SIZE_N above the
    widest GEMM output (2N for GEMM1, K for GEMM2) and BLOCK_SIZE_K above the deepest reduction
    (K, N) are all padding. For real models only the BLOCK_SIZE_M clamp ever bites.
    `pins` (from `parse_space`) holds knobs at one value each, clamps or not.
    """
    pins = pins or {}
    caps = {
        "BLOCK_SIZE_M": max(MIN_USEFUL_BLOCK_M, _pow2_ceil(M)),
        "BLOCK_SIZE_N": _pow2_ceil(max(2 * shape.N, shape.K)),
        "BLOCK_SIZE_K": _pow2_ceil(max(shape.K, shape.N)),
    }
    ranges = []
    for knob, (name, lo, hi) in LOG2_KNOBS.items():
        if knob in pins:
            lo = hi = int(math.log2(pins[knob]))
        elif knob in caps:
            hi = max(lo, min(hi, int(math.log2(caps[knob]))))
        ranges.append((name, lo, hi))
    stages = (pins["num_stages"],) * 2 if "num_stages" in pins else STAGES
    ranges.append(("num_stages", *stages))
    extras = tuple((knob, (pins[knob],) if knob in pins else values) for knob, values in extra_choices(M))
    return Space(tuple(ranges), extras)


def parse_space(spec: str | None) -> dict[str, Any]:
    """`--space` as pinned knobs: "vllm" pins every extra knob at vLLM's structure (the six knobs of
    the vLLM-format table are then the whole space), KNOB=VALUE pins one knob; comma-separated."""
    pins: dict[str, Any] = {}
    if spec is None:
        return pins
    for item in spec.split(","):
        item = item.strip()
        if item == "vllm":
            pins.update({knob: default for knob, (_, default) in EXTRA_KNOBS.items()})
            continue
        knob, sep, text = item.partition("=")
        knob, text = knob.strip(), text.strip()
        allowed = VLLM_KNOBS.get(knob) or EXTRA_KNOBS.get(knob, ((),))[0]
        if not sep or not allowed:
            known = ", ".join([*VLLM_KNOBS, *EXTRA_KNOBS])
            raise MoetuneError(f"--space {spec!r}: {item!r} is neither 'vllm' nor KNOB=VALUE with a knob of {known}")
        value = next((v for v in allowed if str(v) == text), None)
        if value is None:
            raise MoetuneError(f"--space {spec!r}: {knob}={text!r} is not allowed; use one of {list(allowed)}")
        pins[knob] = value
    return pins


def describe_space(pins: Mapping[str, Any]) -> str:
    """One line for a log: which knobs a run pinned."""
    if not pins:
        return "the whole space"
    vllm = all(pins.get(knob) == default for knob, (_, default) in EXTRA_KNOBS.items())
    rest = [f"{k}={v}" for k, v in pins.items() if not (vllm and k in EXTRA_KNOBS)]
    return ", ".join((["vLLM's six knobs only"] if vllm else []) + rest)


def to_config(params: Mapping[str, Any]) -> Config:
    """Optuna parameters -> a config: six knobs, plus each extra knob that is not vLLM's structure."""
    config: Config = {knob: 1 << int(params[name]) for knob, (name, _, _) in LOG2_KNOBS.items()}
    config["num_stages"] = int(params["num_stages"])
    config = {k: config[k] for k in KNOBS}
    for knob, (values, default) in EXTRA_KNOBS.items():
        name = _extra_param(knob)
        if name in params:
            value = values[int(params[name])] if name != knob else params[name]
            if value != default:
                config[knob] = value
    return config


def canonical(config: Mapping[str, Any]) -> Config:
    """A config from any source with extra knobs at their vLLM-structure value dropped."""
    return {k: v for k, v in config.items() if k not in EXTRA_KNOBS or v != EXTRA_KNOBS[k][1]}


def config_key(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """Identity of a config: the six knobs and every extra knob (its default where absent)."""
    return (*(int(config[k]) for k in KNOBS), *(config.get(k, d) for k, (_, d) in EXTRA_KNOBS.items()))


def six_knobs(config: Mapping[str, Any]) -> Config:
    return {k: int(config[k]) for k in KNOBS}


def shared_memory_bytes(config: Mapping[str, int], bytes_per_elem: int) -> int:
    """What the software pipeline keeps in shared memory: one A and one B tile per stage."""
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    return config["num_stages"] * (bm * bk + bk * bn) * bytes_per_elem


def accumulator_registers(config: Mapping[str, int]) -> int:
    """fp32 accumulator registers per thread: the BLOCK_M x BLOCK_N tile shared by the warps' threads."""
    return config["BLOCK_SIZE_M"] * config["BLOCK_SIZE_N"] // (32 * config["num_warps"])


def predict_infeasible(config: Mapping[str, int], bytes_per_elem: int, smem_limit: int | None) -> str | None:
    """Why config cannot run or cannot win, when that is known without compiling it; None otherwise.

    Only on a GPU (smem_limit known): the interpreter has no such limits. A tile whose accumulator
    alone needs every register a thread has spills to local memory on every k-step; it compiles, but
    the same tile with twice the warps holds it in registers, so it never wins and its compile is saved.
    """
    if smem_limit is None:
        return None
    need = shared_memory_bytes(config, bytes_per_elem)
    if need > smem_limit:
        return f"predicted shared memory {need // 1024} KiB > device limit {smem_limit // 1024} KiB"
    regs = accumulator_registers(config)
    if regs >= MAX_ACC_REGISTERS:
        return f"predicted spill: the accumulator alone needs {regs} registers per thread (limit 255)"
    return None
