"""OpenAI request checking, the Mistral chat template and incremental detokenization.

Pure functions over plain JSON and a tokenizer: no engine, no sockets, so every rule here is
testable on its own. A request that breaks a rule raises BadRequest, which the server turns into
HTTP 400 with OpenAI's error body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class BadRequest(Exception):
    """The client's fault: answered with 400 and this message."""


class Tokenizer(Protocol):
    eos_id: int

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Request:
    """One checked completion request, independent of the endpoint it came from."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    stop_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _sampling(body: dict, req: Request, default_max: int, max_model_len: int) -> Request:
    """Fill and check the sampling fields both endpoints share (OpenAI defaults: T=1, top_p=1)."""
    n = body.get("n", 1)
    if n != 1 or not _is_int(n):
        raise BadRequest("n must be 1; this server returns one choice per request")
    if body.get("best_of") not in (None, 1):
        raise BadRequest("best_of is not supported")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
        raise BadRequest("logprobs and echo are not supported")
    t = body.get("temperature")
    if t is not None and (not _is_num(t) or t < 0):
        raise BadRequest(f"temperature must be a number >= 0, got {t!r}")
    p = body.get("top_p")
    if p is not None and (not _is_num(p) or not 0 < p <= 1):
        raise BadRequest(f"top_p must be in (0, 1], got {p!r}")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    m = body.get(key)
    if m is not None and (not _is_int(m) or m < 1):
        raise BadRequest(f"{key} must be an integer >= 1, got {m!r}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest(f"seed must be an integer, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object")
    req.temperature = 1.0 if t is None else float(t)
    req.top_p = 1.0 if p is None else float(p)
    req.max_tokens = default_max if m is None else m
    req.seed, req.stream = seed, stream
    req.include_usage = bool(opts.get("include_usage"))
    req.ignore_eos = bool(body.get("ignore_eos", False))  # vLLM's extension; handy for benchmarks
    _stops(body.get("stop"), req)
    total = len(req.prompt_ids) + req.max_tokens
    if total > max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {total} "
            f"tokens ({len(req.prompt_ids)} in the prompt, {req.max_tokens} for the completion). "
            f"Please reduce the prompt or max_tokens."
        )
    return req


def _stops(stop: Any, req: Request) -> None:
    """`stop` may be a string, a token id, or a list of either (ids are our extension, as in vLLM)."""
    if stop is None:
        return
    for s in stop if isinstance(stop, list) else [stop]:
        if isinstance(s, str) and s:
            req.stop_strings.append(s)
        elif _is_int(s) and s >= 0:
            req.stop_ids.append(s)
        else:
            raise BadRequest(f"stop must hold non-empty strings or token ids, got {s!r}")


def _check_ids(ids: list, vocab_size: int) -> list[int]:
    if not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
        raise BadRequest(f"prompt token ids must be integers in [0, {vocab_size})")
    return ids


def parse_completion(body: Any, tok: Tokenizer, vocab_size: int, max_model_len: int) -> Request:
    """POST /v1/completions: prompt is a string or a list of token ids (used as given, no BOS added)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one is still one prompt
    if isinstance(prompt, str) and prompt:
        ids = tok.encode(prompt, bos=True)
    elif isinstance(prompt, list) and prompt:
        ids = _check_ids(prompt, vocab_size)
    elif prompt is None:
        raise BadRequest("missing required field 'prompt'")
    else:
        raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids (one prompt only)")
    return _sampling(body, Request(prompt_ids=ids, max_tokens=16), 16, max_model_len)  # OpenAI's default 16


def _content(msg: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        return "".join(str(p.get("text", "")) for p in c)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def chat_prompt_ids(messages: Any, tok: Tokenizer) -> list[int]:
    """Mistral instruct v1: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST]`.

    <s> and </s> are added as ids, never as text, since SentencePiece would split the text into
    ordinary pieces. A system message is prepended to the first user message, as Mistral's own
    template does (it has no system role).
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object with role system, user or assistant")
        if m["role"] == "system":
            if turns:
                raise BadRequest("system messages must come before the conversation")
            system.append(_content(m, i))
        else:
            turns.append((m["role"], _content(m, i), i))
    for k, (role, _, i) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise BadRequest(f"messages[{i}]: roles must alternate user/assistant, starting with user")
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message must come from the user")
    ids: list[int] = []
    for k, (role, text, _) in enumerate(turns):
        if role == "user":
            if k == 0 and system:
                text = "\n\n".join([*system, text])
            ids += tok.encode(f"[INST] {text} [/INST]", bos=k == 0)  # <s> once, at the start
        else:
            ids += tok.encode(text, bos=False) + [tok.eos_id]
    return ids


def parse_chat(body: Any, tok: Tokenizer, vocab_size: int, max_model_len: int) -> Request:
    """POST /v1/chat/completions. With no max_tokens the reply may fill the context, as in vLLM."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if "messages" not in body:
        raise BadRequest("missing required field 'messages'")
    ids = chat_prompt_ids(body["messages"], tok)
    if len(ids) >= max_model_len:
        raise BadRequest(f"This model's maximum context length is {max_model_len} tokens; the messages take {len(ids)}")
    return _sampling(body, Request(prompt_ids=ids, max_tokens=0), max_model_len - len(ids), max_model_len)


class TextStream:
    """Turns token ids into text deltas, cutting at stop strings.

    Decoding the whole sequence each time (not token by token) keeps SentencePiece's leading-space
    rule right. A tail that could still grow into a stop string, or ends in half a UTF-8 character
    (decoded as U+FFFD), is held back until it is safe.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text = ""  # what has been emitted so far
        self.hidden = 0  # stop/EOS tokens counted in usage but kept out of the text
        self.stopped = False  # a stop string was seen: the request is over

    def add(self, new_ids: list[int], final: bool = False) -> str:
        self.ids += new_ids
        full = self.decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, full, final = True, full[: min(hits)], True
        end = len(full)
        if not final:
            end -= max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            while end > 0 and full[end - 1] == "\ufffd":
                end -= 1
        if end <= len(self.text):
            return ""
        delta, self.text = full[len(self.text) : end], full[:end]
        return delta
