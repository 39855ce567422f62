"""`moetune show` and `moetune validate` on hand-made tables and sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.tables import save_table, sidecar_path

NAME = "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
A = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4)
B = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=16, num_warps=8, num_stages=3)


def sidecar_for(name: str, configs: dict[int, dict]) -> dict:
    return {
        "table": name, "model": "mixtral-8x7b", "device": "NVIDIA_H100_80GB_HBM3", "dtype": "fp8",
        "timings_meaningful": True, "shape": {"E": 8, "N": 14336, "K": 4096, "top_k": 2, "tp": 1},
        "versions": {"torch": "2.11", "triton": "3.6", "moetune": "0.1.0"}, "wall_time_s": 125.0,
        "entries": {str(M): {"config": c, "tuned_us": 50.0, "default_us": 80.0, "speedup": 1.6, "trials": 100,
                             "rel_err": 0.02} for M, c in configs.items()},
    }  # fmt: skip


def make_table(folder: Path, name: str = NAME, sidecar: bool = True) -> Path:
    configs = {1: A, 64: B}
    save_table(folder / name, configs, sidecar_for(name, configs) if sidecar else None)
    return folder / name


def test_show_prints_each_M_with_its_config_timings_and_speedup(tmp_path, capsys):
    path = make_table(tmp_path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b tp=1 E=8 N=14336 K=4096 top_k=2 fp8 on NVIDIA_H100_80GB_HBM3" in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["64"])
    assert row.split() == ["64", "64", "128", "128", "16", "8", "3", "50.0", "=", "50.0", "80.0", "1.60x", "100",
                           "2.0e-02", "tuned"]
    assert "meaningless" not in out


def test_show_works_without_a_sidecar_and_from_the_sidecar_name(tmp_path, capsys):
    path = make_table(tmp_path, sidecar=False)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no sidecar" in out and out.splitlines()[-1].split()[:7] == ["64", "64", "128", "128", "16", "8", "3"]
    make_table(tmp_path)
    assert main(["show", str(sidecar_path(path))]) == 0
    assert "1.60x" in capsys.readouterr().out


def test_show_of_a_missing_file_is_one_clear_line(tmp_path, capsys):
    assert main(["show", str(tmp_path / NAME)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and err.count("\n") == 1


def test_validate_passes_a_good_folder(tmp_path, capsys):
    make_table(tmp_path)
    make_table(tmp_path, NAME.replace(",dtype=fp8_w8a8", "").replace("H100_80GB_HBM3", "H200"), sidecar=False)
    assert main(["validate", str(tmp_path)]) == 0
    assert "ok: 2 table(s)" in capsys.readouterr().out


def test_validate_lists_every_problem_and_exits_nonzero(tmp_path, capsys):
    make_table(tmp_path)  # fine
    (tmp_path / "mixtral-table.json").write_text(json.dumps({"1": A}))  # bad name
    (tmp_path / NAME.replace("E=8", "E=16")).write_text(json.dumps({"1": A, "best": A}))  # not a token count
    wrong = make_table(tmp_path, NAME.replace("H100_80GB_HBM3", "H200"))  # sidecar says H100
    side = json.loads(sidecar_path(wrong).read_text())
    side["entries"]["64"]["config"] = A  # and disagrees with the table at M=64
    del side["entries"]["1"]  # and misses M=1
    sidecar_path(wrong).write_text(json.dumps(side))
    (tmp_path / "E=8,N=7168,device_name=NVIDIA_H200.moetune.json").write_text("{}")  # sidecar without table

    assert main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    expected = [
        "mixtral-table.json: name does not follow",
        "key 'best' is not a token count",
        "device is 'NVIDIA_H100_80GB_HBM3' but the table's name says 'NVIDIA_H200'",
        "entries do not match the table's M (missing [1], extra [])",
        "M=64: config differs from the table's",
        "sidecar without its table",
        "6 problem(s)",
    ]
    for text in expected:
        assert text in err, text
    assert "Traceback" not in err


def test_validate_checks_sidecars_against_their_schema(tmp_path, capsys):
    path = make_table(tmp_path)
    side = json.loads(sidecar_path(path).read_text())
    side["dtype"] = "fp4"
    sidecar_path(path).write_text(json.dumps(side))
    assert main(["validate", str(tmp_path)]) == 1
    assert "dtype" in capsys.readouterr().err


def test_validate_of_a_missing_folder_is_one_clear_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_validate_defaults_to_the_packaged_tables(capsys):
    assert main(["validate"]) == 0
    assert "tuned_configs" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_validate_runs_this_devices_tables_through_the_kernel_and_reports_wrong_results(
    tmp_path, capsys, monkeypatch, dtype
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU_triton_interpreter tables only run on a machine without a GPU")
    suffix = ",dtype=fp8_w8a8" if dtype == "fp8" else ""
    name = f"E=4,N=96,device_name=CPU_triton_interpreter{suffix}.json"
    side = sidecar_for(name, {1: A}) | {"device": "CPU_triton_interpreter", "dtype": dtype, "model": "tiny"}
    side["shape"] = {"E": 4, "N": 96, "K": 64, "top_k": 2, "tp": 1}
    save_table(tmp_path / name, {1: A}, side)
    assert main(["validate", str(tmp_path)]) == 0
    assert "1 configs ran right on this device" in capsys.readouterr().out

    from moetune.tuning.bench import KernelBench

    monkeypatch.setattr(KernelBench, "verify", lambda self, config, M: 0.5)
    assert main(["validate", str(tmp_path)]) == 1
    assert "M=1: wrong result, rel_err 0.5" in capsys.readouterr().err


def test_validate_runs_a_sidecar_config_with_knobs_vllm_lacks(tmp_path, capsys, monkeypatch):
    """A sidecar may give our kernel its own config for an M (e.g. the decode GEMV path) while the
    table keeps a six-knob one for vLLM: validate accepts that and runs the sidecar's config."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU_triton_interpreter tables only run on a machine without a GPU")
    name = "E=4,N=96,device_name=CPU_triton_interpreter.json"
    gemv = dict(A, BLOCK_SIZE_N=16, BLOCK_SIZE_K=32, kernel="gemv")
    side = sidecar_for(name, {1: gemv}) | {"device": "CPU_triton_interpreter", "dtype": "bf16", "model": "tiny"}
    side["shape"] = {"E": 4, "N": 96, "K": 64, "top_k": 2, "tp": 1}
    save_table(tmp_path / name, {1: A}, side)
    ran = []
    from moetune.tuning.bench import KernelBench

    real_verify = KernelBench.verify
    monkeypatch.setattr(KernelBench, "verify", lambda self, config, M: ran.append(config) or real_verify(self, config, M))
    assert main(["validate", str(tmp_path)]) == 0
    assert "1 configs ran right on this device" in capsys.readouterr().out
    assert ran == [gemv]


def test_validate_reports_each_unreadable_file_and_still_checks_the_rest(tmp_path, capsys):
    make_table(tmp_path)  # fine
    (tmp_path / NAME.replace("E=8", "E=2")).write_bytes(b'{"1": "\xff"}')  # not UTF-8
    odd = make_table(tmp_path, NAME.replace("E=8", "E=4"))
    side = json.loads(sidecar_path(odd).read_text())
    side["shape"]["top_k"] = 9  # top-k of 8 experts cannot be 9
    sidecar_path(odd).write_text(json.dumps(side))
    (tmp_path / NAME.replace("E=8", "E=6")).write_text(json.dumps({"1": {**A, "BLOCK_SIZE_K": 128.0}}))
    assert main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    for text in ("not UTF-8 text", "top_k=9 exceeds E=8", "BLOCK_SIZE_K=128.0 must be an integer", "3 problem(s)"):
        assert text in err, text
    assert "Traceback" not in err


def test_validate_flags_a_cpu_interpreter_table_in_tuned_configs(tmp_path, capsys):
    folder = tmp_path / "tuned_configs"
    folder.mkdir()
    save_table(folder / "E=4,N=96,device_name=CPU_triton_interpreter.json", {1: A})
    assert main(["validate", str(folder)]) == 1
    assert "a CPU-interpreter table in tuned_configs/, which ships in the wheel" in capsys.readouterr().err


def test_show_prints_the_vllm_table_and_our_configs_with_extra_knobs(tmp_path, capsys):
    configs = {1: A, 64: B}
    side = sidecar_for(NAME, configs)
    side["entries"]["1"].update(config={**A, "kernel": "gemv"}, vllm_config=A, vllm_us=60.0, tuned_us=50.0)
    side["entries"]["64"]["incomplete"] = True
    save_table(tmp_path / NAME, configs, side)
    assert main(["show", str(tmp_path / NAME)]) == 0
    out = capsys.readouterr().out
    row1 = next(line for line in out.splitlines() if line.split()[:1] == ["1"]).split()
    assert row1[7:10] == ["60.0", "16/64/128/1/4/4,kernel=gemv", "50.0"]
    assert "incomplete (the time budget ran out; `moetune run --resume` continues): M=64" in out
    assert main(["validate", str(tmp_path)]) == 0
