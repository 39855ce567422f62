"""What each search idea of tuner v2 buys, on the synthetic objective (CPU, no kernel).

Runs whole tables (vLLM's 18 M, Mixtral-8x7B TP1 shape, fp8 priors) through `tune_table` with one
idea switched at a time, and scores each table by the *true* synthetic time of the config it chose
(gap to the best feasible config of the whole space, found by enumerating it), against the work
spent: trials (each costs a compile and a verify on the GPU) and timing reps.

    PYTHONPATH=. python benchmarks/search_quality.py [--seeds 3] [--trials 60] [--noise 0.1]

`--noise` is the relative spread of a 1-rep timing (a 10-rep screening then has a third of it).
Results: benchmarks/search_quality.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
from pathlib import Path

import optuna

from moetune.kernels.knobs import is_vllm_structure
from moetune.models import MoeShape
from moetune.tables import TOKEN_COUNTS, load_sidecar
from moetune.tuning.space import space_for
from moetune.tuning.study import Settings
from moetune.tuning.synthetic import SyntheticBench, synthetic_us
from moetune.tuning.tuner import TableJob, tune_table

SHAPE = MoeShape(E=8, N=14336, K=4096, top_k=2)


def runs_right(config: dict, M: int, bench: SyntheticBench) -> bool:
    return (not bench.compile([config], M)[0] and bench.verify(config, M) <= bench.tolerance
            and not (config["BLOCK_SIZE_M"] == 256 and config["num_stages"] == 5))  # fmt: skip


def true_best(M: int) -> float:
    bench = SyntheticBench()
    return min(synthetic_us(c, M) for c in space_for(M, SHAPE).configs() if runs_right(c, M, bench))


class CountingBench(SyntheticBench):
    """Counts timing reps into a file, so the parent can read the work done."""

    def __init__(self, counter: str, **kw):
        super().__init__(**kw)
        self._counter = counter

    def time(self, config, M, reps):
        with open(self._counter, "a") as f:
            f.write(f"{reps}\n")
        return super().time(config, M, reps)


VARIANTS = {
    "v1 (default start only, one fidelity, uniform M)": dict(neighbour_top=0, anchors=False, priors=False),
    "+ neighbours' top-2 and priors as warm starts": dict(anchors=False),
    "+ anchors first, M between them at half budget": dict(),
    "+ two-fidelity screening (pruner, careful 40 reps)": dict(careful_reps=40),
}


def run_variant(args: tuple[str, dict, int, int, float]) -> dict:
    name, knobs, seed, trials, noise = args
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    knobs = dict(knobs)
    priors = knobs.pop("priors", True)
    import moetune.tuning.study as study_mod

    real_priors = study_mod.prior_configs
    study_mod.prior_configs = real_priors if priors else (lambda M, dtype: [])  # the v1 tuner had none
    with tempfile.TemporaryDirectory() as tmp:
        job = TableJob(path=Path(tmp) / "E=8,N=14336,device_name=Synthetic.json", storage=str(Path(tmp) / "j.log"),
                       shape=SHAPE, dtype="fp8", model="mixtral-8x7b", tp=1, device="Synthetic",
                       Ms=list(TOKEN_COUNTS))  # fmt: skip
        settings = Settings(trials=trials, patience=40, seed=seed, screen_reps=10, final_reps=100, final_rounds=3,
                            finalists=4, **knobs)  # fmt: skip
        counter = str(Path(tmp) / "reps")
        factory = lambda: CountingBench(counter, noise=noise, seed=seed)  # noqa: E731
        import io
        import sys

        err, sys.stderr = sys.stderr, io.StringIO()  # no progress bars
        try:
            tune_table(job, settings, factory)
        finally:
            sys.stderr = err
            study_mod.prior_configs = real_priors
        entries = load_sidecar(job.path)["entries"]
        reps = sum(int(line) for line in Path(counter).read_text().split())
    gaps = {M: synthetic_us(entries[str(M)]["config"], M) / BEST[M] - 1 for M in TOKEN_COUNTS}
    vllm_gaps = {M: synthetic_us(entries[str(M)]["vllm_config"], M) / BEST_VLLM[M] - 1 for M in TOKEN_COUNTS}
    return dict(name=name, seed=seed, gaps=gaps, vllm_gaps=vllm_gaps, reps=reps,
                trials=sum(entries[str(M)]["trials"] for M in TOKEN_COUNTS))  # fmt: skip


def _best_vllm(M: int) -> float:
    bench = SyntheticBench()
    return min(synthetic_us(c, M) for c in space_for(M, SHAPE).configs()
               if is_vllm_structure(c) and runs_right(c, M, bench))  # fmt: skip


BEST: dict[int, float] = {}
BEST_VLLM: dict[int, float] = {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--only", help="substring of one variant name")
    a = p.parse_args()
    jobs = [(n, k, s, a.trials, a.noise) for n, k in VARIANTS.items() if not a.only or a.only in n
            for s in range(a.seeds)]  # fmt: skip
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(run_variant, jobs)
    print(f"trials {a.trials}/M (patience 40), noise {a.noise:.0%} at 1 rep, {a.seeds} seeds; gap = true time of the "
          f"chosen config / best of the space - 1, over vLLM's 18 M")  # fmt: skip
    print("| variant | mean gap, ours | worst gap, ours | mean gap, vLLM table | M within 1% | trials (18 M) | reps |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["name"] for r in results):
        rs = [r for r in results if r["name"] == name]
        gaps = [g for r in rs for g in r["gaps"].values()]
        vgaps = [g for r in rs for g in r["vllm_gaps"].values()]
        within = statistics.mean(sum(g <= 0.01 for g in r["gaps"].values()) for r in rs)
        print(f"| {name} | {statistics.mean(gaps):.1%} | {max(gaps):.1%} | {statistics.mean(vgaps):.1%} | "
              f"{within:.1f}/18 | {statistics.mean(r['trials'] for r in rs):.0f} | "
              f"{statistics.mean(r['reps'] for r in rs):.0f} |")


BEST.update({M: true_best(M) for M in TOKEN_COUNTS})
BEST_VLLM.update({M: _best_vllm(M) for M in TOKEN_COUNTS})

if __name__ == "__main__":
    main()
