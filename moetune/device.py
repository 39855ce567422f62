"""Which way Triton kernels run here: compiled for the GPU, or through the CPU interpreter."""

from __future__ import annotations

import os


def use_interpreter_if_no_gpu() -> bool:
    """With no GPU only Triton's interpreter can run a kernel. Triton decides compiled-or-interpreted
    when each @triton.jit kernel is defined, so entry points call this before importing any kernel."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET") == "1"
