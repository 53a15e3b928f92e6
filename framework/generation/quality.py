"""The quality gate for quantized generative models: does the rewritten causal LM still say the same thing?

A cosine between outputs (the one-shot models' gate, ``framework.engine.quality_gate``) says little
about a language model: what matters is which token it picks. ``quantize_and_gate`` keeps a
full-precision copy of ``model.module``, applies the quantization plugin in place, and compares the two
on the model's calibration prompts (``GenerativeModelPlugin.calibration_prompts()``, plus
``quantization.calibration_file``):

* **token agreement** (the gated metric, ``quality["token_agreement"]``): the reference generates
  ``GATE_TOKENS`` greedy tokens per prompt; the quantized model reads the same prompt + those tokens
  in one forward (teacher forcing) and we count the positions where its argmax is the reference's
  token, over all prompts together. A near-tie that flips one token costs one position, not the rest
  of the answer, so the number is stable enough to gate on. Its floor is the model's
  ``min_token_agreement`` (``model.min_token_agreement``, 0.9; ``null`` measures without refusing), see
  ``gate_floor``. ``quantization.min_quality`` is the one-shot models' cosine floor and does not apply: the
  same numeric error costs a language model more in token agreement than in cosine.
* **greedy prefix agreement** (reported, not gated, ``quality["greedy_prefix_agreement"]``): both models
  generate ``GATE_TOKENS`` greedy tokens on their own; the fraction of positions before the first
  divergence, the mean over prompts (the worst is ``greedy_prefix_worst``). What a user would see
  with temperature=0, but one early near-tie makes it 0, so it is reported only.
* **perplexity ratio** (reported, not gated): perplexity of the quantized model over the
  reference's on a short English paragraph (``PERPLEXITY_TEXT``); 1.0 is no loss.

Both models run through plain Hugging Face forwards (``module(input_ids)`` / ``module.generate``),
the same code for both, so only the weights differ. The reference is freed before returning.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from framework.engine import QualityGateError
from framework.errors import RequestError

GATE_TOKENS = 32  # greedy tokens per calibration prompt
DEFAULT_FLOOR = 0.9  # token agreement floor of a model config without min_token_agreement
MAX_PROMPT_TOKENS = 256  # a calibration prompt is cut to its last this many tokens

#: A plain English paragraph for the perplexity check (written for this gate; no data set needed).
PERPLEXITY_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Most people come to "
    "read the newspapers, borrow a book for the weekend, or use the computers near the window. On "
    "Saturdays the children's room is busy: a volunteer reads stories aloud, and the younger ones sit "
    "on the carpet while their parents look for cookbooks and travel guides. The building is old, "
    "but the roof was repaired last year, and the town plans to add a small garden behind it where "
    "visitors can sit in the shade when the weather is warm."
)

#: The calibration prompts ``GenerativeModelPlugin.calibration_prompts`` returns by default.
DEFAULT_CALIBRATION_PROMPTS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Write a short poem about the sea."}]},
    {"messages": [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Give me three tips for learning to cook."}]},
]


class GenerationQualityGateError(QualityGateError):
    """The quantized causal LM picks other tokens than the full-precision one more than allowed."""

    def __init__(self, scheme: str, measured: float, min_quality: float, quality: dict):
        super().__init__(scheme, measured, min_quality, quality)
        positions = quality.get("positions", "?")
        more_precise = "quantization=none" if scheme in ("bf16", "fp16") else "e.g. quantization=bf16 or none"
        self.args = (
            f"quality gate failed for quantization={scheme}: greedy token agreement with the "
            f"full-precision model is {measured:.4f} over {positions} positions (greedy prefix agreement "
            f"{quality.get('greedy_prefix_agreement', float('nan')):.3f}, perplexity ratio "
            f"{quality.get('perplexity_ratio', float('nan')):.3f}), below model.min_token_agreement={min_quality}. "
            f"Use a more precise scheme ({more_precise}), keep sensitive layers in full "
            "precision (quantization.skip=[...]), or lower model.min_token_agreement if this is acceptable "
            "(null measures without refusing).",)

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------------------- prompts
def _as_prompt(body: Any) -> dict | None:
    """A calibration-file request body (OpenAI chat / completion, or the worker's prompt) as a prompt."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("messages"), list):
        return {"messages": body["messages"]}
    for key in ("text", "prompt"):
        if isinstance(body.get(key), str):
            return {"text": body[key]}
    return None


def _file_prompts(path: str) -> list[dict]:
    raw = Path(path).expanduser().read_text()
    try:
        data = json.loads(raw)
        bodies = data if isinstance(data, list) else [data]
    except ValueError:
        bodies = [json.loads(line) for line in raw.splitlines() if line.strip()]
    prompts = [p for p in map(_as_prompt, bodies) if p is not None]
    if not prompts:
        raise ValueError(f"quantization.calibration_file {path}: no prompt found; give request bodies with "
                         "\"messages\" (chat) or \"prompt\" (completions)")
    return prompts


def prompt_token_ids(model: Any, prompt: dict) -> list[int]:
    """``model.prompt_ids(prompt)``; chat messages fall back to their text for a model without a chat
    template, so the built-in prompts work with any tokenizer."""
    try:
        ids = model.prompt_ids(prompt)
    except RequestError:
        if "messages" not in prompt:
            raise
        ids = model.prompt_ids({"text": "\n".join(m["content"] for m in prompt["messages"])})
    return list(ids)[-MAX_PROMPT_TOKENS:]


# ------------------------------------------------------------------------------------------ measures
def _logits(module: Any, ids: list[int]) -> Any:
    import torch

    out = module(input_ids=torch.tensor([ids], device=_device(module)))
    return out.logits[0].float().cpu()


def _device(module: Any) -> Any:
    return next(module.parameters()).device


def greedy_tokens(module: Any, ids: list[int], n: int, pad_token_id: int | None = None) -> list[int]:
    """``n`` greedy tokens after ``ids`` (EOS does not stop it: every position is compared)."""
    import torch

    out = module.generate(torch.tensor([ids], device=_device(module)), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad_token_id, attention_mask=torch.ones(1, len(ids),
                          dtype=torch.long, device=_device(module)))
    return out[0, len(ids):].tolist()


def teacher_forced_matches(module: Any, ids: list[int], target: list[int]) -> int:
    """How many of ``target`` (the reference's greedy tokens) ``module`` picks itself, reading the
    prompt and the reference's tokens so far."""
    logits = _logits(module, ids + target[:-1])
    picks = logits[len(ids) - 1:].argmax(dim=-1).tolist()
    return sum(int(a == b) for a, b in zip(picks, target, strict=True))


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions before the first divergence of two token lists."""
    n = max(len(a), 1)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i / n
    return min(len(a), len(b)) / n


def perplexity(module: Any, ids: list[int]) -> float:
    import torch

    logits = _logits(module, ids)
    target = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1], target)
    return float(math.exp(float(nll)))


# ---------------------------------------------------------------------------------------- dtype repair
def _compute_dtype(module: Any) -> Any:
    """The dtype most of the weights are in, embeddings and head aside (after a cast scheme)."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        sub = getattr(module, getter, lambda: None)()
        if sub is not None:
            skip |= {id(p) for p in sub.parameters()}
    counts: Counter = Counter()
    for p in module.parameters():
        if id(p) not in skip and p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else None


def _untie_cast_embeddings(module: Any) -> str | None:
    """A cast scheme (bf16, fp16) keeps the LM head in float32 (``quantization.skip``); when the head
    shares its weight with the input embedding (SmolLM2, tied embeddings), that pulls the embedding
    back to float32 too, and the first layer then gets float32 activations against bfloat16 weights.
    Give the embedding its own copy in the compute dtype (the head keeps the float32 one)."""
    import torch

    embed = getattr(module, "get_input_embeddings", lambda: None)()
    dtype = _compute_dtype(module)
    if embed is None or dtype is None or embed.weight.dtype == dtype:
        return None
    embed.weight = torch.nn.Parameter(embed.weight.detach().to(dtype), requires_grad=False)
    return f"input embedding untied from the head and cast to {str(dtype).removeprefix('torch.')}"


def apply_in_place(model: Any, quantization: Any, device: str) -> dict:
    """``quantization.apply(model.module, device)``, keeping ``model.module`` the same object.

    The engine's batched forward drives the model's own layers (``q_proj``, ``mlp``, ...), so a scheme
    must rewrite them in place: torchao's ``quantize_`` does, and the cast schemes cast in place and
    return a float32-edges wrapper (``CastIO``) that the engine does not need (it feeds token ids and
    reads logits). Any other replacement module is refused.
    """
    module = model.module
    out = quantization.apply(module, device)
    if out is not module and getattr(out, "inner", None) is not module:
        raise RuntimeError(
            f"quantization={quantization.scheme_name} returned a new module ({type(out).__name__}) instead of "
            "rewriting the loaded one in place; the generation engine runs the model's own layers, so a "
            "quantization for a generative model must rewrite its nn.Linear modules in place (as torchao's "
            "quantize_ does)")
    notes = {}
    fix = _untie_cast_embeddings(module)
    if fix:
        notes["dtype_fix"] = fix
    return notes


# ------------------------------------------------------------------------------------------------ gate
def measure(model: Any, reference: Any, candidate: Any, prompts: list[dict], tokens: int = GATE_TOKENS,
            text: str = PERPLEXITY_TEXT) -> dict:
    """Token agreement, greedy prefix agreement and perplexity of ``candidate`` against ``reference``."""
    import torch

    with torch.inference_mode():
        return _measure(model, reference, candidate, prompts, tokens, text)


def _measure(model: Any, reference: Any, candidate: Any, prompts: list[dict], tokens: int, text: str) -> dict:
    pad = getattr(model.tokenizer, "pad_token_id", None)
    if pad is None:
        eos = model.eos_token_ids()
        pad = eos[0] if eos else 0
    matches = positions = 0
    prefixes = []
    for prompt in prompts:
        ids = prompt_token_ids(model, prompt)
        ref = greedy_tokens(reference, ids, tokens, pad)
        cand = greedy_tokens(candidate, ids, tokens, pad)
        matches += teacher_forced_matches(candidate, ids, ref)
        positions += len(ref)
        prefixes.append(prefix_agreement(ref, cand))
    text_ids = [int(t) for t in model.tokenizer(text)["input_ids"]][:512]
    ppl_ref, ppl_cand = perplexity(reference, text_ids), perplexity(candidate, text_ids)
    return {"metric": "token_agreement", "token_agreement": round(matches / max(positions, 1), 4),
            "positions": positions, "prompts": len(prompts), "tokens_per_prompt": tokens,
            "greedy_prefix_agreement": round(sum(prefixes) / max(len(prefixes), 1), 4),
            "greedy_prefix_worst": round(min(prefixes, default=1.0), 4),
            "perplexity_reference": round(ppl_ref, 3), "perplexity": round(ppl_cand, 3),
            "perplexity_ratio": round(ppl_cand / ppl_ref, 4), "perplexity_tokens": len(text_ids)}


def gate_floor(model: Any) -> float | None:
    """The token-agreement floor: the model config's ``min_token_agreement`` (``None``: no floor), or
    ``DEFAULT_FLOOR`` for a model config without that field."""
    config = getattr(model, "config", None)
    return getattr(config, "min_token_agreement", DEFAULT_FLOOR)


def quantize_and_gate(model: Any, quantization: Any, device: str, tokens: int = GATE_TOKENS) -> dict:
    """Quantize ``model.module`` in place and gate it; returns the start-up report's entries
    (``quantization_applied``, ``quality``, ``quality_gate``, ``perplexity_ratio``, timings). Raises
    ``GenerationQualityGateError`` below ``model.min_token_agreement`` (``null``: measured, never refused)."""
    report: dict[str, Any] = {}
    t = time.perf_counter()
    reference = copy.deepcopy(model.module)  # the scheme changes numbers: keep full precision to compare
    report["reference_copy_ms"] = _ms(t)
    t = time.perf_counter()
    notes = apply_in_place(model, quantization, device)
    report["quantize_ms"] = _ms(t)
    report["quantization_applied"] = {k: v for k, v in (quantization.summary or {}).items()
                                      if k != "kept_full_precision"} | notes
    try:
        t = time.perf_counter()
        prompts = list(model.calibration_prompts() or [])
        if quantization.calibration_file:
            prompts += _file_prompts(quantization.calibration_file)
        quality = measure(model, reference, model.module, prompts, tokens) if prompts else None
        report["quality_gate_ms"] = _ms(t)
    finally:
        del reference
        gc.collect()
        _return_freed_memory()
    if quality is None:
        report.update(quality=None, quality_gate="skipped: the model has no calibration prompts",
                      perplexity_ratio=None)
        return report
    report.update(quality=quality, perplexity_ratio=quality["perplexity_ratio"])
    floor = gate_floor(model)
    report["quality_floor"] = floor
    value = quality["token_agreement"]
    if floor is not None and value < floor:
        raise GenerationQualityGateError(quantization.scheme_name, value, floor, quality)
    report["quality_gate"] = "passed" if floor is not None else "measured (no floor)"
    return report


def _return_freed_memory() -> None:
    """glibc keeps the freed reference's pages in its arenas (RSS stays at the peak); hand them back."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 1)
