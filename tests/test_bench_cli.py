"""`moetune bench` end to end on the tiny preset (CPU interpreter), and its bad-input errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from moetune.cli import main


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
    ],
)
def test_bench_bad_arguments_get_one_clear_line(args, message, capsys):
    assert main(["bench", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
