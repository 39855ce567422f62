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
             "decode": [{"batch": 1, "default_tok_s": 2.0, "tuned_tok_s": 2.5}],
             "ttft": {"prompt_len": 64, "default_ms": 9.0, "tuned_ms": 8.0}}  # fmt: skip
    (results / "serve_tiny_bf16_cpu.json").write_text(json.dumps(serve))
    # the GPU-only harnesses' shapes (vLLM side by side, runtime benchmark), marked as CPU placeholders
    side = {"device": "CPU", "timings_meaningful": False, "ceilings": {"bw": 1.0, "read_bw": 1.2},
            "rows": [{"dtype": "bf16", "M": m, "floor_us": 2.0 * m, "read_floor_us": 1.5 * m, "vllm_table_us": 3.0 * m,
                      "vllm_default_us": 4.0 * m, "ours_vllmtable_us": 3.1 * m, "ours_tuned_us": 2.9 * m} for m in (1, 4)]}  # fmt: skip
    (results / "vllm_side_by_side_cpu.json").write_text(json.dumps(side))
    step = {"model": "tiny", "device": "CPU", "context_len": 8, "timings_meaningful": False,
            "decode_b1": [{"option": "base", "tok_s": 1.0}, {"option": "+ fused", "tok_s": 1.5}],
            "profile": [{"part": "MoE GEMMs", "ms": 2.0, "launches": 4}]}  # fmt: skip
    (results / "decode_step_cpu.json").write_text(json.dumps(step))

    scope = run_notebook(tmp_path, tmp_path / "figures", monkeypatch)
    assert scope["drawn"] == ["kernel_us.png", "vllm_side_by_side.png", "kernel_speedup.png", "convergence.png",
                              "serve_tok_s.png", "decode_step.png"]  # fmt: skip
    assert all((tmp_path / "figures" / name).stat().st_size > 1000 for name in scope["drawn"])
    assert scope["kernel"]["floor_us"].notna().all(), "bench floors join the sidecar rows"


def test_notebook_draws_every_figure_from_the_committed_gpu_results(tmp_path, monkeypatch):
    """The committed H100 results alone (no tuning run) draw all six figures; the old copy-bandwidth
    bench floor is rescaled to read bandwidth, and the tuned kernel then sits at or below the floor's speed."""
    scope = run_notebook(ROOT, tmp_path / "figures", monkeypatch, allow_cpu=False)
    assert scope["drawn"] == ["kernel_us.png", "vllm_side_by_side.png", "kernel_speedup.png", "convergence.png",
                              "serve_tok_s.png", "decode_step.png"]  # fmt: skip
    kernel, bench = scope["kernel"], scope["bench"]
    h100 = kernel[kernel.table == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"]
    assert len(h100) == 18 and h100.against_us.notna().all()
    assert (bench[bench.source == "h100-2026-11-25/bench_fp8_tp1_against_vllm.csv"].floor_bw == "read (rescaled)").all()
    assert h100.frac_of_floor.between(0.5, 1.01).all(), h100.frac_of_floor


def test_notebook_skips_cpu_timings_unless_asked(tmp_path, monkeypatch):
    assert main(["run", "--model", "tiny", "--batch-sizes", "1", "--trials", "2", "--finalists", "1",
                 "--output", str(tmp_path / "tuned_configs"), "--run-dir", str(tmp_path / "run")]) == 0  # fmt: skip
    assert list((tmp_path / "tuned_configs").glob("*.moetune.json")), "a CPU sidecar exists"
    scope = run_notebook(tmp_path, tmp_path / "figures", monkeypatch, allow_cpu=False)
    assert scope["drawn"] == [] and scope["kernel"].empty
