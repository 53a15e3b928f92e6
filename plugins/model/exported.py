"""``model=exported model.path=FILE.pt2 model.input_shape=[8]``: a ``torch.export`` program, tensor in/out.

The file is what ``torch.export.save(torch.export.export(m, (x,)), FILE)`` writes. Export with a dynamic
batch dimension (``dynamic_shapes=({0: torch.export.Dim("batch")},)``) so any batch size runs in one
call; a program exported with a fixed batch size is run in chunks of that size (the last one padded).
``input_shape`` and ``input_dtype`` are checked against the program when it loads.
``torch.export.load`` unpickles parts of the file: serve only files you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugins.model._tensor_io import TensorModel, shape_text, torch_dtype


def _user_input_spec(program: Any) -> list[Any]:
    """Fake tensors describing the program's user inputs (parameters and buffers excluded)."""
    names = set(program.graph_signature.user_inputs)
    return [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


class ExportedModel(TensorModel):
    display_name = "exported"

    def _check_signature(self, program: Any) -> int | None:
        """Compare the program's input with the config; return its fixed batch size, if any."""
        specs = _user_input_spec(program)
        if len(specs) != 1 or specs[0] is None or not hasattr(specs[0], "shape"):
            raise ValueError(f"model.path: {self.config.path} takes {len(specs)} inputs; model=exported "
                             "serves programs with exactly one tensor input")
        spec = specs[0]
        declared = list(self.config.input_shape)
        dims = list(spec.shape)
        item_dims = dims[1:]
        want = torch_dtype(self.config.input_dtype)
        if spec.dtype != want:
            raise ValueError(f"model.input_dtype: the program takes {str(spec.dtype).replace('torch.', '')}, "
                             f"the config says {self.config.input_dtype}")
        program_shape = [d if isinstance(d, int) else -1 for d in item_dims]
        fits = len(program_shape) == len(declared) and all(
            p == -1 or p == d for p, d in zip(program_shape, declared, strict=True))
        if not fits:
            raise ValueError(f"model.input_shape: the program takes items of shape "
                             f"{shape_text(program_shape)} (after the batch dimension), the config says "
                             f"{shape_text(declared)}")
        return dims[0] if dims and isinstance(dims[0], int) else None

    def load_module(self, path: Path, device: str) -> Any:
        import torch

        program = torch.export.load(str(path))
        self.fixed_batch = self._check_signature(program)
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()


PLUGIN = ExportedModel
