"""The search space of the six launch knobs, as Optuna sees it.

Power-of-two knobs are searched as their log2 exponents (ordered integers), so TPE learns that 64
lies between 32 and 128 instead of treating each size as an unrelated category. The space is a
superset of vLLM's 1,920-config grid: it also holds BLOCK_SIZE_K=32 and GROUP_SIZE_M 2..8, because
vLLM's default config uses them and every study starts from that default.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from optuna.distributions import IntDistribution

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


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclass(frozen=True)
class Space:
    """Inclusive integer ranges of the Optuna parameters for one M."""

    ranges: tuple[tuple[str, int, int], ...]

    def distributions(self) -> dict[str, IntDistribution]:
        return {name: IntDistribution(lo, hi) for name, lo, hi in self.ranges}

    def grid(self) -> dict[str, list[int]]:
        return {name: list(range(lo, hi + 1)) for name, lo, hi in self.ranges}

    def size(self) -> int:
        return math.prod(hi - lo + 1 for _, lo, hi in self.ranges)

    def configs(self) -> list[Config]:
        """Every config of the space, in grid order."""
        names = [name for name, _, _ in self.ranges]
        return [to_config(dict(zip(names, values))) for values in itertools.product(*self.grid().values())]

    def params(self, config: Mapping[str, int]) -> dict[str, int]:
        """A config (e.g. from an old table or a neighbouring M) moved to the nearest point of this space."""
        out = {}
        for name, lo, hi in self.ranges:
            knob = name.removesuffix("_log2")
            value = int(config[knob])
            out[name] = min(hi, max(lo, round(math.log2(value)) if name.endswith("_log2") else value))
        return out


def space_for(M: int, shape: MoeShape) -> Space:
    """The space for token count M, with blocks that can only add padding clamped away.

    Top-k picks distinct experts, so no expert receives more than M slots: a BLOCK_SIZE_M above
    next_pow2(M) only pads every block further (kept >= 64 for wgmma). Likewise BLOCK_SIZE_N above the
    widest GEMM output (2N for GEMM1, K for GEMM2) and BLOCK_SIZE_K above the deepest reduction
    (K, N) are all padding. For real models only the BLOCK_SIZE_M clamp ever bites.
    """
    caps = {
        "BLOCK_SIZE_M": max(MIN_USEFUL_BLOCK_M, _pow2_ceil(M)),
        "BLOCK_SIZE_N": _pow2_ceil(max(2 * shape.N, shape.K)),
        "BLOCK_SIZE_K": _pow2_ceil(max(shape.K, shape.N)),
    }
    ranges = []
    for knob, (name, lo, hi) in LOG2_KNOBS.items():
        if knob in caps:
            hi = max(lo, min(hi, int(math.log2(caps[knob]))))
        ranges.append((name, lo, hi))
    ranges.append(("num_stages", *STAGES))
    return Space(tuple(ranges))


def to_config(params: Mapping[str, int]) -> Config:
    config = {knob: 1 << int(params[name]) for knob, (name, _, _) in LOG2_KNOBS.items()}
    config["num_stages"] = int(params["num_stages"])
    return {k: config[k] for k in KNOBS}


def config_key(config: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(config[k]) for k in KNOBS)


def shared_memory_bytes(config: Mapping[str, int], bytes_per_elem: int) -> int:
    """What the software pipeline keeps in shared memory: one A and one B tile per stage."""
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    return config["num_stages"] * (bm * bk + bk * bn) * bytes_per_elem


def predict_infeasible(config: Mapping[str, int], bytes_per_elem: int, smem_limit: int | None) -> str | None:
    """Why config cannot run, when that is known without compiling it; None when it may run."""
    if smem_limit is None:
        return None
    need = shared_memory_bytes(config, bytes_per_elem)
    if need > smem_limit:
        return f"predicted shared memory {need // 1024} KiB > device limit {smem_limit // 1024} KiB"
    return None
