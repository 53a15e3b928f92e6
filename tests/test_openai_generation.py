"""OpenAI-compatible generation without a server: request validation, answer shapes, error objects.

Every answer builder is checked against the official ``openai`` client's pydantic types, so a shape the
client cannot read fails here rather than in a user's program. The /v1/ error bodies of the API-key
middleware and of Starlette's own errors are checked on small in-process apps (Starlette's TestClient).
"""

from __future__ import annotations

import orjson
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from framework import openai_generation as g
from framework import security
from framework.errors import RequestError

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> g.GenerationSpec:
    return g.parse_chat({"messages": USER, **fields})


def completion(**fields) -> g.GenerationSpec:
    return g.parse_completion({"prompt": "Once upon", **fields})


def refused(parse, body: dict) -> RequestError:
    with pytest.raises(RequestError) as err:
        parse(body)
    assert err.value.status == 400, err.value.message
    return err.value


# ------------------------------------------------------------------------------------ parsing


def test_chat_defaults_and_item():
    spec = chat()
    assert spec.kind == "chat" and spec.model is None and spec.max_tokens is None
    assert (spec.temperature, spec.top_p, spec.seed, spec.stop) == (1.0, 1.0, None, [])
    assert (spec.stream, spec.include_usage, spec.ignore_eos) == (False, False, False)
    assert spec.item() == {"prompt": {"messages": USER}, "max_tokens": None, "temperature": 1.0, "top_p": 1.0,
                           "seed": None, "stop": [], "ignore_eos": False}
    orjson.dumps(spec.item())  # JSON-able: it travels to the worker


def test_chat_options_reach_the_item():
    spec = chat(model="m", max_tokens=7, temperature=0, top_p=0.5, seed=42, stop="\n", ignore_eos=True,
                stream=True, stream_options={"include_usage": True}, n=1, user="u", metadata={"a": "b"},
                store=False, service_tier="auto", parallel_tool_calls=True)
    assert spec.model == "m" and spec.stream and spec.include_usage
    assert spec.item() == {"prompt": {"messages": USER}, "max_tokens": 7, "temperature": 0.0, "top_p": 0.5,
                           "seed": 42, "stop": ["\n"], "ignore_eos": True}
    assert isinstance(spec.item()["temperature"], float)


def test_nulls_mean_the_defaults():
    spec = chat(model=None, max_tokens=None, temperature=None, top_p=None, seed=None, stop=None, stream=None,
                stream_options=None, n=None, tools=None, logprobs=None, response_format=None, ignore_eos=None)
    assert spec.item() == chat().item() and not spec.stream


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_completion_tokens=5, max_tokens=9).max_tokens == 5
    assert chat(max_tokens=9).max_tokens == 9
    assert chat(max_completion_tokens=3).max_tokens == 3


def test_default_settings_sent_explicitly_are_accepted():
    chat(tools=[], tool_choice="none", functions=[], function_call="none", logprobs=False, top_logprobs=0,
         logit_bias={}, response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0.0,
         modalities=["text"])
    completion(echo=False, best_of=1, logprobs=None, logit_bias={}, presence_penalty=0)


def test_content_parts_are_joined_and_developer_is_system():
    spec = g.parse_chat({"messages": [
        {"role": "developer", "content": "be brief", "name": "ops"},
        {"role": "system", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "user", "content": "q", "name": "alice"},
        {"role": "assistant", "content": "a", "tool_calls": None, "refusal": None},
    ]})
    assert spec.prompt == {"messages": [{"role": "system", "content": "be brief"},
                                        {"role": "system", "content": "one\ntwo"},
                                        {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}]}


def test_completion_prompt_forms():
    assert completion().prompt == {"text": "Once upon"}
    assert g.parse_completion({"prompt": ["only one"]}).prompt == {"text": "only one"}
    spec = completion(max_tokens=4, stop=["a", "b"])
    assert spec.kind == "completion" and spec.item()["prompt"] == {"text": "Once upon"}
    assert spec.item()["max_tokens"] == 4 and spec.item()["stop"] == ["a", "b"]


@pytest.mark.parametrize("body, field", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages.0"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [*USER, {"role": "tool", "content": "x", "tool_call_id": "c"}]}, "messages.1.role"),
    ({"messages": [*USER, {"role": "function", "content": "x", "name": "f"}]}, "messages.1.role"),
    ({"messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c", "type": "function"}]}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [*USER, {"role": "user", "content": 5}]}, "messages.1.content"),
    ({"messages": [*USER, {"role": "user", "content": None}]}, "messages.1.content"),
    ({"messages": [*USER, {"role": "user", "content": []}]}, "messages.1.content"),
    ({"messages": [*USER, {"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages.1.content.1"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
])
def test_bad_messages_name_the_field(body, field):
    err = refused(g.parse_chat, body)
    assert err.field == field, (err.field, err.message)


@pytest.mark.parametrize("fields, field", [
    ({"n": 2}, "n"), ({"n": True}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"seed": 1.5}, "seed"), ({"seed": "1"}, "seed"), ({"seed": False}, "seed"), ({"seed": 2**70}, "seed"),
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"stream": True, "stream_options": {"include_usge": True}}, "stream_options.include_usge"),
    ({"stream": True, "stream_options": True}, "stream_options"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": []}, "stop"), ({"stop": 5}, "stop"),
    ({"stop": ""}, "stop"), ({"stop": ["ok", ""]}, "stop.1"), ({"stop": ["ok", 3]}, "stop.1"),
    ({"ignore_eos": "true"}, "ignore_eos"), ({"model": 3}, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"prediction": {"type": "content", "content": "x"}},
                                                        "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"temprature": 0.2}, "temprature"), ({"max_new_tokens": 5}, "max_new_tokens"),
    ({"prompt": "x"}, "prompt"), ({"echo": True}, "echo"),
])
def test_chat_refusals_name_their_field(fields, field):
    err = refused(g.parse_chat, {"messages": USER, **fields})
    assert err.field == field, (err.field, err.message)
    assert field.split(".")[-1] in err.message or field.split(".")[0] in err.message, err.message


@pytest.mark.parametrize("fields, field", [
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": [[1, 2], [3]]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": []}, "prompt"), ({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"),
    ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"suffix": " the end"}, "suffix"),
    ({"logprobs": 2}, "logprobs"), ({"logprobs": 0}, "logprobs"), ({"n": 3}, "n"),
    ({"max_tokens": False}, "max_tokens"), ({"top_p": -1}, "top_p"),
    ({"messages": USER}, "messages"), ({"max_completion_tokens": 5}, "max_completion_tokens"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_completion_refusals_name_their_field(fields, field):
    err = refused(g.parse_completion, {"prompt": "Once upon", **fields})
    assert err.field == field, (err.field, err.message)


def test_refusal_messages_say_what_to_do():
    assert "unknown field 'temprature'" in refused(g.parse_chat, {"messages": USER, "temprature": 1}).message
    assert "one text prompt per request" in refused(g.parse_completion, {"prompt": ["a", "b"]}).message
    assert "token-id" in refused(g.parse_completion, {"prompt": [1, 2]}).message
    assert "not supported" in refused(g.parse_chat, {"messages": USER, "tools": [{"type": "function"}]}).message
    part = {"type": "image_url", "image_url": {"url": "x"}}
    assert "image_url" in refused(g.parse_chat, {"messages": [{"role": "user", "content": [part]}]}).message
    assert "stream" in refused(g.parse_chat, {"messages": USER, "stream_options": {}}).message
    missing = refused(g.parse_completion, {})
    assert missing.field == "prompt" and "missing" in missing.message


def test_a_body_that_is_not_an_object_is_400():
    assert refused(g.parse_chat, [1, 2]).status == 400
    assert refused(g.parse_completion, "text").status == 400


def test_stream_options_with_stream_and_obfuscation_flag():
    spec = chat(stream=True, stream_options={"include_usage": False, "include_obfuscation": False})
    assert spec.stream and not spec.include_usage
    assert chat(stream=True, stream_options={}).include_usage is False


# ----------------------------------------------------------------------------------- answers


def test_ids():
    a, b = g.new_id("chat"), g.new_id("chat")
    assert a.startswith("chatcmpl-") and a != b and int(a.split("-", 1)[1], 16) >= 0
    assert g.new_id("completion").startswith("cmpl-")


def test_usage():
    assert g.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_chat_response_reads_as_a_chat_completion(reason):
    body = g.chat_response("chatcmpl-1", 1700000000, "m", "Hello!", reason, 5, 2)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion" and parsed.id == "chatcmpl-1" and parsed.model == "m"
    assert parsed.created == 1700000000 and len(parsed.choices) == 1
    choice = parsed.choices[0]
    assert choice.index == 0 and choice.finish_reason == reason
    assert choice.message.role == "assistant" and choice.message.content == "Hello!"
    assert parsed.usage.total_tokens == 7 and parsed.usage.prompt_tokens == 5
    assert orjson.loads(orjson.dumps(body)) == body


def test_chat_chunks_read_as_chunks():
    first = ChatCompletionChunk.model_validate(g.chat_chunk("chatcmpl-1", 1, "m", role=True))
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    mid = g.chat_chunk("chatcmpl-1", 1, "m", "Hel")
    assert mid["choices"][0]["delta"] == {"content": "Hel"}
    assert ChatCompletionChunk.model_validate(mid).choices[0].delta.content == "Hel"
    last = g.chat_chunk("chatcmpl-1", 1, "m", finish_reason="length")
    assert last["choices"][0]["delta"] == {}
    assert ChatCompletionChunk.model_validate(last).choices[0].finish_reason == "length"
    assert g.chat_chunk("chatcmpl-1", 1, "m", "")["choices"][0]["delta"] == {"content": ""}


def test_chat_usage_chunk():
    body = g.usage_chunk("chat", "chatcmpl-1", 1, "m", 5, 3)
    parsed = ChatCompletionChunk.model_validate(body)
    assert parsed.choices == [] and parsed.usage.total_tokens == 8
    assert parsed.object == "chat.completion.chunk"


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_completion_response_reads_as_a_completion(reason):
    parsed = Completion.model_validate(g.completion_response("cmpl-1", 2, "m", " a time", reason, 2, 3))
    assert parsed.object == "text_completion" and parsed.id == "cmpl-1"
    assert parsed.choices[0].text == " a time" and parsed.choices[0].finish_reason == reason
    assert parsed.choices[0].index == 0 and parsed.usage.completion_tokens == 3


def test_completion_chunks_and_usage_chunk():
    from openai._models import construct_type

    body = g.completion_chunk("cmpl-1", 2, "m", " a")
    # OpenAI streams "finish_reason": null until the last chunk, which the non-streamed Completion type
    # does not allow; the client reads stream chunks with construct_type (no validation), as here.
    assert body["choices"][0]["finish_reason"] is None
    mid = construct_type(type_=Completion, value=body)
    assert isinstance(mid, Completion) and mid.choices[0].text == " a" and mid.usage is None
    # Everything else in the chunk is strictly valid.
    Completion.model_validate({**body, "choices": [{**body["choices"][0], "finish_reason": "stop"}]})
    last = Completion.model_validate(g.completion_chunk("cmpl-1", 2, "m", "", finish_reason="stop"))
    assert last.choices[0].finish_reason == "stop"
    tail = Completion.model_validate(g.usage_chunk("completion", "cmpl-1", 2, "m", 2, 3))
    assert tail.choices == [] and tail.usage.total_tokens == 5 and tail.object == "text_completion"


def test_models_list():
    from openai.pagination import SyncPage

    body = g.models_list("tiny-llama", 1700000000)
    assert body["object"] == "list"
    model = Model.model_validate(body["data"][0])
    assert (model.id, model.object, model.created, model.owned_by) == ("tiny-llama", "model", 1700000000,
                                                                      "hydraserve")
    assert SyncPage[Model].model_validate(body).data[0].id == "tiny-llama"
    assert g.models_list("x", 0, owned_by="me")["data"][0]["owned_by"] == "me"


def test_sse_framing():
    event = g.sse({"a": "é", "b": [1]})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert orjson.loads(event[len(b"data: "):-2]) == {"a": "é", "b": [1]}
    assert g.SSE_DONE == b"data: [DONE]\n\n"


def test_sse_stream_reads_with_the_openai_client_decoder():
    from openai._streaming import SSEDecoder

    chunks = [g.chat_chunk("c", 1, "m", role=True), g.chat_chunk("c", 1, "m", "hi"),
              g.chat_chunk("c", 1, "m", finish_reason="stop")]
    raw = b"".join(g.sse(c) for c in chunks) + g.SSE_DONE
    events = list(SSEDecoder().iter_bytes(iter([raw])))
    assert [e.data for e in events[:-1]] == [orjson.dumps(c).decode() for c in chunks]
    assert events[-1].data == "[DONE]"


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (408, "invalid_request_error"), (413, "invalid_request_error"),
    (422, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (429, "rate_limit_error"), (503, "service_unavailable"), (504, "timeout"),
    (500, "server_error"), (502, "server_error"),
])
def test_error_type_per_status(status, kind):
    body = g.error_body(status, "oops")
    assert body == {"error": {"message": "oops", "type": kind, "param": None, "code": None}}


def test_error_body_param_and_code():
    body = g.error_body(404, "The model 'x' does not exist", param="model", code="model_not_found")
    assert body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"


def test_error_from_request_error_keeps_status_and_field():
    err = refused(g.parse_chat, {"messages": USER, "n": 2})
    status, body = g.error_from_request_error(err)
    assert status == 400
    assert body == {"error": {"message": err.message, "type": "invalid_request_error", "param": "n", "code": None}}
    assert g.error_from_request_error(RequestError("bad", field="input[0]")) == (
        422, {"error": {"message": "bad", "type": "invalid_request_error", "param": "input[0]", "code": None}})


def test_error_body_maps_onto_the_client_exceptions():
    import httpx
    import openai

    client = openai.OpenAI(api_key="k", base_url="http://test/v1", max_retries=0)
    for status, cls in [(400, openai.BadRequestError), (401, openai.AuthenticationError),
                        (404, openai.NotFoundError), (503, openai.InternalServerError)]:
        body = g.error_body(status, "why", param="p", code="c")
        response = httpx.Response(status, json=body, request=httpx.Request("POST", "http://test/v1/x"))
        err = client._make_status_error_from_response(response)
        assert isinstance(err, cls) and err.code == "c" and err.param == "p" and err.type == body["error"]["type"]
        assert "why" in err.message


def test_embeddings_errors_are_400_with_their_field():
    from framework import openai_compat

    for body, field in [({}, "input"), ({"input": [1, 2]}, "input"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "x", "dimensions": 8}, "dimensions")]:
        with pytest.raises(RequestError) as err:
            openai_compat.request_items(body)
        assert (err.value.status, err.value.field) == (400, field)
        assert g.error_from_request_error(err.value)[1]["error"]["param"] == field


# ------------------------------------------------------- /v1/ error bodies from security.py, in-process


def _app(key: str | None = "k3y"):
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None)
    security.install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_route():
        return {"ok": True}

    @app.get("/v1/n/{number}")
    async def number(number: int):
        return {"n": number}

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.post("/predict")
    async def predict():
        return {"ok": True}

    app.add_middleware(security.ApiKeyMiddleware, key=key, public_paths=("/health",))
    return app


def _openai_error(r, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind
    return body["error"]


def test_v1_api_key_errors_are_openai_error_objects():
    from starlette.testclient import TestClient

    client = TestClient(_app())
    err = _openai_error(client.post("/v1/chat/completions"), 401, "authentication_error")
    assert err["code"] == "invalid_api_key" and "didn't provide" in err["message"]
    r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"})
    err = _openai_error(r, 401, "authentication_error")
    assert err["code"] == "invalid_api_key" and "Incorrect API key" in err["message"] and "wrong" not in r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.post("/v1/chat/completions", headers={"Authorization": "Bearer k3y"}).json() == {"ok": True}
    # Other paths keep hydraserve's own body.
    assert client.post("/predict").json() == orjson.loads(security.UNAUTHORIZED)


def test_the_openai_client_sees_an_authentication_error():
    import openai
    from starlette.testclient import TestClient

    client = openai.OpenAI(api_key="wrong", base_url="http://testserver/v1", max_retries=0,
                           http_client=TestClient(_app()))
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "invalid_api_key"


def test_v1_routing_validation_and_server_errors_are_openai_error_objects():
    from starlette.testclient import TestClient

    client = TestClient(_app(key=None), raise_server_exceptions=False)
    err = _openai_error(client.get("/v1/nope"), 404, "not_found_error")
    assert "/v1/nope" in err["message"]
    r = client.get("/v1/chat/completions")
    err = _openai_error(r, 405, "invalid_request_error")
    assert "GET" in err["message"] and "POST" in err["message"] and r.headers["Allow"] == "POST"
    err = _openai_error(client.get("/v1/n/seven"), 422, "invalid_request_error")
    assert err["param"] == "path.number"
    err = _openai_error(client.get("/v1/boom"), 500, "server_error")
    assert "server log" in err["message"]
    # Other paths keep {"error", "detail"}.
    assert set(client.get("/nope").json()) == {"error", "detail"}
    assert set(client.get("/predict").json()) == {"error", "detail"}
