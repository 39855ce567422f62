"""vLLM-compatible table naming, loading, lookup and error messages."""

from __future__ import annotations

import json
import logging

import pytest

from moetune import tables
from moetune.errors import MoetuneError, TableError
from moetune.models import get_model, moe_shape

GOOD = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}


@pytest.mark.parametrize(
    "args,name",
    [
        ((8, 14336, "NVIDIA_H100_80GB_HBM3", "fp8"), "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"),
        ((8, 7168, "NVIDIA_H200", "bf16"), "E=8,N=7168,device_name=NVIDIA_H200.json"),
        ((8, 3584, "NVIDIA_H200", "fp16"), "E=8,N=3584,device_name=NVIDIA_H200.json"),
    ],
)
def test_file_names_match_vllms_real_ones(args, name):
    assert tables.table_filename(*args) == name
    parts = tables.parse_table_filename(name)
    assert (parts["E"], parts["N"], parts["device"]) == args[:3]


def test_block_shape_names_parse():
    parts = tables.parse_table_filename("E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json")
    assert parts["block_shape"] == [128, 128] and parts["dtype"] == "fp8_w8a8"
    assert tables.parse_table_filename("notes.json") is None


def test_sidecar_sits_beside_its_table():
    path = tables.sidecar_path(tables.Path("t/E=8,N=7168,device_name=NVIDIA_H200.json"))
    assert path.as_posix() == "t/E=8,N=7168,device_name=NVIDIA_H200.moetune.json"


@pytest.mark.parametrize("tp,N", [(1, 14336), (2, 7168), (4, 3584), (8, 1792)])
def test_tensor_parallel_shards_n_like_vllm(tp, N):
    assert moe_shape(get_model("mixtral-8x7b"), tp).N == N


def test_tp_that_does_not_divide_n_is_rejected():
    with pytest.raises(MoetuneError, match="does not divide"):
        moe_shape(get_model("mixtral-8x7b"), 3)


def test_nearest_m_picks_closest_and_breaks_ties_low():
    keys = [1, 16, 64, 256]
    assert tables.nearest(keys, 1) == 1
    assert tables.nearest(keys, 40) == 16  # tie between 16 and 64 goes to the smaller
    assert tables.nearest(keys, 41) == 64
    assert tables.nearest(keys, 100000) == 256


def test_save_then_load_round_trips_and_keeps_only_the_six_knobs(tmp_path):
    path = tmp_path / "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
    tables.save_table(path, {64: GOOD, 1: GOOD})
    raw = json.loads(path.read_text())
    assert list(raw) == ["1", "64", "triton_version"]
    assert tables.load_table(path) == {1: GOOD, 64: GOOD}
    # what vLLM does with it: drop triton_version, int() every other key
    raw.pop("triton_version")
    assert {int(k): v for k, v in raw.items()} == {1: GOOD, 64: GOOD}


def test_find_table_uses_the_folder_given(tmp_path, caplog):
    shape = moe_shape(get_model("mixtral-8x7b"), 2)
    tables.save_table(tmp_path / tables.table_filename(8, 7168, "NVIDIA_H200", "bf16"), {16: GOOD})
    table = tables.find_table(shape, "bf16", device="NVIDIA_H200", folders=[tmp_path])
    assert table.path == tmp_path / "E=8,N=7168,device_name=NVIDIA_H200.json"
    assert table.pick(1) == GOOD and table.pick(5000) == GOOD


def test_sidecar_configs_with_extra_knobs_are_what_our_kernel_runs(tmp_path):
    path = tmp_path / tables.table_filename(8, 7168, "NVIDIA_H200", "bf16")
    gemv = {**GOOD, "kernel": "gemv"}
    sidecar = {
        "table": path.name, "device": "NVIDIA_H200", "dtype": "bf16",
        "shape": {"E": 8, "N": 7168, "K": 4096, "top_k": 2},
        "versions": {"torch": "2.11", "triton": "3.6", "moetune": "0.1.0"},
        "entries": {"1": {"config": gemv}, "64": {"config": GOOD}},
    }
    tables.save_table(path, {1: GOOD, 64: {**GOOD, "BLOCK_SIZE_M": 64}}, sidecar)
    assert "kernel" not in json.loads(path.read_text())["1"], "vLLM's file keeps six knobs"
    table = tables.find_table(moe_shape(get_model("mixtral-8x7b"), 2), "bf16", "NVIDIA_H200", [tmp_path])
    assert table.pick(2) == gemv
    assert table.pick(100)["BLOCK_SIZE_M"] == 64, "without extra knobs the table's own config is used"


def test_unknown_gpu_falls_back_to_default_with_one_warning(tmp_path, caplog):
    shape = moe_shape(get_model("mixtral-8x7b"), 1)
    with caplog.at_level(logging.WARNING, logger="moetune"):
        for _ in range(3):
            table = tables.find_table(shape, "fp8", device="Imaginary_GPU_9000", folders=[tmp_path])
    warnings = [r for r in caplog.records if "E=8,N=14336,device_name=Imaginary_GPU_9000,dtype=fp8_w8a8.json" in r.msg % r.args]
    assert len(warnings) == 1
    assert table.path is None and table.pick(4) == tables.default_config(4, 8)


def _write(tmp_path, text):
    path = tmp_path / "E=8,N=14336,device_name=NVIDIA_H200.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"1": {"BLOCK_SIZE_M": 16,', "not valid JSON (line 1"),
        ({"1": {k: v for k, v in GOOD.items() if k != "BLOCK_SIZE_K"}}, "M=1: 'BLOCK_SIZE_K' is missing"),
        ({"16": {**GOOD, "BLOCK_SIZE_M": 48}}, "M=16: BLOCK_SIZE_M=48 must be a power of two"),
        ({"abc": GOOD}, "key 'abc' is not a token count"),
        ({"1.5": GOOD}, "key '1.5' is not a token count"),
        ({"8": {**GOOD, "num_warps": 3}}, "M=8: num_warps=3"),
        ({"8": {**GOOD, "split_k": 2}}, "M=8: unknown knob(s) ['split_k']"),
        ({"8": {**GOOD, "num_stages": "3"}}, "M=8: num_stages '3' is not of type 'integer'"),
        ([GOOD], "top level must be a JSON object"),
        ({}, "the table is empty"),
    ],
)
def test_malformed_tables_each_get_their_own_clear_error(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(TableError) as err:
        tables.load_table(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TableError, match="no such file"):
        tables.load_table(tmp_path / "nope.json")


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    tables.atomic_write_json(path, {"v": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        tables.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"], "no temp file left behind"


def test_save_refuses_a_config_vllm_could_not_load(tmp_path):
    with pytest.raises(TableError, match="power of two"):
        tables.save_table(tmp_path / "x.json", {1: {**GOOD, "BLOCK_SIZE_N": 100}})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ({"16": {**GOOD, "BLOCK_SIZE_M": 16.0}}, "M=16: BLOCK_SIZE_M=16.0 must be an integer (write 16)"),
        ({"99999999999999999999999": GOOD}, "key '99999999999999999999999' is not a token count"),
        ({"01": GOOD, "1": GOOD}, "key '01' is not a token count"),
        ({"-1": GOOD}, "key '-1' is not a token count"),
    ],
)
def test_integers_only_and_bounded_m_keys_named(tmp_path, content, message):
    with pytest.raises(TableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tables.load_table(_write(tmp_path, content))


def _sidecar(path, **entry_config):
    return {
        "table": path.name, "device": "NVIDIA_H200", "dtype": "bf16", "shape": {"E": 8, "N": 7168, "K": 4096, "top_k": 2},
        "versions": {"torch": "2.11", "triton": "3.6", "moetune": "0.1.0"},
        "entries": {"1": {"config": {**GOOD, **entry_config}}},
    }


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"kernel": "gemm"}, "M=1: config: kernel='gemm' is not allowed; use one of ['tiled', 'gemv']"),
        ({"fuse_silu": 2}, "M=1: config: fuse_silu=2 is not allowed"),
        ({"split_kk": 2}, "M=1: config: unknown knob 'split_kk'"),
    ],
)
def test_sidecar_extra_knobs_are_checked_against_knobs_py_when_the_table_is_loaded(tmp_path, extra, message):
    path = tmp_path / tables.table_filename(8, 7168, "NVIDIA_H200", "bf16")
    tables.save_table(path, {1: GOOD})
    tables.sidecar_path(path).write_text(json.dumps(_sidecar(path, **extra)))
    with pytest.raises(TableError) as err:
        tables.ConfigTable.load(path, 8)
    assert str(tables.sidecar_path(path)) in str(err.value) and message in str(err.value)


def test_a_sidecar_with_an_impossible_shape_is_refused(tmp_path):
    path = tmp_path / tables.table_filename(8, 7168, "NVIDIA_H200", "bf16")
    side = _sidecar(path)
    side["shape"]["top_k"] = 9
    tables.save_table(path, {1: GOOD})
    tables.sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(TableError, match="top_k=9 exceeds E=8"):
        tables.load_sidecar(path)


def test_non_utf8_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "")
    path.write_bytes(b'{"1": "\xff\xfe"}')
    with pytest.raises(TableError, match="not UTF-8 text"):
        tables.load_table(path)


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        tables.atomic_write_json(tmp_path / "a.json", {})
        os.umask(0o077)
        tables.atomic_write_text(tmp_path / "b.csv", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o600


def test_no_table_for_this_dtype_but_one_for_another_says_so(tmp_path, caplog):
    shape = moe_shape(get_model("mixtral-8x7b"), 1)
    tables.save_table(tmp_path / tables.table_filename(8, 14336, "NVIDIA_H100", "bf16"), {1: GOOD})
    with caplog.at_level(logging.WARNING, logger="moetune"):
        tables.find_table(shape, "fp8", device="NVIDIA_H100", folders=[tmp_path])
    text = " ".join(r.msg % r.args for r in caplog.records)
    assert "for fp8" in text and "there is one for another dtype: bf16" in text
