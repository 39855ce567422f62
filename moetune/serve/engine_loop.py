"""The engine side of the server: one loop, in the process that owns the GPU, is the only caller of the engine.

The HTTP process (moetune.serve.api) sends commands down a pipe: ("add", key, prompt_ids, params),
("abort", key), ("ready",). After each step this loop sends every output of that step back in one
message, ("out", [(key, token_ids, finished, reason, error, status), ...], stats). Why two processes:
in one, the HTTP layer's Python (about 50 µs a streamed token) and the engine's Python take turns on
one GIL, and on an H100 a batch-256 decode step under 256 streaming clients took 53 ms against 39 ms
alone. Here nothing but this loop runs Python in the engine's process.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from moetune.errors import MoetuneError
from moetune.runtime.sampling import SamplingParams

log = logging.getLogger("moetune.serve")

IDLE_POLL_S = 0.05  # an idle loop wakes this often to see stop()
SLOW_STEP_S = 1.0  # a step this long is logged: it stalls every request in flight


class EngineLoop:
    def __init__(self, engine: Any, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self._rid: dict[int, int] = {}  # HTTP key -> engine request id, for requests in flight
        self._key: dict[int, int] = {}  # engine request id -> HTTP key
        self._out: list[tuple] = []  # this step's outputs, sent together
        self._taken = 0  # add commands applied: the HTTP side's queue depth is what it sent minus this
        self._stats: tuple = ()
        self._stop = threading.Event()
        self.ready = threading.Event()  # the HTTP process is serving
        self.dead: str | None = None  # why the engine failed for good

    def stop(self) -> None:
        """From any thread: run() returns within IDLE_POLL_S or one step."""
        self._stop.set()

    def run(self) -> None:
        """Until stop() or the HTTP process hangs up (EOFError/OSError propagate to the caller)."""
        with torch.no_grad():  # grad mode is per thread: the main thread's setting does not reach this one
            while not self._stop.is_set():
                busy = self._busy()
                if self.conn.poll(0 if busy else IDLE_POLL_S):  # take every command waiting, then step
                    self._apply(self.conn.recv())
                    while self.conn.poll(0):
                        self._apply(self.conn.recv())
                    busy = self._busy()
                self.flush(self._step() if busy else None)

    def fail_all(self, msg: str, status: int) -> None:
        """End every request in flight with an error (aborted in the engine); flush() sends it."""
        for key, rid in list(self._rid.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of request %d failed", rid)
            self._out.append((key, [], True, None, msg, status))
        self._rid.clear()
        self._key.clear()

    def flush(self, step_s: float | None = None) -> None:
        stats = (self._taken, *self._scheduler_sizes())
        if not self._out and stats == self._stats and step_s is None:
            return
        batch, self._out, self._stats = self._out, [], stats
        self.conn.send(("out", batch, stats, step_s))

    # ------------------------------------------------------------------------------------------------

    def _busy(self) -> bool:
        if self.dead is not None:
            return False
        try:
            return self.engine.has_unfinished()
        except Exception:
            self._die()
            return False

    def _die(self) -> None:
        """A broken engine: say so once; /health turns 503, and so does every request from now on."""
        log.exception("the engine stopped")
        self.dead = "the engine stopped"
        self.fail_all(self.dead, 503)
        self.conn.send(("dead", self.dead))

    def _scheduler_sizes(self) -> tuple[int, int]:
        sched = getattr(self.engine, "scheduler", None)
        return (len(sched.running), len(sched.waiting)) if sched is not None else (0, 0)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, key, ids, params = cmd
            self._taken += 1
            if self.dead is not None:
                self._out.append((key, [], True, None, self.dead, 503))
                return
            try:
                rid = self.engine.add_request(ids, SamplingParams(**params))
            except MoetuneError as e:  # too long, empty, bad params: the client's fault
                self._out.append((key, [], True, None, str(e), 400))
                return
            except Exception as e:
                log.exception("add_request failed")
                self._out.append((key, [], True, None, f"engine error: {e}", 500))
                return
            self._rid[key], self._key[rid] = rid, key
        elif cmd[0] == "abort":
            rid = self._rid.pop(cmd[1], None)
            if rid is not None:
                del self._key[rid]
                self.engine.abort(rid)
        elif cmd[0] == "ready":
            self.ready.set()

    def _step(self) -> float | None:
        """One engine step; its outputs join this flush. Returns how long it took (None if it failed)."""
        t0 = time.perf_counter()
        try:
            outs = self.engine.step()
        except Exception as e:  # the engine could not single out a request: fail what runs, keep serving
            log.exception("engine step failed")
            self.fail_all(f"engine error: {e}", 500)
            return None
        step_s = time.perf_counter() - t0
        if step_s > SLOW_STEP_S:
            log.warning("an engine step took %.1f s (%d outputs): every request in flight waited", step_s, len(outs))
        for out in outs:
            key = self._key.get(out.request_id)
            if key is None:
                continue
            error = getattr(out, "error", None)  # the engine aborted this one request (engine.step isolation)
            self._out.append((key, list(out.new_token_ids), out.finished, out.finish_reason, error,
                              500 if error else 200))  # fmt: skip
            if out.finished:
                del self._rid[key], self._key[out.request_id]
        return step_s
