"""What Triton's CPU interpreter (TRITON_INTERPRET=1, triton 3.9.0) gets wrong, and the workarounds.
The GPU path compiles them away: every kernel gets INTERPRETED as a constexpr."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def downcast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 -> dtype, round to nearest even. The GPU's cvt does exactly this. The interpreter
    truncates to bf16 and drops the exponent carry in fp8 (7.9 -> 4.0), so there we round in fp32
    first and the final cast is exact. Checked bit-exact against torch's casts, subnormals included."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        elif dtype == tl.float8e4nv:
            bits = x.to(tl.uint32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
            sub = ((tl.abs(x) * 512.0 + 8388608.0) - 8388608.0) / 512.0  # subnormal grid is 2^-9
            x = tl.where(tl.abs(x) >= 0.015625, normal, tl.where(x < 0, -sub, sub))
    return x.to(dtype)


@triton.jit
def add_into(ptrs, val, mask, INTERPRETED: tl.constexpr):
    """*ptrs += val, atomically, in the pointers' 16-bit dtype (val already rounded to it): the hardware
    adds exactly and rounds once to nearest even. The interpreter has no 16-bit atomics; it runs one
    program at a time, so there a load, an fp32 add and a rounded store do the same."""
    if INTERPRETED:
        cur = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, downcast(cur + val.to(tl.float32), ptrs.dtype.element_ty, INTERPRETED), mask=mask)
    else:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
