"""Import ``torchvision.models`` even when torchvision's C++ extension cannot load.

Why this exists: torchvision wheels ship a compiled extension (``torchvision/_C.so``) holding the
detection operators (``nms``, ``roi_align``, ...). When the wheel was built for another torch
build (here: the PyPI torchvision 0.28.0 wheel is CUDA-linked, torch is 2.13.0+cpu) the extension
fails to load. torchvision itself tolerates that (``torchvision.extension._has_ops()`` becomes
False), except that ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and registering a kernel for an
operator whose schema was never defined raises ``RuntimeError: operator torchvision::nms does not
exist``, so ``import torchvision`` fails as a whole.

Classification models are pure Python and never call those operators. So, *only* when the import
failed that way *and* torchvision reports that its extension did not load, we define the schemas of
the missing operators (schemas only, no kernels) with ``torch.library`` and import again. Calling
``torchvision.ops.nms`` afterwards still raises torchvision's own "Couldn't load custom C++ ops"
error, as it would without this shim. When the extension loads (a matching install), nothing here
runs: defining the ``torchvision`` namespace ourselves would then clash with the extension's own
``TORCH_LIBRARY`` registration, which is why this is never done up front.
"""

from __future__ import annotations

import re
import sys
import threading
from types import ModuleType
from typing import Any

INSTALL_HINT = "pip install 'hydraserve[vision]'  (torchvision 0.28.0, the release built for torch 2.13)"

# Schemas of the operators torchvision registers fake kernels for at import time, copied from
# torchvision/csrc/ops/nms.cpp and qnms (quantized/cpu/qnms_kernel.cpp) of torchvision 0.28.
_OPERATOR_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

_lock = threading.Lock()
_library: Any = None  # the torch.library.Library holding our schemas; kept alive for the process
shimmed: bool = False  # True when the schemas had to be defined (for describe()/diagnostics)


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _extension_failed() -> bool:
    ext = sys.modules.get("torchvision.extension")
    return ext is not None and not ext._has_ops()


def _define_schemas(names: set[str]) -> None:
    global _library, shimmed
    import torch

    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
    for name in sorted(names):
        _library.define(_OPERATOR_SCHEMAS[name])
    shimmed = True


def import_models() -> ModuleType:
    """Return ``torchvision.models``; raise ``ModuleNotFoundError`` with an install hint if absent."""
    with _lock:
        defined: set[str] = set()
        while True:
            try:
                import torchvision.models

                return torchvision.models
            except ModuleNotFoundError as exc:
                if exc.name in ("torchvision", "torchvision.models"):
                    raise ModuleNotFoundError(f"torchvision is not installed; {INSTALL_HINT}",
                                              name="torchvision") from exc
                raise
            except RuntimeError as exc:
                match = _MISSING_OP.search(str(exc))
                op = match.group(1) if match else None
                if op is None or op not in _OPERATOR_SCHEMAS or op in defined or not _extension_failed():
                    raise
                # Define every known schema at once (nms, then qnms, would otherwise take two rounds).
                todo = set(_OPERATOR_SCHEMAS) - defined
                _forget_partial_import()
                _define_schemas(todo)
                defined |= todo
