"""The ``litserve_raw`` baseline's LitAPI: the configured model plugin's hooks on stock LitServe.

The model is prepared exactly as a hydraserve worker prepares it (``framework.engine.prepare_model``:
load, quantize, quality gate, compile + warm-up) and batches are padded to the hardware plugin's
buckets as the worker does, so the comparison is about the serving path, not the model.

A module of its own, imported only by the baseline subprocess: LitServe pickles the LitAPI into
its spawned workers, so the class must be importable by name (not defined inside a function).
"""

from __future__ import annotations

from typing import Any

import litserve as ls
from fastapi import HTTPException


def _builtin(value: Any) -> Any:
    """numpy arrays and scalars (anywhere in the structure) as Python lists and numbers, which
    LitServe's JSON encoder (FastAPI's ``jsonable_encoder``) understands."""
    if isinstance(value, dict):
        return {k: _builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_builtin(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class RawModelAPI(ls.LitAPI):
    """decode -> preprocess -> forward -> postprocess -> encode, batched by LitServe itself."""

    def __init__(self, config: dict, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config  # plain data: pickles into the workers; models load in setup()

    def setup(self, device: str) -> None:
        from framework.config import validate
        from framework.engine import prepare_model, warmup_batch_sizes

        resolved = validate(self.config)
        self.model, self.hardware = resolved.model, resolved.hardware
        prepare_model(self.model, resolved.quantization, self.hardware, str(device),
                      warmup_batch_sizes(self.hardware, resolved.batching.max_batch_size))

    # No annotations on ``request`` or the return of ``encode_response``: LitServe turns them into
    # the endpoint's request/response types (plain dict in, JSON out is what we want).
    def decode_request(self, request, **kwargs: Any):
        from framework import RequestError

        try:
            return self.model.decode(request), request
        except RequestError as exc:
            raise HTTPException(status_code=exc.status, detail=exc.to_body()) from exc

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def unbatch(self, output: list) -> list:
        return list(output)

    def predict(self, x: Any, **kwargs: Any) -> Any:
        requests = x if self.max_batch_size > 1 else [x]
        flat = [item for items, _ in requests for item in items]
        n = len(flat)
        padded = flat + [flat[-1]] * (max(self.hardware.pad_batch_size(n), n) - n)  # compiled shapes
        outputs = self.model.postprocess(self.model.forward(self.model.preprocess(padded)))[:n]
        answers, start = [], 0
        for items, body in requests:
            answers.append((list(outputs[start:start + len(items)]), body))
            start += len(items)
        return answers if self.max_batch_size > 1 else answers[0]

    def encode_response(self, output: Any, **kwargs: Any):
        outs, body = output
        return _builtin(self.model.encode(outs, body))
