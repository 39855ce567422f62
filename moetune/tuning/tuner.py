"""The tuner: one Optuna study per (table, M), screened cheaply, then the finalists re-timed.

For each token count M, in order:
  1. open the study `<table stem>/M=<M>` (its trials survive a kill in the journal or database),
  2. enqueue warm starts: vLLM's default, the finished neighbouring M's winners, the old table's entry,
  3. screen: TPE asks a batch, the batch is compiled together, each config is verified against the
     reference and timed with few reps; configs that cannot run get a penalty value so TPE learns,
  4. stop at the trial budget, the time budget, or when the best stops improving,
  5. re-time the few best and the default with many reps (winner's curse), verify the winner again,
  6. record the result in the study, then write the table and its sidecar atomically.
An M whose study holds a final result is never redone.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.storages import BaseStorage
from tqdm import tqdm

import moetune
from moetune.errors import MoetuneError
from moetune.models import MoeShape
from moetune.tables import KNOBS, Config, atomic_write_text, default_config, load_sidecar, load_table, save_table
from moetune.tuning.bench import Bench, DeviceBroken
from moetune.tuning.space import Space, space_for, to_config
from moetune.tuning.study import (
    PENALTY_US,
    BenchFactory,
    Settings,
    budget,
    finalize,
    make_sampler,
    open_storage,
    recover_stale,
    screen,
    trial_counts,
    warm_starts,
)


@dataclass
class TableJob:
    path: Path  # the table file to write
    storage: str  # journal file path, or an Optuna RDB URL
    shape: MoeShape
    dtype: str
    model: str
    tp: int
    device: str
    Ms: list[int]
    resume: bool = False
    cache_dir: Path | None = None  # our own TRITON_CACHE_DIR, pruned after each M
    cache_limit_bytes: int = 2 << 30

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".json")

    def study_name(self, M: int) -> str:
        return f"{self.stem}/M={M}"


@dataclass
class TableResult:
    done: dict[int, dict] = field(default_factory=dict)  # M -> sidecar entry, this run or resumed
    resumed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    interrupted: bool = False
    wall_time_s: float = 0.0


# ------------------------------------------------------------------------------------------ workers


def _worker_main(rank: int, factory: BenchFactory, storage_spec: str, settings: Settings,
                 jobs: Any, done: Any) -> None:  # fmt: skip
    """One extra GPU: screen each M's study alongside the coordinator until told to stop (None)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    bench = factory()
    storage = open_storage(storage_spec)
    try:
        while (job := jobs.get()) is not None:
            name, M, space, deadline = job
            study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(settings, space, M, rank))
            try:
                screen(study, bench, M, space, settings, deadline)
                done.put((rank, None))
            except DeviceBroken as e:
                done.put((rank, f"GPU {rank} stopped: {e}"))
                return
    except KeyboardInterrupt:
        pass
    finally:
        bench.close()


class Workers:
    """Processes for GPUs 1..n-1; the coordinator screens on GPU 0 itself."""

    def __init__(self, n: int, factory: BenchFactory, storage_spec: str, settings: Settings):
        ctx = mp.get_context("spawn")
        self._done = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(1, n)]
        self._procs = [
            ctx.Process(target=_worker_main, args=(rank, factory, storage_spec, settings, q, self._done))
            for rank, q in zip(range(1, n), self._jobs)
        ]
        for p in self._procs:
            p.start()

    def start(self, study_name: str, M: int, space: Space, deadline: float | None) -> None:
        for q, p in zip(self._jobs, self._procs):
            if p.is_alive():
                q.put((study_name, M, space, deadline))

    def wait(self) -> list[str]:
        """Block until every live worker finished the current M; returns their problems."""
        waiting = {rank for rank, p in enumerate(self._procs, 1) if p.is_alive()}
        problems = []
        while waiting:
            try:
                rank, problem = self._done.get(timeout=1.0)
                waiting.discard(rank)
                problems += [problem] if problem else []
            except queue.Empty:  # see whether someone died instead
                for rank in list(waiting):
                    if not self._procs[rank - 1].is_alive():
                        waiting.discard(rank)
                        problems.append(f"worker for GPU {rank} exited (code {self._procs[rank - 1].exitcode})")
        return problems

    def close(self) -> None:
        for q, p in zip(self._jobs, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


# --------------------------------------------------------------------------------------------- table


def _finals(storage: BaseStorage, job: TableJob) -> dict[int, dict]:
    """The M this run already finished, as recorded in their studies."""
    names = set(optuna.get_all_study_names(storage))
    finals = {}
    for M in job.Ms:
        if job.study_name(M) in names:
            attrs = optuna.load_study(study_name=job.study_name(M), storage=storage).user_attrs
            if "final" in attrs:
                finals[M] = attrs["final"]
    return finals


def _check_fresh(storage: BaseStorage, job: TableJob) -> None:
    ours = sorted(int(n.split("/M=")[1]) for n in optuna.get_all_study_names(storage) if n.startswith(job.stem + "/M="))
    if ours and not job.resume:
        raise MoetuneError(
            f"{job.storage} already holds a run of this table (M={','.join(map(str, ours))}); pass --resume to "
            f"continue it, or delete it (or choose another --storage/--run-dir) to start over"
        )


def _sidecar(job: TableJob, entries: Mapping[int, dict], meaningful: bool, settings: Settings) -> dict:
    import torch
    import triton

    return {
        "table": job.path.name,
        "model": job.model,
        "device": job.device,
        "dtype": job.dtype,
        "timings_meaningful": meaningful,
        "shape": {"E": job.shape.E, "N": job.shape.N, "K": job.shape.K, "top_k": job.shape.top_k, "tp": job.tp},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "moetune": moetune.__version__},
        "wall_time_s": round(sum(e.get("wall_time_s", 0.0) for e in entries.values()), 1),
        "entries": {str(M): entries[M] for M in sorted(entries)},
        "sampler": settings.sampler,
        "studies": f"{job.stem}/M=<M>",
    }


TRIAL_COLUMNS = ["M", "trial", "state", *KNOBS, "us", "infeasible", "rel_err", "repeat_of", "warm_start", "duration_s"]


def write_trials_csv(storage: BaseStorage, job: TableJob, path: Path) -> pd.DataFrame:
    """Every trial of every M of this table, one row each; loads with pd.read_csv."""
    names = set(optuna.get_all_study_names(storage))
    rows = []
    for M in job.Ms:
        if job.study_name(M) not in names:
            continue
        for t in optuna.load_study(study_name=job.study_name(M), storage=storage).get_trials(deepcopy=False):
            config = to_config(t.params) if len(t.params) == len(KNOBS) else {}
            a = t.user_attrs
            rows.append({
                "M": M, "trial": t.number, "state": t.state.name, **{k: config.get(k) for k in KNOBS},
                "us": a.get("us"), "infeasible": a.get("infeasible"), "rel_err": a.get("rel_err"),
                "repeat_of": a.get("repeat_of"), "warm_start": a.get("warm_start"),
                "duration_s": t.duration.total_seconds() if t.duration else None,
            })  # fmt: skip
    df = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    atomic_write_text(path, df.to_csv(index=False))
    return df


def prune_cache(cache_dir: Path, limit_bytes: int) -> None:
    """Keep our Triton cache under a size limit, dropping the kernels least recently written."""
    if not cache_dir.is_dir():
        return
    entries = [(d.stat().st_mtime, sum(f.stat().st_size for f in d.rglob("*") if f.is_file()), d)
               for d in cache_dir.iterdir() if d.is_dir()]  # fmt: skip
    total = sum(size for _, size, _ in entries)
    for _, size, d in sorted(entries):
        if total <= limit_bytes:
            break
        shutil.rmtree(d, ignore_errors=True)
        total -= size


class _Progress:
    """One tqdm bar for the whole table: M, trial, best so far. An M that plateaus early skips ahead."""

    def __init__(self, job: TableJob, budgets: Mapping[int, int]):
        self.bar = tqdm(total=sum(budgets.values()), desc=job.stem[:60], unit="trial", dynamic_ncols=True)
        self.budgets, self.base = budgets, 0

    def update(self, study: optuna.Study, M: int) -> None:
        started, best = trial_counts(study)
        n = min(started, self.budgets[M])
        self.bar.n = self.base + n
        best_s = f"{best:.1f} µs" if best < PENALTY_US else "-"
        self.bar.set_postfix_str(f"M={M} trial {n}/{self.budgets[M]} best {best_s}")

    def next_m(self, M: int) -> None:
        self.base += self.budgets[M]
        self.bar.n = self.base
        self.bar.refresh()


def tune_table(job: TableJob, settings: Settings, factory: BenchFactory, *, workers: int = 1,
               trials_csv: Path | None = None) -> TableResult:  # fmt: skip
    """Tune every M of job.Ms into job.path. Ctrl-C returns what finished (interrupted=True)."""
    t0 = time.time()
    storage = open_storage(job.storage)
    _check_fresh(storage, job)
    old_table = load_table(job.path) if job.path.exists() else {}
    old_sidecar = load_sidecar(job.path) if job.path.exists() else None
    entries: dict[int, dict] = {int(m): e for m, e in (old_sidecar or {}).get("entries", {}).items()}
    configs: dict[int, Config] = dict(old_table)
    for M, config in old_table.items():  # keep the sidecar's entries in step with the table's keys
        entries.setdefault(M, {"config": config, "note": "kept from the existing table"})

    result = TableResult()
    for M, entry in _finals(storage, job).items():  # resumed: the journal, not the table, is the truth
        result.done[M] = entries[M] = entry
        configs[M] = entry["config"]
        result.resumed.append(M)
    todo = [M for M in job.Ms if M not in result.done]

    bench = factory()
    pool = Workers(workers, factory, job.storage, settings) if workers > 1 and todo else None
    if result.resumed:
        save_table(job.path, configs, _sidecar(job, entries, bench.timings_meaningful, settings))
    progress = _Progress(job, {M: budget(settings, space_for(M, job.shape)) for M in todo}) if todo else None
    try:
        for i, M in enumerate(todo):
            deadline = None
            if settings.time_budget_s is not None:  # what is left, shared evenly: early plateaus roll over
                deadline = time.time() + (settings.time_budget_s - (time.time() - t0)) / (len(todo) - i)
            finals = {m: e["config"] for m, e in result.done.items()}
            entry = _tune_m(job, settings, storage, bench, pool, M, finals, old_table, deadline, progress)
            progress.next_m(M)
            if entry is None:
                result.failed[M] = "no config ran correctly (see the trials file for each reason)"
                continue
            result.done[M] = entries[M] = entry
            configs[M] = entry["config"]
            save_table(job.path, configs, _sidecar(job, entries, bench.timings_meaningful, settings))
            if trials_csv:
                write_trials_csv(storage, job, trials_csv)
            if job.cache_dir:
                prune_cache(job.cache_dir, job.cache_limit_bytes)
    except KeyboardInterrupt:
        result.interrupted = True
    except DeviceBroken as e:
        raise MoetuneError(
            f"M={M}: a config broke the GPU context ({e}); it is recorded as infeasible, rerun with --resume to go on"
        ) from None
    finally:
        if progress:
            progress.bar.close()
        if pool:
            pool.close()
        bench.close()
    if trials_csv:
        write_trials_csv(storage, job, trials_csv)
    result.wall_time_s = time.time() - t0
    return result


def _tune_m(job: TableJob, settings: Settings, storage: BaseStorage, bench: Bench, pool: Workers | None, M: int,
            finals: Mapping[int, Config], old_table: Mapping[int, Config], deadline: float | None,
            progress: _Progress) -> dict | None:  # fmt: skip
    t0 = time.time()
    space = space_for(M, job.shape)
    study = optuna.create_study(
        storage=storage, study_name=job.study_name(M), sampler=make_sampler(settings, space, M, 0),
        direction="minimize", load_if_exists=True,
    )  # fmt: skip
    if "M" not in study.user_attrs:  # what the study is, for whoever opens it in optuna-dashboard
        for key, value in dict(M=M, table=job.path.name, model=job.model, dtype=job.dtype, device=job.device,
                               unit="µs (median, whole layer)", penalty_us=PENALTY_US).items():  # fmt: skip
            study.set_user_attr(key, value)
    recover_stale(study)
    if settings.sampler != "grid":  # the grid holds them anyway; enqueued extras would eat its budget
        for source, config in warm_starts(M, job.shape.E, finals, old_table):
            study.enqueue_trial(space.params(config), user_attrs={"warm_start": source}, skip_if_exists=True)

    if pool:
        pool.start(job.study_name(M), M, space, deadline)
    screen(study, bench, M, space, settings, deadline, on_trial=lambda: progress.update(study, M))
    for problem in pool.wait() if pool else []:  # the others finish their trials in flight
        tqdm.write(f"warning: {problem}")

    entry = finalize(study, bench, M, default_config(M, job.shape.E), settings)
    if entry is not None:
        entry["wall_time_s"] = round(time.time() - t0, 1)
        study.set_user_attr("final", entry)  # first the journal, then the table: a kill in between is healed on resume
    return entry
