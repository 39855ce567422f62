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
kernel)
  python3 -m pytest -q tests/test_fused_moe.py 2>&1 | tail -5 | tee "$R/pytest.txt"
  for dt in fp8 bf16; do
    moetune bench --model mixtral-8x7b --dtype "$dt" --batch-sizes all --csv "$R/bench-default-$dt.csv" 2>&1 | tee "$R/bench-default-$dt.txt"
  done
  python3 benchmarks/gemv_vs_tiled.py --dtype fp8 --csv "$R/gemv_vs_tiled-fp8.csv" 2>&1 | tail -12 | tee "$R/gemv_vs_tiled.txt"
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
