"""Response-cache keys: what makes two requests "the same request" for the cache.

A key is the SHA-256 of two parts:

* the **scope** (``cache_scope``): a digest of everything about the *server* that shapes an answer:
  the model identity (plugin, path, **weights fingerprint**, tokenizer/pooling settings, from
  ``ModelPlugin.identity()``), the quantization plugin name and parameters, and the preprocessing
  config (the model group's parameters). The request handler appends the route and the response
  format (``/predict`` and ``/v1/embeddings`` answer the same items with different bodies), so a
  scope names exactly one way of turning items into response bytes. The semantic cache only ever
  compares requests within one scope.
* the request's **decoded items** (``ModelPlugin.decode``), as canonical JSON: orjson with sorted
  keys, so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are one key while ``"1"`` and ``1`` are two.

Changing any part (new weights, another quantization scheme or parameter, another ``max_length``,
another route, one more character in an input) changes the key, so a cache never serves an answer
computed under another configuration: stale entries are simply never looked up again and age out
through the store's size limit / TTL. ``KEY_VERSION`` is part of every scope; bump it whenever the
key recipe or the cached body format changes, and every existing entry is orphaned at once.

Items that are not JSON (bytes, numpy arrays, tensors, PIL images, paths) are reduced to a typed
digest of their content (dtype and shape included), never to ``str()`` or ``repr()``, which can
elide data. Anything else raises ``TypeError``: an item the key cannot describe must not be cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import orjson

#: Bump when the key recipe or the stored response format changes: orphans every existing entry.
KEY_VERSION = 1

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _default(obj: Any) -> Any:
    """Canonical, content-based stand-ins for the non-JSON values items and identities may hold."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": _digest(bytes(obj))}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=lambda v: orjson.dumps(v, default=_default, option=_OPTIONS))
    if isinstance(obj, tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    kind = type(obj).__module__.split(".")[0]
    if kind == "numpy" and hasattr(obj, "dtype"):
        import numpy as np

        arr = np.ascontiguousarray(obj)
        if arr.dtype.hasobject:
            raise TypeError("numpy arrays of Python objects cannot be part of a cache key")
        return {"__ndarray__": [str(arr.dtype), list(arr.shape), _digest(arr.tobytes())]}
    if kind == "torch" and hasattr(obj, "detach"):
        arr = obj.detach().cpu().contiguous()
        raw = arr.view(-1).view(_u8()).numpy().tobytes()  # any dtype, bfloat16 included
        return {"__tensor__": [str(arr.dtype), list(arr.shape), _digest(raw)]}
    if kind == "PIL" and hasattr(obj, "tobytes"):
        return {"__image__": [obj.mode, list(obj.size), _digest(obj.tobytes())]}
    raise TypeError(f"cannot build a cache key from a {type(obj).__module__}.{type(obj).__name__}; "
                    "return JSON values, bytes, numpy arrays, tensors or PIL images from decode()")


def _u8() -> Any:
    import torch

    return torch.uint8


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes (sorted keys; non-JSON values as typed content digests)."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        # orjson replaces the message raised in ``default``; surface the one that says what to do.
        raise TypeError(str(exc.__cause__ or exc)) from exc


def cache_scope(model_identity: dict, quantization: dict, preprocessing: dict, numerics: dict | None = None) -> str:
    """Digest of the server-side configuration an answer depends on (see the module docstring).

    ``model_identity`` is ``ModelPlugin.identity()`` (must include the weights fingerprint),
    ``quantization`` the quantization group node (plugin ``name`` and parameters), and
    ``preprocessing`` the model group node (tokenizer length, normalisation, buckets, ...).
    ``numerics``: what the hardware plugin does to the numbers besides quantization (another runtime,
    its own int8, from its ``numerics()``); empty or ``None`` leaves the scope as it always was.
    """
    payload = {"v": KEY_VERSION, "model": model_identity, "quantization": quantization,
               "preprocessing": preprocessing}
    if numerics:
        payload["hardware"] = numerics
    return _digest(canonical_json(payload))


def cache_key(scope: str, items: list) -> str:
    """Digest of ``scope`` and the request's decoded items (canonical JSON)."""
    h = hashlib.sha256(scope.encode())
    h.update(b"\x00")
    h.update(canonical_json(items))
    return h.hexdigest()
