"""OpenAI-compatible text generation: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Pure functions, no I/O: the HTTP layer parses a body with ``parse_chat`` / ``parse_completion``, sends
``GenerationSpec.item()`` to the worker, and builds its answer with the builders below, whose shapes are
OpenAI's own (checked against the official client's pydantic types in ``tests/test_openai_generation.py``).

Validation is strict on purpose: an option this server cannot honour (tools, logprobs, penalties...) or a
misspelled one answers 400 naming the field, instead of being silently ignored and giving a client a
result that looks right but is not what it asked for.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

import orjson

from framework.errors import RequestError

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP = 4  # OpenAI's limit on "stop" sequences
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

# Top-level fields every endpoint reads, and those accepted only to be ignored (they change nothing a
# single-model server computes: bookkeeping, billing tier, parallel tool calls when no tools are allowed).
_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                     "n", "ignore_eos", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty"})
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_CHAT = _COMMON | _IGNORED | {"messages", "max_completion_tokens", "tools", "tool_choice", "functions",
                              "function_call", "top_logprobs", "response_format", "audio", "modalities",
                              "prediction", "reasoning_effort"}
_COMPLETION = _COMMON | _IGNORED | {"prompt", "echo", "best_of", "suffix"}

TOOLS_UNSUPPORTED = "tools and function calling are not supported by this server"


def _bad(message: str, field: str | None) -> RequestError:
    return RequestError(message, field=field, status=400)


# ------------------------------------------------------------------------------------- the request


@dataclasses.dataclass
class GenerationSpec:
    """One validated generation request; ``item()`` is what the inference worker receives."""

    kind: str  # "chat" or "completion"
    prompt: dict  # {"messages": [{"role", "content"}, ...]} for chat; {"text": str} for completions
    model: str | None
    max_tokens: int | None  # None: until the context is full
    temperature: float = 1.0  # OpenAI's default; 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)  # [] when absent or null
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False

    def item(self) -> dict:
        """The JSON-able dict for the worker: the prompt and the sampling options, nothing HTTP-only."""
        return {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "stop": list(self.stop),
                "ignore_eos": self.ignore_eos}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not a token count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_object(body: Any, allowed: frozenset[str]) -> None:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    for key in body:
        if key not in allowed:
            raise _bad(f"unknown field '{key}'; check its spelling (see OpenAI's API reference for this endpoint)",
                       str(key))


def _refuse(body: dict, field: str, ok: Any, why: str) -> None:
    """Answer 400 when ``field`` is present with a value ``ok(value)`` rejects (absent and null are fine)."""
    value = body.get(field)
    if value is not None and not ok(value):
        raise _bad(f"'{field}' is not supported: {why}", field)


def _refuse_unsupported(body: dict) -> None:
    def zero(v: Any) -> bool:
        return _is_number(v) and v == 0

    def empty(v: Any) -> bool:
        return v in ([], {})

    _refuse(body, "tools", empty, f"{TOOLS_UNSUPPORTED}; remove 'tools'")
    _refuse(body, "tool_choice", lambda v: v == "none", f"{TOOLS_UNSUPPORTED}; remove 'tool_choice' or send \"none\"")
    _refuse(body, "functions", empty, f"{TOOLS_UNSUPPORTED}; remove 'functions'")
    _refuse(body, "function_call", lambda v: v == "none", f"{TOOLS_UNSUPPORTED}; remove 'function_call'")
    _refuse(body, "logprobs", lambda v: v is False, "log probabilities are not returned; remove it or send false")
    _refuse(body, "top_logprobs", lambda v: _is_int(v) and v == 0, "log probabilities are not returned; remove it")
    _refuse(body, "logit_bias", empty, "logit bias is not applied; remove it or send {}")
    _refuse(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text" and len(v) == 1,
            "only plain text output; remove it or send {\"type\": \"text\"}")
    _refuse(body, "presence_penalty", zero, "penalties are not applied; remove it or send 0")
    _refuse(body, "frequency_penalty", zero, "penalties are not applied; remove it or send 0")
    _refuse(body, "audio", lambda v: False, "only text output; remove it")
    _refuse(body, "modalities", lambda v: v == ["text"], "only text output; remove it or send [\"text\"]")
    _refuse(body, "prediction", lambda v: False, "predicted outputs are not supported; remove it")
    _refuse(body, "reasoning_effort", lambda v: False, "this model has no reasoning setting; remove it")


def _positive_int(body: dict, field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _bad(f"'{field}' must be an integer >= 1, got {value!r}", field)
    return value


def _number(body: dict, field: str, default: float, low: float, high: float, low_open: bool) -> float:
    value = body.get(field)
    if value is None:
        return default
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _bad(f"'{field}' must be a number in {bounds}, got {value!r}", field)
    return float(value)


def _flag(body: dict, field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{field}' must be true or false, got {value!r}", field)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP:
        raise _bad(f"'stop' must be a string or a list of 1 to {MAX_STOP} strings, got {value!r}", "stop")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            field = "stop" if isinstance(value, str) else f"stop.{i}"
            raise _bad(f"stop sequences must be non-empty strings, got {s!r}", field)
    return list(stops)


def _common(kind: str, body: dict, prompt: dict, max_tokens: int | None) -> GenerationSpec:
    n = body.get("n")
    if n is not None and not (_is_int(n) and n == 1):
        raise _bad(f"'n' must be 1 (one choice per request), got {n!r}; send several requests instead", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {model!r}", "model")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        raise _bad(f"'seed' must be a 64-bit integer, got {seed!r}", "seed")
    stream = _flag(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise _bad(f"'stream_options' must be an object, got {options!r}", "stream_options")
        for key in options:
            if key not in ("include_usage", "include_obfuscation"):
                raise _bad(f"unknown field '{key}' in 'stream_options'; only 'include_usage' is read",
                           f"stream_options.{key}")
        include_usage = _flag(options, "include_usage")
        _flag(options, "include_obfuscation")  # accepted: there is no obfuscation padding to turn off
    return GenerationSpec(
        kind=kind, prompt=prompt, model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, low_open=False),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed, stop=_stop(body), stream=stream, include_usage=include_usage,
        ignore_eos=_flag(body, "ignore_eos"))


def _content(content: Any, field: str) -> str:
    """A message's text: a string, or text parts joined with newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad("'content' must be a string or a non-empty list of {\"type\": \"text\", \"text\": ...} parts",
                   field)
    texts = []
    for j, part in enumerate(content):
        where = f"{field}.{j}"
        if not isinstance(part, dict) or "type" not in part:
            raise _bad("each content part must be an object like {\"type\": \"text\", \"text\": ...}", where)
        if part["type"] != "text":
            raise _bad(f"content parts of type {part['type']!r} are not supported: this model reads text only; "
                       "send {\"type\": \"text\", \"text\": ...} parts", where)
        if not isinstance(part.get("text"), str):
            raise _bad("a text part needs a string 'text'", f"{where}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _message(message: Any, i: int) -> dict:
    field = f"messages.{i}"
    if not isinstance(message, dict):
        raise _bad("each message must be an object like {\"role\": \"user\", \"content\": \"...\"}", field)
    role = message.get("role")
    if role in ("tool", "function"):
        raise _bad(f"messages with role {role!r} are not supported: {TOOLS_UNSUPPORTED}", f"{field}.role")
    if role not in ROLES:
        raise _bad(f"'role' must be one of {', '.join(ROLES)}, got {role!r}", f"{field}.role")
    for key in ("tool_calls", "function_call"):
        if message.get(key) not in (None, []):
            raise _bad(f"{TOOLS_UNSUPPORTED}; remove '{key}' from the message", f"{field}.{key}")
    if message.get("audio") is not None:
        raise _bad("audio in messages is not supported: this model reads text only", f"{field}.audio")
    if "content" not in message:
        raise _bad("missing field 'content'", f"{field}.content")
    # 'name' (and any other key) is ignored: a plain chat template has nowhere to put it.
    return {"role": "system" if role == "developer" else role,
            "content": _content(message["content"], f"{field}.content")}


def parse_chat(body: dict) -> GenerationSpec:
    """Validate a ``/v1/chat/completions`` body; raises ``RequestError`` (400) naming the field."""
    _check_object(body, _CHAT)
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    prompt = {"messages": [_message(m, i) for i, m in enumerate(messages)]}
    max_tokens = _positive_int(body, "max_tokens")
    newer = _positive_int(body, "max_completion_tokens")
    return _common("chat", body, prompt, newer if newer is not None else max_tokens)


def parse_completion(body: dict) -> GenerationSpec:
    """Validate a ``/v1/completions`` body; raises ``RequestError`` (400) naming the field."""
    _check_object(body, _COMPLETION)
    _refuse_unsupported(body)
    if body.get("echo") not in (None, False):
        raise _bad("'echo' is not supported: the prompt is not repeated in the answer; remove it", "echo")
    best_of = body.get("best_of")
    if best_of is not None and not (_is_int(best_of) and best_of == 1):
        raise _bad(f"'best_of' must be 1 (one candidate per request), got {best_of!r}", "best_of")
    if body.get("suffix") is not None:
        raise _bad("'suffix' is not supported: this server does not do insertion; remove it", "suffix")
    if "prompt" not in body:
        raise _bad("missing field 'prompt'", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        tokens = isinstance(prompt, list) and prompt and all(_is_int(t) or isinstance(t, list) for t in prompt)
        what = "token-id prompts are not supported" if tokens else f"got {type(prompt).__name__} {prompt!r:.80}"
        raise _bad(f"'prompt' must be one text prompt per request (a string, or a list of one string); {what}",
                   "prompt")
    return _common("completion", body, {"text": prompt}, _positive_int(body, "max_tokens"))


# ------------------------------------------------------------------------------------ the answers


def new_id(kind: str) -> str:
    """A fresh response id shaped like OpenAI's: ``chatcmpl-<hex>`` for chat, ``cmpl-<hex>`` for completions."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's ``usage`` object (clients bill and benchmark from it)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict:
    """A non-streamed ``chat.completion``: one choice with the assistant's message."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, content: str | None = None, *, role: bool = False,
               finish_reason: str | None = None) -> dict:
    """One ``chat.completion.chunk``: the first (``role=True``), a text delta, or the last (``finish_reason``)."""
    if role:
        delta: dict = {"role": "assistant", "content": ""}
    elif content is not None:
        delta = {"content": content}
    else:
        delta = {}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    """A non-streamed ``text_completion``: one choice with the generated text."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None) -> dict:
    """One streamed ``text_completion`` chunk (OpenAI streams completions with the same object name)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(kind: str, rid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """``stream_options.include_usage``'s extra last chunk: no choices, only ``usage``."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


SSE_DONE: bytes = b"data: [DONE]\n\n"  # the stream's end, which the openai client waits for


def sse(obj: dict) -> bytes:
    """One server-sent event carrying ``obj`` (the framing OpenAI's streams use)."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def models_list(model: str, created: int, owned_by: str = "hydraserve") -> dict:
    """``GET /v1/models``: the one model this server serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": owned_by}]}


# ------------------------------------------------------------------------------------- the errors

_ERROR_TYPES = {400: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (clients map it onto their exception classes)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, for every /v1/ error."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_from_request_error(exc: RequestError) -> tuple[int, dict]:
    """``(status, body)`` for a client mistake on an OpenAI route: ``param`` is the offending field."""
    return exc.status, error_body(exc.status, exc.message, param=exc.field)
