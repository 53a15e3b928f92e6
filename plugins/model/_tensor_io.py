"""Tensor-in, tensor-out serving shared by ``model=torchscript`` and ``model=exported``.

A request is ``{"input": ITEM}`` or ``{"input": [ITEM, ...]}`` where an ITEM is a nested list of
shape ``input_shape`` (``-1`` marks a dimension of any size); the answer is
``{"outputs": [OUT, ...]}``, one model output row per item. Shape and dtype are checked in the API
process (``decode``), so a wrong request is a 422 naming the offending item and never reaches the
worker. The model is called with one batched tensor ``[N, *input_shape]``; items whose dynamic
dimensions differ are run as separate groups of equal shape.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from framework import ModelPlugin, RequestError

# dtype name -> numpy kinds a JSON value may decode to for it ("b" bool, "i"/"u" int, "f" float).
DTYPE_KINDS: dict[str, str] = {
    "float32": "fiu", "float16": "fiu", "bfloat16": "fiu", "float64": "fiu",
    "int64": "iu", "int32": "iu", "int16": "iu", "int8": "iu", "uint8": "iu",
    "bool": "b",
}
_KIND_WORDS = {"fiu": "numbers", "iu": "integers", "b": "booleans (true/false)"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def file_fingerprint(path: str | os.PathLike) -> str:
    """Size plus a digest of the first and last MiB: cheap, and changes when the weights change."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def shape_text(shape: list[int] | tuple[int, ...]) -> str:
    return "[" + ", ".join("*" if d == -1 else str(d) for d in shape) + "]"


def _as_array(value: Any) -> np.ndarray | None:
    """``value`` as a numeric/bool array, or None when ragged or not made of numbers."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return arr if arr.dtype.kind in "biuf" else None


def _check_item(arr: np.ndarray, shape: list[int], dtype: str, where: str) -> None:
    kinds = DTYPE_KINDS[dtype]
    if arr.shape != () and 0 in arr.shape:
        raise RequestError(f"'{where}' is empty; expected shape {shape_text(shape)}", field=where)
    if arr.ndim != len(shape) or any(d != -1 and d != a for d, a in zip(shape, arr.shape, strict=True)):
        raise RequestError(f"'{where}' has shape {list(arr.shape)}; expected {shape_text(shape)} "
                           f"(input_shape, '*' = any size)", field=where)
    if arr.dtype.kind not in kinds:
        got = {"b": "booleans", "f": "floats"}.get(arr.dtype.kind, "integers")
        raise RequestError(f"'{where}' must hold {_KIND_WORDS[kinds]} for input_dtype {dtype}, got {got}",
                           field=where)
    if kinds == "iu" and arr.size:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise RequestError(f"'{where}' has values outside the {dtype} range [{info.min}, {info.max}]",
                               field=where)


def check_tensor_item(value: Any, shape: list[int], dtype: str, where: str) -> None:
    """Raise ``RequestError`` (naming ``where``) unless ``value`` is one item of ``shape``/``dtype``."""
    arr = _as_array(value)
    if arr is None:
        raise RequestError(f"'{where}' must be a nested list of {_KIND_WORDS[DTYPE_KINDS[dtype]]} of shape "
                           f"{shape_text(shape)}", field=where)
    _check_item(arr, shape, dtype, where)


def decode_tensor_items(body: dict, shape: list[int], dtype: str, max_items: int,
                        field: str = "input") -> list[Any]:
    """Validate ``body[field]`` as one item or a list of items; return the items (JSON values)."""
    if field not in body:
        raise RequestError(f"missing field '{field}': send one item of shape {shape_text(shape)} or a "
                           f"list of such items", field=field)
    value = body[field]
    rank = len(shape)
    arr = _as_array(value)
    if arr is not None and arr.ndim == rank and not (arr.ndim and arr.shape[0] == 0):
        _check_item(arr, shape, dtype, field)
        return [value]
    if not isinstance(value, list) or not value:
        raise RequestError(f"'{field}' must be one item of shape {shape_text(shape)} ({dtype}) or a "
                           "non-empty list of such items", field=field)
    if len(value) > max_items:
        raise RequestError(f"'{field}' has {len(value)} items; at most {max_items} allowed",
                           field=field, status=413)
    if arr is not None and arr.ndim == rank + 1:
        # Fast path: one array holds every item (same shape); check it once.
        for i in range(len(value)):
            _check_item(arr[i], shape, dtype, f"{field}[{i}]")
        return list(value)
    for i, item in enumerate(value):
        check_tensor_item(item, shape, dtype, f"{field}[{i}]")
    return list(value)


@dataclass
class TensorModelConfig:
    path: str = "???"  # the model file (required)
    input_shape: list[int] = field(default_factory=lambda: [-1])  # one item's shape; -1 = any size
    input_dtype: str = "float32"  # one of DTYPE_KINDS
    max_items: int = 256  # items per request (413 above)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not Path(os.path.expanduser(self.path)).is_file():
            out.append(("path", f"no such file: {self.path}; point it at a saved model file"))
        if any(d != -1 and d < 1 for d in self.input_shape):
            out.append(("input_shape", f"dimensions must be >= 1 or -1 (any size), got {self.input_shape}"))
        if self.input_dtype not in DTYPE_KINDS:
            out.append(("input_dtype", f"must be one of {', '.join(DTYPE_KINDS)}, got '{self.input_dtype}'"))
        if self.max_items < 1:
            out.append(("max_items", f"must be >= 1, got {self.max_items}"))
        return out


@dataclass
class Grouped:
    """A batch whose items differ in a dynamic dimension: one tensor per distinct shape."""

    positions: list[list[int]]  # item positions (in the batch) of each group
    tensors: list[Any]
    size: int

    def __len__(self) -> int:
        return self.size


def _single_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; model=torchscript/exported serve "
                        "models that return one tensor")
    return out


class TensorModel(ModelPlugin):
    """Base of the file-backed tensor models; subclasses implement ``load_module``."""

    task = "tensor"
    Config = TensorModelConfig
    display_name = "tensor"
    #: batch size the model only accepts (an export without a dynamic batch dim); None = any.
    fixed_batch: int | None = None

    def file(self) -> Path:
        return Path(os.path.expanduser(self.config.path)).resolve()

    # --- API process -------------------------------------------------------------------------
    def decode(self, body: dict) -> list[Any]:
        return decode_tensor_items(body, list(self.config.input_shape), self.config.input_dtype,
                                   self.config.max_items)

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"outputs": outputs}

    def identity(self) -> dict:
        if not hasattr(self, "_identity"):
            path = self.file()
            self._identity = {"model": self.display_name, "path": str(path),
                              "weights": file_fingerprint(path),
                              "input_shape": list(self.config.input_shape),
                              "input_dtype": self.config.input_dtype}
        return self._identity

    # --- inference worker --------------------------------------------------------------------
    def load_module(self, path: Path, device: str) -> Any:
        """Load the model file onto ``device``; may set ``fixed_batch``."""
        raise NotImplementedError

    def load(self, device: str) -> None:
        self.device = device
        self.module = self.load_module(self.file(), device)

    def _tensor(self, items: list[Any]) -> Any:
        import torch

        return torch.tensor(items, dtype=torch_dtype(self.config.input_dtype), device=self.device)

    def preprocess(self, items: list[Any]) -> Any:
        if -1 not in self.config.input_shape:
            return self._tensor(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(np.shape(item), []).append(i)
        if len(groups) == 1:
            return self._tensor(items)
        positions = list(groups.values())
        return Grouped(positions, [self._tensor([items[i] for i in pos]) for pos in positions], len(items))

    def _run(self, batch: Any) -> Any:
        import torch

        n, size = batch.shape[0], self.fixed_batch
        if size is None or n == size:
            return _single_tensor(self.module(batch))
        # The model accepts exactly `size` items: run chunks of that size, padding the last one.
        outs = []
        for start in range(0, n, size):
            chunk = batch[start:start + size]
            if chunk.shape[0] < size:
                pad = torch.zeros((size - chunk.shape[0], *chunk.shape[1:]), dtype=chunk.dtype,
                                  device=chunk.device)
                chunk = torch.cat([chunk, pad])
            outs.append(_single_tensor(self.module(chunk)))
        return torch.cat(outs)[:n]

    def forward(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode():
            if isinstance(batch, Grouped):
                return Grouped(batch.positions, [self._run(t) for t in batch.tensors], batch.size)
            return self._run(batch)

    @staticmethod
    def _rows(out: Any) -> list[Any]:
        import torch

        if out.dtype in (torch.float16, torch.bfloat16):  # JSON has no half floats
            out = out.float()
        return out.detach().cpu().tolist()

    def postprocess(self, outputs: Any) -> list[Any]:
        if isinstance(outputs, Grouped):
            rows: list[Any] = [None] * outputs.size
            for pos, out in zip(outputs.positions, outputs.tensors, strict=True):
                for i, row in zip(pos, self._rows(out), strict=True):
                    rows[i] = row
            return rows
        return self._rows(outputs)

    def calibration_items(self) -> list[Any]:
        import torch

        gen = torch.Generator().manual_seed(1234)
        shape = [4 if d == -1 else d for d in self.config.input_shape]
        kinds = DTYPE_KINDS[self.config.input_dtype]
        if kinds == "b":
            data = torch.rand(16, *shape, generator=gen) > 0.5
        elif kinds == "iu":
            data = torch.randint(0, 2, (16, *shape), generator=gen)
        else:
            data = torch.randn(16, *shape, generator=gen)
        return data.tolist()

    def quality(self, reference: Any, candidate: Any) -> dict:
        """Per-item cosine similarity of the flattened outputs, and the largest absolute error."""
        import torch

        pairs = [(reference, candidate)]
        if isinstance(reference, Grouped):
            pairs = list(zip(reference.tensors, candidate.tensors, strict=True))
        cosines, errors = [], []
        for ref, cand in pairs:
            ref, cand = ref.float().reshape(ref.shape[0], -1), cand.float().reshape(cand.shape[0], -1)
            cosines.append(torch.nn.functional.cosine_similarity(ref, cand, dim=1))
            errors.append(float((ref - cand).abs().max()))
        cos = torch.cat(cosines)
        return {"metric": "cosine", "min": float(cos.min()), "mean": float(cos.mean()),
                "max_abs_error": max(errors)}
