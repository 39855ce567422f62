"""An OpenAI-compatible HTTP server on the standard library alone (the GPU machine cannot pip install).

The engine is single-threaded, so one EngineLoop thread owns it: handler threads only put commands
in its inbox and read events from their own queue. ThreadingHTTPServer gives each connection a
thread, which is what lets a slow stream and a health check run side by side.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import torch

from moetune.errors import MoetuneError
from moetune.runtime.sampling import SamplingParams
from moetune.serve.protocol import BadRequest, Request, TextStream, parse_chat, parse_completion

log = logging.getLogger("moetune.serve")

MAX_BODY = 16 << 20  # 16 MiB of JSON is far beyond any prompt max_model_len allows
POLL_S = 0.25  # how often a waiting handler checks whether its client hung up


@dataclass
class Event:
    """What the engine thread tells one request: new tokens, the end, or why it failed."""

    token_ids: list[int]
    finished: bool = False
    reason: str | None = None
    error: str | None = None
    status: int = 200


class Handle:
    def __init__(self) -> None:
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.rid: int | None = None  # set by the engine thread once the engine accepts it


class ClientGone(Exception):
    pass


class EngineLoop:
    """The one thread that calls the engine: add, abort, step, route outputs to handles."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._live: dict[int, Handle] = {}
        self._thread = threading.Thread(target=self._run, name="moetune-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        h = Handle()
        self._inbox.put(("add", h, prompt_ids, params))
        return h

    def abort(self, h: Handle) -> None:
        self._inbox.put(("abort", h))

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    def events(self, h: Handle, gone: Any) -> Iterator[Event]:
        """The request's events until it ends; aborts it if `gone()` says the client left."""
        checked = time.monotonic()
        while True:
            try:
                ev = h.events.get(timeout=POLL_S)
            except queue.Empty:
                ev = None
            if ev is None or time.monotonic() - checked > POLL_S:  # tokens flowing must not hide a hang-up
                checked = time.monotonic()
                if gone():
                    self.abort(h)
                    raise ClientGone
            if ev is None:
                if self.alive:
                    continue
                ev = Event([], True, error="the engine thread has stopped", status=503)
            yield ev
            if ev.finished or ev.error:
                return

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a broken engine: say so, then /health turns 503 and waiters get 503 too
            log.exception("the engine thread stopped")
            self._fail_all("the engine thread stopped", 503)

    def _loop(self) -> None:
        # Grad mode is per thread: the main thread's settings do not reach this one.
        with torch.no_grad():
            while True:
                try:  # idle: sleep until a command comes; busy: take what is there and step
                    cmd = self._inbox.get(block=not self.engine.has_unfinished())
                    while True:
                        if cmd[0] == "stop":
                            self._fail_all("the server is shutting down", 503)
                            return
                        self._apply(cmd)
                        cmd = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    self._step()

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, h, ids, params = cmd
            try:
                h.rid = self.engine.add_request(ids, params)
                self._live[h.rid] = h
            except MoetuneError as e:  # too long, empty, bad params: the client's fault
                h.events.put(Event([], True, error=str(e), status=400))
            except Exception as e:
                log.exception("add_request failed")
                h.events.put(Event([], True, error=f"engine error: {e}", status=500))
        elif cmd[0] == "abort":
            h = cmd[1]
            if h.rid is not None and self._live.pop(h.rid, None) is not None:
                self.engine.abort(h.rid)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # fail what is running, keep serving: the next request may be fine
            log.exception("engine step failed")
            self._fail_all(f"engine error: {e}", 500)
            return
        for out in outs:
            h = self._live.get(out.request_id)
            if h is None:
                continue
            h.events.put(Event(list(out.new_token_ids), out.finished, out.finish_reason))
            if out.finished:
                del self._live[out.request_id]

    def _fail_all(self, msg: str, status: int) -> None:
        for rid, h in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of request %d failed", rid)
            h.events.put(Event([], True, error=msg, status=status))
        self._live.clear()


class LockedTokenizer:
    """Handler threads share one tokenizer; a lock avoids betting on its thread safety."""

    def __init__(self, tok: Any) -> None:
        self._tok, self._lock, self.eos_id = tok, threading.Lock(), tok.eos_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        with self._lock:
            return list(self._tok.encode(text, bos=bos))

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self._tok.decode(list(ids))


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at shutdown

    def __init__(self, addr: tuple[str, int], engine: Any) -> None:
        # Read what the handlers need now: after this only the loop thread touches the engine.
        self.model_name: str = engine.config.model
        self.max_model_len: int = engine.config.max_model_len
        self.vocab_size: int = engine.spec.vocab_size
        self.tok = LockedTokenizer(engine.tokenizer)
        self.created = int(time.time())
        super().__init__(addr, Handler)
        self.loop = EngineLoop(engine)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server_close()
        self.loop.stop()


def sampling_params(r: Request) -> SamplingParams:
    p = SamplingParams(
        temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos,
        stop_token_ids=list(r.stop_ids), seed=r.seed,
    )
    try:
        p.validate()
    except MoetuneError as e:
        raise BadRequest(str(e)) from None
    return p


ROUTES = {"/v1/completions": (parse_completion, False), "/v1/chat/completions": (parse_chat, True)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for plain replies; streams close their connection
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------------------------ plumbing

    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, msg: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": msg, "type": kind, "param": None, "code": None}})

    def _sse(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _gone(self) -> bool:
        """A readable socket with nothing to read means the client closed its end."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _body(self) -> Any:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("a JSON body with a Content-Length header is required") from None
        if n < 0 or n > MAX_BODY:
            raise BadRequest(f"the body must be 0 to {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None

    # ------------------------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        s = self.server
        if path == "/health":
            ok = s.loop.alive
            self._send(200 if ok else 503, {"status": "ok" if ok else "engine stopped"})
        elif path == "/v1/models":
            card = {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "moetune",
                    "max_model_len": s.max_model_len}
            self._send(200, {"object": "list", "data": [card]})
        elif path in ROUTES:
            self._error(405, f"use POST for {path}")
        else:
            self._error(404, f"no route {path}", "not_found_error")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path not in ROUTES:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))  # drain so keep-alive stays in sync
            self._error(404, f"no route {path}", "not_found_error")
            return
        parse, chat = ROUTES[path]
        s = self.server
        try:
            req = parse(self._body(), s.tok, s.vocab_size, s.max_model_len)
            params = sampling_params(req)
        except BadRequest as e:
            self._error(400, str(e))
            return
        h = s.loop.submit(req.prompt_ids, params)
        try:
            (self._stream if req.stream else self._whole)(h, req, chat)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            s.loop.abort(h)  # an abort for a finished request is a no-op
            self.close_connection = True
            log.info("client left; request aborted")

    def _run(self, h: Handle, req: Request) -> Iterator[tuple[str, Event, TextStream]]:
        """(text delta, event, stream) per engine event; ends the request early on a stop string."""
        ts = TextStream(self.server.tok.decode, req.stop_strings)
        stop_ids = {*req.stop_ids, self.server.tok.eos_id}
        for ev in self.server.loop.events(h, self._gone):
            if ev.error:
                yield "", ev, ts
                return
            ids = ev.token_ids
            if ev.reason == "stop" and ids and ids[-1] in stop_ids:  # as OpenAI: the stop itself is not text
                ids, ts.hidden = ids[:-1], ts.hidden + 1
            delta = ts.add(ids, final=ev.finished)
            if ts.stopped:  # a stop string ends the request whatever the engine had in mind
                if not ev.finished:
                    self.server.loop.abort(h)
                ev = Event([], True, "stop")
            yield delta, ev, ts
            if ev.finished:
                return

    def _usage(self, req: Request, ts: TextStream) -> dict:
        n, m = len(req.prompt_ids), len(ts.ids) + ts.hidden
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def _whole(self, h: Handle, req: Request, chat: bool) -> None:
        text, reason, ts = "", None, None
        for delta, ev, stream in self._run(h, req):
            if ev.error:
                self._error(ev.status, ev.error, "invalid_request_error" if ev.status == 400 else "server_error")
                return
            text, reason, ts = text + delta, ev.reason, stream
        assert ts is not None
        rid, now = uuid.uuid4().hex, int(time.time())
        if chat:
            obj = {"id": f"chatcmpl-{rid}", "object": "chat.completion",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason}]}
        else:
            obj = {"id": f"cmpl-{rid}", "object": "text_completion",
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
        self._send(200, {**obj, "created": now, "model": self.server.model_name, "usage": self._usage(req, ts)})

    def _stream(self, h: Handle, req: Request, chat: bool) -> None:
        rid, now, model = uuid.uuid4().hex, int(time.time()), self.server.model_name
        head = ({"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk"} if chat
                else {"id": f"cmpl-{rid}", "object": "text_completion"})
        head.update(created=now, model=model)

        def chunk(text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice]}

        started = False
        for delta, ev, ts in self._run(h, req):
            if ev.error and not started:  # nothing sent yet: a real HTTP status is still possible
                self._error(ev.status, ev.error, "invalid_request_error" if ev.status == 400 else "server_error")
                return
            if not started:
                started = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")  # the close ends the stream: no chunked encoding
                self.end_headers()
                self.close_connection = True
                if chat:
                    self._sse(chunk(None, None, role=True))
            if ev.error:
                self._sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                break
            if delta:
                self._sse(chunk(delta, None))
            if ev.finished:
                self._sse({**chunk(None, ev.reason), "usage": self._usage(req, ts)})
                if req.include_usage:
                    self._sse({**head, "choices": [], "usage": self._usage(req, ts)})
        self._sse("[DONE]")


def start_server(engine: Any, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Bind (port 0 picks a free one) and start the engine thread; call serve_forever() next."""
    return Server((host, port), engine)
