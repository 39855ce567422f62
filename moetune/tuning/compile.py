"""Parallel ahead-of-time compilation in spawned CPU processes.

Triton compiles a config on its first launch, which takes seconds and is pure CPU work. The timing
process should only time, so each batch of candidates is first launched once in a pool of spawned
processes; they fill the shared on-disk cache (TRITON_CACHE_DIR) and the timing process then loads
each kernel from disk. A config that fails to compile (OutOfResources, register or lowering errors)
or hangs is reported here, so it never reaches, or crashes, the process that times.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from moetune.tables import Config

_bench: Any = None  # the compile-only bench of this pool process


def describe(e: BaseException) -> str:
    """One line naming an exception, short enough for a CSV cell."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _init(factory: Callable[[], Any], ready: Any) -> None:
    global _bench
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates us
    _bench = factory()
    ready.wait()


def _compile_one(config: Config, M: int) -> str | None:
    try:
        _bench.run_once(config, M)
        _bench.synchronize()
        return None
    except Exception as e:  # any failure makes the config infeasible, never the run
        return describe(e)


class CompilePool:
    """`processes` spawned workers, each holding a compile-only bench made by `factory()`."""

    def __init__(self, factory: Callable[[], Any], processes: int, timeout_s: float):
        self._factory, self._n, self._timeout = factory, processes, timeout_s
        self._ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self._pool = self._start()
        self._stale = False  # a hung or poisoned process: start afresh before the next batch

    def _start(self, startup_s: float = 600.0) -> Any:
        """A pool whose processes are all set up, so compile timeouts count compiling only."""
        ready = self._ctx.Barrier(self._n + 1)
        pool = self._ctx.Pool(self._n, initializer=_init, initargs=(self._factory, ready))
        try:
            ready.wait(timeout=startup_s)
        except Exception:  # threading.BrokenBarrierError
            pool.terminate()
            raise RuntimeError(f"compile processes did not start within {startup_s:.0f} s") from None
        return pool

    def compile(self, configs: Sequence[Config], M: int, timeout_s: float | None = None) -> list[str | None]:
        """None for each config that compiled, else the reason it cannot run. `timeout_s` caps the
        whole wait (a time budget's deadline); the restart that a hang needs is then left to the next
        batch, so it is paid from the next M's share of the budget, not past this one's."""
        if self._stale:
            self._pool.terminate()
            self._pool = self._start()
            self._stale = False
        jobs = [self._pool.apply_async(_compile_one, (c, M)) for c in configs]
        wait = self._timeout * math.ceil(len(configs) / self._n)
        limit = wait if timeout_s is None else max(0.0, min(wait, timeout_s))
        deadline = time.monotonic() + limit
        reasons: list[str | None] = []
        for job in jobs:
            try:
                reasons.append(job.get(timeout=max(0.0, deadline - time.monotonic())))
            except mp.TimeoutError:
                reasons.append(f"compile did not finish within {limit:.0f} s")
        # A hung compile holds its process, and a CUDA error poisons its context: start afresh.
        if any(r and ("did not finish" in r or "CUDA" in r) for r in reasons):
            self._stale = True
        return reasons

    def close(self) -> None:
        self._pool.terminate()
