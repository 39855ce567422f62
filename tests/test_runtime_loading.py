"""Checkpoints, tokenizer and config tables as the engine loads them: what works, and the errors when not."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetune import tables
from moetune.errors import MoetuneError
from moetune.runtime import EngineConfig, LLMEngine
from moetune.runtime import tokenizer as tokenizer_module
from moetune.runtime.tokenizer import Tokenizer, find_tokenizer_model

TINY = dict(model="tiny", device="cpu", dtype="fp32", moe_backend="torch", max_model_len=64, max_num_seqs=4)


def edited_checkpoint(src, dst, edit):
    """A copy of the tiny checkpoint whose tensors went through edit(dict) before being saved again."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    ckpt = edited_checkpoint(tiny_checkpoint, tmp_path / "ckpt", lambda w: w.pop(name))
    with pytest.raises(MoetuneError, match=f"missing tensor {name}"):
        LLMEngine(EngineConfig(checkpoint=str(ckpt), **TINY))


def test_wrong_shape_is_named_with_expected_and_found(tiny_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    ckpt = edited_checkpoint(tiny_checkpoint, tmp_path / "ckpt", lambda w: w.update({name: torch.zeros(16, 64)}))
    with pytest.raises(MoetuneError, match=rf"{name} has shape \[16, 64\], expected \[32, 64\]"):
        LLMEngine(EngineConfig(checkpoint=str(ckpt), **TINY))


def test_folder_without_safetensors_is_refused(tmp_path):
    with pytest.raises(MoetuneError, match="no \\*.safetensors"):
        LLMEngine(EngineConfig(checkpoint=str(tmp_path), **TINY))
    with pytest.raises(MoetuneError, match="does not exist"):
        LLMEngine(EngineConfig(checkpoint=str(tmp_path / "nowhere"), **TINY))


def test_config_json_shapes_override_the_preset(tmp_path, tiny_checkpoint_factory):
    hf = tiny_checkpoint_factory(tmp_path, num_hidden_layers=1, num_local_experts=3)
    eng = LLMEngine(EngineConfig(checkpoint=str(tmp_path), **TINY))
    assert (eng.spec.num_layers, eng.spec.num_experts) == (1, 3) and eng.spec.name == f"tiny@{tmp_path.name}"
    with torch.no_grad():
        ref = hf(torch.tensor([[1, 330, 28808]])).logits[0]
    torch.testing.assert_close(eng.prefill_logits([1, 330, 28808]), ref, atol=2e-5, rtol=1e-4)


def test_non_mixtral_config_is_refused(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text()) | {"model_type": "llama"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoetuneError, match="Mixtral only"):
        LLMEngine(EngineConfig(checkpoint=str(tmp_path / "ckpt"), **TINY))


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_mixtrals_and_round_trips():
    tok = Tokenizer(find_tokenizer_model(None))
    assert tok.encode("Hello, Mixtral!", bos=False) == [22557, 28725, 19630, 434, 282, 28808]
    assert tok.encode("Hello, Mixtral!")[0] == tok.bos_id == 1 and tok.eos_id == 2
    text = "Sparse experts: 8 of them, 2 per token — ünïcödé too."
    assert tok.decode(tok.encode(text)) == text


def test_checkpoint_tokenizer_wins_and_a_missing_one_is_a_clear_error(tmp_path, monkeypatch):
    shutil.copy(find_tokenizer_model(None), tmp_path / "tokenizer.model")
    assert find_tokenizer_model(str(tmp_path)) == tmp_path / "tokenizer.model"

    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(tokenizer_module.resources, "files", no_package)
    with pytest.raises(MoetuneError, match="tokenizer.model does not exist and mistral-common"):
        find_tokenizer_model(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- tables


@pytest.fixture
def no_table_env(monkeypatch):
    """No table folders from the environment, and a fresh warn-once memory."""
    monkeypatch.delenv("MOETUNE_TUNED_CONFIGS", raising=False)
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    monkeypatch.setattr(tables, "_warned", set())


def test_engine_uses_a_tuned_table_from_tuned_configs_and_can_switch_it_off(tiny_checkpoint, tmp_path, no_table_env):
    cfg = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=2, num_stages=2)
    path = tmp_path / tables.table_filename(4, 96, tables.CPU_DEVICE_NAME, "bf16")  # fp32 reads the 16-bit table
    tables.save_table(path, {1: cfg, 64: cfg})
    eng = LLMEngine(EngineConfig(checkpoint=str(tiny_checkpoint), tuned_configs=str(tmp_path), **TINY))
    assert eng.moe_table_path == path
    moe = eng.runner.model.model.layers[1].block_sparse_moe
    assert moe.tables.active.pick(3) == cfg
    eng.use_tuned_tables(False)
    assert eng.moe_table_path is None and moe.tables.active.pick(3) == tables.default_config(3, 4)
    eng.use_tuned_tables(True)
    assert eng.moe_table_path == path


def test_engine_without_a_table_falls_back_to_the_default_with_one_warning(
    tiny_checkpoint, tmp_path, no_table_env, caplog
):
    with caplog.at_level(logging.WARNING, logger="moetune"):
        for _ in range(2):
            eng = LLMEngine(EngineConfig(checkpoint=str(tiny_checkpoint), tuned_configs=str(tmp_path), **TINY))
            assert eng.moe_table_path is None
    warnings = [r for r in caplog.records if "no tuned MoE config table" in r.getMessage()]
    assert len(warnings) == 1 and "E=4,N=96" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"", "the file is empty"),
        (lambda b: b[: len(b) // 2], "not a valid safetensors file"),  # truncated: the header promises more
        (lambda b: b"\xff" * 64 + b[64:], "not a valid safetensors file"),  # corrupt header
    ],
)
def test_bad_safetensors_file_is_named_with_what_is_wrong(tiny_checkpoint, tmp_path, damage, message):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(MoetuneError, match=rf"{f}: {message}"):
        LLMEngine(EngineConfig(checkpoint=str(tmp_path / "ckpt"), **TINY))


@pytest.mark.parametrize(("key", "value", "message"), [("hidden_size", "64", "hidden_size must be an integer, found str"),
                                                         ("rms_norm_eps", [1e-5], "rms_norm_eps must be a number")])
def test_config_json_with_a_wrong_type_is_named(tiny_checkpoint, tmp_path, key, value, message):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(MoetuneError, match=rf"{path}: {message}"):
        LLMEngine(EngineConfig(checkpoint=str(tmp_path / "ckpt"), **TINY))


def test_corrupt_tokenizer_model_is_named(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(b"not a sentencepiece model" * 10)
    with pytest.raises(MoetuneError, match=rf"{tmp_path / 'ckpt' / 'tokenizer.model'}: not a valid sentencepiece"):
        LLMEngine(EngineConfig(checkpoint=str(tmp_path / "ckpt"), **TINY))
