"""OpenAI request and response schemas, JSON parsing, the Mistral chat template and incremental detokenization.

No engine and no sockets here, so every rule is testable on its own. A request that breaks a rule raises
BadRequest (or fails Pydantic validation), which the server turns into HTTP 400 with OpenAI's error body.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

MAX_BODY = 16 << 20  # 16 MiB of JSON is far beyond any prompt max_model_len allows
INT64 = 1 << 63  # seeds go to torch.Generator.manual_seed, which takes a 64-bit integer


class BadRequest(Exception):
    """The client's fault: answered with 400 (or `status`) and this message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class Tokenizer(Protocol):
    eos_id: int

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ----------------------------------------------------------------------------------------------- JSON


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # 1e999 parses to inf
        raise BadRequest(f"the number {text} is out of range")
    return x


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a valid JSON number")  # Python's json accepts NaN and Infinity; JSON does not


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN/Infinity anywhere, no number that overflows to inf, bounded nesting."""
    if len(body) > MAX_BODY:
        raise BadRequest(f"the body must be at most {MAX_BODY} bytes", status=413)
    try:
        return json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------- requests

# strict: "3" is not 3 and true is not 1; allow_inf_nan=False: a second guard behind parse_json
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
Seed = Annotated[int, Field(ge=-INT64, lt=INT64)]
Stop = str | int | list[str | int] | None  # token ids are our extension, as in vLLM


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share, with OpenAI's defaults (T=1, top_p=1)."""

    model_config = _STRICT
    model: str | None = Field(None, description="the served model's id; omitted means the served model")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, description="only 1: one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: keep going past EOS (benchmarks)")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None


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


def _unsupported(body: _Sampling) -> None:
    """Fields OpenAI has and this server does not implement: a clear 400, never a silent ignore."""
    if body.n != 1:
        raise BadRequest("n must be 1; this server returns one choice per request", param="n")
    if body.presence_penalty or body.frequency_penalty or body.logit_bias:
        raise BadRequest("presence_penalty, frequency_penalty and logit_bias are not supported")
    extra = [k for k in ("logprobs", "top_logprobs", "echo", "suffix") if getattr(body, k, None)]  # 0/false: off
    if getattr(body, "best_of", None) not in (None, 1):
        extra.append("best_of")
    if extra:
        raise BadRequest(f"not supported by this server: {', '.join(sorted(extra))}", param=sorted(extra)[0])


def _stops(stop: Stop, req: Request) -> None:
    for s in stop if isinstance(stop, list) else [] if stop is None else [stop]:
        if isinstance(s, str) and s:
            req.stop_strings.append(s)
        elif isinstance(s, int) and s >= 0:
            req.stop_ids.append(s)
        else:
            raise BadRequest(f"stop must hold non-empty strings or token ids, got {s!r}", param="stop")


def _sampling(body: _Sampling, req: Request, max_tokens: int | None, default_max: int, max_model_len: int) -> Request:
    _unsupported(body)
    req.temperature, req.top_p, req.seed, req.stream = body.temperature, body.top_p, body.seed, body.stream
    req.max_tokens = default_max if max_tokens is None else max_tokens
    req.include_usage = bool(body.stream_options and body.stream_options.include_usage)
    req.ignore_eos = body.ignore_eos
    _stops(body.stop, req)
    total = len(req.prompt_ids) + req.max_tokens
    if req.max_tokens < 1:  # only a default can be 0: an explicit max_tokens below 1 fails validation
        raise BadRequest(f"the prompt ({len(req.prompt_ids)} tokens) fills the model's context of {max_model_len} "
                         f"tokens and leaves none for the reply; shorten the prompt")  # fmt: skip
    if total > max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {total} "
            f"tokens ({len(req.prompt_ids)} in the prompt, {req.max_tokens} for the completion). "
            f"Please reduce the prompt or max_tokens."
        )
    return req


def parse_completion(body: CompletionRequest, tok: Tokenizer, vocab_size: int, max_model_len: int) -> Request:
    """POST /v1/completions: prompt is a string or a list of token ids (used as given, no BOS added)."""
    prompt: Any = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one is still one prompt
    if isinstance(prompt, str) and prompt:
        ids = tok.encode(prompt, bos=True)
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
        if not all(0 <= i < vocab_size for i in prompt):
            raise BadRequest(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
        ids = list(prompt)
    else:
        raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids (one prompt only)",
                         param="prompt")  # fmt: skip
    # with no max_tokens the completion may fill the context (the rule; OpenAI's API says 16)
    remaining = max_model_len - len(ids)
    return _sampling(body, Request(prompt_ids=ids, max_tokens=0), body.max_tokens, remaining, max_model_len)


def chat_prompt_ids(messages: list[Message], tok: Tokenizer) -> list[int]:
    """Mistral instruct v1: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST]`.

    <s> and </s> are added as ids, never as text, since SentencePiece would split the text into
    ordinary pieces. A system message is prepended to the first user message, as Mistral's own
    template does (it has no system role).
    """
    if not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[tuple[str, str, int]] = []
    for i, m in enumerate(messages):
        if m.role == "system":
            if turns:
                raise BadRequest("system messages must come before the conversation", param="messages")
            system.append(m.text)
        else:
            turns.append((m.role, m.text, i))
    for k, (role, _, i) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise BadRequest(f"messages[{i}]: roles must alternate user/assistant, starting with user",
                             param="messages")  # fmt: skip
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message must come from the user", param="messages")
    ids: list[int] = []
    for k, (role, text, _) in enumerate(turns):
        if role == "user":
            if k == 0 and system:
                text = "\n\n".join([*system, text])
            ids += tok.encode(f"[INST] {text} [/INST]", bos=k == 0)  # <s> once, at the start
        else:
            ids += tok.encode(text, bos=False) + [tok.eos_id]
    return ids


def parse_chat(body: ChatRequest, tok: Tokenizer, vocab_size: int, max_model_len: int) -> Request:
    """POST /v1/chat/completions. With no max_tokens the reply may fill the context, as in vLLM."""
    ids = chat_prompt_ids(body.messages, tok)
    if len(ids) >= max_model_len:
        raise BadRequest(f"This model's maximum context length is {max_model_len} tokens; the messages take {len(ids)}")
    m = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _sampling(body, Request(prompt_ids=ids, max_tokens=0), m, max_model_len - len(ids), max_model_len)


# ----------------------------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moetune"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ----------------------------------------------------------------------------------------------- detokenization


class TextStream:
    """Turns token ids into text deltas incrementally, cutting at stop strings.

    Each call decodes only a short window (the previous step's tokens plus the new ones) and keeps the
    part past the window's old text, so SentencePiece's leading-space rule stays right at O(1) cost per
    token. Text that ends in half a UTF-8 character (U+FFFD) waits for more tokens; a tail that could still
    grow into a stop string is held back until it is safe.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.hidden = 0  # stop/EOS tokens counted in usage but kept out of the text
        self.stopped = False  # a stop string was seen: the request is over
        self.text = ""  # what has been emitted so far
        self._full = ""  # all text decoded so far, emitted or not
        self._prefix = self._read = 0  # decode window: ids[_prefix:_read] were decoded last time

    def _decode_new(self, final: bool) -> None:
        old = self.decode(self.ids[self._prefix : self._read])
        new = self.decode(self.ids[self._prefix :])
        if len(new) > len(old) and (final or not new.endswith("\ufffd")):
            self._full += new[len(old) :]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        self.ids += new_ids
        if new_ids or final:
            self._decode_new(final)
        full, start = self._full, len(self.text)  # a stop string cannot start in text already emitted
        hits = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, full, final = True, full[: min(hits)], True
        end = len(full)
        if not final:
            end -= max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        if end <= start:
            return ""
        delta, self.text = full[start:end], full[:end]
        return delta
