"""Built-in priors: a few strong configs per M range on Hopper (H100/H200), where every study starts.

These are starting points, not results: they come from what is known to run well on Hopper for
Mixtral-sized layers (wgmma wants 64-row tiles, fp8 wants deep K tiles), and are to be replaced by
the measured winners of the committed tables once the lead has run them on the GPU. A prior that a
study's space cannot hold (the tiny CPU model clamps tiles) is moved to the space's nearest point.
"""

from __future__ import annotations

from moetune.tables import Config


def _c(bm: int, bn: int, bk: int, g: int, w: int, s: int) -> Config:
    return dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=g, num_warps=w, num_stages=s)


# dtype -> ((largest M of the range, configs best first), ...), ranges in increasing M
HOPPER_PRIORS: dict[str, tuple[tuple[int, tuple[Config, ...]], ...]] = {
    "fp8": (
        (64, (_c(64, 128, 256, 1, 4, 4), _c(64, 64, 128, 1, 8, 5))),
        (384, (_c(128, 128, 128, 16, 8, 3), _c(64, 128, 256, 16, 4, 4))),
        (1 << 30, (_c(128, 256, 128, 16, 8, 3), _c(128, 256, 128, 16, 8, 4), _c(128, 256, 64, 16, 8, 4))),
    ),
    "bf16": (
        (64, (_c(16, 128, 128, 1, 4, 5), _c(64, 64, 64, 1, 4, 4))),
        (384, (_c(32, 128, 128, 16, 4, 4), _c(64, 128, 128, 16, 4, 3))),
        (1 << 30, (_c(128, 256, 64, 16, 8, 4), _c(128, 128, 64, 16, 8, 4))),
    ),
}
HOPPER_PRIORS["fp16"] = HOPPER_PRIORS["bf16"]  # same bytes per element, same tiles


def prior_configs(M: int, dtype: str) -> list[Config]:
    """The built-in priors for token count M, best first."""
    for top, configs in HOPPER_PRIORS[dtype]:
        if M <= top:
            return [dict(c) for c in configs]
    return []
