"""A cheap, deterministic stand-in for the kernel, for tests and search-quality experiments.

Its landscape has what the real one has: an optimum that moves with M, knobs that interact, configs
that fail to compile, configs that fail at launch, and configs that give wrong results.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

from moetune.tables import Config
from moetune.tuning.bench import Infeasible
from moetune.tuning.space import config_key


def synthetic_us(config: Config, M: int) -> float:
    """µs of a made-up layer: each knob costs more the further (in log2 steps) it is from M's ideal."""
    ideal = {
        "BLOCK_SIZE_M": min(128, max(16, 2 ** math.ceil(math.log2(M)))),
        "BLOCK_SIZE_N": 64 if M < 64 else 128,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 16,
        "num_warps": 4 if M < 256 else 8,
        "num_stages": 3 if M < 256 else 4,
    }
    cost = 1.0
    for knob, best in ideal.items():
        value = config[knob]
        distance = abs(value - best) if knob == "num_stages" else abs(math.log2(value) - math.log2(best))
        cost *= 1 + 0.15 * distance**2
    # an interaction: big N tiles only pay off with big K tiles
    if config["BLOCK_SIZE_N"] >= 128 and config["BLOCK_SIZE_K"] < 64:
        cost *= 1.3
    # extra knobs: fusing SiLU saves the intermediate's round trip once it is big; GEMV wins decode
    if config.get("fuse_silu"):
        cost *= 0.95 if M >= 32 else 1.02
    if config.get("kernel") == "gemv":
        cost *= 0.85 if M <= 4 else 1.1
    return 20.0 * cost + 0.01 * M


class SyntheticBench:
    """Bench protocol over `synthetic_us`; `delay_s` makes each timing take real time. `noise` is the
    relative spread of a 1-rep timing; a median of `reps` shrinks it as 1/sqrt(reps), as on a GPU."""

    tolerance = 1e-2
    timings_meaningful = False

    def __init__(self, *, delay_s: float = 0.0, noise: float = 0.0, seed: int = 0, log_path: str | None = None):
        self.delay_s, self.noise = delay_s, noise
        self._rng = random.Random(seed)
        self._log = Path(log_path) if log_path else None

    def compile(self, configs: Sequence[Config], M: int, timeout_s: float | None = None) -> list[str | None]:
        return [
            "synthetic compile error: too many registers"
            if c["num_warps"] == 8 and c["BLOCK_SIZE_N"] == 256 and c["BLOCK_SIZE_K"] == 256
            else None
            for c in configs
        ]

    def verify(self, config: Config, M: int) -> float:
        return 0.5 if config["GROUP_SIZE_M"] == 2 else 1e-4  # GROUP_SIZE_M=2 "computes garbage"

    def time(self, config: Config, M: int, reps: int) -> float:
        if self._log:
            with self._log.open("a") as f:
                f.write(f"{M} {' '.join(map(str, config_key(config)))} {reps}\n")
        time.sleep(self.delay_s)
        if config["BLOCK_SIZE_M"] == 256 and config["num_stages"] == 5:
            raise Infeasible("synthetic OutOfResources at launch")
        return synthetic_us(config, M) * (1 + self.noise / math.sqrt(reps) * self._rng.gauss(0, 1))

    def close(self) -> None:
        pass
