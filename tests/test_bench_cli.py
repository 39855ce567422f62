"""`moetune bench` end to end on the tiny preset (CPU interpreter), and its bad-input errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from moetune.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's output (its 'meaningless' line)")
def test_bench_tiny_writes_a_row_per_m_with_floor_and_accuracy(tmp_path, capsys):
    csv = tmp_path / "bench.csv"
    assert main(["bench", "--model", "tiny", "--dtype", "fp16", "--batch-sizes", "1,5", "--reps", "2", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "timings and floors are meaningless" in out
    df = pd.read_csv(csv)
    assert df["M"].tolist() == [1, 5]
    assert (df["rel_err"] < 1e-2).all() and (df["floor_us"] > 0).all()
    assert set(df.columns) >= {"default_us", "table_us", "speedup", "frac_of_floor", "config", "device"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_says_so_in_one_line(capsys):
    assert main(["bench", "--model", "mixtral-8x7b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU found" in err and "--model tiny" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-sizes", "1,x"], "--batch-sizes '1,x'"),
        (["--batch-sizes", "0"], "positive integers"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--tp", "5"], "--tp 5 does not divide"),
        (["--model", "llama"], "unknown model 'llama'"),
        (["--reps", "0"], "--reps 0 is out of range"),
        (["--rounds", "0"], "--rounds 0 is out of range"),
    ],
)
def test_bench_bad_arguments_get_one_clear_line(args, message, capsys):
    assert main(["bench", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


TINY = "E=4,N=96,device_name=CPU_triton_interpreter.json"
CFG = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tables are named for the CPU interpreter")
def test_bench_against_times_another_tables_config_in_the_same_run_and_prints_the_ratio(tmp_path, capsys):
    from moetune.tables import save_table

    save_table(tmp_path / "ours" / TINY, {1: CFG})
    save_table(tmp_path / "vllm" / TINY, {1: {**CFG, "BLOCK_SIZE_N": 64}})
    csv = tmp_path / "b.csv"
    argv = ["bench", "--model", "tiny", "--dtype", "fp16", "--batch-sizes", "1", "--reps", "1", "--csv", str(csv),
            "--table", str(tmp_path / "ours" / TINY), "--against", str(tmp_path / "vllm" / TINY)]
    assert main(argv) == 0
    assert "against:" in capsys.readouterr().out
    df = pd.read_csv(csv)
    assert df.loc[0, "ratio"] == pytest.approx(df.loc[0, "against_us"] / df.loc[0, "table_us"])


def test_against_alternates_the_two_configs_so_clock_drift_hits_both_alike():
    from moetune.bench import paired_us

    class DriftingBench:  # every timing is slower than the last, as a heating GPU's clock sags
        def __init__(self):
            self.order, self.t = [], 100.0

        def time(self, config, M, reps):
            self.order.append(config["name"])
            self.t += 10.0
            return self.t

    bench = DriftingBench()
    a_us, b_us = paired_us(bench, {"name": "a"}, {"name": "b"}, M=1, reps=1, rounds=4)
    assert bench.order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert a_us == b_us  # back to back (a a a a b b b b) would have called a 40 µs faster



@pytest.mark.skipif(torch.cuda.is_available(), reason="the tables are named for the CPU interpreter")
def test_a_table_for_another_layer_or_dtype_is_named_in_a_warning_and_refused_with_strict(tmp_path, capsys, caplog):
    from moetune.tables import save_table

    other = tmp_path / "E=8,N=96,device_name=CPU_triton_interpreter,dtype=fp8_w8a8.json"
    save_table(other, {1: CFG})
    argv = ["bench", "--model", "tiny", "--dtype", "fp16", "--batch-sizes", "1", "--reps", "1",
            "--csv", str(tmp_path / "b.csv"), "--table", str(other)]
    assert main([*argv, "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"--table {other} is for E=8, dtype='fp8_w8a8', but this bench is for E=4, dtype=None" in err
    assert err.count("\n") == 1
    with caplog.at_level("WARNING", logger="moetune"):
        assert main(argv) == 0
    assert any("--strict refuses" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_bench_tiny_defaults_to_a_few_m_on_the_cpu_and_finds_the_table_run_wrote(tmp_path, capsys, monkeypatch):
    from moetune.tables import CPU_TABLES_DIR, save_table

    monkeypatch.chdir(tmp_path)
    save_table(CPU_TABLES_DIR / TINY, {1: CFG})  # where `moetune run --model tiny --dtype fp16` writes
    assert main(["bench", "--model", "tiny", "--dtype", "fp16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"table: {CPU_TABLES_DIR / TINY}" in out
    assert [int(line.split()[0]) for line in out.splitlines() if line.split()[:1] in (["1"], ["16"], ["64"])] == [1, 16, 64]
