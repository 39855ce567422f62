"""The HTTP process of the OpenAI-compatible server: FastAPI + uvicorn, tokenizing and detokenizing.

It never touches the engine or torch: requests go to the engine process (moetune.serve.engine_loop) down
a pipe, and each engine step's outputs come back in one message. A reader thread hands that message to
the event loop in one thread-safe call, where each request's mailbox collects its tokens; a sender thread
writes commands, so the event loop never blocks on the pipe. The engine never waits on a client: a slow
reader only lets its own mailbox grow. Tokenizing prompts runs in a worker thread; detokenizing is
incremental and runs on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moetune.serve import protocol as P
from moetune.serve.protocol import BadRequest, Request, TextStream

log = logging.getLogger("moetune.serve")
T = TypeVar("T")

GRACE_S = 2.0  # on shutdown, in-flight connections get this long to finish
API_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


@dataclass
class ModelInfo:
    """What the HTTP process knows of the model; sent to it pickled (the tokenizer reloads from its file)."""

    name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # encode(text, bos), decode(ids), eos_id

    @classmethod
    def of(cls, engine: Any) -> ModelInfo:
        return cls(engine.config.model, engine.config.max_model_len, engine.spec.vocab_size, engine.tokenizer)


@dataclass
class Event:
    """What the engine tells one request: new tokens, the end, or why it failed."""

    token_ids: list[int]
    finished: bool = False
    reason: str | None = None
    error: str | None = None
    status: int = 200


class Handle:
    """One request's mailbox; filled and read on the event loop only."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.events: deque[Event] = deque()
        self.ready = asyncio.Event()

    def push(self, ev: Event) -> None:
        self.events.append(ev)
        self.ready.set()

    async def take(self) -> Event:
        """Every event since the last call, merged into one (tokens joined, the last one's end state)."""
        await self.ready.wait()
        self.ready.clear()
        evs, self.events = list(self.events), deque()
        if len(evs) == 1:
            return evs[0]
        last = evs[-1]
        return Event([t for e in evs for t in e.token_ids], last.finished, last.reason, last.error, last.status)


class EngineClient:
    """The engine as the event loop sees it: submit and abort (never blocking), and per-step deliveries."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._handles: dict[int, Handle] = {}  # event loop only
        self._keys = itertools.count(1)
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.sent = self.taken = self.running = self.waiting = 0
        self.engine_error: str | None = None
        self.on_step: Callable[[float], None] = lambda s: None
        self.on_shutdown: Callable[[], None] = lambda: None

    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        threading.Thread(target=self._send_loop, name="moetune-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name="moetune-read", daemon=True).start()
        self._outbox.put(("ready",))

    @property
    def alive(self) -> bool:
        return self.engine_error is None

    @property
    def queue_depth(self) -> int:
        return self.sent - self.taken

    def submit(self, prompt_ids: list[int], params: dict[str, Any]) -> Handle:
        """On the event loop; the handle's events arrive there. params: SamplingParams' fields."""
        h = Handle(next(self._keys))
        if self.engine_error is not None:
            h.push(Event([], True, error=self.engine_error, status=503))
            return h
        self._handles[h.key] = h
        self.sent += 1
        self._outbox.put(("add", h.key, prompt_ids, params))
        return h

    def abort(self, h: Handle) -> None:
        if self._handles.pop(h.key, None) is not None:
            self._outbox.put(("abort", h.key))

    def fail_all(self, msg: str, status: int = 503) -> None:
        """On the event loop: end every request in flight (the server is stopping, or the engine is gone)."""
        for h in self._handles.values():
            h.push(Event([], True, error=msg, status=status))
        self._handles.clear()

    # ------------------------------------------------------------------------------------ threads

    def _send_loop(self) -> None:
        while (cmd := self._outbox.get()) is not None:
            try:
                self.conn.send(cmd)
            except OSError:  # the engine process is gone; the reader says so
                return

    def _read_loop(self) -> None:
        reason = "the engine process stopped"
        try:
            while True:
                msg = self.conn.recv()
                if msg[0] == "out":
                    self._call(self._deliver, msg[1], msg[2], msg[3])
                elif msg[0] == "dead":
                    reason = msg[1]
                    self._call(self._engine_failed, reason, False)
                elif msg[0] == "shutdown":
                    reason = "the server is shutting down"
                    break
        except (EOFError, OSError):
            pass
        self._call(self._engine_failed, reason, True)

    def _call(self, fn: Callable, *args: Any) -> None:
        assert self._aloop is not None
        try:
            self._aloop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _deliver(self, batch: list[tuple], stats: tuple[int, int, int], step_s: float | None) -> None:
        self.taken, self.running, self.waiting = stats
        if step_s is not None:
            self.on_step(step_s)
        for key, ids, finished, reason, error, status in batch:
            h = self._handles.get(key)
            if h is None:
                continue
            h.push(Event(ids, finished, reason, error, status))
            if finished:
                del self._handles[key]

    def _engine_failed(self, reason: str, gone: bool) -> None:
        self.engine_error = self.engine_error or reason
        self.fail_all(reason)
        if gone:  # nothing more can be served: stop the HTTP server too
            self._outbox.put(None)
            self.on_shutdown()


# ----------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of their own, so several servers can live in one process (tests)."""

    def __init__(self, client: EngineClient) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moetune_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("moetune_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("moetune_generation_tokens", "tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("moetune_time_to_first_token_seconds", "request arrival to first token",
                              buckets=buckets, registry=r)  # fmt: skip
        self.itl = Histogram("moetune_inter_token_latency_seconds", "time between tokens of one request",
                             buckets=buckets, registry=r)  # fmt: skip
        self.e2e = Histogram("moetune_request_latency_seconds", "request arrival to last token",
                             buckets=buckets, registry=r)  # fmt: skip
        self.step = Histogram("moetune_engine_step_seconds", "one engine step (prefill or decode), engine side",
                              buckets=buckets, registry=r)  # fmt: skip
        Gauge("moetune_queue_depth", "requests sent to the engine process that it has not taken yet",
              registry=r).set_function(lambda: client.queue_depth)  # fmt: skip
        Gauge("moetune_num_requests_running", "sequences the engine is decoding",
              registry=r).set_function(lambda: client.running)  # fmt: skip
        Gauge("moetune_num_requests_waiting", "sequences waiting for (or part-way through) prefill",
              registry=r).set_function(lambda: client.waiting)  # fmt: skip
        client.on_step = self.step.observe


class MetricsMiddleware:
    """Counts every API request by route and final status (validation errors included); pure ASGI, so cheap."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in API_ROUTES else "other"  # a label per made-up path would grow
        status = [500]

        async def send_status(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()


# ----------------------------------------------------------------------------------------------- HTTP


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


class StrictJSONRequest(HTTPRequest):
    """FastAPI's body parsing, with our JSON rules: no NaN/Infinity, bounded nesting and size."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = P.parse_json(await self.body())
            except BadRequest as e:  # FastAPI passes HTTPException on; anything else becomes a vague 400
                raise HTTPException(e.status, str(e)) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: HTTPRequest) -> Response:
            scope = request.scope
            if int(request.headers.get("content-length") or 0) > P.MAX_BODY:  # refuse before reading it
                return error_response(413, f"the body must be at most {P.MAX_BODY} bytes")
            if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
                # every body here is JSON: serve `curl -d` and header-less clients as the old server did
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(StrictJSONRequest(scope, request.receive))

        return strict


def _validation_message(e: RequestValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    return f"{loc}: {err.get('msg', 'invalid value')}"


class OpenAIServer:
    """The routes and the per-request logic; app is the FastAPI application."""

    def __init__(self, info: ModelInfo, conn: Connection) -> None:
        self.model_name, self.max_model_len, self.vocab_size = info.name, info.max_model_len, info.vocab_size
        self.tok = info.tokenizer  # SentencePiece encode/decode are const C++ calls: safe across threads
        self.eos_id: int = info.tokenizer.eos_id
        self.created = int(time.time())
        self.engine = EngineClient(conn)
        self.metrics = Metrics(self.engine)
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.engine.start(asyncio.get_running_loop())
            yield
            self.engine.fail_all("the server is shutting down")

        app = FastAPI(title="moetune OpenAI-compatible server", lifespan=lifespan)
        app.router.route_class = StrictJSONRoute
        app.add_exception_handler(BadRequest, lambda r, e: error_response(e.status, str(e), e.param, e.code))
        app.add_exception_handler(RequestValidationError, lambda r, e: error_response(400, _validation_message(e)))
        app.add_exception_handler(StarletteHTTPException, lambda r, e: error_response(e.status_code, str(e.detail)))
        errors: dict[int | str, dict[str, Any]] = {400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}}
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"], response_model=P.ModelList)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], responses=errors,
                          response_model=P.CompletionResponse)  # fmt: skip
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"], responses=errors,
                          response_model=P.ChatResponse)  # fmt: skip
        app.add_middleware(MetricsMiddleware, metrics=self.metrics)
        return app

    # ---------------------------------------------------------------------------------------- routes

    async def health(self) -> JSONResponse:
        ok = self.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> P.ModelList:
        card = P.ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)
        return P.ModelList(data=[card])

    async def completions(self, body: P.CompletionRequest, request: HTTPRequest) -> Response:
        return await self._serve(body, request, P.parse_completion, chat=False)

    async def chat(self, body: P.ChatRequest, request: HTTPRequest) -> Response:
        return await self._serve(body, request, P.parse_chat, chat=True)

    # ---------------------------------------------------------------------------------------- requests

    async def _serve(self, body: P._Sampling, request: HTTPRequest, parse: Callable, chat: bool) -> Response:
        arrived = time.monotonic()
        if body.model is not None and body.model != self.model_name:
            raise BadRequest(f"The model `{body.model}` does not exist.", 404, "model", "model_not_found")
        # tokenizing a long prompt takes milliseconds: keep it off the event loop
        req: Request = await asyncio.to_thread(parse, body, self.tok, self.vocab_size, self.max_model_len)
        # SamplingParams' fields: the engine process builds and checks them (a bad one is a 400 event)
        params = dict(temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_tokens,
                      ignore_eos=req.ignore_eos, stop_token_ids=list(req.stop_ids), seed=req.seed)  # fmt: skip
        run = Run(self, req, self.engine.submit(req.prompt_ids, params), arrived)
        try:
            if not req.stream:
                try:
                    text, ev = await _unless_gone(run.collect(), request)
                finally:
                    run.close()
                return self._whole(run, text, ev, chat)
            # wait for the first tokens before answering: an error can still have its own HTTP status
            first = await _unless_gone(run.next(), request)
        except ClientGone:
            run.close()  # aborts it: a request nobody reads must not keep its slot in the batch
            return Response(status_code=499)
        if first[1].error:
            run.close()
            return error_response(first[1].status, first[1].error)
        return StreamingResponse(self._sse(run, first, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    def _whole(self, run: Run, text: str, ev: Event, chat: bool) -> Response:
        if ev.error:
            return error_response(ev.status, ev.error)
        rid, now, usage = uuid.uuid4().hex, int(time.time()), run.usage()
        if chat:
            choice = P.ChatChoice(message=P.ChatMessage(content=text), finish_reason=ev.reason)
            return JSONResponse(P.ChatResponse(id=f"chatcmpl-{rid}", created=now, model=self.model_name,
                                               choices=[choice], usage=usage).model_dump())  # fmt: skip
        choice_c = P.CompletionChoice(text=text, finish_reason=ev.reason)
        return JSONResponse(P.CompletionResponse(id=f"cmpl-{rid}", created=now, model=self.model_name,
                                                 choices=[choice_c], usage=usage).model_dump())  # fmt: skip

    async def _sse(self, run: Run, first: tuple[str, Event], chat: bool) -> AsyncIterator[str]:
        head: dict[str, Any] = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                                "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": int(time.time()), "model": self.model_name}  # fmt: skip

        def chunk(text: str | None, reason: str | None = None, role: bool = False, usage: P.Usage | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            obj = {**head, "choices": [choice]}
            if run.req.include_usage:
                obj["usage"] = None  # OpenAI: with include_usage every chunk has the key; only the last fills it
            if usage is not None:
                obj["usage"] = usage.model_dump()
            return _data(obj)

        try:
            if chat:
                yield chunk(None, role=True)
            delta, ev = first
            while True:
                if ev.error:
                    err = P.ErrorBody(message=ev.error, type="server_error")
                    yield _data({"error": err.model_dump()})
                    break
                if delta:
                    yield chunk(delta)
                if ev.finished:
                    # usage rides on the finish chunk as before; with include_usage, OpenAI's own last chunk has it
                    yield chunk(None, ev.reason, usage=None if run.req.include_usage else run.usage())
                    if run.req.include_usage:
                        yield _data({**head, "choices": [], "usage": run.usage().model_dump()})
                    break
                delta, ev = await run.next()
            yield "data: [DONE]\n\n"
        finally:  # also on a disconnect: Starlette cancels this generator and the request must stop running
            run.close()


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class ClientGone(Exception):
    pass


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client hangs up (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(work: Awaitable[T], request: HTTPRequest) -> T:
    """work's result, or ClientGone (work cancelled) if the client hangs up first."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()  # before a StreamingResponse starts listening for the disconnect itself
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone
    return task.result()


class Run:
    """One request in flight: its events as text deltas, its metrics, and its end (abort if unfinished)."""

    def __init__(self, server: OpenAIServer, req: Request, h: Handle, arrived: float) -> None:
        self.s, self.req, self.h, self.arrived = server, req, h, arrived
        self.ts = TextStream(server.tok.decode, req.stop_strings)
        self.stop_ids = {*req.stop_ids, server.eos_id}
        self.last: float | None = None  # when the previous tokens came
        self.done = self.closed = False

    async def next(self) -> tuple[str, Event]:
        """(text delta, event) for everything the engine produced since the last call."""
        ev = await self.h.take()
        if ev.error:
            self.done = True
            return "", ev
        self._observe(len(ev.token_ids))
        ids = ev.token_ids
        if ev.reason == "stop" and ids and ids[-1] in self.stop_ids:  # as OpenAI: the stop itself is not text
            ids, self.ts.hidden = ids[:-1], self.ts.hidden + 1
        delta = self.ts.add(ids, final=ev.finished)
        if self.ts.stopped and not ev.finished:  # a stop string ends the request whatever the engine had in mind
            self.s.engine.abort(self.h)
            ev = Event([], True, "stop")
        self.done = ev.finished
        return delta, ev

    async def collect(self) -> tuple[str, Event]:
        """The whole reply: all text and the final event."""
        text, ev = await self.next()
        while not ev.finished and not ev.error:
            delta, ev = await self.next()
            text += delta
        return text, ev

    def _observe(self, n: int) -> None:
        if not n:
            return
        now, m = time.monotonic(), self.s.metrics
        if self.last is None:
            m.ttft.observe(now - self.arrived)
            gaps = [0.0] * (n - 1)  # tokens that came with the first one
        else:
            gaps = [(now - self.last) / n] * n  # tokens that came together share the gap since the previous ones
        for gap in gaps:  # one observation per token after the first, so count = tokens - 1 per request
            m.itl.observe(gap)
        self.last = now

    def usage(self) -> P.Usage:
        n, m = len(self.req.prompt_ids), len(self.ts.ids) + self.ts.hidden
        return P.Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)

    def close(self) -> None:
        """Idempotent: an unfinished request is aborted; either way it is counted once."""
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.s.engine.abort(self.h)
            self.done = True
        u = self.usage()
        self.s.metrics.prompt_tokens.inc(u.prompt_tokens)
        self.s.metrics.generation_tokens.inc(u.completion_tokens)
        self.s.metrics.e2e.observe(time.monotonic() - self.arrived)


# ----------------------------------------------------------------------------------------------- process


class _Uvicorn(uvicorn.Server):
    """The engine process owns the signals: it tells this process to stop (or hangs up)."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient) -> None:
        super().__init__(config)
        self._engine = engine

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # End what is in flight first (a 503 event, then [DONE]), so uvicorn finds the connections done
        # instead of cancelling their tasks after its grace period with a traceback each.
        self._engine.fail_all("the server is shutting down")
        await super().shutdown(sockets)


def http_main(conn: Connection, sock: socket.socket, info: ModelInfo, log_level: int) -> None:
    """The HTTP process: serve on the socket the engine process bound until it says stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the engine process decides
    logging.basicConfig(level=log_level, format="%(levelname)s %(message)s")
    api = OpenAIServer(info, conn)
    config = uvicorn.Config(api.app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACE_S)  # fmt: skip
    server = _Uvicorn(config, api.engine)

    def stop() -> None:
        server.should_exit = True

    api.engine.on_shutdown = stop
    server.run(sockets=[sock])
