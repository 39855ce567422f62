#!/usr/bin/env bash
# The GPU work of a session, in stages that each fit one 10-minute device call:
#   bash benchmarks/gpu_session.sh kernel   # GPU tests, bench fp8+bf16 default configs, GEMV vs tiled
#   bash benchmarks/gpu_session.sh tune     # moetune run fp8 (8-minute budget), then bench with the table
#   bash benchmarks/gpu_session.sh serve    # python -m moetune.serve, fp8, default vs tuned
# Needs .whl/ (benchmarks/prepare_device_wheels.sh) carried along; all results land in $OUT/results-<stage>.tar.gz.
# The serve stage reads the tune stage's table from tuned_configs/: commit it there first.
set -uo pipefail
stage=${1:?stage: kernel, tune or serve}
OUT=${OUT:-/tmp/out}
R=runs/gpu-$stage
mkdir -p "$R" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
moetune() { python3 -m moetune.cli "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$R/device.txt"
case $stage in
kernel)  # needs .anchor/ (vLLM's kernel, its tables, the side-by-side harness) carried too
  timeout 230 python3 .anchor/vllm_side_by_side.py --anchor .anchor --out "$OUT/sbs_base.json" 2>&1 | tee "$OUT/sbs_base.txt"
  timeout 90 python3 benchmarks/breakdown.py --table .anchor/configs --extra '[{}, {"fuse_silu": 1}]' --csv "$R/breakdown.csv" 2>&1 | tee "$OUT/breakdown.txt"
  timeout 140 python3 .anchor/vllm_side_by_side.py --anchor .anchor --no-vllm --ours-config '{"fuse_silu": 1}' --out "$OUT/sbs_fused.json" 2>&1 | tee "$OUT/sbs_fused.txt"
  timeout 50 python3 benchmarks/gemm_parity.py --dump "$R/ttgir" 2>&1 | tee "$OUT/gemm_parity.txt"
  timeout 50 python3 benchmarks/gemv_vs_tiled.py --dtype fp8 --batch-sizes 1,4 --csv "$R/gemv_vs_tiled-fp8.csv" 2>&1 | tail -6 | tee "$OUT/gemv.txt"
  ;;
tune)
  moetune run --model mixtral-8x7b --dtype fp8 --time-budget 8m --output "$R/tables" --run-dir "$R/run" 2>&1 | tee "$R/run.txt"
  table=$(ls "$R"/tables/E=8,N=14336,*fp8_w8a8.json | head -1)
  moetune bench --model mixtral-8x7b --dtype fp8 --batch-sizes all --table "$table" --csv "$R/bench-tuned-fp8.csv" 2>&1 | tee "$R/bench-tuned-fp8.txt"
  cp "$R"/run/trials.csv "$R/" 2>/dev/null
  ;;
serve)
  python3 -m moetune.serve --dtype fp8 --results-dir "$R" 2>&1 | tee "$R/serve.txt"
  ;;
esac
rm -rf "$R/run/triton_cache" 2>/dev/null
tar czf "$OUT/results-$stage.tar.gz" "$R"
