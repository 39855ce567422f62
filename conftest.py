"""Run every Triton kernel through the CPU interpreter when there is no GPU. Triton reads this
variable when a kernel is decorated, so it must be set before moetune's kernels are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
