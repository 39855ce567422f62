"""The bundled Mixtral runtime (nano-vllm style): continuous batching over a paged KV cache, decode as
CUDA graphs, and every MoE layer on the tuned fused kernel, switchable to vLLM's untuned default."""

from moetune.runtime.config import EngineConfig
from moetune.runtime.engine import LLMEngine, StepOutput
from moetune.runtime.sampling import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "SamplingParams", "StepOutput"]
