"""OpenAI-compatible ``POST /v1/embeddings``, so the official ``openai`` client works unchanged.

The client asks for ``encoding_format="base64"`` by default (little-endian float32), so both
``float`` and ``base64`` are served. A malformed body is a 400 (OpenAI's ``invalid_request_error`` status);
the HTTP layer turns the ``RequestError`` into OpenAI's error object with ``param`` = its ``field``.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from framework.errors import RequestError

ENCODINGS = ("float", "base64")


def request_items(body: dict) -> tuple[dict, str]:
    """The ``/predict``-shaped body for the model's ``decode`` and the encoding format asked for."""
    if "input" not in body:
        raise RequestError("missing field 'input'", field="input", status=400)
    value = body["input"]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value) or (
        isinstance(value, list) and value and all(isinstance(v, list) for v in value)
    ):
        raise RequestError("token-id inputs are not supported; send text", field="input", status=400)
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ENCODINGS:
        raise RequestError(f"'encoding_format' must be one of {', '.join(ENCODINGS)}, got {fmt!r}",
                           field="encoding_format", status=400)
    if body.get("dimensions") is not None:
        raise RequestError("'dimensions' is not supported by this model; omit it", field="dimensions", status=400)
    return {"input": value}, fmt


def _vector(output: Any) -> np.ndarray:
    vec = output["embedding"] if isinstance(output, dict) else output
    return np.asarray(vec, dtype=np.float32)


def response(outputs: list[Any], fmt: str, model_name: str) -> dict:
    data = []
    for i, output in enumerate(outputs):
        vec = _vector(output)
        embedding: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode() if fmt == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(int(o.get("tokens", 0)) for o in outputs if isinstance(o, dict))
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
