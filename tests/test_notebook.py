"""The results notebook draws every figure from what the tools really write (tiny CPU run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


def run_notebook(root: Path, figures: Path, monkeypatch, allow_cpu: bool = True) -> dict:
    monkeypatch.setenv("MOETUNE_RESULTS_ROOT", str(root))
    monkeypatch.setenv("MOETUNE_FIGURES", str(figures))
    monkeypatch.setenv("MOETUNE_PLOT_CPU", "1" if allow_cpu else "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = json.loads((ROOT / "notebooks" / "results.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "results.ipynb", "exec"), scope)
    return scope


def test_notebook_draws_kernel_convergence_and_serve_figures_from_tool_outputs(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results" / "cpu"
    results.mkdir(parents=True)
    run_dir = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--dtype", "bf16", "--batch-sizes", "1,4", "--trials", "3", "--finalists", "1",
                 "--output", str(tmp_path / "tuned_configs"), "--run-dir", str(run_dir)]) == 0  # fmt: skip
    shutil.copy(run_dir / "trials.csv", results / "trials.csv")
    assert main(["bench", "--model", "tiny", "--dtype", "bf16", "--batch-sizes", "1,4", "--reps", "2",
                 "--csv", str(results / "bench.csv")]) == 0  # fmt: skip
    serve = {"model": "tiny", "dtype": "bf16", "device": "CPU_triton_interpreter", "timings_meaningful": False,
             "decode": [{"batch": 1, "default_tok_s": 2.0, "tuned_tok_s": 2.5}]}  # fmt: skip
    (results / "serve_tiny_bf16_cpu.json").write_text(json.dumps(serve))

    scope = run_notebook(tmp_path, tmp_path / "figures", monkeypatch)
    assert scope["drawn"] == ["kernel_us.png", "kernel_speedup.png", "convergence.png", "serve_tok_s.png"]
    assert all((tmp_path / "figures" / name).stat().st_size > 1000 for name in scope["drawn"])
    assert scope["kernel"]["floor_us"].notna().all(), "bench floors join the sidecar rows"


def test_notebook_skips_cpu_timings_unless_asked(tmp_path, monkeypatch):
    assert main(["run", "--model", "tiny", "--batch-sizes", "1", "--trials", "2", "--finalists", "1",
                 "--output", str(tmp_path / "tuned_configs"), "--run-dir", str(tmp_path / "run")]) == 0  # fmt: skip
    assert list((tmp_path / "tuned_configs").glob("*.moetune.json")), "a CPU sidecar exists"
    scope = run_notebook(tmp_path, tmp_path / "figures", monkeypatch, allow_cpu=False)
    assert scope["drawn"] == [] and scope["kernel"].empty
