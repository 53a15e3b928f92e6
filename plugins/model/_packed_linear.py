"""Linear layers on oneDNN with weights packed once: the CPU kernel choice of an eager decode step.

The generation engine packs its model (``_llama_batched.py``) and the hardware plugins pack an eager
one-shot model before its warm-up (``plugins/hardware/_base.py``), both under ``hardware.packed_weights``.

On a CPU a decode step is a chain of skinny matrix products (one to a few dozen rows against each
weight matrix), bound by reading the weights. torch's ``F.linear`` runs those through MKL's GEMV/GEMM
on the plain row-major weight; oneDNN's matmul on a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU freezing pass uses) read the same
bytes markedly faster on this project's 2-core AVX2 machine: all of SmolLM2-135M's 211 fp32 weight
matrices took 34.7 ms at 1 row, 37.4 at 4 and 60.1 at 16 against 58.4, 70.9 and 99.8 ms through
``F.linear``, in the same process (``benchmarks/packed_linear.py``). The layout is reordered for a
batch of 16 rows: it measured best at every batch size from 1 to 64.

The packed weight replaces the module's own (the module is swapped), so the weights are not held
twice; a weight shared with another module (a tied LM head is the embedding table) stays where it is
and the packed copy is extra. Only plain float32 ``nn.Linear`` weights on the CPU are packed: a
quantized weight (a torchao tensor subclass) keeps its own kernel, and oneDNN's bf16 matmul needs
AVX512-BF16 or AMX. The result differs from ``F.linear``'s only in the order of its float32 sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PACK_ROWS", "PackedLinear", "available", "pack_linears"]

PACK_ROWS = 16  # the batch the layout is chosen for (oneDNN's hint); measured best from 1 to 64 rows


def available() -> bool:
    """oneDNN is built into this torch and exposes the packed linear ops."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward on a oneDNN-packed weight (any leading dimensions, as ``F.linear``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            # A buffer, not a parameter: an opaque oneDNN tensor has no autograd or state-dict meaning.
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS),
                                 persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # type(...) is: a torchao subclass (Int8Tensor, AffineQuantizedTensor, ...) has its own kernel.
    # A module with hooks is left as it is: swapping it would drop them (quantization=bf16 keeps a
    # skipped layer in float32 with hooks that cast its input and output at the boundary).
    return (type(module) is nn.Linear and type(weight) in (torch.Tensor, nn.Parameter)
            and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and not (module._forward_pre_hooks or module._forward_hooks))


def pack_linears(model: nn.Module) -> dict[str, Any]:
    """Swap every packable ``nn.Linear`` of ``model`` for a :class:`PackedLinear`, in place.

    Returns ``{"packed_linears": n, "packed_extra_mib": m}``: ``m`` is the packed copies of weights
    another module still holds (a tied LM head). Nothing changes when oneDNN is unavailable.
    """
    if not available():
        return {"packed_linears": 0, "packed_extra_mib": 0.0}
    shared = {id(p) for m in model.modules() if not _packable(m) for p in m.parameters(recurse=False)}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if _packable(child)]
    extra = 0
    for parent, name, child in swaps:
        if id(child.weight) in shared:
            extra += child.weight.numel() * child.weight.element_size()
        setattr(parent, name, PackedLinear(child))
    return {"packed_linears": len(swaps), "packed_extra_mib": round(extra / 2**20, 1)}
