#!/usr/bin/env bash
# Issue 9 (tuner): the open items that need a GPU, in ONE device call on one H100 80GB HBM3 (~9 minutes).
#
#   device call: bash benchmarks/issue9_h100.sh     kind nvidia-h100-x1, carry [".whl", ".anchor"], timeout_s 600
#   CPU check:   CPU_CHECK=1 bash benchmarks/issue9_h100.sh   (the same commands on --model tiny, ~2-3 minutes)
#
# Needs .whl/ (benchmarks/prepare_device_wheels.sh) and .anchor/configs/ (vLLM's shipped tables) carried along.
# Steps, in order, each under its own `timeout -s INT` (a `moetune run` stopped so keeps every finished M):
#   1. moetune run --model mixtral-8x7b --dtype bf16 --tp 2 --time-budget $TUNE_BUDGET (expected wall: budget + ~15 s)
#      into runs/issue9/tune. The shipped tuned_configs/E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json is found as
#      the previous table (--output points elsewhere, so tables.search_folders() finds the checkout's tuned_configs/)
#      and its entry at each M is every study's first warm start; tuned_configs/ itself is never written.
#   2. moetune bench --batch-sizes all --table <new> --against vLLM's E=8,N=7168,...H100 file, 5 alternating rounds
#      (~100 s: ~45 s of timing, ~40 s compiling vLLM's configs, start-up). At the very end, only if time is left:
#      the same bench of the new table against the shipped (old) one.
#   3. Search quality at M=$SQ_M, fp8 TP1 (E=8, N=14336, K=4096, top_k=2), in the space --space $SPACE (the six knobs
#      of the vLLM-format table with GROUP_SIZE_M=1 and BLOCK_SIZE_M=64: 128 configs per M, 8 of them dropped before
#      compiling by the shared-memory/register pre-filter; benchmarks/search_quality.md says why this space):
#      a. --sampler grid, exhaustive (~110 s: ~0.35 s a trial with 12 compile processes, plus start-up),
#      b. TPE (the default sampler and settings: 100 trials, patience 40, warm starts) in the same space (~40 s: the
#         grid left every config compiled in the shared Triton cache),
#      c. moetune bench --table <tpe> --against <grid> at the same M, 11 alternating rounds (~25 s).
#   Each step's timeout is its cap, cut so that the later steps keep their expected time before $DEADLINE; a grid
#   cut short by it says so in the summary (grid_screened below 128 at an M; an M cut mid-grid has no table entry).
# Outputs in $OUT (at most 8): summary.txt (the final table, also printed last), tune_bf16_tp2.txt,
#   bench_bf16_tp2_vs_vllm.txt, grid_fp8.txt, tpe_fp8.txt, bench_tpe_vs_grid.txt, [bench_bf16_tp2_vs_old.txt],
#   results.tar.gz (runs/issue9: tables, sidecars, trials.csv, journals, bench CSVs, full logs, steps.txt).
set -uo pipefail

# ---- time budgets (seconds): shorten here or in the environment
TUNE_BUDGET=${TUNE_BUDGET:-240}   # step 1: the tuner's --time-budget (its whole run; start-up outside it is ~10 s)
BENCH_CAP=${BENCH_CAP:-150}       # step 2: the bench's timeout (expected ~100 s; a bench cut short writes nothing)
GRID_BUDGET=${GRID_BUDGET:-200}   # step 3a: the grid's --time-budget (it ends when the grid is done: expected ~100 s)
TPE_BUDGET=${TPE_BUDGET:-75}      # step 3b: TPE's --time-budget (it ends at its plateau: expected ~30 s)
SQ_BENCH_CAP=${SQ_BENCH_CAP:-60}  # step 3c: the bench's timeout (expected ~25 s)
DEADLINE=${DEADLINE:-570}         # seconds after the start by which the last step must end (the call's limit: 600)
# expected walls of the steps, kept free for them while an earlier one runs (STARTUP: a run's start outside its budget)
E_BENCH=100 E_GRID=110 E_TPE=40 E_SQB=25 E_END=5 STARTUP=10

# ---- what is run
MODEL=mixtral-8x7b
TUNE_M=()                                    # step 1: every M (vLLM's 18)
BENCH_M=all                                  # step 2
SQ_M=1,128                                   # step 3
SPACE=vllm,GROUP_SIZE_M=1,BLOCK_SIZE_M=64    # step 3
VLLM_BF16=".anchor/configs/E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"
OLD_BF16="tuned_configs/E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"
SQ_ROUNDS=11

OUT=${OUT:-/tmp/out}
R=runs/issue9
if [[ ${CPU_CHECK:-0} == 1 ]]; then  # the same commands on the tiny model through Triton's interpreter
  MODEL=tiny TUNE_M=(--batch-sizes 1,16) BENCH_M=1,16 SQ_M=1,16 SQ_ROUNDS=2
  SPACE=vllm,GROUP_SIZE_M=1,BLOCK_SIZE_M=64,BLOCK_SIZE_K=64,num_stages=2  # 8 configs: the interpreter is slow
  TUNE_BUDGET=40 GRID_BUDGET=60 TPE_BUDGET=30 DEADLINE=400 E_BENCH=40 E_GRID=30 E_TPE=25 E_SQB=15
  OUT=${CPU_OUT:-/tmp/issue9_cpu_out} R=runs/issue9_cpu
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  if [[ $gpu != "NVIDIA H100 80GB HBM3" ]]; then
    echo "issue9_h100.sh is for one NVIDIA H100 80GB HBM3 (the tables it tunes and vLLM's file are); this is: $gpu"
    exit 3
  fi
fi
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/issue9_triton_cache}  # shared: later steps reuse the compiles
unset MOETUNE_TUNED_CONFIGS VLLM_TUNED_CONFIG_FOLDER  # previous tables: the checkout's tuned_configs/ only
rm -rf "$R"  # a warm machine keeps runs/: a journal left there would refuse a fresh run
mkdir -p "$R" "$OUT"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$R/device.txt"
cat "$R/device.txt"

limit() {  # limit CAP RESERVE: CAP, or less so that RESERVE seconds stay before DEADLINE (at least 10)
  local l=$((DEADLINE - SECONDS - $2))
  ((l < $1)) && echo $((l > 10 ? l : 10)) || echo "$1"
}
step() {  # step NAME LIMIT CMD...: run CMD under the limit, full log in $R, its tail in $OUT/NAME.txt
  local name=$1 lim=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit $lim s, t=$SECONDS s): $*"
  timeout -s INT -k 20 "$lim" "$@" > "$R/$name.log" 2>&1
  rc=$?
  echo "$name: rc $rc, $((SECONDS - t0)) s (limit $lim s)" | tee -a "$R/steps.txt"
  sed 's/.*\r//' "$R/$name.log" | tail -n 60 > "$OUT/$name.txt"  # a progress bar's last state, not its redraws
  tail -n 4 "$OUT/$name.txt"
  return $rc
}
table_in() { ls "$1"/E=*.json 2>/dev/null | grep -v '\.moetune\.json$' | head -1; }
common_m() {  # the M both tables hold, comma-separated
  python3 -c 'import json, sys; a, b = (json.load(open(p)) for p in sys.argv[1:]); print(",".join(m for m in a if m.isdigit() and m in b))' "$1" "$2"
}
moetune=(python3 -m moetune.cli)

# ---- step 1: re-tune bf16 TP2 (Mixtral-8x7B, N=7168), seeded by the shipped table
budget=$(limit "$TUNE_BUDGET" $((STARTUP + E_BENCH + E_GRID + E_TPE + E_SQB + E_END)))
step tune_bf16_tp2 $((budget + 45)) "${moetune[@]}" run --model $MODEL --dtype bf16 --tp 2 "${TUNE_M[@]}" \
  --time-budget "$budget" --output "$R/tune" --run-dir "$R/tune/run"
NEW=$(table_in "$R/tune")

# ---- step 2: the new table against vLLM's, alternating rounds
if [[ -n $NEW ]]; then
  step bench_bf16_tp2_vs_vllm "$(limit "$BENCH_CAP" $((E_GRID + E_TPE + E_SQB + E_END)))" "${moetune[@]}" bench \
    --model $MODEL --dtype bf16 --tp 2 --batch-sizes $BENCH_M --table "$NEW" --against "$VLLM_BF16" --rounds 5 \
    --csv "$R/bench_bf16_tp2_vs_vllm.csv"
else
  echo "step 1 wrote no table: step 2 skipped" | tee -a "$R/steps.txt"
fi

# ---- step 3: search quality, grid against TPE in one space at two M
# The grid's and TPE's budgets stay whole: a budget is shared over the M by cost with 20% of each share kept for
# finalists, so a budget cut to the minute would cut the first M's grid short while the second's share idled.
# Each ends by itself (grid done, TPE's plateau); the deadline acts through the timeout (SIGINT: finished M kept).
step grid_fp8 "$(limit $((GRID_BUDGET + 45)) $((E_TPE + E_SQB + E_END)))" "${moetune[@]}" run --model $MODEL \
  --dtype fp8 --batch-sizes $SQ_M --sampler grid --space "$SPACE" --time-budget "$GRID_BUDGET" \
  --output "$R/grid" --run-dir "$R/grid/run"
step tpe_fp8 "$(limit $((TPE_BUDGET + 45)) $((E_SQB + E_END)))" "${moetune[@]}" run --model $MODEL --dtype fp8 \
  --batch-sizes $SQ_M --space "$SPACE" --time-budget "$TPE_BUDGET" --output "$R/tpe" --run-dir "$R/tpe/run"
GRID=$(table_in "$R/grid") TPE=$(table_in "$R/tpe")
if [[ -n $GRID && -n $TPE ]]; then
  step bench_tpe_vs_grid "$(limit "$SQ_BENCH_CAP" "$E_END")" "${moetune[@]}" bench --model $MODEL --dtype fp8 \
    --batch-sizes "$(common_m "$GRID" "$TPE")" --table "$TPE" --against "$GRID" --rounds $SQ_ROUNDS \
    --csv "$R/bench_tpe_vs_grid.csv"
else
  echo "no grid or no TPE table: step 3c skipped" | tee -a "$R/steps.txt"
fi

# ---- if time is left (step 2's second half): the new table against the shipped one
left=$((DEADLINE - SECONDS - E_END))
if [[ -n $NEW && -f $OLD_BF16 && $left -ge ${OLD_BENCH_MIN:-80} ]]; then
  step bench_bf16_tp2_vs_old "$left" "${moetune[@]}" bench --model $MODEL --dtype bf16 --tp 2 --batch-sizes $BENCH_M \
    --table "$NEW" --against "$OLD_BF16" --rounds 5 --csv "$R/bench_bf16_tp2_vs_old.csv"
else
  echo "bench new vs old skipped: $left s left (needs ${OLD_BENCH_MIN:-80})" | tee -a "$R/steps.txt"
fi

# ---- summary
R=$R NEW=$NEW OLD=$OLD_BF16 GRID=$GRID TPE=$TPE SQ_M=$SQ_M SPACE=$SPACE MODEL=$MODEL WALL=$SECONDS \
  python3 - <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, os
from pathlib import Path

import pandas as pd

from moetune.models import get_model, moe_shape
from moetune.tuning.space import describe_space, parse_space, space_for

R, env = Path(os.environ["R"]), os.environ
pd.set_option("display.width", 200)


def sidecar(table):
    p = Path(table).with_name(Path(table).name.removesuffix(".json") + ".moetune.json") if table else None
    return json.loads(p.read_text()) if p and p.is_file() else None


def csv(name):
    p = R / name
    return pd.read_csv(p) if p.is_file() else None


def cfg(c):
    return "/".join(str(c[k]) for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps",
                                        "num_stages")) + ("/silu" if c.get("fuse_silu") else "")


print(f"== issue 9 summary; wall {env['WALL']} s")
print((R / "device.txt").read_text().strip())
print((R / "steps.txt").read_text().strip() if (R / "steps.txt").is_file() else "")

# step 1
new, old = sidecar(env["NEW"]), sidecar(env["OLD"])
print(f"\n-- 1. bf16 TP2 re-tune: {env['NEW'] or 'no table written'}")
if new:
    trials = csv("tune/run/trials.csv")
    seeded = set() if trials is None else set(trials.loc[trials["warm_start"] == "existing table", "M"])
    e = new["entries"]
    print(f"   {len(e)} M, {sum(bool(x.get('incomplete')) for x in e.values())} incomplete, "
          f"{sum(x.get('trials', 0) for x in e.values())} trials, {new['wall_time_s']} s of tuning; "
          f"M started from the shipped table: {len(seeded)}")
    rows = []
    for m, x in e.items():
        table = x.get("vllm_config") or x["config"]
        o = (old or {}).get("entries", {}).get(m, {})
        rows.append(dict(M=int(m), table=cfg(table), table_us=x.get("vllm_us"),
                         ours="=" if x["config"] == table else cfg(x["config"]), tuned_us=x.get("tuned_us"),
                         old_table=cfg(o.get("vllm_config") or o["config"]) if o else None, old_table_us=o.get("vllm_us"),
                         trials=x.get("trials"), incomplete=bool(x.get("incomplete"))))
    print(pd.DataFrame(rows).to_string(index=False))
    print("   table: the vLLM-format config; ours: the sidecar's (extra knobs: /silu), which `moetune bench` times.")
    print("   old_table_us: the shipped sidecar's number, another session's timing; the benches below compare.")

# step 2
for name, what in (("bench_bf16_tp2_vs_vllm.csv", "vLLM's"), ("bench_bf16_tp2_vs_old.csv", "the shipped (old)")):
    b = csv(name)
    if b is None:
        print(f"\n-- 2. bench of the new table against {what}: not run or cut short")
        continue
    print(f"\n-- 2. bench, new table against {what} table on our kernel (ratio = theirs / new, >= 1: new is as fast)")
    print(f"   ratio >= 1.000 at {(b['ratio'] >= 1).sum()} of {len(b)} M, >= 0.98 at {(b['ratio'] >= 0.98).sum()}; "
          f"lowest {b['ratio'].min():.3f} at M={int(b.loc[b['ratio'].idxmin(), 'M'])}")
    print(b[["M", "table_us", "against_us", "ratio", "config"]].to_string(
        index=False, formatters={"ratio": "{:.3f}".format, "table_us": "{:.1f}".format, "against_us": "{:.1f}".format}))

# step 3
pins = parse_space(env["SPACE"])
shape = moe_shape(get_model(env["MODEL"]), 1)
grid, tpe, gt, tt = sidecar(env["GRID"]), sidecar(env["TPE"]), csv("grid/run/trials.csv"), csv("tpe/run/trials.csv")
sq = csv("bench_tpe_vs_grid.csv")
print(f"\n-- 3. search quality, fp8 TP1, space: {describe_space(pins)}")
rows = []
for M in map(int, env["SQ_M"].split(",")):
    row = dict(M=M, space=space_for(M, shape, pins).size())
    if gt is not None:
        g = gt[(gt["M"] == M) & (gt["state"] == "COMPLETE")]
        row["grid_screened"] = len(g)
        row["pre_filtered"] = int(g["infeasible"].map(lambda v: str(v).startswith("predicted")).sum())
        row["failed"] = int(g["infeasible"].notna().sum()) - row["pre_filtered"]
    ge = (grid or {}).get("entries", {}).get(str(M))
    te = (tpe or {}).get("entries", {}).get(str(M))
    if ge:
        row.update(grid_config=cfg(ge["config"]), grid_us=ge.get("tuned_us"))
    if te:
        distinct = None if tt is None else int(tt[(tt["M"] == M) & tt["repeat_of"].isna()].shape[0])
        row.update(tpe_config=cfg(te["config"]), tpe_us=te.get("tuned_us"), tpe_trials=te.get("trials"),
                   tpe_distinct=distinct)
    if ge and te:
        row["same_config"] = ge["config"] == te["config"]  # then the bench's gap is its noise
    if ge and te and ge.get("tuned_us") and te.get("tuned_us"):
        row["gap_sidecars"] = f"{te['tuned_us'] / ge['tuned_us'] - 1:+.2%}"
    if sq is not None and M in set(sq["M"]):
        s = sq[sq["M"] == M].iloc[0]
        row.update(bench_tpe_us=round(s["table_us"], 1), bench_grid_us=round(s["against_us"], 1),
                   gap_bench=f"{s['table_us'] / s['against_us'] - 1:+.2%}")
    rows.append(row)
print(pd.DataFrame(rows).T.to_string(header=False))
print("   gap = TPE's config / the grid's best - 1 (goal <= 2%); gap_bench times both in one process, alternating.")
print("   TPE's starts: the shipped fp8 table's config at M, the Hopper priors, vLLM's default (all moved into the space).")
EOF
tar czf "$OUT/results.tar.gz" "$R"
echo "done in $SECONDS s"
