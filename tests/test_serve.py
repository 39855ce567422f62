"""The serving layer against a fake engine with the runtime's API: HTTP, SSE, the official openai client,
errors, isolation, aborts, metrics, and the default-vs-tuned comparison. Deterministic and model-free, so
these run in seconds (the real tiny engine is in test_serve_e2e.py)."""

from __future__ import annotations

import asyncio
import csv
import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import openai
import pytest
import torch
from fake_tokenizer import FakeTokenizer  # a module of its own: the HTTP process unpickles it without torch

from moetune.errors import MoetuneError
from moetune.serve import compare as cmp
from moetune.serve.protocol import BadRequest, Message, TextStream, chat_prompt_ids, parse_json
from moetune.serve.server import start_server


@dataclass
class Out:
    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


A = ord("a") + 3  # the fake writes "abcdefgh..." for every request


class FakeEngine:
    def __init__(self, max_model_len: int = 64, delay: float = 0.0, table: str | None = "E=4,N=96.json",
                 diverge_at: int | None = None, drift: float = 1e-3, noise: float = 2e-4) -> None:
        self.config = SimpleNamespace(model="fake", max_model_len=max_model_len, dtype="bf16", device="cpu",
                                      max_num_seqs=8)
        self.spec = SimpleNamespace(name="fake", vocab_size=32000)
        self.tokenizer = FakeTokenizer()
        self.delay, self.table, self.diverge_at, self.drift, self.noise = delay, table, diverge_at, drift, noise
        self.reqs: dict[int, list] = {}
        self.next_id, self.aborted, self.threads, self.tuned, self.which = 0, [], set(), True, "tuned"
        self.fail_next_step = self.broken = False

    # -- serving API
    def add_request(self, ids: list[int], params) -> int:
        self.threads.add(threading.get_ident())
        if ids[0] == 0:
            raise MoetuneError("the fake engine rejects prompts starting with 0")
        if len(ids) + params.max_tokens > self.config.max_model_len:
            raise MoetuneError("too long")
        self.next_id += 1
        self.reqs[self.next_id] = [params, 0]
        return self.next_id

    def abort(self, rid: int) -> None:
        self.aborted.append(rid)
        self.reqs.pop(rid, None)

    def has_unfinished(self) -> bool:
        if self.broken:
            raise RuntimeError("engine state is corrupt")
        return bool(self.reqs)

    def step(self) -> list[Out]:
        self.threads.add(threading.get_ident())
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        time.sleep(self.delay)
        outs = []
        for rid, r in list(self.reqs.items()):
            params, n = r
            tok = A + n % 26
            r[1] += 1
            stop = tok in params.stop_token_ids
            done = stop or r[1] >= params.max_tokens
            outs.append(Out(rid, [tok], done, ("stop" if stop else "length") if done else None))
            if done:
                del self.reqs[rid]
        return outs

    # -- comparison API
    @property
    def moe_table_path(self):
        return self.table if self.tuned else None

    def use_tables(self, which: str) -> None:
        self.which, self.tuned = which, which == "tuned"

    def decode_step_time_us(self, batch_size: int, context_len: int, steps: int) -> float:
        return 1000.0 + batch_size * (5.0 if self.tuned and self.table else 10.0)

    def generate(self, prompts: list[list[int]], params) -> list[list[int]]:
        out = [[(p[0] + j) % 1000 + 3 for j in range(params.max_tokens)] for p in prompts]
        if self.tuned and self.diverge_at is not None:
            out[0][self.diverge_at] += 1
        return out

    def teacher_forced_logits(self, prompt: list[int], forced: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(len(prompt))
        shift = {"tuned": self.drift, "default": 0.0, "default-perturbed": self.noise}[self.which]
        return torch.randn(len(forced), 2000, generator=g) + shift

    def teacher_forced_logits_batch(self, prompts: list[list[int]], forced: list[list[int]]) -> torch.Tensor:
        return torch.stack([self.teacher_forced_logits(p, f) for p, f in zip(prompts, forced)])


@pytest.fixture
def engine():
    return FakeEngine()


def serve(engine):
    """A running server on a free port and its thread; wait until it answers."""
    s = start_server(engine, "127.0.0.1", 0)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    assert s.wait_started(60), "the HTTP process did not start"
    return s, t


def stop(s, t) -> None:
    s.shutdown()
    t.join(5)
    s.close()
    assert not t.is_alive()


@pytest.fixture
def server(engine):
    s, t = serve(engine)
    yield s
    stop(s, t)


def call(server, method: str, path: str, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


def sse(server, path: str, body: dict) -> list:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = []
    for _ in range(1000):  # bounded: a broken stream fails the test instead of hanging it
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    conn.close()
    return events


# ---------------------------------------------------------------------------------------- good requests


def test_health_and_models(server):
    assert call(server, "GET", "/health") == (200, {"status": "ok"})
    status, body = call(server, "GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "fake" and body["object"] == "list"


def test_completion_with_text_prompt_returns_text_and_usage(server):
    status, body = call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 5})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abcde" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}  # BOS + 2 chars


def test_completion_with_token_id_prompt_uses_ids_as_given(server):
    status, body = call(server, "POST", "/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 2})
    assert status == 200 and body["usage"]["prompt_tokens"] == 4 and body["choices"][0]["text"] == "ab"


def test_chat_completion_uses_template_and_returns_message(server):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    status, body = call(server, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 3})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert body["usage"]["prompt_tokens"] == 1 + len("[INST] be brief\n\nhi [/INST]")


def test_streamed_completion_matches_the_whole_reply(server):
    events = sse(server, "/v1/completions", {"prompt": "hi", "max_tokens": 6})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abcdef"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["object"] == "text_completion" for c in chunks)


def test_streamed_chat_sends_role_then_content_then_finish_and_usage(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream_options": {"include_usage": True}}
    events = sse(server, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
    assert text == "abcd" and events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4 and events[-1] == "[DONE]"


def test_stop_string_cuts_text_and_ends_request(server, engine):
    status, body = call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 20, "stop": ["de"]})
    assert body["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "stop"}
    events = sse(server, "/v1/completions", {"prompt": "x", "max_tokens": 20, "stop": "de"})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "abc"
    # the rest of the request is aborted, not generated; the abort reaches the engine thread
    # asynchronously, possibly after the client has read the last event, so wait for it (bounded)
    deadline = time.monotonic() + 5
    while engine.reqs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.reqs


def test_stop_token_id_is_not_part_of_the_text(server):
    status, body = call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 20, "stop": [A + 2]})
    assert body["choices"][0]["text"] == "ab" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3


def test_concurrent_requests_all_complete_and_engine_runs_on_one_thread(server, engine):
    results = []
    ts = [threading.Thread(target=lambda: results.append(
        call(server, "POST", "/v1/completions", {"prompt": "q", "max_tokens": 8}))) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert [r[1]["choices"][0]["text"] for r in results] == ["abcdefgh"] * 6
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


# ---------------------------------------------------------------------------------------- bad requests

BAD = [
    ("/v1/completions", None),  # malformed JSON, sent raw below
    ("/v1/completions", []),
    ("/v1/completions", {"max_tokens": 3}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": [1, -4]}),
    ("/v1/completions", {"prompt": "x" * 100}),  # over max_model_len=64
    ("/v1/completions", {"prompt": "x", "max_tokens": 64}),  # prompt + completion over 64
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}),
    ("/v1/completions", {"prompt": "x", "top_p": 0}),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}),
    ("/v1/completions", {"prompt": "x", "n": 2}),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}),
    ("/v1/completions", {"prompt": [0, 5]}),  # the engine itself refuses: its message reaches the client
    ("/v1/chat/completions", {"max_tokens": 3}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 80}]}),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}'),  # Python's json reads NaN; JSON has none
    ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e999}'),  # overflows to inf
    ("/v1/completions", b'{"prompt": "x", "user": "u", "extra": [NaN]}'),  # NaN anywhere, even where unused
    ("/v1/completions", {"prompt": "x", "seed": 2**70}),
    ("/v1/completions", {"prompt": "x", "seed": "1"}),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}),
    ("/v1/completions", {"prompt": "x", "temperature": True}),
    ("/v1/completions", {"prompt": "x", "model": 42}),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}),
    ("/v1/completions", {"prompt": "x", "echo": True}),
    ("/v1/completions", {"prompt": "x", "best_of": 3}),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}),
    ("/v1/completions", {"prompt": "x", "stop": [""]}),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000),  # nested far past the parser's recursion limit
]


@pytest.mark.parametrize("path,body", BAD)
def test_bad_request_gets_400_with_openai_error_and_server_keeps_serving(server, path, body):
    raw = b"{not json" if body is None else body if isinstance(body, bytes) else None
    status, resp = call(server, "POST", path, None if raw else body, raw=raw)
    assert status == 400, resp
    assert resp["error"]["type"] == "invalid_request_error" and resp["error"]["message"]
    assert call(server, "GET", "/health")[0] == 200


def test_engine_rejection_message_reaches_client(server):
    _, resp = call(server, "POST", "/v1/completions", {"prompt": [0, 5], "max_tokens": 1})
    assert "rejects prompts starting with 0" in resp["error"]["message"]


def test_bad_streamed_request_still_gets_a_400_status(server):
    status, resp = call(server, "POST", "/v1/completions", {"prompt": [0, 5], "stream": True})
    assert status == 400 and resp["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_with_openai_error_shape(server):
    status, resp = call(server, "POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert status == 404
    assert resp == {"error": {"message": "The model `gpt-4` does not exist.", "type": "not_found_error",
                              "param": "model", "code": "model_not_found"}}


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "temperature": -Infinity}',
    b'{"prompt": "x", "seed": 1180591620717411303424}', b'{"prompt": "x", "model": "nope"}',
])
def test_bad_request_fails_alone_while_a_concurrent_request_succeeds(raw):
    eng = FakeEngine(delay=0.01)
    s, t = serve(eng)
    try:
        good: list = []
        th = threading.Thread(target=lambda: good.append(call(s, "POST", "/v1/completions", {"prompt": "q", "max_tokens": 30})))
        th.start()
        for _ in range(200):  # the good request is running in the engine before the bad one comes
            if eng.reqs:
                break
            time.sleep(0.005)
        status, resp = call(s, "POST", "/v1/completions", raw=raw)
        assert 400 <= status < 500 and resp["error"]["message"], resp
        th.join(10)
        assert good[0][0] == 200 and good[0][1]["choices"][0]["text"] == ("abcdefghijklmnopqrstuvwxyz" + "abcd")
    finally:
        stop(s, t)


def test_engine_error_for_one_request_reaches_only_that_request(server, engine):
    """engine.step reports a request it aborted (StepOutput.error): that request gets a 500, others go on."""
    real_step = engine.step

    def step():
        outs = real_step()
        for o in outs:
            if engine.victim == o.request_id:
                o.error, o.finished, o.new_token_ids = "kaput", True, []
                engine.reqs.pop(o.request_id, None)
        return outs

    engine.step, engine.victim, engine.delay = step, 2, 0.005
    results: dict = {}
    ths = [threading.Thread(target=lambda i=i: results.__setitem__(i, call(server, "POST", "/v1/completions",
                                                                              {"prompt": "q", "max_tokens": 10})))
           for i in range(3)]
    for th in ths:
        th.start()
        time.sleep(0.05)  # request ids 1, 2, 3 in order
    for th in ths:
        th.join(10)
    statuses = sorted(r[0] for r in results.values())
    assert statuses == [200, 200, 500]
    assert all(r[1]["choices"][0]["text"] == "abcdefghij" for r in results.values() if r[0] == 200)
    assert [r[1]["error"]["message"] for r in results.values() if r[0] == 500] == ["kaput"]


def test_oversized_body_is_413_before_it_is_read(server):
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()  # no body follows: the answer must not wait for it
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["type"] == "invalid_request_error"
    conn.close()


def test_unknown_path_404_and_wrong_method_405(server):
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "POST", "/v1/nope", {"a": 1})[0] == 404
    assert call(server, "GET", "/v1/completions")[0] == 405


def test_engine_failure_is_500_and_next_request_succeeds(server, engine):
    engine.fail_next_step = True
    status, resp = call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 500 and "boom" in resp["error"]["message"]
    assert call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200


def test_dead_engine_thread_turns_health_and_requests_into_503(server, engine):
    engine.broken = True
    status, resp = call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 503 and resp["error"]["type"] == "server_error"
    assert call(server, "GET", "/health")[0] == 503


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_its_request(stream):
    eng = FakeEngine(max_model_len=100_000, delay=0.02)
    s, t = serve(eng)
    try:
        body = json.dumps({"prompt": "x", "max_tokens": 50_000, "stream": stream}).encode()
        sock = socket.create_connection(s.server_address[:2], timeout=5)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            got = b""
            for _ in range(50):  # headers and the first chunk may come in separate reads
                got += sock.recv(4096)
                if b"data: " in got:
                    break
            assert b"data: " in got  # the stream has started
        else:
            time.sleep(0.3)
        sock.close()
        for _ in range(100):
            if eng.aborted and not eng.reqs:
                break
            time.sleep(0.05)
        assert eng.aborted == [1] and not eng.reqs
    finally:
        stop(s, t)


# ---------------------------------------------------------------------------------------- official client


def test_openai_client_every_route_streaming_and_not(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
    assert [m.id for m in c.models.list()] == ["fake"]
    r = c.completions.create(model="fake", prompt="hi", max_tokens=5)
    assert r.choices[0].text == "abcde" and r.usage.completion_tokens == 5
    parts = list(c.completions.create(model="fake", prompt="hi", max_tokens=5, stream=True))
    assert "".join(p.choices[0].text for p in parts) == "abcde"
    msgs = [{"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="fake", messages=msgs, max_tokens=3, seed=7, temperature=0.5)
    assert r.choices[0].message.content == "abc" and r.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="fake", messages=msgs, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "abc"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        c.completions.create(model="fake", prompt="hi", n=2)


def test_64_concurrent_openai_clients_none_dropped():
    eng = FakeEngine(delay=0.002)
    s, t = serve(eng)

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:
            r = await c.completions.create(model="fake", prompt="q", max_tokens=20)
            return r.choices[0].text
        stream = await c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "q"}],
                                                 max_tokens=20, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=30) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)), return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        stop(s, t)
    assert out == ["abcdefghijklmnopqrst"] * 64


def test_metrics_and_docs(server):
    call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": False})
    call(server, "POST", "/v1/completions", {"prompt": "hi", "temperature": -1})
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'moetune_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'moetune_requests_total{route="/v1/completions",status="400"} 1.0' in text
    assert "moetune_generation_tokens_total 4.0" in text and "moetune_prompt_tokens_total 3.0" in text
    for name in ("moetune_time_to_first_token_seconds_count 1.0", "moetune_inter_token_latency_seconds_count 3.0",
                 "moetune_queue_depth", "moetune_num_requests_running", "moetune_num_requests_waiting"):
        assert name in text
    conn.request("GET", "/docs")
    assert conn.getresponse().read() and call(server, "GET", "/openapi.json")[1]["paths"]["/v1/chat/completions"]
    conn.close()


# ---------------------------------------------------------------------------------------- protocol pieces


def test_chat_template_mistral_v1():
    tok = FakeTokenizer()
    msgs = [Message.model_validate(m) for m in [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "text", "text": "c"}]}]]
    ids = chat_prompt_ids(msgs, tok)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == "[INST] a [/INST]b[INST] c [/INST]"
    with pytest.raises(BadRequest):
        chat_prompt_ids([Message(role="user", content="a"), Message(role="system", content="late")], tok)


def test_text_stream_holds_back_possible_stop_prefix_and_half_characters():
    tok = FakeTokenizer()
    ts = TextStream(tok.decode, ["xyz"])
    assert ts.add(tok.encode("abcx", bos=False)) == "abc"  # "x" could still start "xyz"
    assert ts.add(tok.encode("y", bos=False)) == ""
    assert ts.add(tok.encode("zq", bos=False)) == "" and ts.stopped and ts.text == "abc"
    ts = TextStream(tok.decode, ["xyz"])
    assert ts.add(tok.encode("abxy", bos=False)) == "ab" and ts.add(tok.encode("q", bos=False)) == "xyq"
    half = TextStream(lambda ids: ["", "ok\ufffd", "ok!"][len(ids)], [])
    assert half.add([5]) == "" and half.add([6], final=True) == "ok!"  # the window waits for whole characters


def test_text_stream_is_incremental_and_matches_a_full_decode_with_the_real_tokenizer():
    from moetune.runtime.tokenizer import Tokenizer, find_tokenizer_model

    tok = Tokenizer(find_tokenizer_model(None))
    ids = tok.encode("Hello wörld, 日本語 text — with  spaces\nand lines.", bos=False)
    g = torch.Generator().manual_seed(0)
    ids += torch.randint(3, tok.vocab_size, (40,), generator=g).tolist()
    ts, calls = TextStream(lambda x: (calls.append(len(x)), tok.decode(x))[1], []), []
    text = "".join(ts.add([i]) for i in ids) + ts.add([], final=True)
    assert text == tok.decode(ids) and max(calls) < 8  # short windows, not the whole text each time


def test_parse_json_rejects_what_json_is_not():
    assert parse_json(b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}
    for bad in (b"NaN", b"[Infinity]", b"-Infinity", b"1e400", b"[" * 5000, b"{", b"\xff"):
        with pytest.raises(BadRequest):
            parse_json(bad)


# ---------------------------------------------------------------------------------------- comparison

W = cmp.Workload(batch_sizes=[1, 4], context_len=8, prompt_len=16, steps=2, ttft_reps=1, check_prompts=2,
                 check_tokens=4, check_prompt_len=4)


def test_compare_with_table_reports_speedup_and_writes_json_and_csv(tmp_path):
    r = cmp.compare(FakeEngine(), W)
    assert r["tuned_table_found"] and r["table"] == "E=4,N=96.json"
    assert [x["batch"] for x in r["decode"]] == [1, 4] and all(x["speedup"] > 1 for x in r["decode"])
    assert r["decode"][1]["default_tok_s"] == pytest.approx(4e6 / 1040)
    p = r["parity"][0]
    assert all(p["greedy_identical"] and p["verdict"] == "MATCH" for p in r["parity"])
    assert p["max_abs_logit_diff"] == pytest.approx(1e-3, rel=1e-3) and p["steps"] == 2 * 4 and p["tolerance"] > 0.02
    assert p["noise_floor"] == pytest.approx(2e-4, rel=1e-3) and p["tolerance"] == p["rtol_floor"]  # tiny noise
    text = cmp.report(r)
    assert "cannot tell a wrong config" not in text
    assert "tuned table: E=4,N=96.json" in text and "MEANINGLESS" not in text.split("\n")[0]
    jpath, cpath = cmp.save(r, tmp_path)
    assert json.loads(jpath.read_text())["decode"][0]["batch"] == 1
    rows = list(csv.DictReader(cpath.open()))
    assert [row["kind"] for row in rows] == ["decode", "decode", "ttft"]


def test_compare_without_table_claims_no_speedup():
    r = cmp.compare(FakeEngine(table=None), W)
    assert r["table"] is None and all(x["speedup"] is None for x in r["decode"]) and r["ttft"]["speedup"] is None
    assert "NO TUNED TABLE" in cmp.report(r) and "default vs default" in cmp.report(r)


def test_compare_verdict_comes_from_logits_and_greedy_tokens_are_information():
    r = cmp.compare(FakeEngine(diverge_at=2), W)
    p = r["parity"][0]
    assert not p["greedy_identical"] and p["first_divergence"] == 2 and p["verdict"] == "MATCH"
    assert "MATCH: max |Δlogit| 0.001" in cmp.report(r) and "first differ at 2" in cmp.report(r)
    r = cmp.compare(FakeEngine(drift=1.0), W)  # logits moved far more than rounding can, same greedy tokens
    assert r["parity"][0]["verdict"] == "MISMATCH" and r["parity"][0]["greedy_identical"]
    assert "MISMATCH: max |Δlogit| 1" in cmp.report(r)


def test_compare_tolerance_follows_the_measured_noise_floor():
    """Two correct tables drifting far beyond the rtol floor pass when default vs default-perturbed drifts as
    much; the same drift with a quiet noise floor is a MISMATCH. Both numbers are reported."""
    r = cmp.compare(FakeEngine(drift=1.5, noise=1.0), W)  # fp8-like: rounding noise amplified over the layers
    p = r["parity"][0]
    assert p["verdict"] == "MATCH" and p["tolerance"] == pytest.approx(cmp.NOISE_FACTOR * 1.0, rel=1e-3)
    assert p["tolerance"] > p["rtol_floor"] and r["parity_rule"]["noise_factor"] == cmp.NOISE_FACTOR
    text = cmp.report(r)
    assert "MATCH: max |Δlogit| 1.5 (tol 3, noise floor 1," in text and "noise floor = default vs default" in text
    assert "cannot tell a wrong config from rounding" in text  # tol 3 against logits of about 4.5
    assert json.loads(json.dumps(r, default=str))["parity"][0]["noise_floor"] == pytest.approx(1.0, rel=1e-3)
    r = cmp.compare(FakeEngine(drift=1.5, noise=0.1), W)
    assert r["parity"][0]["verdict"] == "MISMATCH" and "MISMATCH: max |Δlogit| 1.5" in cmp.report(r)


def test_workload_that_does_not_fit_fails_early():
    with pytest.raises(MoetuneError, match="max_num_seqs"):
        cmp.compare(FakeEngine(), cmp.Workload(batch_sizes=[64], context_len=8, prompt_len=8))


def test_fixed_prompt_is_seeded_and_never_special_tokens():
    a = cmp.fixed_prompt(2048, 32000, seed=1)
    assert a == cmp.fixed_prompt(2048, 32000, seed=1) and min(a) >= 3 and len(set(a)) > 1000
