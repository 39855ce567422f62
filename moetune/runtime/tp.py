"""Tensor parallelism: the engine process is rank 0 and drives tp-1 spawned workers, one ModelRunner each.

Every rank holds 1/tp of each layer (layers.py); the two all-reduces per layer run on NCCL (one GPU per
rank) or gloo (CPU). Only rank 0 schedules and samples. Each step it sends every worker the runner method
and its arguments, then makes the same call itself, so all ranks meet in the same collectives. Control
goes over one pipe per worker, not a collective: an idle worker waits without a timeout and sees rank 0's
death as EOF, and rank 0 sees a dead worker as a broken pipe instead of a collective that hangs.

A worker can also die while rank 0 is inside a call, waiting in a collective. gloo fails that collective
at once; NCCL would wait out its 10-minute timeout. So a watchdog thread waits on the workers' exit
sentinels: if one dies while a call is in flight and the call has not ended after DEATH_GRACE_S, it says
which rank died, kills the other workers and ends the process (exit code 1): a blocked collective cannot
be interrupted from Python. Teardown is bounded too: close() asks, then terminates, then kills, and
leaves the process group from a helper thread it waits on for at most TEARDOWN_S.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.connection
import multiprocessing.process
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetune.errors import MoetuneError
from moetune.models import ModelSpec
from moetune.runtime.config import EngineConfig
from moetune.runtime.layers import set_tp
from moetune.runtime.model_runner import ModelRunner

T = TypeVar("T")

# the GPU hosts this runs on need NVLink multicast (NVLS, symmetric memory) off
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# a collective waits this long for a slow rank (loading weights) before it fails
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
JOIN_S = 10.0  # a worker's time to leave after EXIT before it is terminated (then killed)
TEARDOWN_S = 10.0  # destroy_process_group may block in NCCL on a dead peer: never wait longer
DEATH_GRACE_S = 5.0  # a call still blocked this long after a worker died is a hung collective
EXIT = "exit"


def leave_process_group(timeout: float = TEARDOWN_S) -> None:
    """dist.destroy_process_group(), abandoned after timeout (the thread is a daemon: it cannot hold exit)."""
    if not dist.is_initialized():
        return
    t = threading.Thread(target=dist.destroy_process_group, name="moetune-tp-teardown", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        logging.getLogger("moetune").warning("leaving the process group took over %.0f s; abandoned", timeout)
        global teardown_abandoned
        teardown_abandoned = True


teardown_abandoned = False  # an NCCL thread is still inside destroy_process_group: see exit_process


def exit_process(code: int) -> None:
    """sys.exit(code), or, after an abandoned teardown, os._exit(code) once stdout/stderr are flushed:
    the C++ teardown thread still running at interpreter exit would otherwise abort the process
    ("terminate called without an active exception", exit code 134: 2x H200, 2026-11-26). Results files
    are written (atomically) before this point, so skipping the finalizers loses nothing."""
    if teardown_abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    else:
        sys.exit(code)


def init_rank(rank: int, size: int, port: int, device: str) -> None:
    """Join the process group and set this process's rank for the layers; before the model is built."""
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    set_tp(rank, size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, size: int, port: int, cfg: EngineConfig, spec: ModelSpec, conn: multiprocessing.connection.Connection
) -> None:
    logging.getLogger("moetune").setLevel(logging.ERROR)  # rank 0 logs the same events
    conn.send("imported")  # rank 0 waits for this before its rendezvous, so a failed start is an error, not a hang
    init_rank(rank, size, port, cfg.device)
    try:
        runner = ModelRunner(cfg, spec)
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except EOFError:  # rank 0 is gone
                return
            if method == EXIT:
                return
            with contextlib.suppress(MoetuneError):  # a refused argument: rank 0 refuses it too and carries on
                getattr(runner, method)(*args)
    finally:
        leave_process_group()


class TPWorkers:
    """Ranks 1..tp-1 and rank 0's membership of the process group; close() ends both."""

    def __init__(self, cfg: EngineConfig, spec: ModelSpec):
        if dist.is_initialized():
            raise MoetuneError("a tensor-parallel engine is already open in this process; close() it first")
        size, port, ctx = cfg.tensor_parallel_size, _free_port(), mp.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        self.open = True
        self.busy_since: float | None = None  # monotonic start of the call in flight on rank 0
        atexit.register(self.close)
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            args = (rank, size, port, cfg, spec, theirs)
            proc = ctx.Process(target=_worker, args=args, name=f"moetune-tp{rank}", daemon=True)
            proc.start()
            theirs.close()  # only the worker holds its end, so its death reads as EOF here
            self.procs.append(proc)
            self.conns.append(ours)
        try:
            for conn in self.conns:
                conn.recv()
            init_rank(0, size, port, cfg.device)
        except BaseException as e:
            err = self._failure(e) if isinstance(e, EOFError | RuntimeError) else e
            self.close()
            raise err from None
        threading.Thread(target=self._watch, name="moetune-tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """End the process if a worker dies while rank 0 stays blocked in a call (see the module notes)."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, 1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if not self.open:
            return  # close() stopped them
        rank = sentinels[ready[0]]
        died = time.monotonic()
        while self.open and self.busy_since is not None and time.monotonic() - died < DEATH_GRACE_S:
            time.sleep(0.05)
        if not self.open or self.busy_since is None:
            return  # the call failed by itself (gloo) or none was in flight: the next call reports it
        code = self.procs[rank - 1].exitcode
        print(f"moetune: tensor-parallel worker rank {rank} died (exit code {code}) while rank 0 was blocked in a "
              f"collective for {DEATH_GRACE_S:.0f} s; ending the process (see the worker's stderr)",
              file=sys.stderr, flush=True)  # fmt: skip
        for p in self.procs:
            if p.is_alive():
                p.kill()
        os._exit(1)
    def _failure(self, cause: BaseException) -> BaseException:
        """A MoetuneError naming the dead workers (after closing the rest), or cause if all are alive."""
        multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=1.0)  # let a dying one exit
        dead = [(rank, p.exitcode) for rank, p in enumerate(self.procs, 1) if not p.is_alive()]
        if not dead and not isinstance(cause, EOFError):
            return cause
        self.close()
        codes = ", ".join(f"rank {r} (exit code {c})" for r, c in dead) or "a worker"
        return MoetuneError(f"tensor-parallel worker {codes} died; the engine is closed (see its stderr)")

    def run(self, fn: Callable[[], T]) -> T:
        """fn on rank 0, with a worker's death (gloo fails the collective) reported as a MoetuneError."""
        try:
            return fn()
        except RuntimeError as e:
            err = self._failure(e)
            if err is e:
                raise
            raise err from e

    def call(self, runner: ModelRunner, method: str, *args: Any) -> Any:
        """runner.method(*args) on every rank; rank 0's result."""
        if not self.open:
            raise MoetuneError("the engine is closed")
        msg = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(msg)
        except OSError as e:
            raise self._failure(EOFError(str(e))) from None
        self.busy_since = time.monotonic()
        try:
            return self.run(lambda: getattr(runner, method)(*args))
        finally:
            self.busy_since = None

    def close(self) -> None:
        """Stop the workers (asked; terminated after JOIN_S; killed 5 s later) and leave the process group.
        Idempotent, and bounded in time whatever state the workers are in."""
        if not self.open:
            return
        self.open = False
        atexit.unregister(self.close)
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps((EXIT, ())))
        deadline = time.monotonic() + JOIN_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        leave_process_group()
        set_tp(0, 1)
