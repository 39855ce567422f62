"""The tuner's logic against a synthetic objective (no kernel, no GPU): infeasible configs, warm
starts, plateaus, the grid, finalists, durability across SIGKILL and Ctrl-C, and workers sharing a study."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from moetune.errors import MoetuneError, TableError
from moetune.kernels.knobs import is_vllm_structure
from moetune.models import MoeShape
from moetune.tables import default_config, load_sidecar, load_table, save_table
from moetune.tuning.priors import prior_configs
from moetune.tuning.space import Space, config_key, parse_space, space_for, to_config
from moetune.tuning.study import (
    PENALTY_US,
    Settings,
    drop_stale_journal_lock,
    finalize,
    make_pruner,
    make_sampler,
    open_storage,
    plateaued,
    recover_stale,
    screen,
    warm_starts,
)
from moetune.tuning.synthetic import SyntheticBench, synthetic_us
from moetune.tuning.tuner import TableJob, tune_table

SHAPE = MoeShape(E=8, N=14336, K=4096, top_k=2)  # Mixtral-8x7B at TP1: nothing is clamped but BLOCK_SIZE_M
FAST = dict(screen_reps=1, final_reps=2, final_rounds=1, finalists=2)


def make_job(tmp_path: Path, Ms: list[int], resume: bool = False) -> TableJob:
    return TableJob(
        path=tmp_path / "out" / "E=8,N=14336,device_name=Synthetic.json", storage=str(tmp_path / "journal.log"),
        shape=SHAPE, dtype="bf16", model="mixtral-8x7b", tp=1, device="Synthetic", Ms=Ms, resume=resume,
    )  # fmt: skip


def memory_study(seed: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))


def cfg(bm: int, bn: int, bk: int, g: int, w: int, s: int) -> dict[str, int]:
    return dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=g, num_warps=w, num_stages=s)


def trials_of(job: TableJob, M: int) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=job.study_name(M), storage=open_storage(job.storage)).trials


# -------------------------------------------------------------------------------------------- space


def test_space_holds_vllms_grid_and_the_default_configs():
    space = space_for(4096, SHAPE)
    configs = {config_key(c) for c in space.configs()}
    for bm in (16, 32, 64, 128, 256):
        for bn in (32, 64, 128, 256):
            for bk in (64, 128, 256):
                for g in (1, 16, 32, 64):
                    for w in (4, 8):
                        for s in (2, 3, 4, 5):
                            assert config_key(cfg(bm, bn, bk, g, w, s)) in configs
    for M in (1, 4096):
        default = default_config(M, SHAPE.E)
        assert to_config(space.params(default)) == default


def test_block_m_above_the_token_count_is_clamped_but_never_below_64():
    biggest = cfg(256, 64, 64, 1, 4, 3)
    top = {M: to_config(space_for(M, SHAPE).params(biggest))["BLOCK_SIZE_M"] for M in (1, 64, 100, 4096)}
    assert top == {1: 64, 64: 64, 100: 128, 4096: 256}


def test_tiny_shapes_clamp_tiles_that_would_only_pad():
    space = space_for(16, MoeShape(E=4, N=96, K=64, top_k=2))
    assert to_config(space.params(cfg(16, 256, 256, 1, 4, 3)))["BLOCK_SIZE_K"] == 128  # max(K, N) = 96 -> 128


def test_space_pins_hold_knobs_at_one_value_for_either_sampler():
    assert parse_space(None) == {}
    six = parse_space("vllm")
    assert six == {"kernel": "tiled", "fuse_silu": 0}
    assert space_for(16, SHAPE, six).size() == 2688 and space_for(256, SHAPE, six).size() == 4480  # vLLM's six knobs
    assert all(is_vllm_structure(c) for c in space_for(1, SHAPE, six).configs())
    pins = parse_space("vllm, GROUP_SIZE_M=1,BLOCK_SIZE_M=64")
    for M in (1, 128, 4096):  # BLOCK_SIZE_M=64 holds at any M, above the clamp or not
        space = space_for(M, SHAPE, pins)
        configs = space.configs()
        assert space.size() == len(configs) == 128  # BLOCK_SIZE_N 4 x BLOCK_SIZE_K 4 x warps 2 x stages 4
        assert {(c["GROUP_SIZE_M"], c["BLOCK_SIZE_M"]) for c in configs} == {(1, 64)}
        assert all(set(c) == set(cfg(1, 1, 1, 1, 1, 1)) for c in configs)  # six knobs, no extra
        # anything (an old table's entry, vLLM's default, a prior) moves to the nearest point of the space
        moved = to_config(space.params({**cfg(16, 64, 128, 8, 8, 3), "fuse_silu": 1, "kernel": "gemv"}))
        assert moved == cfg(64, 64, 128, 1, 8, 3)
    # a pin off vLLM's structure is a config's knob too, even where it is not searched (gemv above M=8)
    fused = space_for(64, SHAPE, parse_space("fuse_silu=1,kernel=gemv,num_stages=3"))
    assert {(c["fuse_silu"], c["kernel"], c["num_stages"]) for c in fused.configs()} == {(1, "gemv", 3)}
    assert to_config(fused.params(cfg(64, 64, 64, 1, 4, 4))) == {**cfg(64, 64, 64, 1, 4, 3), "kernel": "gemv",
                                                                  "fuse_silu": 1}  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), [
    ("vllm,BLOCK_SIZE_M=48", "BLOCK_SIZE_M='48' is not allowed; use one of [16, 32, 64, 128, 256]"),
    ("warps=4", "'warps=4' is neither 'vllm' nor KNOB=VALUE"),
    ("six", "'six' is neither"),
    ("", "'' is neither"),
    ("kernel=fast", "kernel='fast' is not allowed; use one of ['tiled', 'gemv']"),
])  # fmt: skip
def test_a_bad_space_spec_is_one_clear_error(spec, message):
    with pytest.raises(MoetuneError, match=re.escape(message)):
        parse_space(spec)


def test_grid_and_tpe_search_the_same_pinned_space_and_the_grid_all_of_it(tmp_path):
    pins = parse_space("vllm,GROUP_SIZE_M=1,BLOCK_SIZE_M=64,num_warps=4")  # 64 configs
    grid_job, tpe_job = make_job(tmp_path / "grid", [1, 64]), make_job(tmp_path / "tpe", [1, 64])
    save_table(tpe_job.path, {1: cfg(16, 32, 64, 8, 8, 3)})  # an old table outside the space: moved into it
    tune_table(grid_job, Settings(trials=None, sampler="grid", pins=pins, **FAST), SyntheticBench)
    tune_table(tpe_job, Settings(trials=30, patience=1000, pins=pins, **FAST), SyntheticBench)
    for job in (grid_job, tpe_job):
        sidecar = load_sidecar(job.path)
        assert sidecar["space"] == pins
        for M in (1, 64):
            entry, trials = sidecar["entries"][str(M)], trials_of(job, M)
            in_space = {config_key(c) for c in space_for(M, SHAPE, pins).configs()}
            assert {config_key(to_config(t.params)) for t in trials} <= in_space
            assert config_key(entry["config"]) in in_space and entry["config"] == entry["vllm_config"]
            # vLLM's default (BLOCK_SIZE_M 16 at M=1, GROUP_SIZE_M 8 at M=64) is re-timed moved into the space
            assert entry["default_us"] == pytest.approx(synthetic_us(to_config(
                space_for(M, SHAPE, pins).params(default_config(M, SHAPE.E))), M), rel=1e-3)  # fmt: skip
            if job is grid_job:
                assert len(trials) == len(in_space) == 64  # every config once
                best = min(synthetic_us(c, M) for c in space_for(M, SHAPE, pins).configs())
                assert entry["tuned_us"] == pytest.approx(best, rel=1e-3)
    assert to_config(trials_of(tpe_job, 1)[0].params) == cfg(64, 32, 64, 1, 4, 3)  # the old entry, moved


def test_a_run_resumes_only_with_the_space_it_started_with(tmp_path):
    pins = parse_space("vllm,GROUP_SIZE_M=1")
    tune_table(make_job(tmp_path, [1, 16]), Settings(trials=2, pins=pins, **FAST), SyntheticBench)
    for other in ({}, parse_space("vllm")):
        with pytest.raises(MoetuneError, match=r"was run with --space 'kernel=tiled,fuse_silu=0,GROUP_SIZE_M=1'"):
            tune_table(make_job(tmp_path, [1, 16, 64], resume=True), Settings(trials=2, pins=other, **FAST),
                       SyntheticBench)  # fmt: skip
    result = tune_table(make_job(tmp_path, [1, 16, 64], resume=True), Settings(trials=2, pins=pins, **FAST),
                        SyntheticBench)  # fmt: skip
    assert result.resumed == [1, 16] and sorted(result.done) == [1, 16, 64]


# ---------------------------------------------------------------------------------------- screening


def test_infeasible_configs_are_recorded_with_a_reason_and_a_penalty_never_as_failures():
    study = memory_study()
    space = space_for(4096, SHAPE)
    bad = {
        "predicted shared memory": cfg(256, 256, 256, 1, 4, 5),  # 5 * (64K + 64K) * 2 bytes
        "synthetic compile error": cfg(16, 256, 256, 1, 8, 2),
        "synthetic OutOfResources": cfg(256, 64, 64, 1, 4, 5),
        "wrong result": cfg(64, 64, 64, 2, 4, 3),
    }
    for config in bad.values():
        study.enqueue_trial(space.params(config))
    settings = Settings(trials=12, smem_limit=300 * 1024, patience=100, **FAST)
    screen(study, SyntheticBench(), 4096, space, settings)

    assert len(study.trials) == 12
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for (reason, config), t in zip(bad.items(), study.trials):
        assert to_config(t.params) == config
        assert reason in t.user_attrs["infeasible"] and t.value == PENALTY_US and t.user_attrs["us"] is None
    assert study.best_trial.user_attrs["infeasible"] is None


def test_a_config_suggested_again_reuses_its_measurement():
    study = memory_study()
    space = space_for(64, SHAPE)
    for _ in range(3):
        study.enqueue_trial(space.params(cfg(64, 128, 128, 16, 4, 3)))
    log = []
    bench = SyntheticBench()
    bench.time = lambda c, M, reps: log.append(c) or synthetic_us(c, M)
    screen(study, bench, 64, space, Settings(trials=3, **FAST))
    assert len(log) == 1
    assert [t.user_attrs.get("repeat_of") for t in study.trials] == [None, 0, 0]
    assert len({t.value for t in study.trials}) == 1


def test_an_M_stops_early_once_the_best_plateaus():
    assert plateaued([5, 4, 4, 4, 4, 4], patience=4, min_gain=0.01)
    assert not plateaued([5, 4, 4, 4, 3], patience=4, min_gain=0.01)
    assert plateaued([5, 4, 3.99, 3.99, 3.99, 3.99], patience=4, min_gain=0.01)  # a 0.25% gain is no gain
    study = memory_study()
    screen(study, SyntheticBench(), 64, space_for(64, SHAPE), Settings(trials=300, patience=8, **FAST))
    assert len(study.trials) < 300


def test_grid_sampler_times_every_config_of_the_space_exactly_once():
    space = Space((("BLOCK_SIZE_M_log2", 4, 5), ("BLOCK_SIZE_N_log2", 6, 7), ("BLOCK_SIZE_K_log2", 6, 7),
                   ("GROUP_SIZE_M_log2", 4, 4), ("num_warps_log2", 2, 3), ("num_stages", 3, 4)))  # fmt: skip
    settings = Settings(trials=None, sampler="grid", **FAST)
    study = optuna.create_study(sampler=make_sampler(settings, space, 8, 0))
    screen(study, SyntheticBench(), 8, space, settings)
    seen = [config_key(to_config(t.params)) for t in study.trials]
    assert len(seen) == space.size() == 32 and len(set(seen)) == 32
    assert study.best_value == min(synthetic_us(c, 8) for c in space.configs())


def test_finalists_are_retimed_so_a_lucky_screening_time_does_not_win():
    lucky, solid = cfg(64, 128, 128, 16, 4, 3), cfg(64, 128, 128, 32, 4, 3)

    class LuckyBench(SyntheticBench):
        def time(self, config, M, reps):
            if config == lucky:
                return 1.0 if reps == 1 else 100.0  # one fast sample, slow for real
            return 5.0 if config == solid else 50.0

    study = memory_study()
    space = space_for(64, SHAPE)
    for c in (lucky, solid):
        study.enqueue_trial(space.params(c))
    settings = Settings(trials=2, **FAST)
    screen(study, LuckyBench(), 64, space, settings)
    assert study.best_trial.user_attrs["config"] == lucky
    entry = finalize(study, LuckyBench(), 64, default_config(64, SHAPE.E), settings)
    assert entry["config"] == solid
    assert entry["tuned_us"] == 5.0 and entry["default_us"] == 50.0 and entry["speedup"] == 10.0


def test_warm_starts_are_the_old_table_the_neighbours_best_the_priors_and_the_default():
    a, a2, b = cfg(32, 64, 64, 1, 4, 3), cfg(32, 64, 128, 1, 4, 3), cfg(128, 128, 64, 16, 8, 4)
    old = cfg(64, 64, 128, 32, 4, 4)
    starts = warm_starts(16, 8, "fp8", tops={1: [b], 8: [a, a2, b], 64: [b], 256: [a]}, old_table={12: old, 4096: b})
    priors = [("prior #1", prior_configs(16, "fp8")[0]), ("prior #2", prior_configs(16, "fp8")[1])]
    assert starts == [("existing table", old), ("M=8", a), ("M=8 #2", a2), ("M=64", b), *priors,
                      ("default", default_config(16, 8))]
    # the same config from two sources is evaluated once, under its first source
    assert [s for s, _ in warm_starts(16, 8, "bf16", {8: [old]}, {16: old})][:2] == ["existing table", "prior #1"]
    # --prior tables (vLLM's shipped file, say) come right after the existing table, nearest M
    vllm = {8: a, 32: b}
    assert warm_starts(16, 8, "fp8", {}, {16: old}, prior_tables={"vllm.json": vllm})[:2] == [
        ("existing table", old), ("--prior vllm.json", a)]


def test_each_study_starts_from_its_warm_starts(tmp_path):
    job = make_job(tmp_path, [1, 16])
    old_1, old = cfg(16, 64, 128, 16, 4, 4), cfg(32, 64, 128, 32, 4, 4)
    save_table(job.path, {1: old_1, 16: old})
    tune_table(job, Settings(trials=5, **FAST), SyntheticBench)
    first = trials_of(job, 16)[:2]
    assert [t.user_attrs["warm_start"] for t in first] == ["existing table", "M=1"]
    finals = load_sidecar(job.path)["entries"]["1"]
    assert to_config(first[0].params) == old and to_config(first[1].params) == finals["config"]


# ---------------------------------------------------------------------------------------- the table


def test_a_run_writes_a_valid_table_sidecar_and_trials_file(tmp_path):
    job = make_job(tmp_path, [1, 64])
    result = tune_table(job, Settings(trials=6, **FAST), SyntheticBench, trials_csv=tmp_path / "trials.csv")
    assert sorted(result.done) == [1, 64] and not result.failed and not result.interrupted
    table, sidecar = load_table(job.path), load_sidecar(job.path)
    assert sorted(table) == [1, 64]
    assert sidecar["timings_meaningful"] is False and sidecar["table"] == job.path.name
    for M in (1, 64):
        e = sidecar["entries"][str(M)]
        assert e["vllm_config"] == table[M] and e["trials"] == 6 and not e.get("incomplete")
        assert e["speedup"] == pytest.approx(e["default_us"] / e["tuned_us"], rel=1e-3)
    df = pd.read_csv(tmp_path / "trials.csv")
    assert len(df) == 12 and set(df["M"]) == {1, 64} and set(df["state"]) == {"COMPLETE"}
    assert {"BLOCK_SIZE_M", "num_stages", "kernel", "fuse_silu", "us", "infeasible"} <= set(df.columns)
    assert df["BLOCK_SIZE_M"].notna().all() and set(df["kernel"]) <= {"tiled", "gemv"}
    assert not list(job.path.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_the_time_budget_is_shared_over_the_table_and_every_M_still_gets_a_config(tmp_path):
    job = make_job(tmp_path, [1, 16, 64])
    settings = Settings(trials=1000, patience=1000, time_budget_s=3, min_screen=3, **FAST)
    t0 = time.monotonic()
    result = tune_table(job, settings, functools.partial(SyntheticBench, delay_s=0.05))
    assert time.monotonic() - t0 < 3 * 1.05  # hard: finalists and writes included
    assert sorted(result.done) == [1, 16, 64]
    assert all(3 <= len(trials_of(job, M)) < 60 for M in job.Ms)


def test_the_budget_is_hard_even_with_slow_finalists_and_weights_large_M_more(tmp_path):
    job = make_job(tmp_path, [1, 64, 4096])
    settings = Settings(trials=1000, patience=1000, time_budget_s=4, screen_reps=1, final_reps=20, final_rounds=5,
                        finalists=3, anchors=False)  # fmt: skip

    class SlowFinals(SyntheticBench):  # a careful timing costs 20x a screening one
        def time(self, config, M, reps):
            time.sleep(0.005 * reps)
            return synthetic_us(config, M)

    t0 = time.monotonic()
    tune_table(job, settings, SlowFinals)
    assert time.monotonic() - t0 < 4 * 1.05
    n = {M: len(trials_of(job, M)) for M in job.Ms}
    assert n[4096] > n[1]  # M=4096 has the biggest share: 9x the weight of M=1


def test_an_M_the_budget_cut_short_is_incomplete_keeps_a_config_and_resume_continues_it(tmp_path):
    job = make_job(tmp_path, [1, 16, 64, 256])
    settings = Settings(trials=30, patience=1000, time_budget_s=1.2, min_screen=30, anchors=False, **FAST)
    result = tune_table(job, settings, functools.partial(SyntheticBench, delay_s=0.1))
    sidecar, table = load_sidecar(job.path), load_table(job.path)
    assert sorted(table) == job.Ms and result.incomplete == job.Ms and not result.done
    assert all(sidecar["entries"][str(M)]["incomplete"] for M in job.Ms)
    before = len(trials_of(job, 64))

    job.resume = True
    result = tune_table(job, Settings(trials=30, patience=1000, anchors=False, **FAST), SyntheticBench)
    assert sorted(result.done) == job.Ms and not result.resumed and not result.incomplete
    assert not any(e.get("incomplete") for e in load_sidecar(job.path)["entries"].values())
    assert len([t for t in trials_of(job, 64) if t.state == TrialState.COMPLETE]) >= 30 > before


def test_a_first_batch_compiling_past_its_Ms_share_still_runs_inside_the_budget(tmp_path):
    """H100, 2026-11-26: a light M's share (about 10 s) was shorter than its first batch's compile (14 s).
    The batch was failed whole and the M left with no timing while 130 s of the budget remained."""
    job = make_job(tmp_path, [1, 2, 4, 8, 16])  # anchors 1, 4, 16 first; 2 and 8 then share what is left

    class SlowCompileAt2(SyntheticBench):
        def compile(self, configs, M, timeout_s=None):
            if M == 2:
                time.sleep(2.5)  # past M=2's share (about half of ~4 s), not past the budget
            return super().compile(configs, M, timeout_s)

    t0 = time.monotonic()
    result = tune_table(job, Settings(trials=6, patience=1000, time_budget_s=4.5, min_screen=1, **FAST), SlowCompileAt2)
    assert time.monotonic() - t0 < 4.5 * 1.05
    assert sorted(result.done) == job.Ms and not result.incomplete
    assert any(t.state == TrialState.COMPLETE for t in trials_of(job, 2))


def test_a_second_run_on_the_same_storage_needs_resume(tmp_path):
    tune_table(make_job(tmp_path, [1]), Settings(trials=2, **FAST), SyntheticBench)
    with pytest.raises(MoetuneError, match="--resume"):
        tune_table(make_job(tmp_path, [1]), Settings(trials=2, **FAST), SyntheticBench)
    result = tune_table(make_job(tmp_path, [1], resume=True), Settings(trials=2, **FAST), SyntheticBench)
    assert result.resumed == [1]


def test_ctrl_c_keeps_finished_M_in_a_valid_table_and_loses_only_the_trial_in_flight(tmp_path):
    calls = {64: 0}

    class InterruptedBench(SyntheticBench):
        def time(self, config, M, reps):
            if M == 64 and (calls.update({64: calls[64] + 1}) or calls[64] == 2):
                raise KeyboardInterrupt  # Ctrl-C while timing M=64's second trial
            return synthetic_us(config, M)

    job = make_job(tmp_path, [1, 64, 256])
    result = tune_table(job, Settings(trials=4, anchors=False, **FAST), InterruptedBench)
    assert result.interrupted and sorted(result.done) == [1]
    assert sorted(load_table(job.path)) == [1] and sorted(load_sidecar(job.path)["entries"]) == ["1"]
    states = [t.state for t in trials_of(job, 64)]
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states


# ------------------------------------------------------------------------------ kill, resume, workers

CHILD = textwrap.dedent("""
    import functools, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_tuner import make_job, FAST
    from moetune.tuning.synthetic import SyntheticBench
    from moetune.tuning.study import Settings
    from moetune.tuning.tuner import tune_table
    job = make_job(Path({tmp!r}), [1, 2, 4, 8, 16])
    tune_table(job, Settings(trials=6, patience=100, anchors=False, **FAST), functools.partial(SyntheticBench, delay_s=0.1, log_path={log!r}))
""")


def test_resume_after_sigkill_redoes_no_finished_M(tmp_path):
    log = tmp_path / "first.log"
    script = CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), log=str(log))
    child = subprocess.Popen([sys.executable, "-c", script])
    job = make_job(tmp_path, [1, 2, 4, 8, 16], resume=True)
    deadline = time.monotonic() + 60
    finished: list[int] = []
    try:
        while len(finished) < 2:
            assert child.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            if job.path.exists():
                finished = sorted(load_table(job.path))  # never half-written: TableError would fail the test
            time.sleep(0.02)
        time.sleep(0.25)  # into the next M's trials
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    drop_stale_journal_lock(Path(job.storage))  # as `moetune run` does, holding the run folder's lock
    finished = sorted(load_table(job.path))
    before = {M: len(trials_of(job, M)) for M in finished}
    killed_M = min(set(job.Ms) - set(finished))
    killed_trials = [t for t in trials_of(job, killed_M) if t.state == TrialState.COMPLETE]

    relog = tmp_path / "resume.log"
    bench = functools.partial(SyntheticBench, log_path=str(relog))
    result = tune_table(job, Settings(trials=6, patience=100, anchors=False, **FAST), bench)
    assert sorted(result.resumed) == finished and sorted(result.done) == job.Ms, (result.failed, result.incomplete)
    redone = {int(line.split()[0]) for line in relog.read_text().splitlines()}
    assert not redone & set(finished)
    assert {M: len(trials_of(job, M)) for M in finished} == before
    after = trials_of(job, killed_M)
    kept = [t.number for t in after if t.state == TrialState.COMPLETE][: len(killed_trials)]
    assert kept == [t.number for t in killed_trials]  # the killed M's finished trials were kept, not redone
    assert sorted(load_table(job.path)) == job.Ms


def test_two_worker_processes_share_one_study_without_duplicating_work(tmp_path):
    log = tmp_path / "timings.log"
    job = make_job(tmp_path, [64])
    settings = Settings(trials=20, patience=100, screen_reps=1, final_reps=2, final_rounds=1, finalists=2)
    # 0.5 s a timing: the coordinator alone would need 10 s, time enough for the spawned worker to join
    result = tune_table(job, settings, functools.partial(SyntheticBench, delay_s=0.5, log_path=str(log)), workers=2)
    assert sorted(result.done) == [64]
    trials = trials_of(job, 64)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert 20 <= len(trials) <= 21  # two workers may both take the last slot
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2
    screened = [line.split()[1:-1] for line in log.read_text().splitlines() if line.endswith(" 1")]
    assert len(screened) == len(set(map(tuple, screened)))  # no config timed twice in screening
    starts = [t.number for t in trials if t.user_attrs.get("warm_start")]
    assert starts == list(range(len(starts)))  # each warm start taken once, by one of the two


def test_a_trial_whose_process_died_is_retried_once_then_recorded_infeasible():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"host": os.uname().nodename, "pid": dead.pid}
    study = memory_study()
    dists = space_for(64, SHAPE).distributions()

    first = study.ask(dists)
    first.set_user_attr("owner", owner)
    recover_stale(study)
    assert study.trials[0].state == TrialState.FAIL
    retry = study.ask(dists)  # pops the re-enqueued config
    assert retry.params == first.params and retry.user_attrs["retry_of"] == 0
    retry.set_user_attr("owner", owner)
    recover_stale(study)
    record = study.trials[-1]
    assert record.state == TrialState.COMPLETE and record.value == PENALTY_US
    assert "died" in record.user_attrs["infeasible"] and record.params == first.params
    assert not [t for t in study.trials if t.state == TrialState.WAITING]


def test_a_broken_existing_table_is_a_clear_error(tmp_path):
    job = make_job(tmp_path, [1])
    job.path.parent.mkdir(parents=True)
    job.path.write_text("{not json")
    with pytest.raises(TableError, match="not valid JSON"):
        tune_table(job, Settings(trials=2, **FAST), SyntheticBench)


class FakeCompiler:
    """A compile-only bench for CompilePool: some configs fail, one hangs."""

    def run_once(self, config, M):
        if config["num_warps"] == 8:
            raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")
        if config["num_stages"] == 5:
            time.sleep(60)

    def synchronize(self):
        pass


def test_compile_pool_reports_errors_and_hangs_without_stopping():
    from moetune.tuning.compile import CompilePool

    pool = CompilePool(FakeCompiler, processes=3, timeout_s=3.0)
    try:
        good, bad, hung = cfg(64, 64, 64, 1, 4, 3), cfg(64, 64, 64, 1, 8, 3), cfg(64, 64, 64, 1, 4, 5)
        reasons = pool.compile([good, bad, hung], M=16)
        assert reasons[0] is None
        assert reasons[1].startswith("RuntimeError: out of resource: shared memory")
        assert "did not finish within 3 s" in reasons[2]
        assert pool.compile([good], M=16) == [None]  # a fresh pool replaced the hung one
        t0 = time.monotonic()
        assert "did not finish within 1 s" in pool.compile([hung], M=16, timeout_s=1.0)[0]  # a budget's deadline
        assert time.monotonic() - t0 < 2.5
    finally:
        pool.close()


# ------------------------------------------------------------------------------------- tuner v2


def test_extra_knobs_come_from_knobs_py_so_a_new_one_is_searched_with_no_other_change(monkeypatch):
    from moetune.kernels import knobs

    monkeypatch.setitem(knobs.EXTRA_KNOBS, "split_k", ((1, 2, 4), 1))
    space = space_for(64, SHAPE)
    dists = space.distributions()
    assert (dists["split_k_idx"].low, dists["split_k_idx"].high) == (0, 2)  # ordered, as an index
    assert "kernel" not in dists  # gemv is for M <= 8 only
    config = {**cfg(64, 128, 128, 16, 4, 3), "split_k": 4, "fuse_silu": 1}
    assert to_config(space.params(config)) == config
    assert to_config(space.params(cfg(64, 128, 128, 16, 4, 3))) == cfg(64, 128, 128, 16, 4, 3)  # defaults dropped
    assert set(space_for(1, SHAPE).distributions()["kernel"].choices) == {"tiled", "gemv"}
    knobs.check_config(to_config(space.params(config)), "test")


def test_ours_may_use_extra_knobs_but_the_table_gets_the_best_config_with_vllms_structure():
    study = memory_study()
    space = space_for(1, SHAPE)
    tiled, gemv = cfg(64, 64, 128, 16, 4, 3), {**cfg(64, 64, 128, 16, 4, 3), "kernel": "gemv"}
    for c in (gemv, tiled):
        study.enqueue_trial(space.params(c))
    settings = Settings(trials=2, **FAST)
    screen(study, SyntheticBench(), 1, space, settings)
    entry = finalize(study, SyntheticBench(), 1, default_config(1, SHAPE.E), settings)
    assert entry["config"] == gemv and entry["vllm_config"] == tiled  # synthetic gemv is 15% faster at M=1
    assert entry["tuned_us"] < entry["vllm_us"]


def test_the_best_prior_is_always_re_timed_with_the_finalists_so_the_result_is_never_slower():
    prior, lucky = cfg(64, 128, 128, 16, 4, 3), cfg(64, 128, 128, 32, 4, 3)

    class Bench(SyntheticBench):
        def time(self, config, M, reps):
            careful = reps > 1
            if config == prior:
                return 6.0 if careful else 10.0
            if config == lucky:
                return 8.0 if careful else 5.0  # looked best in screening, is not
            return 50.0

    study = memory_study()
    space = space_for(64, SHAPE)
    study.enqueue_trial(space.params(lucky))
    study.enqueue_trial(space.params(prior), user_attrs={"warm_start": "prior #1"})
    settings = Settings(trials=2, screen_reps=1, final_reps=5, final_rounds=1, finalists=1)
    screen(study, Bench(), 64, space, settings)
    entry = finalize(study, Bench(), 64, default_config(64, SHAPE.E), settings)
    assert entry["config"] == prior and entry["tuned_us"] == entry["prior_us"] == 6.0


def test_careful_re_timing_goes_to_the_best_third_through_optunas_pruner():
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), pruner=make_pruner(Settings(careful_reps=40)))
    space = space_for(64, SHAPE)
    reps = []
    bench = SyntheticBench(noise=0.2)
    timed = bench.time
    bench.time = lambda c, M, r: reps.append(r) or timed(c, M, r)
    screen(study, bench, 64, space, Settings(trials=30, patience=100, careful_reps=40, **FAST))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    promoted = [t for t in study.trials if t.state == TrialState.COMPLETE and "screen_us" in t.user_attrs]
    assert pruned and promoted and reps.count(40) == len(promoted) < len(pruned)
    entry = finalize(study, SyntheticBench(), 64, default_config(64, SHAPE.E), Settings(**FAST))
    assert entry is not None and entry["trials"] == 30


def test_the_register_pre_filter_drops_tiles_that_must_spill_and_keeps_hoppers_winners():
    from moetune.tuning.space import predict_infeasible

    assert "spill" in predict_infeasible(cfg(256, 256, 64, 1, 4, 3), 1, 232448)
    assert predict_infeasible(cfg(128, 256, 128, 16, 8, 3), 1, 232448) is None
    assert predict_infeasible(cfg(256, 256, 64, 1, 4, 3), 1, None) is None  # the interpreter has no such limit


def test_a_torn_last_journal_line_is_named_cut_off_and_resume_works(tmp_path, capsys):
    job = make_job(tmp_path, [1])
    tune_table(job, Settings(trials=3, **FAST), SyntheticBench)
    journal = Path(job.storage)
    whole = journal.read_bytes()
    with journal.open("ab") as f:
        f.write(b'{"op_code": 6, "worker_id": "ab')  # a kill mid-write
    result = tune_table(make_job(tmp_path, [1, 16], resume=True), Settings(trials=3, **FAST), SyntheticBench)
    assert result.resumed == [1] and sorted(result.done) == [1, 16]
    err = capsys.readouterr().err
    assert f"{journal}: its last line was torn" in err and "moved its 31 bytes" in err
    assert journal.read_bytes().startswith(whole)
    assert (tmp_path / "journal.log.torn").read_bytes() == b'{"op_code": 6, "worker_id": "ab'
    again = tune_table(make_job(tmp_path, [1, 16], resume=True), Settings(trials=3, **FAST), SyntheticBench)
    assert sorted(again.resumed) == [1, 16]


def test_an_rdb_storage_lets_several_workers_share_a_run(tmp_path):
    """SQLite stands in for the database several hosts would share (Optuna's RDBStorage)."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    job = make_job(tmp_path, [64])
    job.storage = url
    settings = Settings(trials=10, patience=100, screen_reps=1, final_reps=2, final_rounds=1, finalists=2)
    result = tune_table(job, settings, functools.partial(SyntheticBench, delay_s=0.4), workers=2)
    assert sorted(result.done) == [64]
    trials = trials_of(job, 64)
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2 and 10 <= len(trials) <= 11
    job.resume, job.Ms = True, [64, 256]  # another host joining later (--resume) finds M=64 done
    assert tune_table(job, Settings(trials=3, **FAST), SyntheticBench).resumed == [64]


def test_a_trial_killed_before_it_was_claimed_is_recovered_when_no_one_else_can_run_it():
    study = memory_study()
    study.ask(space_for(64, SHAPE).distributions())  # asked, never claimed: the process died in between
    recover_stale(study)  # a shared database: another host may be about to claim it
    assert study.trials[0].state == TrialState.RUNNING
    recover_stale(study, exclusive=True)  # a journal file: this coordinator is the only one
    assert study.trials[0].state == TrialState.FAIL and study.trials[1].user_attrs["retry_of"] == 0


def test_a_study_starts_from_the_table_shipped_or_found_for_this_gpu_when_none_is_being_rewritten(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    job = make_job(tmp_path, [16])
    old = cfg(32, 64, 128, 32, 4, 4)
    save_table(shipped / job.path.name, {16: old})
    monkeypatch.setenv("MOETUNE_TUNED_CONFIGS", str(shipped))
    tune_table(job, Settings(trials=3, **FAST), SyntheticBench)
    first = trials_of(job, 16)[0]
    assert first.user_attrs["warm_start"] == "existing table" and to_config(first.params) == old


def test_an_m_the_budget_never_reached_gets_its_first_start_moved_into_its_space():
    from moetune.tuning.study import fallback_entry

    gemv = {**cfg(32, 128, 64, 1, 4, 3), "kernel": "gemv"}  # M=1's winner; gemv is not searched at M=16
    entry = fallback_entry([("M=1", gemv), ("prior #1", cfg(64, 128, 128, 1, 4, 4))], space_for(16, SHAPE), "late")
    assert entry["config"] == entry["vllm_config"] == cfg(32, 128, 64, 1, 4, 3)
    assert entry["incomplete"] and entry["tuned_us"] is None and "config from M=1" in entry["note"]
