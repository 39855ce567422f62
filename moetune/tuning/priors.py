"""Built-in priors: a few strong configs per M range on Hopper (H100/H200), where every study starts.

Measured winners: the vLLM-structure configs of the tables tuned on an H100 on 2026-11-25
(`tuned_configs/E=8,N=14336,...,dtype=fp8_w8a8.json` for fp8, `E=8,N=7168,...H100_80GB_HBM3.json` for bf16),
plus vLLM's own config where it beat our table's entry on our kernel in the same run (fp8 M=256:
128/128/128/1/8/3, 543 against 568 µs, `benchmarks/results/h100-2026-11-25/vllm_side_by_side_tuned.json`).
They are where studies start, not a result: the tuner re-times the best of them against what it finds.
A prior that a study's space cannot hold (the tiny CPU model clamps tiles) is moved to the space's nearest point.
"""

from __future__ import annotations

from moetune.tables import Config


def _c(bm: int, bn: int, bk: int, g: int, w: int, s: int) -> Config:
    return dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=g, num_warps=w, num_stages=s)


# dtype -> ((largest M of the range, configs best first), ...), ranges in increasing M
HOPPER_PRIORS: dict[str, tuple[tuple[int, tuple[Config, ...]], ...]] = {
    "fp8": (
        (8, (_c(64, 128, 256, 1, 4, 4), _c(64, 128, 256, 2, 4, 4), _c(64, 64, 256, 2, 4, 5))),
        (128, (_c(64, 128, 256, 1, 4, 4), _c(64, 64, 128, 1, 8, 5))),
        (384, (_c(128, 128, 128, 1, 8, 3), _c(64, 128, 256, 16, 4, 4))),
        (1 << 30, (_c(128, 256, 128, 32, 8, 4), _c(128, 256, 128, 64, 8, 4), _c(128, 256, 128, 16, 8, 4))),
    ),
    "bf16": (
        (48, (_c(16, 64, 256, 1, 4, 4), _c(16, 128, 128, 1, 4, 5))),
        (128, (_c(64, 128, 128, 1, 4, 4), _c(32, 128, 128, 16, 4, 4))),
        (384, (_c(128, 128, 128, 1, 4, 3), _c(64, 128, 128, 16, 4, 3))),
        (1 << 30, (_c(128, 256, 64, 16, 8, 4), _c(128, 256, 64, 32, 8, 4), _c(128, 256, 64, 64, 8, 3))),
    ),
}
HOPPER_PRIORS["fp16"] = HOPPER_PRIORS["bf16"]  # same bytes per element, same tiles


def prior_configs(M: int, dtype: str) -> list[Config]:
    """The built-in priors for token count M, best first."""
    for top, configs in HOPPER_PRIORS[dtype]:
        if M <= top:
            return [dict(c) for c in configs]
    return []
