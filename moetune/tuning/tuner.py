"""The tuner: one Optuna study per (table, M), screened cheaply, then the finalists re-timed.

The anchors (every other M, and the largest) go first with the full trial budget; the M between
two finished anchors then start from both neighbours' best configs and get a lighter budget.
For each token count M:
  1. open the study `<table stem>/M=<M>` (its trials survive a kill in the journal or database),
  2. enqueue warm starts: the old table's entry, the finished neighbouring M's best configs, the
     built-in Hopper priors, vLLM's default,
  3. screen: TPE asks a batch, the batch is compiled together, each config is verified against the
     reference and timed with few reps; configs that cannot run get a penalty value so TPE learns,
  4. stop at the trial budget, the M's share of the time budget, or when the best stops improving,
  5. re-time the few best, the best prior and the default together (winner's curse), verify again,
  6. record the result in the study, then write the table and its sidecar atomically.
The time budget is hard: each M gets a share of what is left, weighted by its cost, with a part kept
for its finalists. An M whose screening the budget cut short is marked incomplete (it still gets the
best config found, or its first warm start) and `--resume` continues it; any other M whose study
holds a final result is never redone.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import sys
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
from moetune.kernels.knobs import EXTRA_KNOBS
from moetune.models import MoeShape
from moetune.tables import (
    KNOBS,
    Config,
    atomic_write_text,
    default_config,
    load_sidecar,
    load_table,
    save_table,
    search_folders,
)
from moetune.tuning.bench import Bench, DeviceBroken
from moetune.tuning.space import Space, space_for, to_config
from moetune.tuning.study import (
    PENALTY_US,
    BenchFactory,
    Settings,
    budget,
    fallback_entry,
    finalize,
    make_pruner,
    make_sampler,
    open_storage,
    recover_stale,
    screen,
    screened_count,
    trial_counts,
    warm_starts,
)

WRITE_RESERVE_S = 2.0  # of the time budget, kept for the last table, sidecar and trials file writes


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
    prior_tables: Mapping[str, Mapping[int, Config]] = field(default_factory=dict)  # --prior: name -> table

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".json")

    def study_name(self, M: int) -> str:
        return f"{self.stem}/M={M}"


@dataclass
class TableResult:
    done: dict[int, dict] = field(default_factory=dict)  # M -> sidecar entry, this run or resumed
    resumed: list[int] = field(default_factory=list)
    incomplete: list[int] = field(default_factory=list)  # cut short by the time budget; --resume continues them
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
            name, M, space, deadline, n_max, hard_deadline = job
            study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(settings, space, M, rank),
                                      pruner=make_pruner(settings))  # fmt: skip
            try:
                screen(study, bench, M, space, settings, deadline, n_max=n_max, hard_deadline=hard_deadline)
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

    def start(self, study_name: str, M: int, space: Space, deadline: float | None, n_max: int,
              hard_deadline: float | None) -> None:  # fmt: skip
        for q, p in zip(self._jobs, self._procs):
            if p.is_alive():
                q.put((study_name, M, space, deadline, n_max, hard_deadline))

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
    """The M this run already finished (or cut short: "incomplete"), as recorded in their studies."""
    names = set(optuna.get_all_study_names(storage))
    finals = {}
    for M in job.Ms:
        if job.study_name(M) in names:
            attrs = optuna.load_study(study_name=job.study_name(M), storage=storage).user_attrs
            if "final" in attrs:
                finals[M] = attrs["final"]
    return finals


def _previous_table(job: TableJob) -> dict[int, Config]:
    """The last table for this GPU and layer: the one being rewritten, else one found where tables are
    looked for (e.g. the one shipped with moetune); its entries are where each study starts."""
    for path in [job.path, *(folder / job.path.name for folder in search_folders())]:
        if path.is_file():
            return load_table(path)
    return {}


def tuning_order(Ms: list[int], anchors: bool) -> list[tuple[int, bool]]:
    """(M, is an anchor) in the order to tune: every other M and the largest first, then the rest,
    each of which then starts from finished neighbours on both sides."""
    Ms = sorted(Ms)
    if not anchors or len(Ms) < 3:
        return [(M, True) for M in Ms]
    main = set(Ms[::2]) | {Ms[-1]}
    return [(M, True) for M in Ms if M in main] + [(M, False) for M in Ms if M not in main]


def cost_weight(M: int, anchor: bool, settings: Settings) -> float:
    """Share of the time budget: a trial at large M times a longer kernel (about linear in M past
    a few hundred tokens, on top of the compile and verify every trial pays)."""
    return (1.0 + M / 512) * (1.0 if anchor else settings.light_fraction)


def _spec(pins: Mapping[str, Any]) -> str:
    """Pinned knobs as the --space value that gives them ('' for the whole space)."""
    return repr(",".join(f"{k}={v}" for k, v in pins.items()))


def _check_space(storage: BaseStorage, job: TableJob, pins: Mapping[str, Any]) -> None:
    """A resumed (or shared) run searches the space its studies were started with: their trials hold its
    distributions, and a table mixing two spaces would answer neither question."""
    for name in optuna.get_all_study_names(storage):
        if name.startswith(job.stem + "/M="):
            attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
            theirs = attrs.get("space", {})
            if "M" in attrs and theirs != pins:  # "M" and "space" are set together when a study starts
                raise MoetuneError(f"{name} was run with --space {_spec(theirs)}, not {_spec(pins)}; "
                                   f"resume with the same --space, or start another run (--run-dir)")  # fmt: skip


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
        "entries": {str(M): {k: v for k, v in entries[M].items() if k != "top"} for M in sorted(entries)},
        "sampler": settings.sampler,
        "studies": f"{job.stem}/M=<M>",
        **({"space": settings.pins} if settings.pins else {}),
    }


TRIAL_COLUMNS = ["M", "trial", "state", *KNOBS, *EXTRA_KNOBS, "us", "screen_us", "infeasible", "rel_err", "repeat_of",
                 "warm_start", "duration_s"]  # fmt: skip


def write_trials_csv(storage: BaseStorage, job: TableJob, path: Path) -> pd.DataFrame:
    """Every trial of every M of this table, one row each; loads with pd.read_csv."""
    names = set(optuna.get_all_study_names(storage))
    rows = []
    for M in job.Ms:
        if job.study_name(M) not in names:
            continue
        for t in optuna.load_study(study_name=job.study_name(M), storage=storage).get_trials(deepcopy=False):
            complete = t.params and len(t.params) == len(t.distributions)  # a trial killed mid-ask has fewer
            config = to_config(t.params) if complete else {}
            a = t.user_attrs
            rows.append({
                "M": M, "trial": t.number, "state": t.state.name, **{k: config.get(k) for k in KNOBS},
                **{k: config.get(k, d) if config else None for k, (_, d) in EXTRA_KNOBS.items()},
                "us": a.get("us"), "screen_us": a.get("screen_us"), "infeasible": a.get("infeasible"),
                "rel_err": a.get("rel_err"),
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
    end = None
    if settings.time_budget_s is not None:
        end = t0 + settings.time_budget_s - min(WRITE_RESERVE_S, 0.02 * settings.time_budget_s)
    storage = open_storage(job.storage, on_repair=lambda message: tqdm.write(f"warning: {message}", file=sys.stderr))
    _check_fresh(storage, job)
    _check_space(storage, job, settings.pins)
    old_table = load_table(job.path) if job.path.exists() else {}
    old_sidecar = load_sidecar(job.path) if job.path.exists() else None
    entries: dict[int, dict] = {int(m): e for m, e in (old_sidecar or {}).get("entries", {}).items()}
    configs: dict[int, Config] = dict(old_table)
    for M, config in old_table.items():  # keep the sidecar's entries in step with the table's keys
        entries.setdefault(M, {"config": config, "note": "kept from the existing table"})
    prior_table = old_table or _previous_table(job)

    result = TableResult()
    for M, entry in _finals(storage, job).items():  # resumed: the journal, not the table, is the truth
        entries[M] = entry
        configs[M] = _table_config(entry)
        if not entry.get("incomplete"):
            result.done[M] = entry
            result.resumed.append(M)
    order = [(M, anchor) for M, anchor in tuning_order(job.Ms, settings.anchors) if M not in result.done]
    n_max = {M: _trial_budget(settings, space_for(M, job.shape, settings.pins), anchor) for M, anchor in order}

    bench = factory()
    pool = Workers(workers, factory, job.storage, settings) if workers > 1 and order else None
    if result.resumed:
        save_table(job.path, configs, _sidecar(job, entries, bench.timings_meaningful, settings))
    progress = _Progress(job, n_max) if order else None
    try:
        for i, (M, _) in enumerate(order):
            slice_end = None
            if end is not None:  # what is left, shared by cost: early plateaus roll over to the rest
                weights = [cost_weight(m, a, settings) for m, a in order[i:]]
                slice_end = time.time() + max(0.0, end - time.time()) * weights[0] / sum(weights)
            tops = {m: e.get("top") or [e["config"], _table_config(e)] for m, e in result.done.items()}
            entry = _tune_m(job, settings, storage, bench, pool, M, tops, prior_table, slice_end, end, n_max[M],
                            progress)  # fmt: skip
            progress.next_m(M)
            if entry is None:
                result.failed[M] = "no config ran correctly (see the trials file for each reason)"
                continue
            entries[M] = entry
            if not entry.get("incomplete"):
                result.done[M] = entry
            else:
                result.incomplete.append(M)
            configs[M] = _table_config(entry)
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


def _table_config(entry: Mapping[str, Any]) -> Config:
    """What the vLLM-format table holds for an entry: its best config with vLLM's structure."""
    return entry.get("vllm_config") or entry["config"]


def _trial_budget(settings: Settings, space: Space, anchor: bool) -> int:
    n = budget(settings, space)
    return n if anchor or settings.sampler == "grid" else max(1, round(n * settings.light_fraction))


def _tune_m(job: TableJob, settings: Settings, storage: BaseStorage, bench: Bench, pool: Workers | None, M: int,
            tops: Mapping[int, list[Config]], old_table: Mapping[int, Config], slice_end: float | None,
            run_end: float | None, n_max: int, progress: _Progress) -> dict | None:  # fmt: skip
    t0 = time.time()
    space = space_for(M, job.shape, settings.pins)
    study = optuna.create_study(
        storage=storage, study_name=job.study_name(M), sampler=make_sampler(settings, space, M, 0),
        pruner=make_pruner(settings), direction="minimize", load_if_exists=True,
    )  # fmt: skip
    final = study.user_attrs.get("final")
    if final is not None and not final.get("incomplete"):  # another host sharing this RDB study finished it
        return final
    if "M" not in study.user_attrs:  # what the study is, for whoever opens it in optuna-dashboard
        for key, value in dict(M=M, table=job.path.name, model=job.model, dtype=job.dtype, device=job.device,
                               unit="µs (median, whole layer)", penalty_us=PENALTY_US,
                               space=settings.pins).items():  # fmt: skip
            study.set_user_attr(key, value)
    recover_stale(study, exclusive="://" not in job.storage)
    starts = warm_starts(M, job.shape.E, job.dtype, tops, old_table, settings.neighbour_top, job.prior_tables)
    default = to_config(space.params(default_config(M, job.shape.E)))  # itself, unless --space pins one of its knobs
    if settings.sampler != "grid":  # the grid holds them anyway; enqueued extras would eat its budget
        for source, config in starts:
            study.enqueue_trial(space.params(config), user_attrs={"warm_start": source}, skip_if_exists=True)

    screen_end = None
    if slice_end is not None:
        screen_end = slice_end - settings.finalize_share * max(0.0, slice_end - t0)
    if pool:
        pool.start(job.study_name(M), M, space, screen_end, n_max, run_end)
    screen(study, bench, M, space, settings, screen_end, on_trial=lambda: progress.update(study, M), n_max=n_max,
           hard_deadline=run_end)  # fmt: skip
    for problem in pool.wait() if pool else []:  # the others finish their trials in flight
        tqdm.write(f"warning: {problem}")

    screened = screened_count(study)
    entry = None
    if screened:
        entry = finalize(study, bench, M, default, settings, slice_end)
    elif slice_end is not None:
        entry = fallback_entry(starts, space, "the time budget ran out before its screening began")
    if entry is not None:
        if screened < min(settings.min_screen, n_max):
            entry["incomplete"] = True  # --resume continues its study
        entry["wall_time_s"] = round(time.time() - t0, 1)
        study.set_user_attr("final", entry)  # first the journal, then the table: a kill in between is healed on resume
    return entry
