"""Triton kernels for the fused MoE layer, each beside its launcher and a torch reference."""
