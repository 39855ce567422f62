"""`moetune run` from the command line: clear one-line errors, and the whole pipeline end to end on
the CPU (the real kernel through Triton's interpreter, a real Optuna study, table and sidecar)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from moetune.cli import main
from moetune.tables import load_sidecar, load_table

TINY_TABLE = "E=4,N=96,device_name=CPU_triton_interpreter.json"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "mixtral-9x9b"], "unknown model 'mixtral-9x9b'"),
        (["--model", "tiny", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["--model", "tiny", "--tp", "5"], "--tp 5 does not divide"),
        (["--model", "tiny", "--batch-sizes", "1,x,16"], "--batch-sizes '1,x,16' is malformed"),
        (["--model", "tiny", "--batch-sizes", "0,16"], "--batch-sizes '0,16' is malformed"),
        (["--model", "tiny", "--trials", "-3"], "--trials -3 is out of range"),
        (["--model", "tiny", "--time-budget", "soon"], "--time-budget 'soon' is malformed"),
        (["--model", "tiny", "--time-budget", ""], "--time-budget '' is malformed"),
        (["--model", "tiny", "--batch-sizes", ""], "--batch-sizes '' is malformed"),
        (["--model", "tiny", "--compile-timeout", "-1"], "--compile-timeout -1 is out of range"),
        (["--model", "tiny", "--gpus", "0"], "--gpus 0 is out of range"),
        (["--model", "tiny", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--model", "tiny", "--trials", "2.5"], "argument --trials: invalid int value: '2.5'"),
        (["--model", "tiny", "--sampler", "random"], "unknown --sampler 'random'"),
        (["--model", "tiny", "--prior", "/nonexistent/vllm.json"], "/nonexistent/vllm.json"),
        (["--model", "tiny", "--space", "vllm,num_warps=3"], "num_warps='3' is not allowed"),
        (["--model", "tiny", "--space", "GROUP=1"], "'GROUP=1' is neither 'vllm' nor KNOB=VALUE"),
        ([], "which model?"),
    ],
)
def test_bad_arguments_give_one_clear_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["run", *argv, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetune run: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_real_model_without_a_gpu_suggests_tiny(capsys, tmp_path):
    assert main(["run", "--model", "mixtral-8x7b", "--dtype", "fp8", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no GPU found" in err and "--model tiny" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; on a GPU tiny tunes for real")
def test_run_tiny_tunes_through_the_real_kernel_on_cpu_then_show_and_validate_read_it(tmp_path):
    # The CLI must switch on Triton's interpreter itself, so the child starts without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "moetune.cli", "run", "--model", "tiny", "--batch-sizes", "1,16", "--trials", "3",
         "--output", str(tmp_path / "tables"), "--run-dir", str(tmp_path / "run"), "--dtype", "bf16"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "meaningless" in run.stdout and "2 M tuned" in run.stdout

    table = tmp_path / "tables" / TINY_TABLE
    configs, sidecar = load_table(table), load_sidecar(table)
    assert sorted(configs) == [1, 16]
    assert sidecar["timings_meaningful"] is False and sidecar["model"] == "tiny" and sidecar["dtype"] == "bf16"
    for M in ("1", "16"):
        e = sidecar["entries"][M]
        assert e["rel_err"] <= 1e-2 and e["tuned_us"] > 0 and e["default_us"] > 0 and e["trials"] == 3
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert len(trials) == 6 and set(trials["M"]) == {1, 16}
    assert (tmp_path / "run" / "journal.log").exists()

    show = subprocess.run([sys.executable, "-m", "moetune.cli", "show", str(table)], capture_output=True, text=True)
    assert show.returncode == 0 and "speedup" in show.stdout and "meaningless" in show.stdout
    validate = subprocess.run(
        [sys.executable, "-m", "moetune.cli", "validate", str(tmp_path / "tables")], capture_output=True, text=True
    )
    assert validate.returncode == 0, validate.stderr
    assert "2 configs ran right on this device" in validate.stdout

    again = subprocess.run(
        [sys.executable, "-m", "moetune.cli", "run", "--model", "tiny", "--batch-sizes", "1,16", "--trials", "3",
         "--output", str(tmp_path / "tables"), "--run-dir", str(tmp_path / "run"), "--resume", "--dtype", "bf16"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and "2 already done (resumed)" in again.stdout
    assert load_table(table) == configs


@pytest.mark.skipif(torch.cuda.is_available(), reason="the table name holds this machine's device")
def test_run_dir_and_storage_defaults_follow_the_table_name(tmp_path, monkeypatch):
    from moetune.tuning import cli

    seen = {}
    fake = lambda job, settings, factory, **kw: seen.update(job=job, kw=kw) or cli.TableResult()
    monkeypatch.setattr(cli, "tune_table", fake)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", "tiny", "--batch-sizes", "4,1,4"]) == 0  # fp8: the one default dtype
    job = seen["job"]
    stem = "E=4,N=96,device_name=CPU_triton_interpreter,dtype=fp8_w8a8"
    # an interpreter table never lands in the repo's tuned_configs/, which ships in the wheel
    assert job.path == Path("runs") / "tuned_configs" / f"{stem}.json" and job.Ms == [1, 4]
    assert job.storage == str(Path("runs") / stem / "journal.log")
    assert seen["kw"]["trials_csv"] == Path("runs") / stem / "trials.csv"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_space_pins_reach_the_tuner_and_the_log_says_how_big_each_space_is(tmp_path, monkeypatch, capsys):
    from moetune.tuning import cli

    seen = {}
    fake = lambda job, settings, factory, **kw: seen.update(settings=settings) or cli.TableResult()
    monkeypatch.setattr(cli, "tune_table", fake)
    argv = ["run", "--model", "tiny", "--batch-sizes", "1,16", "--sampler", "grid", "--output", str(tmp_path),
            "--run-dir", str(tmp_path / "run"), "--space", "vllm,GROUP_SIZE_M=1,BLOCK_SIZE_M=64,num_stages=3"]
    assert main(argv) == 0
    assert seen["settings"].pins == {"kernel": "tiled", "fuse_silu": 0, "GROUP_SIZE_M": 1, "BLOCK_SIZE_M": 64,
                                     "num_stages": 3} and seen["settings"].sampler == "grid"  # fmt: skip
    out = capsys.readouterr().out
    # tiny (N=96, K=64): BLOCK_SIZE_N 32..256 x BLOCK_SIZE_K 32..128 x warps 4, 8
    assert "space: vLLM's six knobs only, GROUP_SIZE_M=1, BLOCK_SIZE_M=64, num_stages=3; configs per M: M=1: 24, M=16: 24" in out


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag", ["--output", "--run-dir"])
def test_a_file_where_a_folder_is_needed_is_refused_before_any_work(flag, tmp_path, capsys, monkeypatch):
    from moetune.tuning import cli

    monkeypatch.setattr(cli, "tune_table", lambda *a, **k: pytest.fail("tuning started"))
    (tmp_path / "file").write_text("x")
    argv = ["run", "--model", "tiny", "--output", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run")]
    argv[argv.index(flag) + 1] = str(tmp_path / "file")
    err = _one_line_error(argv, capsys)
    assert f"{flag} {tmp_path / 'file'} is a file, not a folder" in err
    argv[argv.index(flag) + 1] = str(tmp_path / "file" / "below")
    assert "is a file, so no folder can be made there" in _one_line_error(argv, capsys)


def test_a_folder_given_as_the_journal_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from moetune.tuning import cli

    monkeypatch.setattr(cli, "tune_table", lambda *a, **k: pytest.fail("tuning started"))
    err = _one_line_error(["run", "--model", "tiny", "--output", str(tmp_path), "--storage", str(tmp_path)], capsys)
    assert f"--storage: the journal {tmp_path} is a folder; give a journal file, e.g. {tmp_path / 'journal.log'}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    err = _one_line_error(["run", "--model", "tiny", "--output", str(ro / "tables")], capsys)
    assert f"--output {ro / 'tables'}: {ro} is not writable" in err


def test_a_gpu_run_defaults_to_a_ten_minute_budget_and_any_seed_is_accepted():
    import argparse

    from moetune.models import MoeShape
    from moetune.tuning import cli
    from moetune.tuning.space import space_for
    from moetune.tuning.study import make_sampler

    ns = argparse.Namespace(trials=None, sampler="tpe", seed=10**40, patience=40, finalists=4, gpus=1)
    settings = cli._settings(ns, True, "fp8", None, 12, 232448)
    assert settings.time_budget_s == cli.GPU_TIME_BUDGET_S <= 600 and settings.seed == 10**40
    two = cli._settings(argparse.Namespace(**{**vars(ns), "gpus": 2}), True, "fp8", None, 12, 232448)
    assert two.time_budget_s == cli.GPU_TIME_BUDGET_S / 2  # the same trials on twice the GPUs
    assert cli._settings(argparse.Namespace(**{**vars(ns), "sampler": "grid"}), True, "fp8", None, 12, 0).time_budget_s is None
    space = space_for(16, MoeShape(8, 14336, 4096, 2))
    for seed in (10**40, -5, 4295):  # each once crashed numpy: Seed must be between 0 and 2**32 - 1
        make_sampler(cli._settings(argparse.Namespace(**{**vars(ns), "seed": seed}), True, "fp8", None, 1, 0), space, 16, 0)


def test_a_second_run_on_the_same_run_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    from moetune.tuning.cli import run_dir_lock

    with run_dir_lock(tmp_path / "run"):
        argv = ["run", "--model", "tiny", "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path)]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"another moetune run (pid {os.getpid()}) is using" in err and err.count("\n") == 1
