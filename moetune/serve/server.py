"""An OpenAI-compatible HTTP server on FastAPI + uvicorn.

The engine is single-threaded, so one EngineLoop thread owns it: request coroutines only put commands in
its inbox. After each step the thread hands every output of that step to the event loop in one batch
(one thread-safe wake-up per step, not per token), where each request's mailbox collects them. The
engine never waits on a client: a slow reader only lets its own mailbox grow. Tokenizing prompts runs in
a worker thread; detokenizing is incremental and runs on the event loop, never on the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moetune.errors import MoetuneError
from moetune.runtime.sampling import SamplingParams
from moetune.serve import protocol as P
from moetune.serve.protocol import BadRequest, Request, TextStream

log = logging.getLogger("moetune.serve")
T = TypeVar("T")

GRACE_S = 2.0  # on SIGTERM, in-flight requests get this long before they are cancelled
API_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")
BACKLOG = 4096  # connections the kernel queues: a burst of clients must wait, never be reset


@dataclass
class Event:
    """What the engine thread tells one request: new tokens, the end, or why it failed."""

    token_ids: list[int]
    finished: bool = False
    reason: str | None = None
    error: str | None = None
    status: int = 200


class Handle:
    """One request's mailbox; filled and read on the event loop only."""

    def __init__(self) -> None:
        self.rid: int | None = None  # set by the engine thread once the engine accepts it
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


def _deliver(batch: list[tuple[Handle, Event]]) -> None:
    for h, ev in batch:
        h.push(ev)


class EngineLoop:
    """The one thread that calls the engine: add, abort, step, and hand each step's outputs to the event loop."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._live: dict[int, Handle] = {}  # engine thread only
        self._out: list[tuple[Handle, Event]] = []  # engine thread only: this step's events, sent together
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="moetune-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        """Called on the event loop; the handle's events arrive there."""
        self._aloop = asyncio.get_running_loop()
        h = Handle()
        if not self.alive:
            h.push(Event([], True, error="the engine thread has stopped", status=503))
        else:
            self._inbox.put(("add", h, prompt_ids, params))
        return h

    def abort(self, h: Handle) -> None:
        self._inbox.put(("abort", h))

    def stop(self, timeout: float = 3.0) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    # -------------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a broken engine: say so; /health turns 503 and waiters get 503 too
            log.exception("the engine thread stopped")
            self._fail_all("the engine thread stopped", 503)
        self._flush()

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread: the main thread's setting does not reach this one
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
                self._flush()

    def _flush(self) -> None:
        if not self._out or self._aloop is None:
            return
        batch, self._out = self._out, []
        try:
            self._aloop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, h, ids, params = cmd
            try:
                h.rid = self.engine.add_request(ids, params)
                self._live[h.rid] = h
            except MoetuneError as e:  # too long, empty, bad params: the client's fault
                self._out.append((h, Event([], True, error=str(e), status=400)))
            except Exception as e:
                log.exception("add_request failed")
                self._out.append((h, Event([], True, error=f"engine error: {e}", status=500)))
        elif cmd[0] == "abort":
            h = cmd[1]
            if h.rid is not None and self._live.pop(h.rid, None) is not None:
                self.engine.abort(h.rid)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # the engine could not single out a request: fail what runs, keep serving
            log.exception("engine step failed")
            self._fail_all(f"engine error: {e}", 500)
            return
        for out in outs:
            h = self._live.get(out.request_id)
            if h is None:
                continue
            error = getattr(out, "error", None)  # the engine aborted this one request (engine.step isolation)
            ev = Event(list(out.new_token_ids), out.finished, out.finish_reason, error, 500 if error else 200)
            self._out.append((h, ev))
            if out.finished:
                del self._live[out.request_id]

    def _fail_all(self, msg: str, status: int) -> None:
        for rid, h in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of request %d failed", rid)
            self._out.append((h, Event([], True, error=msg, status=status)))
        self._live.clear()


# ----------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of their own, so several servers can live in one process (tests)."""

    def __init__(self, loop: EngineLoop) -> None:
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
        sched = getattr(loop.engine, "scheduler", None)  # read-only len() of the scheduler's deques: GIL-safe
        Gauge("moetune_queue_depth", "requests waiting for the engine thread to take them",
              registry=r).set_function(lambda: loop.queue_depth)  # fmt: skip
        Gauge("moetune_num_requests_running", "sequences the engine is decoding",
              registry=r).set_function(lambda: len(sched.running) if sched else 0)  # fmt: skip
        Gauge("moetune_num_requests_waiting", "sequences waiting for (or part-way through) prefill",
              registry=r).set_function(lambda: len(sched.waiting) if sched else 0)  # fmt: skip


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

    def __init__(self, engine: Any) -> None:
        # Read what the routes need now: after this only the loop thread touches the engine.
        self.model_name: str = engine.config.model
        self.max_model_len: int = engine.config.max_model_len
        self.vocab_size: int = engine.spec.vocab_size
        self.tok = engine.tokenizer  # SentencePiece encode/decode are const C++ calls: safe across threads
        self.eos_id: int = engine.tokenizer.eos_id
        self.created = int(time.time())
        self.loop = EngineLoop(engine)
        self.metrics = Metrics(self.loop)
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            await asyncio.to_thread(self.loop.stop)  # fails what is still in flight with 503

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
        ok = self.loop.alive
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
        params = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_tokens, ignore_eos=req.ignore_eos,
            stop_token_ids=list(req.stop_ids), seed=req.seed,
        )
        try:
            params.validate()
        except MoetuneError as e:
            raise BadRequest(str(e)) from None
        run = Run(self, req, self.loop.submit(req.prompt_ids, params), arrived)
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
            self.s.loop.abort(self.h)
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
            self.s.loop.abort(self.h)
            self.done = True
        u = self.usage()
        self.s.metrics.prompt_tokens.inc(u.prompt_tokens)
        self.s.metrics.generation_tokens.inc(u.completion_tokens)
        self.s.metrics.e2e.observe(time.monotonic() - self.arrived)


# ----------------------------------------------------------------------------------------------- process


class _Uvicorn(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # End what is in flight first (a 503 event, then [DONE]), so uvicorn finds the connections done
        # instead of cancelling their tasks after its grace period with a traceback each.
        await asyncio.to_thread(self._engine_loop.stop)
        await super().shutdown(sockets)

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop) -> None:
        super().__init__(config)
        self._engine_loop = engine_loop


class Server:
    """Bind now (so a busy port fails at once), serve on serve_forever(); uvicorn handles SIGINT/SIGTERM."""

    def __init__(self, engine: Any, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(BACKLOG)  # now: clients that connect before uvicorn starts wait in the backlog
        except OSError:
            self.sock.close()
            raise
        self.server_address = self.sock.getsockname()[:2]
        self.openai = OpenAIServer(engine)
        self.loop = self.openai.loop
        config = uvicorn.Config(self.openai.app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=GRACE_S, backlog=BACKLOG)  # fmt: skip
        self.uvicorn = _Uvicorn(config, self.loop)

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Blocks until SIGINT/SIGTERM (main thread) or shutdown()."""
        self.uvicorn.run(sockets=[self.sock])

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True

    def close(self) -> None:
        self.loop.stop()
        self.sock.close()


def start_server(engine: Any, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Bind (port 0 picks a free one) and start the engine thread; call serve_forever() next."""
    return Server(engine, host, port)
