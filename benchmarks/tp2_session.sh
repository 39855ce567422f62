#!/usr/bin/env bash
# The 2-GPU work of issues 9 and 10 in ONE device call (kind nvidia-h100-x2, carry [".whl"], ~9.5 minutes):
#   1. python -m moetune.serve --dtype bf16 --tp 2 --batch-sizes 1: tuned vs default, batch-1 tok/s (target >= 170
#      on 2x H100), and it must exit by itself (exit code and seconds from its last output line to its exit).
#   2. the same server with --port and no comparison, SIGTERM once /health answers: seconds to exit, exit code.
#   3. moetune run --model mixtral-8x7b --dtype fp8 --gpus 2 --time-budget $GPUS2_BUDGET (target: a full 18-M
#      table in <= 5 minutes on 2x H100), into runs/tp2/gpus2 (tuned_configs/ is never written).
#   4. benchmarks/tp_parity_check.py --tp 2 (TP2 against TP1 on the same checkpoint, tuned vs default), if time is left.
# Outputs in $OUT: device.txt, serve_compare.txt, serve_sigterm.txt, gpus2_run.txt, tp_parity.txt, results.tar.gz.
set -uo pipefail
GPUS2_BUDGET=${GPUS2_BUDGET:-4.5m}
OUT=${OUT:-/tmp/out}
R=runs/tp2
mkdir -p "$R" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
start=$(date +%s)
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT/device.txt"

# 1. the comparison, then a clean exit by itself
t0=$(date +%s)
timeout -s KILL 170 python3 -m moetune.serve --dtype bf16 --tp 2 --batch-sizes 1 --results-dir "$R/serve" \
  > "$OUT/serve_compare.txt" 2>&1
rc=$?
echo "serve --tp 2 exit code $rc after $(( $(date +%s) - t0 )) s (137: killed at the 170 s limit)" \
  | tee -a "$OUT/serve_compare.txt"
tail -25 "$OUT/serve_compare.txt"

# 2. serving: SIGTERM once /health answers
python3 -m moetune.serve --dtype bf16 --tp 2 --batch-sizes 1 --no-compare --port 8000 --results-dir "$R/serve2" \
  > "$OUT/serve_sigterm.txt" 2>&1 &
server=$!
for _ in $(seq 120); do
  python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || break; sleep 1
done
python3 - >> "$OUT/serve_sigterm.txt" 2>&1 <<'EOF'
import httpx
r = httpx.post("http://127.0.0.1:8000/v1/completions", json={"model": "mixtral-8x7b", "prompt": "Hello", "max_tokens": 8}, timeout=60)
print("completion status", r.status_code, r.text[:200])
EOF
t0=$(date +%s); kill -TERM $server
( sleep 60; kill -KILL $server 2>/dev/null ) & watchdog=$!
wait $server; rc=$?
kill $watchdog 2>/dev/null
echo "SIGTERM -> exit code $rc after $(( $(date +%s) - t0 )) s (137: killed by the 60 s watchdog)" \
  | tee -a "$OUT/serve_sigterm.txt"
pkill -9 -f moetune.serve 2>/dev/null; sleep 2

# 3. --gpus 2
t0=$(date +%s)
timeout -s INT 320 python3 -m moetune.cli run --model mixtral-8x7b --dtype fp8 --gpus 2 --time-budget "$GPUS2_BUDGET" \
  --output "$R/gpus2" --run-dir "$R/gpus2/run" > "$OUT/gpus2_run.txt" 2>&1
echo "moetune run --gpus 2: exit code $? after $(( $(date +%s) - t0 )) s wall" | tee -a "$OUT/gpus2_run.txt"
tail -26 "$OUT/gpus2_run.txt"

# 4. TP2 parity, with what is left of ~570 s
left=$(( 570 - ($(date +%s) - start) ))
if (( left > 40 )); then
  timeout -s KILL $left python3 benchmarks/tp_parity_check.py --tp 2 > "$OUT/tp_parity.txt" 2>&1
  echo "tp_parity_check exit code $? (limit $left s)" | tee -a "$OUT/tp_parity.txt"
  tail -30 "$OUT/tp_parity.txt"
else
  echo "tp_parity_check skipped: $left s left" | tee "$OUT/tp_parity.txt"
fi
tar czf "$OUT/results.tar.gz" "$R" 2>/dev/null
echo "wall $(( $(date +%s) - start )) s"
