"""Every knob a fused-MoE config may carry, and the one check every config passes before launch.

vLLM's six knobs go into the vLLM-format table. The extra knobs are ours: they select kernel variants
vLLM does not have, so they live only in the sidecar (and in configs passed to `fused_moe`). A config
from a file, a CLI or a test is checked here once, with an error that names the knob, the value and
where the config came from, instead of failing deep inside a launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetune.errors import MoetuneError

# vLLM's six launch knobs, and the values its kernel (and ours) accepts for each.
VLLM_KNOBS: dict[str, tuple[int, ...]] = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_K": (16, 32, 64, 128, 256),
    "GROUP_SIZE_M": (1, 2, 4, 8, 16, 32, 64),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4, 5, 6, 7),
}

# Our extra knobs: name -> (allowed values, the value that means "vLLM's structure").
#   kernel     "tiled": route+align, GEMM1, SiLU, GEMM2 (vLLM's structure); "gemv": moe_gemv.py, decode only
#   fuse_silu  1: GEMM1 computes gate and up tiles of the same columns and writes silu(gate) * up
#              directly, so the [S, 2N] intermediate never reaches memory (moe_gemm.py)
EXTRA_KNOBS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "kernel": (("tiled", "gemv"), "tiled"),
    "fuse_silu": ((0, 1), 0),
}
FUSE_SILU_MIN_BLOCK_N = 32  # fuse_silu splits a BLOCK_SIZE_N tile into gate and up halves, each a tl.dot of >= 16


def is_vllm_structure(config: Mapping[str, Any]) -> bool:
    """True when the config runs the kernel structure vLLM has, so its six knobs mean the same there."""
    return all(config.get(k, default) == default for k, (_, default) in EXTRA_KNOBS.items())


def check_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """The config as a plain dict, or a MoetuneError naming the knob, the value and `source`."""
    if not isinstance(config, Mapping):
        raise MoetuneError(f"{source}: a config must be a mapping of knobs, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for knob, value in config.items():
        if knob in VLLM_KNOBS:
            allowed: tuple[Any, ...] = VLLM_KNOBS[knob]
            ok = type(value) is int and value in allowed  # 16.0 or True is no block size
        elif knob in EXTRA_KNOBS:
            allowed = EXTRA_KNOBS[knob][0]
            ok = value in allowed and type(value) is type(allowed[0])
        else:
            known = ", ".join([*VLLM_KNOBS, *EXTRA_KNOBS])
            raise MoetuneError(f"{source}: unknown knob {knob!r} (= {value!r}); known knobs: {known}")
        if not ok:
            raise MoetuneError(f"{source}: {knob}={value!r} is not allowed; use one of {list(allowed)}")
        out[knob] = value
    missing = [k for k in VLLM_KNOBS if k not in out]
    if missing:
        raise MoetuneError(f"{source}: missing knob(s) {missing}; a config needs all of {list(VLLM_KNOBS)}")
    return out
