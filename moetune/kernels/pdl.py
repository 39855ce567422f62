"""Programmatic Dependent Launch (PDL, sm_90+): the one place that decides whether our kernels use it.

Why: a batch-1 decode step is ~520 launches of kernels a few µs long. Without PDL the GPU drains one grid
completely, then launches the next and ramps it up. With PDL (launch_pdl=True) the next grid is launched
while this one finishes, so its launch and prologue (index math, pointer setup, weight-only loads)
overlap this one's tail; `gdc_wait` then holds it until the previous grid has completed and its memory
is visible.

The safety rule, for every kernel launched with launch_pdl=True (USE_PDL=True, `wait_previous` below):
* every program calls `wait_previous` unconditionally, at the top level of the kernel, before its first
  load of anything an earlier kernel may write (activations, routing, KV cache, counters) and before its
  first store or atomic (a store could race with the previous kernel still reading it). Only index math,
  pointer setup, loads of weights and scales (nothing in a step writes them) and L2 prefetches (a hint that
  returns no data: L2 is where the previous kernel's writes land) may come before it.
  Unconditional, early-return paths included, because waits chain: kernel N+1's wait covers kernel N-1
  only through kernel N's wait (N could complete before N-1 if all its programs skipped theirs).
* `wait_previous` then lets the next kernel launch early: safe, since that kernel's own wait still waits
  for the whole of this grid.
A kernel after a torch op (cuBLAS, memset, copy) is fine too: the launch attribute only relaxes ordering
with the previous kernel, and the wait restores it. tests/test_pdl.py checks the rule on the sources.

On by default where it can be: a CUDA device of compute capability >= 9, not the interpreter. Off with
MOETUNE_PDL=0 (inherited by TP workers) or set_enabled(False) (this process). Read at every launch, so a
re-captured CUDA graph picks up a change.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moetune.kernels.interp import interpreting

DEFAULT = os.environ.get("MOETUNE_PDL", "1") != "0"  # the switch's value at import
_enabled = DEFAULT


def set_enabled(on: bool) -> None:
    """The process-wide switch; launches from now on (and graphs captured from now on) follow it."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """The switch alone; whether a launch uses PDL is `launch_kwargs(device)["launch_pdl"]`."""
    return _enabled


@functools.cache
def _sm90_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch_kwargs(device: torch.device) -> dict[str, bool]:
    """`**` these into a launch on `device`: the launch attribute and the kernel's constexpr, always equal
    (a PDL launch whose kernel does not wait would race)."""
    on = _enabled and device.type == "cuda" and not interpreting()
    on = on and _sm90_or_later(device.index if device.index is not None else torch.cuda.current_device())
    return {"launch_pdl": on, "USE_PDL": on}


@triton.jit
def wait_previous(USE_PDL: tl.constexpr):
    """Wait until the previous grid has completed and its writes are visible, then let the next grid
    launch. A no-op (not even traced) without USE_PDL, so the interpreter never meets the inline asm."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
