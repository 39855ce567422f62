"""Launch-config sweep of the fp8 dense kernel (w8a16) at decode sizes, on one GPU.

    python benchmarks/linear_fp8_sweep.py --out runs/linear_fp8_sweep.csv     # H100: ~2-3 min expected
    python benchmarks/linear_fp8_sweep.py --out /tmp/s.csv --quick            # a smaller grid, ~1 min
    python benchmarks/linear_fp8_sweep.py --out /tmp/p.csv --quick --preload 0,1 --prefetch 0,4  # the PDL knobs

Expected, not yet measured: 536 configs (+128 router compiles) take ~1 s each to compile on one core,
so ~45 s in 15 processes, then ~60 s of timing. --budget-s (210) stops it starting new configs.

For M in 1, 4, 16 and Mixtral-8x7B's dense linears (qkv 6144x4096, o_proj 4096x4096, router 8x4096,
lm_head 32000x4096) it times the real kernel (linear_w8a16 with a W8A16Config) over BLOCK_N x BLOCK_K x
num_warps x num_stages x SPLIT_K x PRELOAD x PREFETCH (the weights fetched before the PDL wait; their values
from --preload / --prefetch), the current default and torch's bf16 F.linear. PDL is on where it is on in the
runtime (sm_90), so a launch's early weight fetch overlaps the previous launch, another linear here: the
overlap in a decode step, after a norm or an attention merge, is what benchmarks/decode_step.py measures.
Prints the top 5 per (shape, M), a summary, and the DEFAULT_CONFIGS rows to paste into
moetune/kernels/linear_fp8.py.

Timing (moetune.timing.time_us): one CUDA graph of >= 20 launches, median of its replays, random data.
Each launch reads its own copy of the weights, with copies worth >= 2.5x the L2 cache, so no launch
reads from L2, as in a decode step. The router's 32 KB can't be spread that far: each of its launches
follows an L2-sized memset, whose own time (measured the same way) is subtracted.

Compiles: M is not specialised, so one compile per config serves every M; the router (N=8, not a
multiple of 16) is a second specialisation, swept at BLOCK_N=16 only (wider tiles read the same 8 rows).
A pool of processes (--jobs) first compiles the grid into Triton's disk cache; this process then
takes the configs one at a time, each timed for every (shape, M) while its kernel is loaded.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moetune.kernels import splitk  # noqa: E402
from moetune.kernels.linear_fp8 import W8A16Config, default_w8a16_config, linear_w8a16, quantize_per_channel  # noqa: E402
from moetune.kernels.reference import rel_err  # noqa: E402
from moetune.tables import atomic_write_text  # noqa: E402
from moetune.timing import measure_ceilings, time_us  # noqa: E402

# name: (N, K, launches per batch-1 decode step of Mixtral-8x7B, 32 layers)
SHAPES = {"qkv": (6144, 4096, 32), "o_proj": (4096, 4096, 32), "router": (8, 4096, 32), "lm_head": (32000, 4096, 1)}
BIG = ("qkv", "o_proj", "lm_head")  # one DEFAULT_CONFIGS row serves these; the router gets its own
MS = (1, 4, 16)
GRID = dict(BLOCK_N=(16, 32, 64, 128), BLOCK_K=(128, 256, 512), num_warps=(2, 4, 8), num_stages=(2, 3, 4, 5),
            SPLIT_K=(1, 2, 4, 8))  # fmt: skip
QUICK = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(256, 512), num_warps=(4, 8), num_stages=(3, 4), SPLIT_K=(1, 2, 4))
SMEM_BUDGET = 220 * 1024  # of sm_90's 227 KB a block
MIN_LAUNCHES = 20  # per graph replay
KNOBS = list(W8A16Config.__dataclass_fields__)  # BLOCK_M ... SPLIT_K, PRELOAD, PREFETCH
CSV_FIELDS = ["shape", "N", "K", "M", "kind", *KNOBS, "programs", "us", "tb_s", "weight_bytes", "copies", "launches",
              "rel_err", "status", "device"]  # fmt: skip


def sweep_configs(grid: dict[str, tuple[int, ...]]) -> list[W8A16Config]:
    """The grid less what can't fit or can't use its threads, in a fixed shuffled order: a sweep cut
    short by --budget-s is still a fair sample of it."""
    out = []
    for bn, bk, warps, stages, split, preload, prefetch in itertools.product(*(grid[k] for k in KNOBS[1:])):
        smem = (stages - 1) * bk * bn + 16 * bk * 2  # Triton 3.9: weight tile in stages-1 buffers, x tile once
        per_thread = bk * bn / (32 * warps)  # bytes of the fp8 weight tile; x2 once widened for tl.dot
        # >= one 16 B load a thread; <= 1 KB widened: 2 KB spilled 6.6 KB of stack (ptxas, sm_90; 1 KB: 186 regs)
        if smem <= SMEM_BUDGET and 16 <= per_thread <= 512 and (prefetch == 0 or prefetch * bk >= 128):
            out.append(W8A16Config(16, bn, bk, warps, stages, split, preload, prefetch))
    random.Random(0).shuffle(out)
    return out


def applies(shape: str, cfg: W8A16Config) -> bool:
    N, K, _ = SHAPES[shape]
    return (shape != "router" or cfg.BLOCK_N == 16) and math.ceil(K / cfg.BLOCK_K) >= cfg.SPLIT_K


def label(cfg: W8A16Config) -> str:
    return (f"BN{cfg.BLOCK_N} BK{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages} sk{cfg.SPLIT_K} pl{cfg.PRELOAD} "
            f"pf{cfg.PREFETCH}")  # fmt: skip


def _compile(cfgs: list[W8A16Config]) -> dict[W8A16Config, str]:
    """In a worker process: launch each config on small tensors that get the sweep's specialisations
    (K=4096; N a multiple of 16, and N=8 for the router's configs). That compiles it into Triton's disk
    cache, where the timing process finds it. Returns the configs that failed, with why."""
    K = 4096
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    failed = {}
    for n in (16, 8):
        w, scale = quantize_per_channel(torch.randn(n, K, device="cuda"))
        for cfg in cfgs:
            if n == 16 or applies("router", cfg):
                try:
                    linear_w8a16(x, w, scale, cfg)
                except Exception as e:  # reported by the timing process, which skips the config
                    if is_cuda_failure(e):  # the context is gone: let the timing process meet it and stop
                        raise
                    failed[cfg] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    torch.cuda.synchronize()
    return failed


def precompile(cfgs: list[W8A16Config], jobs: int) -> dict[W8A16Config, str]:
    if jobs < 2:
        return {}
    t0, failed = time.time(), {}
    chunks = [cfgs[i :: jobs * 4] for i in range(jobs * 4)]  # small chunks even out the load
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            for part in pool.map(_compile, chunks):
                failed.update(part)
    except Exception as e:  # a broken pool costs time, not results: the timing loop compiles what is missing
        print(f"precompile pool failed ({type(e).__name__}: {e}); compiling in this process instead", flush=True)
    print(f"precompiled {len(cfgs)} configs ({len(failed)} failed) in {jobs} processes: {time.time() - t0:.0f} s",
          flush=True)  # fmt: skip
    return failed


class Case:
    """One (shape, M): random x, the fp8 weight in enough copies to miss L2, its float32 reference."""

    def __init__(self, shape: str, M: int, fp8: tuple[list, torch.Tensor], scrub: Callable[[], object] | None):
        self.shape, self.M = shape, M
        self.N, self.K, _ = SHAPES[shape]
        self.w, self.scale = fp8
        self.scrub = scrub
        self.x = torch.randn(M, self.K, device="cuda", dtype=torch.bfloat16)
        self.ref = self.x.float() @ (self.w[0].float() * self.scale[:, None]).t()  # [M, N]

    def check(self, cfg: W8A16Config) -> float:
        """Worst rel err of the kernel over two of the copies."""
        return max(rel_err(linear_w8a16(self.x, w, self.scale, cfg), self.ref) for w in self.w[:2])


def copies_for(nbytes: int, l2: int) -> tuple[int, bool]:
    """(copies, scrub): enough copies that a graph's launches never read from L2, or a memset before each."""
    need = math.ceil(2.5 * l2 / nbytes)
    return (max(2, need), False) if need <= 16 else (4, True)


def per_launch_us(call: Callable[[int], object], copies: int, scrub, scrub_us: float, reps: int) -> tuple[float, int]:
    launches = copies * math.ceil(MIN_LAUNCHES / copies)
    turn = itertools.count()

    def step():  # each launch captured into the graph reads the next copy
        if scrub is not None:
            scrub()
        call(next(turn) % copies)

    return time_us(step, reps=reps, inner=launches, warmup=copies) - (scrub_us if scrub is not None else 0.0), launches


def time_torch(cases: list[Case], w16: torch.Tensor, l2: int, scrub, scrub_us: float, reps: int,
               device: str) -> list[dict]:  # fmt: skip
    """torch's bf16 F.linear on the same weights (dequantised), the reference the fp8 kernel must beat."""
    copies, scrubbed = copies_for(w16.numel() * 2, l2)
    ws = [w16] + [w16.clone() for _ in range(copies - 1)]
    rows = []
    for case in cases:
        x = case.x
        us, n = per_launch_us(lambda i, x=x: torch.nn.functional.linear(x, ws[i]), copies,
                              scrub if scrubbed else None, scrub_us, reps)  # fmt: skip
        err = rel_err(torch.nn.functional.linear(x, w16), case.ref)
        rows.append(row(case, "torch_bf16", None, us, w16.numel() * 2, copies, n, err, "ok", device))
    return rows


def is_cuda_failure(e: Exception) -> bool:
    """A failed kernel leaves the context unusable: stop (results so far are still written)."""
    return type(e).__name__ == "AcceleratorError" or "CUDA error" in str(e) or "illegal" in str(e)


def row(case: Case, kind: str, cfg: W8A16Config | None, us: float, nbytes: int, copies: int, launches: int,
        err: float, status: str, device: str) -> dict:  # fmt: skip
    knobs = asdict(cfg) if cfg else dict.fromkeys(KNOBS, "")
    programs = math.ceil(case.M / cfg.BLOCK_M) * math.ceil(case.N / cfg.BLOCK_N) * cfg.SPLIT_K if cfg else ""
    return dict(shape=case.shape, N=case.N, K=case.K, M=case.M, kind=kind, **knobs, programs=programs,
                us=round(us, 3) if us == us else "", tb_s=round(nbytes / us / 1e6, 4) if us == us else "",
                weight_bytes=nbytes, copies=copies, launches=launches, rel_err=f"{err:.3g}", status=status,
                device=device)  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/linear_fp8_sweep.csv", help="CSV of every timing")
    p.add_argument("--quick", action="store_true", help=f"the smaller grid {QUICK}")
    p.add_argument("--preload", type=int_list, default=[0],
                   help="PRELOAD values to sweep, comma-separated (1: the first weight tile into registers before "
                        "the PDL wait; default 0)")  # fmt: skip
    p.add_argument("--prefetch", type=int_list, default=[4],
                   help="PREFETCH values to sweep, comma-separated (K steps prefetched into L2 before the PDL wait; "
                        "default 4, the decode rows' value)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                   help="compile processes (< 2: compile in this process, as each config is timed)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=210, help="start no new config after this many seconds")
    p.add_argument("--reps", type=int, default=8, help="graph replays per timing (median)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("linear_fp8_sweep: no CUDA device (torch.cuda.is_available() is False); it times an H100-class GPU, "
              "nothing was run", file=sys.stderr)  # fmt: skip
        return 2

    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    device, l2, sms = props.name, props.L2_cache_size, props.multi_processor_count
    configs = sweep_configs((QUICK if args.quick else GRID) | dict(PRELOAD=args.preload, PREFETCH=args.prefetch))
    print(f"{device}: {sms} SMs, L2 {l2 / 2**20:.0f} MiB; {len(configs)} configs x {len(MS)} M x {len(SHAPES)} shapes "
          f"(router: BLOCK_N=16 only); triton cache {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}",
          flush=True)  # fmt: skip
    failed = precompile(configs, args.jobs)
    t_compiled = time.time()

    torch.manual_seed(0)
    read_bw = measure_ceilings("bf16").bandwidth
    scrub_buf = torch.empty(2 * l2 // 4, dtype=torch.float32, device="cuda")
    scrub = scrub_buf.zero_
    scrub_us = time_us(scrub, reps=args.reps, inner=MIN_LAUNCHES, warmup=1)
    cases, torch_rows, rows = [], [], []
    for shape, (N, K, _) in SHAPES.items():
        w, scale = quantize_per_channel(torch.randn(N, K, device="cuda"))
        copies, scrubbed = copies_for(w.numel(), l2)
        fp8 = ([w] + [w.clone() for _ in range(copies - 1)], scale)
        cases += [Case(shape, M, fp8, scrub if scrubbed else None) for M in MS]
        torch_rows += time_torch(cases[-len(MS) :], (w.float() * scale[:, None]).bfloat16(), l2, scrub, scrub_us,
                                 args.reps, device)  # fmt: skip
    print(f"ready: read ceiling {read_bw / 1e12:.2f} TB/s, L2 scrub {scrub_us:.1f} µs; weights in "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)  # fmt: skip

    def time_config(case: Case, kind: str, cfg: W8A16Config) -> dict:
        copies, nbytes = len(case.w), case.w[0].numel()
        try:
            err = case.check(cfg)
            if err > 1e-2:
                return row(case, kind, cfg, math.nan, nbytes, copies, 0, err, "wrong result", device)
            w, scale, x = case.w, case.scale, case.x
            us, n = per_launch_us(lambda i: linear_w8a16(x, w[i], scale, cfg), copies, case.scrub, scrub_us, args.reps)
            err = max(err, case.check(cfg))  # again after the replays: split-K counters must be back at zero
            bad = cfg.SPLIT_K > 1 and bool(splitk.tile_counters(x.device, 1).any())
            status = "counters left non-zero" if bad else "ok" if err <= 1e-2 else "wrong result after replays"
            return row(case, kind, cfg, us, nbytes, copies, n, err, status, device)
        except Exception as e:
            if is_cuda_failure(e):
                raise
            return row(case, kind, cfg, math.nan, nbytes, copies, 0, math.nan, f"error: {type(e).__name__}", device)

    done, compiled_here = 0, 0
    try:
        for case in cases:
            rows.append(time_config(case, "current", default_w8a16_config(case.M, case.N)))
        for cfg in configs:
            if time.time() - t_start > args.budget_s:
                break
            for i, case in enumerate(c for c in cases if applies(c.shape, cfg)):
                if cfg in failed:
                    rows.append(row(case, "w8a16", cfg, math.nan, case.w[0].numel(), 0, 0, math.nan,
                                    f"compile failed: {failed[cfg][:80]}", device))  # fmt: skip
                    continue
                t0 = time.time()
                rows.append(time_config(case, "w8a16", cfg))
                compiled_here += i == 0 and time.time() - t0 > 0.5  # a compile: ~1 s; a cached kernel's timing: ~0.05 s
            done += 1
            if done % 50 == 0:
                print(f"  {done}/{len(configs)} configs, {time.time() - t_start:.0f} s", flush=True)
    finally:
        write_csv(Path(args.out), torch_rows + rows)
    t_end = time.time()
    report(rows, torch_rows, read_bw)
    left = len(configs) - done
    timed = f"{done} configs timed" + (f" ({left} left out by --budget-s {args.budget_s:.0f})" if left else "")
    here = f", {compiled_here} of them compiled here, not by the pool" if compiled_here else ""
    print(f"\n{timed}{here}; wall {t_end - t_start:.0f} s (compile pool {t_compiled - t_start:.0f} s, "
          f"timing {t_end - t_compiled:.0f} s); CSV: {args.out}")  # fmt: skip
    return 0


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _cfg(r: dict) -> W8A16Config:
    return W8A16Config(*(int(r[k]) for k in W8A16Config.__dataclass_fields__))


def report(rows: list[dict], torch_rows: list[dict], read_bw: float) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    timed = {(r["shape"], r["M"], _cfg(r)): r["us"] for r in ok if r["kind"] == "w8a16"}
    summary = []
    for shape, M in itertools.product(SHAPES, MS):
        cur = next((r for r in rows if r["kind"] == "current" and r["shape"] == shape and r["M"] == M), None)
        ref = next(r for r in torch_rows if r["shape"] == shape and r["M"] == M)
        top = sorted((r for r in ok if r["kind"] == "w8a16" and r["shape"] == shape and r["M"] == M),
                     key=lambda r: r["us"])  # fmt: skip
        (N, K, _), ceiling = SHAPES[shape], read_bw / 1e12
        print(f"\n{shape} N={N} K={K} M={M}: {N * K / 1e6:.1f} MB fp8; torch bf16 F.linear {ref['us']:.2f} µs "
              f"({ref['tb_s']:.2f} TB/s of {2 * N * K / 1e6:.1f} MB); read ceiling {ceiling:.2f} TB/s")  # fmt: skip
        print(f"  {'':8} {'config':38} {'programs':>8} {'µs':>8} {'TB/s':>6} {'vs current':>10}")
        for i, r in enumerate(top[:5]):
            print(f"  {'#' + str(i + 1):8} {label(_cfg(r)):38} {r['programs']:>8} {r['us']:>8.2f} {r['tb_s']:>6.2f} "
                  f"{cur['us'] / r['us'] if cur and cur['status'] == 'ok' else math.nan:>9.2f}x")  # fmt: skip
        if cur:
            us = f"{cur['us']:>8.2f} {cur['tb_s']:>6.2f}" if cur["status"] == "ok" else f"{cur['status']:>15}"
            print(f"  {'current':8} {label(_cfg(cur)):38} {cur['programs']:>8} {us}")
        if top and cur and cur["status"] == "ok":
            best = top[0]
            summary.append((shape, M, cur["us"], best["us"], label(_cfg(best)), cur["us"] / best["us"], ref["us"]))

    print(f"\n{'shape':8} {'M':>3} {'current µs':>10} {'best µs':>8} {'best config':38} {'speedup':>7} {'bf16 µs':>8}")
    for shape, M, cur, best, cfg, speedup, bf16 in summary:
        print(f"{shape:8} {M:>3} {cur:>10.2f} {best:>8.2f} {cfg:38} {speedup:>6.2f}x {bf16:>8.2f}")
    step_rows(rows, timed)


def step_rows(rows: list[dict], timed: dict) -> None:
    """Per M, the dense part of a batch-1 decode step (qkv, o_proj, router x 32 layers, lm_head once) with
    the current configs, with one config for qkv + o_proj + lm_head plus one for the router (what
    DEFAULT_CONFIGS can say), and with the best config of each shape; then the rows to paste."""
    cur = {(r["shape"], r["M"]): r["us"] for r in rows if r["kind"] == "current" and r["status"] == "ok"}
    cfgs = {c for _, _, c in timed}
    weight = {s: SHAPES[s][2] for s in SHAPES}

    def big_total(cfg, M):
        us = [timed.get((s, M, cfg)) for s in BIG]
        return math.inf if None in us else sum(weight[s] * u for s, u in zip(BIG, us))

    def router(M):
        return min(((u, c) for (s, m, c), u in timed.items() if s == "router" and m == M), default=(math.inf, None))

    def best(s, M):
        return min((u for (s2, m, _), u in timed.items() if s2 == s and m == M), default=math.inf)

    print("\ndense linears of one decode step, µs (qkv, o_proj, router: x32 layers; lm_head once)")
    print("  (2 rows: one config for qkv + o_proj + lm_head and one for the router, as DEFAULT_CONFIGS can say)")
    print(f"  {'M':>3} {'current':>8} {'2 rows':>8} {'per shape':>9}")
    picks = {}
    for M in MS:
        best_big = min(cfgs, key=lambda c: big_total(c, M), default=None)
        if best_big is None or math.isinf(big_total(best_big, M)) or any((s, M) not in cur for s in SHAPES):
            print(f"  {M:>3} not enough timings")
            continue
        r_us, r_cfg = router(M)
        current = sum(weight[s] * cur[(s, M)] for s in SHAPES)
        per_shape = sum(weight[s] * best(s, M) for s in SHAPES)
        picks[M] = (best_big, r_cfg)
        print(f"  {M:>3} {current:>8.0f} {big_total(best_big, M) + 32 * r_us:>8.0f} {per_shape:>9.0f}")

    if not picks:
        return
    # one row for every M <= 16: the config whose worst slowdown against each M's own best is least
    robust = min(cfgs, key=lambda c: max(big_total(c, M) / big_total(picks[M][0], M) for M in picks))
    worst = max(big_total(robust, M) / big_total(picks[M][0], M) for M in picks)
    routers = [c for c in cfgs if all(("router", M, c) in timed for M in picks)]
    robust_r = min(routers, key=lambda c: max(timed[("router", M, c)] / router(M)[0] for M in picks), default=None)
    print("\nDEFAULT_CONFIGS rows (moetune/kernels/linear_fp8.py), replacing the (16, ANY, ...) row:")
    print(f"  one pair for every M <= 16 (within {100 * (worst - 1):.1f}% of each M's best for qkv+o_proj+lm_head):")
    if robust_r is not None:
        print(f"    (16, 64, {paste(robust_r)}),  # router")
    print(f"    (16, ANY, {paste(robust)}),")
    print("  or a pair per M:")
    for M, (big, rcfg) in picks.items():
        if rcfg is not None:
            print(f"    ({M}, 64, {paste(rcfg)}),")
        print(f"    ({M}, ANY, {paste(big)}),")


def paste(cfg: W8A16Config) -> str:
    return "W8A16Config(" + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()) + ")"


if __name__ == "__main__":
    sys.exit(main())
