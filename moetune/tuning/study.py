"""One Optuna study per (table, M): storage, sampler, screening, recovery, warm starts, finalists.

Screening asks TPE for a batch, compiles it together, verifies each config against the reference
and times it with few reps. A config that cannot run is told a penalty value with its reason, so TPE
learns where not to go (a FAIL would be ignored by TPE). The finalists are then re-timed with many
reps, because the best of many noisy screenings is biased low (the winner's curse).

Screening is itself two-fidelity when `careful_reps` is set: every config gets a cheap timing, and
Optuna's SuccessiveHalvingPruner promotes the best third of them to a careful timing, which becomes
the trial's value; the rest end PRUNED with their cheap time. The finalists always include the best
known-good prior (old table, neighbouring M, built-in prior) and the best config with vLLM's
structure, so the result is never slower than the prior when both are re-timed together.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState

from moetune.errors import MoetuneError
from moetune.kernels.knobs import is_vllm_structure
from moetune.tables import Config, default_config, nearest
from moetune.tuning.bench import Bench, DeviceBroken, Infeasible
from moetune.tuning.compile import describe
from moetune.tuning.priors import prior_configs
from moetune.tuning.space import Space, canonical, config_key, predict_infeasible, six_knobs, to_config

# The value an infeasible config reports: far above any real layer time, so TPE ranks it last.
PENALTY_US = 1e9
BenchFactory = Callable[[], Bench]


@dataclass
class Settings:
    trials: int | None = 100  # per M; None with the grid sampler means the whole grid
    time_budget_s: float | None = None  # for the whole table, shared out over the M still to do
    sampler: str = "tpe"  # or "grid" (brute force, for search-quality comparisons)
    seed: int = 0
    patience: int = 40  # stop an M after this many trials without a `min_gain` improvement
    min_gain: float = 0.01
    batch: int = 1  # candidates asked at once and compiled together
    screen_reps: int = 10
    final_reps: int = 100
    final_rounds: int = 3  # finalists are timed round-robin, so drift hits them all alike
    finalists: int = 4
    smem_limit: int | None = None  # bytes of shared memory per block, None when unknown
    bytes_per_elem: int = 2
    twin_timeout_s: float = 900.0  # longest wait for another worker timing the same config
    careful_reps: int | None = None  # promoted configs are re-timed with this many reps (None: one fidelity)
    min_screen: int = 10  # an M with fewer screened trials when its time is up is marked incomplete
    neighbour_top: int = 2  # how many of each finished neighbouring M's best configs a study starts from
    anchors: bool = True  # tune every other M (the anchors) first and fully, the M between them lighter
    light_fraction: float = 0.5  # the trial budget and time weight of an M between two anchors
    finalize_share: float = 0.2  # of an M's time slice, kept for re-timing its finalists
    pins: dict[str, Any] = field(default_factory=dict)  # --space: knobs held at one value (space.parse_space)


# ------------------------------------------------------------------------------------------- storage


def repair_journal(path: Path) -> str | None:
    """Cut a torn last line (a kill mid-write) off a journal, keeping its bytes in <journal>.torn; the
    message says what was done, None when the journal was whole. Optuna skips a torn last line on
    read, but its next record would be appended to the torn one and break every later load."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data:
        return None
    if data.endswith(b"\n"):  # whole lines: torn only if the last one is not a record
        cut = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[cut:])
            return None
        except ValueError:
            pass
    else:  # no newline: the last write did not finish, whatever its bytes parse as
        cut = data.rfind(b"\n") + 1
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(data[cut:])
    with open(path, "r+b") as f:
        f.truncate(cut)
    return f"{path}: its last line was torn (a kill mid-write?); moved its {len(data) - cut} bytes to {torn}"


def drop_stale_journal_lock(path: Path) -> str | None:
    """Remove the lock file a killed process left on a journal (Optuna would wait 30 s, then break it).
    Only for a caller that knows no live process uses the journal: the CLI, holding its run folder's lock."""
    lock = path.with_name(path.name + ".lock")
    if not (lock.exists() or lock.is_symlink()):
        return None
    lock.unlink(missing_ok=True)
    return f"{lock}: removed the journal lock a killed run left behind"


def open_storage(spec: str, on_repair: Callable[[str], None] | None = None) -> BaseStorage:
    """A journal file (the default: survives SIGKILL, no server) or any Optuna RDB URL."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would drown the bar
    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec)
        except ImportError:
            driver = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL"}.get(spec.split(":")[0].split("+")[0])
            fix = f"`pip install {driver}`" if driver else "install the database driver SQLAlchemy needs for it"
            raise MoetuneError(f"cannot open --storage {spec}: its database driver is missing; {fix}") from None
        except Exception as e:
            raise MoetuneError(f"cannot open --storage {spec}: {describe(e)}") from None
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    message = repair_journal(Path(spec)) if on_repair else None
    if message and on_repair:
        on_repair(message)
    return JournalStorage(JournalFileBackend(spec))


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, minus its end-of-grid Study.stop(), which raises outside optimize(); the
    trial budget (the grid size) ends a brute-force study instead."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


def make_sampler(settings: Settings, space: Space, M: int, rank: int) -> optuna.samplers.BaseSampler:
    # workers of one study must not suggest alike; numpy wants 0 <= seed < 2**32, users may give any int
    seed = (settings.seed * 1_000_003 + M * 101 + rank) % 2**32
    if settings.sampler == "grid":
        return _GridSampler(space.grid(), seed=seed)
    return optuna.samplers.TPESampler(
        multivariate=True,  # the knobs interact (tile sizes vs stages vs shared memory)
        constant_liar=True,  # parallel workers see each other's running trials as bad, so they spread out
        n_startup_trials=min(10, max(2, (settings.trials or 100) // 5)),
        seed=seed,
    )


def budget(settings: Settings, space: Space) -> int:
    if settings.sampler == "grid":
        return min(settings.trials or space.size(), space.size())
    return settings.trials or 100


def make_pruner(settings: Settings) -> optuna.pruners.BasePruner:
    """Step 1 is the cheap timing (Optuna's rung 0); the best third go on to the careful one."""
    if settings.careful_reps is None or settings.sampler == "grid":
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3, min_early_stopping_rate=0)


SCREENED = (TrialState.COMPLETE, TrialState.PRUNED)


# ---------------------------------------------------------------------------------------- screening


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _owner_dead(trial: FrozenTrial, grace_s: float = 60.0) -> bool:
    """Whether the process running `trial` is gone. Only this host's processes can be checked."""
    owner = trial.user_attrs.get("owner")
    if owner is None:  # killed between ask and claiming the trial
        return trial.datetime_start is not None and time.time() - trial.datetime_start.timestamp() > grace_s
    if owner["host"] != socket.gethostname() or owner["pid"] == os.getpid():
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _tell(study: optuna.Study, trial: Trial, config: Config, us: float | None, reason: str | None,
          rel_err: float | None = None, state: TrialState = TrialState.COMPLETE, **extra: Any) -> None:  # fmt: skip
    for key, value in dict(config=config, us=us, infeasible=reason, rel_err=rel_err, **extra).items():
        trial.set_user_attr(key, value)
    if state == TrialState.PRUNED:  # its cheap time is its reported rung-0 value and its "us"
        study.tell(trial, state=state)
    else:
        study.tell(trial, us if reason is None else PENALTY_US)


def _evaluate(bench: Bench, config: Config, M: int, reps: int) -> tuple[float | None, str | None, float | None]:
    """(µs, None, rel_err) for a config that runs right; (None, reason, rel_err) for one that does not."""
    rel = None
    try:
        rel = bench.verify(config, M)
        if not rel <= bench.tolerance:  # also catches NaN
            return None, f"wrong result: rel_err {rel:.3g} > {bench.tolerance:g}", rel
        return bench.time(config, M, reps), None, rel
    except Infeasible as e:
        return None, str(e), rel
    except DeviceBroken:
        raise
    except Exception as e:  # one bad config never ends the run
        return None, describe(e), rel


def _twin(study: optuna.Study, trial: Trial) -> FrozenTrial | None:
    """A trial with the same config that was measured, or is being measured under a smaller number:
    TPE on a discrete space repeats itself, and of two workers that drew one config only the first
    should time it."""
    for t in study.get_trials(deepcopy=False, states=(*SCREENED, TrialState.RUNNING)):
        if t.params == trial.params and t.number != trial.number and "repeat_of" not in t.user_attrs:
            if t.state in SCREENED or t.number < trial.number:
                return t
    return None


def _await(study: optuna.Study, number: int, timeout_s: float) -> FrozenTrial | None:
    """The finished trial `number`, or None if it failed, its process died, or it took too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        t = study.get_trials(deepcopy=False)[number]
        if t.state in SCREENED:
            return t
        if t.state != TrialState.RUNNING or _owner_dead(t) or time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def trial_counts(study: optuna.Study) -> tuple[int, float]:
    """(trials started or finished, best µs so far)."""
    trials = study.get_trials(deepcopy=False, states=(*SCREENED, TrialState.RUNNING))
    values = [_screen_us(t) for t in trials if t.state in SCREENED and t.user_attrs.get("us") is not None]
    return len(trials), min(values, default=math.inf)


def screened_count(study: optuna.Study) -> int:
    """Trials that got their screening (a timing, or a reason they cannot run)."""
    return len(study.get_trials(deepcopy=False, states=SCREENED))


def plateaued(values: list[float], patience: int, min_gain: float) -> bool:
    """True when the last `patience` values brought no gain of min_gain (relative) over the best."""
    best, since = math.inf, 0
    for v in values:
        if v < best * (1 - min_gain):
            best, since = v, 0
        else:
            since += 1
    return since >= patience


def _should_stop(study: optuna.Study, settings: Settings, n_max: int, deadline: float | None) -> bool:
    started, _ = trial_counts(study)
    if started >= n_max or (deadline is not None and time.time() >= deadline):
        return True
    if settings.sampler == "grid":  # brute force means brute force
        return False
    done = study.get_trials(deepcopy=False, states=SCREENED)
    return plateaued([_screen_us(t) or PENALTY_US for t in done], settings.patience, settings.min_gain)


def screen(
    study: optuna.Study,
    bench: Bench,
    M: int,
    space: Space,
    settings: Settings,
    deadline: float | None = None,
    on_trial: Callable[[], None] | None = None,
    n_max: int | None = None,
    hard_deadline: float | None = None,
) -> None:
    """Run trials on `study` until its budget, the deadline or a plateau. Safe to run in several
    processes on one study at once: the budget and the plateau are read from the shared storage.
    `deadline` only stops new batches (the M's share of a time budget); a batch in flight finishes unless
    `hard_deadline` (the end of the whole budget) passes. Measured on an H100: a light M's share was 10 s
    while its first batch compiled for 14 s, and failing that batch left the M with no timing at all."""
    n_max = n_max or budget(settings, space)
    while not _should_stop(study, settings, n_max, deadline):
        n = max(1, min(settings.batch, n_max - trial_counts(study)[0]))
        trials = [study.ask(space.distributions()) for _ in range(n)]
        try:
            for t in trials:
                t.set_user_attr("owner", _owner())
            _screen_batch(study, bench, M, trials, settings, on_trial, hard_deadline)
        except BaseException:  # Ctrl-C, a broken device: trials in flight are lost, not half-recorded
            for t in trials:
                study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
            raise


def _screen_batch(study: optuna.Study, bench: Bench, M: int, trials: list[Trial], settings: Settings,
                  on_trial: Callable[[], None] | None, deadline: float | None = None) -> None:  # fmt: skip
    configs = [to_config(t.params) for t in trials]
    twins = [_twin(study, t) for t in trials]
    reasons = [predict_infeasible(c, settings.bytes_per_elem, settings.smem_limit) for c in configs]
    fresh = [i for i in range(len(trials)) if twins[i] is None and reasons[i] is None]
    timeout_s = None if deadline is None else max(0.0, deadline - time.time())
    for i, reason in zip(fresh, bench.compile([configs[i] for i in fresh], M, timeout_s)):
        reasons[i] = reason
    for trial, config, twin, reason in zip(trials, configs, twins, reasons):
        if deadline is not None and time.time() >= deadline:  # the budget is hard: the rest wait for --resume
            study.tell(trial, state=TrialState.FAIL)
            continue
        done = _await(study, twin.number, settings.twin_timeout_s) if twin is not None else None
        if done is not None:  # already measured: same answer, no GPU time
            a = done.user_attrs
            state = TrialState.PRUNED if done.state == TrialState.PRUNED else TrialState.COMPLETE
            if state == TrialState.PRUNED:
                trial.report(a["us"], 1)
            _tell(study, trial, config, a.get("us"), a.get("infeasible"), a.get("rel_err"), state,
                  repeat_of=done.number)
        elif reason is not None:
            _tell(study, trial, config, None, reason)
        else:
            try:
                us, reason, rel = _evaluate(bench, config, M, settings.screen_reps)
                if reason is None and settings.careful_reps and settings.sampler != "grid":
                    trial.set_user_attr("screen_us", us)
                    trial.report(us, 1)
                    if trial.should_prune():
                        _tell(study, trial, config, us, None, rel, TrialState.PRUNED)
                        continue
                    us, reason, rel = _evaluate(bench, config, M, settings.careful_reps)  # promoted
            except DeviceBroken as e:
                _tell(study, trial, config, None, f"broke the GPU context: {e}")
                raise
            finally:
                if on_trial:
                    on_trial()
            _tell(study, trial, config, us, reason, rel)


# ------------------------------------------------------------------------------------------- per M


def recover_stale(study: optuna.Study, exclusive: bool = False) -> None:
    """Trials left RUNNING by a killed process: fail them and run their config again once. A config
    whose process died twice is recorded as infeasible, so a crashing config cannot stall a run.
    `exclusive`: no other live process works on this study now (a journal file: one coordinator per
    run folder, its workers idle between M), so a trial killed before it was claimed is dead too."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        unclaimed = exclusive and "owner" not in t.user_attrs
        if not (unclaimed or _owner_dead(t)):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if len(t.params) != len(t.distributions) or not t.params:
            continue
        if "retry_of" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        else:
            reason = "its process died while evaluating it, twice"
            study.add_trial(optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=PENALTY_US,
                user_attrs={"config": to_config(t.params), "us": None, "infeasible": reason, "rel_err": None},
            ))  # fmt: skip


def warm_starts(
    M: int, E: int, dtype: str, tops: Mapping[int, list[Config]], old_table: Mapping[int, Config], top_n: int = 2,
    prior_tables: Mapping[str, Mapping[int, Config]] | None = None,
) -> list[tuple[str, Config]]:
    """Where a study starts, evaluated in this order: the previous table's entry for this GPU, the
    --prior tables' entries (vLLM's shipped file, say), the best `top_n` configs of the nearest finished
    M below and above (a config's time at 1024 predicts 1536), the built-in Hopper priors, and vLLM's
    default."""
    starts: list[tuple[str, Config]] = []
    if old_table:
        starts.append(("existing table", old_table[nearest(old_table, M)]))
    for name, table in (prior_tables or {}).items():
        if table:
            starts.append((f"--prior {name}", table[nearest(table, M)]))
    for side in (sorted(m for m in tops if m < M)[-1:], sorted(m for m in tops if m > M)[:1]):
        for m in side:
            starts += [(f"M={m}" + (f" #{i + 1}" if i else ""), c) for i, c in enumerate(tops[m][:top_n])]
    starts += [(f"prior #{i + 1}", c) for i, c in enumerate(prior_configs(M, dtype))]
    starts.append(("default", default_config(M, E)))
    seen: set[tuple] = set()
    return [(src, c) for src, c in starts if not (config_key(c) in seen or seen.add(config_key(c)))]


def _screen_us(t: FrozenTrial) -> float:
    """What screening measured: the careful time if promoted (its value), the cheap one if pruned."""
    return t.value if t.state == TrialState.COMPLETE else t.user_attrs["us"]


def _measured(study: optuna.Study) -> list[FrozenTrial]:
    """Screened trials of configs that ran right, fastest first."""
    done = study.get_trials(deepcopy=False, states=SCREENED)
    return sorted((t for t in done if t.user_attrs.get("us") is not None), key=_screen_us)


def _is_prior(t: FrozenTrial) -> bool:
    return t.user_attrs.get("warm_start", "default") != "default"


def finalists(study: optuna.Study, default: Config, n: int) -> tuple[dict[tuple, Config], int]:
    """The configs re-timed together, and how many of them come first as essential: the best
    screened, the two best known-good priors, the best with vLLM's structure (the table needs one), the
    vLLM-structure twin of the best (its six knobs, extras at their defaults: when the search settles
    on an extra knob, the unfused configs it screened are few and poor, and the same tiles are the
    likeliest best for vLLM's kernel) and vLLM's default; then the rest of the best n screened."""
    ranked = _measured(study)
    configs = [canonical(t.user_attrs["config"]) for t in ranked]
    priors = [canonical(t.user_attrs["config"]) for t in ranked if _is_prior(t)]
    vllm = [c for c in configs if is_vllm_structure(c)][:1] + [six_knobs(c) for c in configs[:1]]
    essential = [*configs[:1], *priors[:2], *vllm, canonical(default)]  # two priors: screening may misrank them
    candidates: dict[tuple, Config] = {}
    for c in essential:
        candidates.setdefault(config_key(c), c)
    n_essential = len(candidates)
    for c in configs[: max(n, 1)]:
        candidates.setdefault(config_key(c), c)
    return candidates, n_essential


def finalize(study: optuna.Study, bench: Bench, M: int, default: Config, settings: Settings,
             deadline: float | None = None) -> dict | None:  # fmt: skip
    """Re-time the finalists round-robin with many reps (drift hits all alike; rounds after the first
    stop at the deadline); the fastest that verifies is ours, the fastest with vLLM's structure goes
    in the table. With bench.time, the same CUDA-graph timing as `moetune bench`."""
    candidates, n_essential = finalists(study, default, settings.finalists)
    priors = [t for t in _measured(study) if _is_prior(t)]
    prior_key = config_key(priors[0].user_attrs["config"]) if priors else None
    samples: dict[tuple, list[float]] = {key: [] for key in candidates}
    late = lambda: deadline is not None and time.time() >= deadline  # noqa: E731
    for round_ in range(settings.final_rounds):
        if round_ and late():
            break
        for i, key in enumerate(list(samples)):
            if late() and (round_ or i >= n_essential):  # past the deadline only the essentials, once
                break
            try:
                samples[key].append(bench.time(candidates[key], M, settings.final_reps))
            except Infeasible:
                del samples[key]
    final_us = {key: statistics.median(s) for key, s in samples.items() if s}

    verified = {}
    for key in sorted(final_us, key=final_us.get):
        rel = _final_check(bench, candidates[key], M)
        if rel is not None:
            verified[key] = rel
    ours = next(iter(verified), None)
    vllm = next((k for k in verified if is_vllm_structure(candidates[k])), None)
    if ours is None or vllm is None:
        return None
    done = study.get_trials(deepcopy=False, states=SCREENED)
    us = lambda key: None if key not in final_us else round(final_us[key], 3)  # noqa: E731
    dflt = final_us.get(config_key(default))
    return {
        "config": candidates[ours],
        "tuned_us": us(ours),
        "vllm_config": six_knobs(candidates[vllm]),
        "vllm_us": us(vllm),
        "default_us": us(config_key(default)),
        "prior_us": us(prior_key),
        "speedup": None if dflt is None else round(dflt / final_us[ours], 4),
        "trials": len(done),
        "rel_err": verified[ours],
        "infeasible": sum(t.user_attrs.get("infeasible") is not None for t in done),
        "finalists": len(final_us),
        "top": [candidates[k] for k in list(verified)[:3]],  # where neighbouring M start; not in the sidecar
    }


def fallback_entry(starts: list[tuple[str, Config]], space: Space, note: str) -> dict:
    """An M the budget left unscreened: the first known-good start (old table, neighbour, prior), untimed."""
    placed = [(source, to_config(space.params(c))) for source, c in starts]  # e.g. no gemv above M=8
    source, config = placed[0]
    vllm = next((c for _, c in placed if is_vllm_structure(c)), six_knobs(config))  # none when --space pins an extra
    return {"config": config, "vllm_config": six_knobs(vllm), "tuned_us": None, "default_us": None,
            "speedup": None, "trials": 0, "incomplete": True, "note": f"{note}; config from {source}"}  # fmt: skip


def _final_check(bench: Bench, config: Config, M: int) -> float | None:
    """The last gate before a config enters a table: its rel_err at M, or None if it fails."""
    try:
        rel = bench.verify(config, M)
    except Infeasible:
        return None
    return rel if rel <= bench.tolerance else None
