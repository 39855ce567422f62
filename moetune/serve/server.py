"""The OpenAI-compatible server as two processes: this one keeps the engine, a child serves HTTP.

    engine process (this one)                     HTTP process (moetune.serve.api, spawned)
    EngineLoop: add/abort, step, one message  <-pipe->  FastAPI + uvicorn, tokenize, detokenize, SSE
    per step with every request's new tokens

The socket is bound here, before the child starts, so a busy port fails at once and clients that
connect early wait in the backlog. Signals are handled here: SIGINT/SIGTERM end serve_forever(), which
fails what is in flight with a 503, tells the child to stop and waits for it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import threading
from typing import Any

from moetune.errors import MoetuneError
from moetune.serve.api import GRACE_S, ModelInfo, http_main
from moetune.serve.engine_loop import EngineLoop

log = logging.getLogger("moetune.serve")

BACKLOG = 4096  # connections the kernel queues: a burst of clients must wait, never be reset
START_TIMEOUT_S = 60.0  # the HTTP process imports FastAPI and starts uvicorn in about a second


class Server:
    """Bind now; serve_forever() runs the engine loop in the calling thread until shutdown() or a signal."""

    def __init__(self, engine: Any, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(BACKLOG)
        except OSError:
            self.sock.close()
            raise
        self.server_address = self.sock.getsockname()[:2]
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA
        self._conn, child_conn = ctx.Pipe()
        args = (child_conn, self.sock, ModelInfo.of(engine), logging.getLogger().getEffectiveLevel())
        self._http = ctx.Process(target=http_main, args=args, name="moetune-http", daemon=True)
        self.loop = EngineLoop(engine, self._conn)
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def wait_started(self, timeout: float = START_TIMEOUT_S) -> bool:
        """True once the HTTP process answers requests."""
        return self.loop.ready.wait(timeout)

    def serve_forever(self) -> None:
        """Blocks until shutdown(), SIGINT/SIGTERM (KeyboardInterrupt in the main thread) or the HTTP process
        dying (MoetuneError). Either way the child is stopped before this returns."""
        self._http.start()
        try:
            self.loop.run()
        except (EOFError, OSError):
            if not self._stopping.is_set():
                self._http.join(1.0)
                raise MoetuneError(f"the HTTP process exited unexpectedly (exit code {self._http.exitcode})") from None
        finally:
            self._stop_http()

    def shutdown(self) -> None:
        """From another thread: serve_forever() returns."""
        self._stopping.set()
        self.loop.stop()

    def close(self) -> None:
        self.sock.close()

    def _stop_http(self) -> None:
        self._stopping.set()
        if not self._http.is_alive():
            return
        try:
            self.loop.fail_all("the server is shutting down", 503)
            self.loop.flush()
            self._conn.send(("shutdown",))
        except OSError:
            pass
        self._http.join(GRACE_S + 3.0)
        if self._http.is_alive():
            log.warning("the HTTP process did not stop in %.0f s; terminating it", GRACE_S + 3.0)
            self._http.terminate()
            self._http.join(2.0)


def start_server(engine: Any, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Bind (port 0 picks a free one); serve_forever() starts the HTTP process and runs the engine loop."""
    return Server(engine, host, port)
