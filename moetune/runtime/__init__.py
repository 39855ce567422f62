"""The bundled Mixtral runtime (nano-vllm style): continuous batching over a paged KV cache, decode as
CUDA graphs, and every MoE layer on the tuned fused kernel, switchable to vLLM's untuned default.

The exports load lazily: the HTTP process imports moetune.runtime.tokenizer without paying for torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"EngineConfig": "config", "LLMEngine": "engine", "StepOutput": "engine", "SamplingParams": "sampling"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moetune.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moetune.runtime.{_EXPORTS[name]}"), name)
