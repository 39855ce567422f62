"""Shared fixtures. Without a GPU, Triton kernels go through the CPU interpreter, which must be switched on
before any kernel module is imported (triton.jit reads the setting when a kernel is defined). With a CUDA GPU
the interpreter stays off and the same tests run the compiled kernels: a kernel then takes only GPU tensors,
so every test that launches one builds its inputs on DEVICE."""

from __future__ import annotations

import os

import pytest
import torch

from moetune.device import use_interpreter_if_no_gpu

use_interpreter_if_no_gpu()

# Where Triton kernels run: compiled on the GPU when there is one, else in the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from moetune.models import PRESETS  # noqa: E402


def tiny_hf_config(**overrides):
    """transformers' MixtralConfig with the shapes of our `tiny` preset."""
    from transformers import MixtralConfig

    s = PRESETS["tiny"]
    kwargs = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        num_local_experts=s.num_experts,
        num_experts_per_tok=s.top_k,
        max_position_embeddings=s.max_position_embeddings,
        rope_theta=s.rope_theta,
        rms_norm_eps=s.rms_norm_eps,
        tie_word_embeddings=False,
        sliding_window=None,
        initializer_range=0.1,  # wider than HF's 0.02: well-separated logits, so greedy tokens never tie
    )
    return MixtralConfig(**(kwargs | overrides))


def make_tiny_checkpoint(folder: os.PathLike, seed: int = 0, **config_overrides):
    """A random HF MixtralForCausalLM saved as safetensors (the real hub layout); returns the float32 model."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_hf_config(**config_overrides)).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint_factory():
    """make_tiny_checkpoint(folder, seed=0, **MixtralConfig overrides): for tests that need their own variant."""
    return make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint_and_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    return folder, make_tiny_checkpoint(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_and_model):
    """Path of a tiny random Mixtral checkpoint (config.json + model.safetensors); read-only, shared."""
    return tiny_checkpoint_and_model[0]


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_checkpoint_and_model):
    """The transformers model that wrote tiny_checkpoint: the float32 reference for parity tests."""
    return tiny_checkpoint_and_model[1]


def tiny_engine_config(checkpoint, **overrides):
    """EngineConfig for the tiny checkpoint on the CPU: fp32 and the torch MoE path (exact vs HF), which runs
    no Triton kernel there (the torch references) on any machine. An engine with moe_backend="triton" must
    also pass device=DEVICE: on a GPU machine the interpreter is off and a CPU engine refuses the kernels."""
    from moetune.runtime import EngineConfig

    kwargs = dict(model="tiny", checkpoint=str(checkpoint), device="cpu", dtype="fp32", moe_backend="torch",
                  max_model_len=128, max_num_seqs=8)  # fmt: skip
    return EngineConfig(**(kwargs | overrides))

