"""`moetune run`: tune one model's fused-MoE table on this machine's GPU (or, for --model tiny, on the
CPU through Triton's interpreter) and write it where vLLM and SGLang look for it."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from moetune.errors import MoetuneError
from moetune.models import DEFAULT_DTYPE, MoeShape, check_dtype, get_model, moe_shape
from moetune.tables import (
    CPU_TABLES_DIR,
    CPU_TOKEN_COUNTS,
    TOKEN_COUNTS,
    device_name,
    load_table,
    parse_token_counts,
    table_filename,
)
from moetune.tuning.bench import KernelBench, bytes_per_elem
from moetune.tuning.space import describe_space, parse_space, space_for
from moetune.tuning.study import Settings, drop_stale_journal_lock
from moetune.tuning.tuner import TableJob, TableResult, tune_table

CPU_TRIALS = 6  # with CPU_TOKEN_COUNTS, keeps `moetune run --model tiny` short
# A full 18-M table in 10 minutes on one GPU, Python's and torch's start-up included; --gpus N shares
# the same trials over N GPUs, so the default budget is this over N (the 2-GPU target is 5 minutes).
GPU_TIME_BUDGET_S = 590.0
GPU_TABLES_DIR = Path("tuned_configs")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="mixtral-8x7b, mixtral-8x22b, or tiny (runs on the CPU)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE,
                   help=f"bf16, fp16 or fp8 (w8a8: per-expert weight scales); default {DEFAULT_DTYPE}")  # fmt: skip
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size; the table is for one rank's N")
    p.add_argument("--batch-sizes", help="token counts M to tune, e.g. 1,16,256 (default: vLLM's 18)")
    p.add_argument("--trials", type=int, help="trials per M (default 100; the whole grid with --sampler grid)")
    p.add_argument("--time-budget", help="hard wall-clock budget for the whole table, finalists and writes included, "
                   "e.g. 600, 45m, 2h (default on a GPU: 10m / --gpus; none with --sampler grid or on the CPU)")
    p.add_argument("--output", help=f"folder for the table and sidecar (default: {GPU_TABLES_DIR}; "
                   f"{CPU_TABLES_DIR} for CPU-interpreter tables)")  # fmt: skip
    p.add_argument("--run-dir", help="folder for the journal, trials.csv and Triton cache (default: runs/<table>)")
    p.add_argument("--storage", help="Optuna storage: a journal file (default <run-dir>/journal.log) or an RDB URL")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="how many GPUs (a count: GPUs 0..N-1), one worker each, "
                   "sharing each study; other hosts join a run through an RDB --storage with --resume")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --storage: M not done, "
                   "M marked incomplete by the time budget; or join a run another host keeps in an RDB")  # fmt: skip
    p.add_argument("--prior", action="append", default=[], metavar="TABLE",
                   help="a table (e.g. vLLM's shipped file for this GPU) whose config at each M starts the search "
                   "and is re-timed beside the winner; repeatable")  # fmt: skip
    p.add_argument("--sampler", default="tpe", help="tpe (default) or grid (brute force, for comparisons)")
    p.add_argument("--space", metavar="SPEC", help="search only part of the space, the same part whichever sampler: "
                   "'vllm' = vLLM's six knobs (our extra knobs at vLLM's structure), KNOB=VALUE pins a knob; "
                   "comma-separated, e.g. vllm,GROUP_SIZE_M=1 (default: the whole space)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the inputs and the sampler (any integer)")
    p.add_argument("--patience", type=int, default=40, help="stop an M after this many trials without a 1%% gain")
    p.add_argument("--finalists", type=int, default=4, help="best configs re-timed with many reps per M")
    p.add_argument("--compile-workers", type=int, help="CPU processes compiling per GPU (default: cores / GPUs)")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="seconds before a compile counts as hung")


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise MoetuneError(f"--time-budget {text!r} is malformed; give seconds or a duration like 90, 45m, 2h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value < 1:
        raise MoetuneError(f"{name} {value} is out of range; give a whole number of at least 1")


def _writable_folder(flag: str, folder: Path) -> None:
    """A folder we can create or write in, checked before any work (a bad --output used to fail
    only after the first M was tuned)."""
    if folder.exists() and not folder.is_dir():
        raise MoetuneError(f"{flag} {folder} is a file, not a folder; pass a folder (it is created if missing)")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise MoetuneError(f"{flag} {folder}: {existing} is a file, so no folder can be made there; pass another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MoetuneError(f"{flag} {folder}: {existing} is not writable by this user; pass a folder you can write")


def check_output_paths(output: Path, run_dir: Path, storage: str, storage_given: bool) -> None:
    """--output, --run-dir and a journal --storage: each a usable place, or one line saying why not."""
    _writable_folder("--output", output)
    _writable_folder("--run-dir", run_dir)
    if "://" in storage:
        return
    journal = Path(storage)
    flag = "--storage" if storage_given else "--run-dir"
    if journal.is_dir():
        example = journal / "journal.log"
        raise MoetuneError(f"{flag}: the journal {journal} is a folder; give a journal file, e.g. {example}")
    if journal.exists() and not os.access(journal, os.W_OK):
        raise MoetuneError(f"{flag}: the journal {journal} is not writable by this user; give another file")
    _writable_folder(flag, journal.parent)


def _gpu_facts(gpus: int) -> tuple[bool, int | None]:
    """(on a GPU, shared memory per block); checks that --gpus GPUs exist."""
    if not torch.cuda.is_available():
        if gpus > 1:
            raise MoetuneError(f"--gpus {gpus} but no GPU was found; drop --gpus to run on the CPU")
        return False, None
    if gpus > torch.cuda.device_count():
        raise MoetuneError(f"--gpus {gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    if len(names) > 1:
        raise MoetuneError(f"--gpus {gpus} spans {' and '.join(names)}; a table is for one GPU model, use fewer")
    return True, getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)


def default_compile_workers(gpus: int, shape: MoeShape, dtype: str) -> int:
    """CPU processes compiling for each GPU: the cores shared out over the GPUs, capped by what fits
    in GPU memory beside the timing process, since each one holds a full (uninitialised) weight set."""
    GiB = 1 << 30
    by_cores = ((os.cpu_count() or 2) - gpus) // gpus
    weights = 3 * shape.E * shape.N * shape.K * bytes_per_elem(dtype)  # w13 [E, 2N, K] + w2 [E, K, N]
    timing = weights + 3 * shape.E * shape.N * shape.K * 4 + 4 * GiB  # + the reference's float32 copies
    free, _ = torch.cuda.mem_get_info(0)
    by_memory = int((free - timing) // (weights + 1.5 * GiB))
    return max(1, min(12, by_cores, by_memory))


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """One coordinator per run folder: two would race on its table and journal. (Other hosts sharing
    an RDB study have folders of their own.) The OS drops the lock when the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise MoetuneError(
                f"another moetune run (pid {holder}) is using {run_dir}; wait for it, or pass --run-dir"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def _make_bench(shape: MoeShape, dtype: str, seed: int, workers: int, timeout_s: float) -> KernelBench:
    return KernelBench(shape, dtype, seed=seed, compile_workers=workers, compile_timeout_s=timeout_s)


def _settings(args: argparse.Namespace, gpu: bool, dtype: str, time_budget: float | None,
              compile_workers: int, smem_limit: int | None) -> Settings:  # fmt: skip
    if time_budget is None and gpu and args.sampler != "grid":
        time_budget = GPU_TIME_BUDGET_S / args.gpus
    return Settings(
        trials=args.trials or (None if args.sampler == "grid" else (100 if gpu else CPU_TRIALS)),
        time_budget_s=time_budget,
        sampler=args.sampler,
        seed=args.seed,
        patience=args.patience,
        finalists=args.finalists if gpu else min(args.finalists, 2),
        batch=max(1, compile_workers),  # a batch is compiled in parallel, one config per process
        smem_limit=smem_limit,
        bytes_per_elem=bytes_per_elem(dtype),
        # the interpreter's timings mean nothing, so spend as little time on them as possible
        **({} if gpu else dict(screen_reps=4, final_reps=4, final_rounds=1, min_screen=CPU_TRIALS)),
    )


def run_main(args: argparse.Namespace) -> int:
    started = time.time()
    if not args.model:
        raise MoetuneError("which model? pass --model mixtral-8x7b, mixtral-8x22b or tiny")
    model = get_model(args.model)
    dtype = check_dtype(args.dtype)
    shape = moe_shape(model, args.tp)
    for name in ("--trials", "--gpus", "--patience", "--finalists", "--compile-workers"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    if not args.compile_timeout > 0:  # also NaN
        raise MoetuneError(f"--compile-timeout {args.compile_timeout:g} is out of range; "
                           f"give seconds above 0 (e.g. 300)")
    if args.sampler not in ("tpe", "grid"):
        raise MoetuneError(f"unknown --sampler {args.sampler!r}; choose tpe or grid")
    time_budget = parse_duration(args.time_budget) if args.time_budget is not None else None
    priors = {Path(p).name: load_table(p) for p in args.prior}  # a bad file fails now, not after an hour
    pins = parse_space(args.space)
    batch_sizes = parse_token_counts(args.batch_sizes) if args.batch_sizes is not None else None

    gpu, smem_limit = _gpu_facts(args.gpus)
    if not gpu and model.name != "tiny":
        raise MoetuneError(
            f"no GPU found: tuning {model.name} needs a CUDA GPU; "
            f"try `moetune run --model tiny` to run the whole pipeline on the CPU"
        )
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise MoetuneError("no GPU and TRITON_INTERPRET is not 1: set TRITON_INTERPRET=1 to run tiny on the CPU")

    device = device_name()
    output = Path(args.output) if args.output is not None else (GPU_TABLES_DIR if gpu else CPU_TABLES_DIR)
    path = output / table_filename(shape.E, shape.N, device, dtype)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / path.name.removesuffix(".json")
    storage = args.storage or str(run_dir / "journal.log")
    check_output_paths(output, run_dir, storage, storage_given=bool(args.storage))
    cache_dir = None
    if gpu and "TRITON_CACHE_DIR" not in os.environ:  # our own cache, so we may prune it
        cache_dir = run_dir / "triton_cache"
        os.environ["TRITON_CACHE_DIR"] = str(cache_dir.resolve())

    compile_workers = 0
    if gpu:
        compile_workers = args.compile_workers or default_compile_workers(args.gpus, shape, dtype)
    settings = _settings(args, gpu, dtype, time_budget, compile_workers, smem_limit)
    settings.pins = pins
    job = TableJob(
        path=path, storage=storage, shape=shape, dtype=dtype, model=model.name, tp=args.tp, device=device,
        Ms=batch_sizes or list(TOKEN_COUNTS if gpu else CPU_TOKEN_COUNTS), resume=args.resume, cache_dir=cache_dir,
        prior_tables=priors,
    )  # fmt: skip
    factory = functools.partial(_make_bench, shape, dtype, args.seed, compile_workers, args.compile_timeout)

    print(f"tuning {path} for {model.name} (tp {args.tp}, {dtype}) on {device}")
    workers = f"{args.gpus} GPU worker(s), {compile_workers} compile processes each" if gpu else "1 CPU worker"
    print(f"  M = {','.join(map(str, job.Ms))}; studies in {storage}; {workers}"
          + (f"; time budget {settings.time_budget_s:.0f} s" if settings.time_budget_s else ""))  # fmt: skip
    if pins or settings.sampler == "grid":  # what a comparison of samplers needs to know: how big each space is
        sizes = ", ".join(f"M={M}: {space_for(M, shape, pins).size()}" for M in job.Ms)
        print(f"  space: {describe_space(pins)}; configs per M: {sizes}")
    if not gpu:
        print(
            "  note: no GPU, so this runs through Triton's CPU interpreter: the timings are meaningless "
            "(sidecar timings_meaningful=false); it proves the pipeline, not speed"
        )
    if settings.time_budget_s is not None:  # the budget bounds the whole command, set-up included
        settings.time_budget_s = max(1.0, settings.time_budget_s - (time.time() - started))
    with run_dir_lock(run_dir):
        if "://" not in storage and Path(storage).resolve().parent == run_dir.resolve():
            note = drop_stale_journal_lock(Path(storage))  # the run folder's lock says no one else uses it
            if note:
                print(f"  note: {note}")
        result = tune_table(job, settings, factory, workers=args.gpus, trials_csv=run_dir / "trials.csv")
    _print_summary(job, result, run_dir, storage)
    if result.interrupted:
        return 130
    return 1 if result.failed else 0


def _print_summary(job: TableJob, result: TableResult, run_dir: Path, storage: str) -> None:
    from moetune.tablecli import format_table

    if job.path.exists():
        print(format_table(job.path))
    for M, why in result.failed.items():
        print(f"M={M}: not tuned: {why}")
    if result.incomplete:
        print(f"M={','.join(map(str, result.incomplete))}: incomplete (the time budget ran out before their minimum "
              f"screening); each holds the best config found so far. Rerun with --resume to go on.")  # fmt: skip
    new = len(result.done) - len(result.resumed)
    print(
        f"{new} M tuned in {result.wall_time_s:.0f} s"
        + (f", {len(result.resumed)} already done (resumed)" if result.resumed else "")
        + f"; trials: {run_dir / 'trials.csv'}"
    )
    if "://" not in storage:
        print(f"browse the studies: optuna-dashboard {storage}")
    if result.interrupted:
        left = [M for M in job.Ms if M not in result.done]
        print(f"interrupted: the table holds every finished M; {len(left)} left. Rerun with --resume to go on.")
