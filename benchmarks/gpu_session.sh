#!/usr/bin/env bash
# The GPU work of a session, in stages that each fit one 10-minute device call:
#   bash benchmarks/gpu_session.sh kernel   # GPU tests, bench fp8+bf16 default configs, GEMV vs tiled
#   bash benchmarks/gpu_session.sh tune     # moetune run fp8 (8-minute budget), then bench with the table
#   bash benchmarks/gpu_session.sh serve    # python -m moetune.serve, fp8, default vs tuned
#   bash benchmarks/gpu_session.sh http     # the OpenAI server under 64 and 256 streaming clients, 3 times
# Needs .whl/ (benchmarks/prepare_device_wheels.sh) carried along; all results land in $OUT/results-<stage>.tar.gz.
# The serve stage reads the tune stage's table from tuned_configs/: commit it there first.
set -uo pipefail
stage=${1:?stage: kernel, tune, serve or http}
OUT=${OUT:-/tmp/out}
R=runs/gpu-$stage
mkdir -p "$R" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
moetune() { python3 -m moetune.cli "$@"; }
serve_fp8() {  # python -m moetune.serve in the background with the given batch sizes; returns once /health is 200
  python3 -m moetune.serve --dtype fp8 --batch-sizes "$1" --context-len 128 --results-dir "$R" --port 8000 \
    > "$R/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 200); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)" 2>/dev/null && break
    kill -0 $server 2>/dev/null || break; sleep 2
  done
}
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
tune)  # the final kernel beside vLLM's, then a full fp8 table, then that table against vLLM's shipped one
  VT=".anchor/configs/E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
  timeout 80 python3 .anchor/vllm_side_by_side.py --anchor .anchor --out "$OUT/sbs_final.json" 2>&1 | tail -15 | tee "$OUT/sbs_final.txt"
  moetune run --model mixtral-8x7b --dtype fp8 --time-budget "${BUDGET:-6.5m}" --output "$R/tables" --run-dir "$R/run" 2>&1 | tail -40 | tee "$OUT/run.txt"
  table=$(ls "$R"/tables/E=8,N=14336,*fp8_w8a8.json | head -1)
  cp "$table" "$OUT/table.json"; cp "${table%.json}.moetune.json" "$OUT/sidecar.json"
  timeout 110 python3 -m moetune.cli bench --model mixtral-8x7b --dtype fp8 --batch-sizes all --table "$table" --against "$VT" \
    --csv "$R/bench-against-vllm.csv" 2>&1 | tail -25 | tee "$OUT/bench_against.txt"
  cp "$R"/run/trials.csv "$R/" 2>/dev/null
  ;;
serve)  # runtime benchmark, then default-vs-tuned proof and the HTTP server under the official client
  timeout 200 python3 benchmarks/decode_step.py --out "$R/decode_step.json" 2>&1 | tail -40 | tee "$OUT/decode_step.txt"
  serve_fp8 1,16,64,256
  timeout 90 python3 benchmarks/load_openai.py --base-url http://127.0.0.1:8000/v1 --concurrency 64,256 --max-tokens 128 \
    --procs 4 --engine-results "$(ls "$R"/serve_*fp8*.json | head -1)" 2>&1 | tail -12 | tee "$OUT/load.txt"
  kill -TERM $server; wait $server; echo "server exit: $?" | tee -a "$R/serve.log"
  tail -60 "$R/serve.log" > "$OUT/serve.txt"
  ;;
http)  # the engine's own decode rate at 64/256 (compare), then the same load 3 times; SIGTERM must end it fast
  serve_fp8 64,256
  for run in 1 2 3; do
    timeout 100 python3 benchmarks/load_openai.py --base-url http://127.0.0.1:8000/v1 --concurrency 64,256 \
      --max-tokens 128 --procs 4 --engine-results "$(ls "$R"/serve_*fp8*.json | head -1)" 2>&1 | tail -4 | tee -a "$OUT/load.txt"
  done
  python3 -c "import httpx; print(httpx.get('http://127.0.0.1:8000/metrics').text)" > "$R/metrics.txt"
  t0=$(date +%s.%N); kill -TERM $server; wait $server; rc=$?
  echo "server exit $rc after SIGTERM in $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s" | tee -a "$R/serve.log"
  tail -60 "$R/serve.log" > "$OUT/serve.txt"
  ;;
esac
rm -rf "$R/run/triton_cache" 2>/dev/null
tar czf "$OUT/results-$stage.tar.gz" "$R"
