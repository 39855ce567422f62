"""Tuned fused-MoE config tables (vLLM format) shipped with moetune; see README."""
