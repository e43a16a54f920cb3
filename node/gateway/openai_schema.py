"""The OpenAI request and response bodies the gateway speaks, and the one-to-one mapping of a
request onto a signed job's parameters.

Mapped: model, messages / prompt, temperature, top_p, max_tokens / max_completion_tokens, seed,
stop, stream (+ stream_options.include_usage), n (1 only) and the tags `user`, `safety_identifier`
and `prompt_cache_key` (they change no output). Any other parameter is refused with a 400 naming
it, unless it is given at its no-effect value (n=1, presence_penalty=0, logprobs=false, tools=[],
response_format text, store=false...):
a client must never believe the network honoured a parameter it ignored. Values are checked
strictly, as OpenAI does: "0.5" is not a temperature, nor true a max_tokens of 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from engine.api import MAX_STOP_CHARS, SEED_LIMIT
from node.client import prompt_bytes
from node.config import model_id
from node.envelope import MAX_PAYLOAD_BYTES
from node.gateway.errors import ApiError

# OpenAI's own defaults where the node's would differ (the node's temperature default is greedy).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_CHAT_MAX_TOKENS = 256      # OpenAI's is "up to the context": a bounded default bills predictably
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_STOP = 4
# A worker takes a signed job of at most MAX_PAYLOAD_BYTES; the job's other fields (model <= 256
# characters, stop <= 4 x 256, ids, prices, times) take well under 8 KiB of it.
MAX_PROMPT_BYTES = MAX_PAYLOAD_BYTES - 8192


def _number(target: int) -> Callable[[Any], bool]:
    """null or `target` as a JSON number: Python's True == 1, but JSON's true is no number."""
    return lambda v: v is None or (type(v) in (int, float) and v == target)


def _false(v: Any) -> bool:
    return v is None or v is False       # not 0, which equals False in Python


_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": _number(1),
    "presence_penalty": _number(0),
    "frequency_penalty": _number(0),
    "logprobs": _false,
    "top_logprobs": lambda v: v is None,
    "logit_bias": lambda v: v in (None, {}),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None,
    "response_format": lambda v: v in (None, {"type": "text"}),
    "echo": _false,
    "best_of": _number(1),
    "suffix": lambda v: v in (None, ""),
    "store": _false,            # keep the completion for OpenAI's dashboard: not on this network
}

# A message's fields the gateway cannot honour, at their no-effect values: the SDK's
# ChatCompletionMessage.model_dump() writes them all as null, and callers put that dump back into
# the history as the assistant's turn.
_MESSAGE_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: v is None,
    "refusal": lambda v: v is None,
    "annotations": lambda v: v in (None, []),
    "audio": lambda v: v is None,
    "function_call": lambda v: v is None,
    "tool_calls": lambda v: v in (None, []),
}


def _refuse_unsupported(extra: dict[str, Any] | None, neutral_values: dict[str, Callable[[Any], bool]],
                        prefix: str = "") -> None:
    for name, value in (extra or {}).items():
        neutral = neutral_values.get(name)
        if neutral is None or not neutral(value):
            raise ApiError(400, f"parameter {prefix + name!r} is not supported by this gateway"
                                + (" (only its no-effect value)" if neutral else ""),
                           param=prefix + name, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    # OpenAI pads chunks with random text unless told false; the gateway never pads, so false is what it does.
    include_obfuscation: Literal[False] | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)    # 0 would mean "no nucleus filter" on the worker
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)   # the worker's limits: refused here, naming the field
    stop: str | list[str] | None = None
    stream: bool | None = None         # null is OpenAI's default, as for the other optional parameters
    stream_options: StreamOptions | None = None
    user: str | None = None
    # The SDK's successors of `user` (an end-user tag; a cache-routing hint): no output changes either.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} characters")
        return stops

    def unsupported(self) -> None:
        _refuse_unsupported(self.model_extra, _NEUTRAL)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Body):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]     # OpenAI's four forms: a batch is one per prompt


@dataclass(frozen=True)
class JobParams:
    """What a request asks of the network, in the node's terms (WorkerClient.sign_job's)."""
    model: str
    prompt: dict[str, Any]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_request(kind: Literal["chat", "completion"], body: Any) -> JobParams:
    """Validate an OpenAI request body; raises ApiError(400) naming the first bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_lone_surrogates(body)
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        param, message = _first_fault(exc)
        raise ApiError(400, f"invalid parameter {param!r}: {message}", param=param) from None
    request.unsupported()
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if isinstance(request, ChatCompletionRequest):
        for i, message in enumerate(request.messages):
            _refuse_unsupported(message.model_extra, _MESSAGE_NEUTRAL, f"messages.{i}.")
        max_tokens = _max_tokens(request)
        prompt: dict[str, Any] = {"chat": [{"role": "system" if m.role == "developer" else m.role,
                                            "content": m.text()} for m in request.messages]}
    else:
        max_tokens = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        prompt = _completion_prompt(request.prompt)
    _check_size(prompt, "messages" if isinstance(request, ChatCompletionRequest) else "prompt")
    return JobParams(
        model=model_id(request.model), prompt=prompt, max_new_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed, stop=tuple(request.stop or ()),
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage))


def _first_fault(exc: ValidationError) -> tuple[str, str]:
    """The first bad parameter and what is wrong with it. A union field (content, stop, prompt) has
    an error for each member: the deepest names the fault (`messages.0.content.0.type`: should be
    'text', for an image part) where the first would say only that the value is not a string."""
    errors = [(tuple(str(p) for p in e["loc"] if not _union_member(p)), e["msg"]) for e in exc.errors()]
    field = errors[0][0]
    path, message = max((e for e in errors if e[0][:len(field)] == field), key=lambda e: len(e[0]))
    return ".".join(path), message


def _union_member(part: str | int) -> bool:
    """Whether a part of a pydantic error location names the member of a union it was checked
    against ("str", "list[int]", "function-after[...]"), not a field: no field is named so, while
    a prefix test would also drop `stream` and `stream_options`."""
    return isinstance(part, str) and (part == "str" or "[" in part)


def _refuse_lone_surrogates(body: dict) -> None:
    """JSON may escape half a UTF-16 pair ("\\ud800"), which json.loads turns into a str that is not
    Unicode text: it cannot be encoded as UTF-8, so signing the job (or echoing it in an error)
    would fail deep inside the gateway. Refused here, naming where. Walked with a stack, not
    recursion: the body may nest as deep as json.loads allows."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{_shown(key)}" if path else _shown(key)
                if _shown(key) != key:
                    _refuse_surrogate(child)
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))
        elif isinstance(value, str) and _shown(value) != value:
            _refuse_surrogate(path)


def _shown(text: str) -> str:
    """`text` with any lone surrogate written as its escape; unchanged if it is Unicode text."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _refuse_surrogate(param: str) -> None:
    raise ApiError(400, f"invalid parameter {param!r}: the text holds a lone UTF-16 surrogate (such as \\ud800), "
                        "which is not Unicode text", param=param)


def _check_size(prompt: dict[str, Any], param: str) -> None:
    """A prompt too big for a signed job is the client's fault, said here: every worker would refuse
    it, and past gRPC's 2 MiB it would not even be read (a 503 after trying each worker)."""
    size = prompt_bytes(**prompt)
    if size > MAX_PROMPT_BYTES:
        raise ApiError(400, f"the prompt takes {size} bytes in a signed job, over the {MAX_PROMPT_BYTES} a job "
                            "carries (far past any worker's context)", param=param, code="context_length_exceeded")


def _max_tokens(request: ChatCompletionRequest) -> int:
    both = (request.max_tokens, request.max_completion_tokens)
    if None not in both and both[0] != both[1]:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    return request.max_completion_tokens or request.max_tokens or DEFAULT_CHAT_MAX_TOKENS


def _completion_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"text": prompt}
    if prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "a batch of prompts is not supported: send one prompt per request", param="prompt")
        return _completion_prompt(prompt[0])
    if not prompt or any(not 0 <= t < 2**32 for t in prompt):
        raise ApiError(400, "prompt token ids must be a non-empty list of u32", param="prompt")
    return {"token_ids": list(prompt)}


# --- response bodies -------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Extension(BaseModel):
    """The `dspark` field: who ran the job and the signed receipt that bills it."""
    worker: str
    receipt_digest: str | None = None     # sha256 of the receipt Envelope, hex
    receipt_sequence: int | None = None
    tau: float | None = None
    amount_micros: int | None = None
    job_id: str | None = None
    failovers: int = 0


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    dspark: Extension


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None    # None in stream chunks before the last
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    dspark: Extension


class _OmitsNone(BaseModel):
    """A body whose absent values are left out, as OpenAI's chunks leave out a delta's role after the
    first and the usage before the last; a choice's `finish_reason` and `logprobs` are not of these:
    OpenAI sends them as null (clients read `choice["finish_reason"]`)."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler) -> dict[str, Any]:
        return {name: value for name, value in handler(self).items() if value is not None}


class ChunkDelta(_OmitsNone):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_OmitsNone):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    dspark: Extension | None = None


class CompletionChunk(_OmitsNone):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    dspark: Extension | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dspark-network"
    dspark: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
