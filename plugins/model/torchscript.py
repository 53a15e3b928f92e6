"""``model=torchscript model.path=FILE model.input_shape=[8]``: a TorchScript file, tensor in, tensor out.

The file is what ``torch.jit.script(m).save(FILE)`` or ``torch.jit.trace(m, x).save(FILE)`` writes.
Loading runs TorchScript code from the file: serve only files you trust (they are configuration, never
request data). A request is ``{"input": ITEM}`` or ``{"input": [ITEM, ...]}``; see ``_tensor_io``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugins.model._tensor_io import TensorModel


class TorchScriptModel(TensorModel):
    display_name = "torchscript"

    def load_module(self, path: Path, device: str) -> Any:
        import torch

        module = torch.jit.load(str(path), map_location=device)
        return module.eval()


PLUGIN = TorchScriptModel
