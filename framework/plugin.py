"""The plugin contract: one base class per kind.

A plugin is a class with a nested ``Config`` dataclass (its parameters, validated against the YAML)
and the hooks of its kind. Built-in plugins live in ``plugins/<kind>/<name>.py`` and expose the
class as ``PLUGIN``; installed packages add plugins through entry-point groups ``hydraserve.<kind>``.

Where each hook runs matters for latency and for the spawn process model:

* ``ModelPlugin.decode`` / ``encode`` / ``identity`` run in the API (HTTP) process, so a malformed
  request is refused and a cache hit answered without ever reaching an inference worker.
* ``ModelPlugin.load`` / ``preprocess`` / ``forward`` / ``postprocess`` run in the inference worker,
  after spawn. Nothing heavy happens at import time or in ``__init__``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

KINDS: tuple[str, ...] = ("model", "quantization", "batching", "cache", "hardware")


@dataclass
class EmptyConfig:
    """For plugins without parameters."""


class Plugin:
    """Base of every plugin. ``config`` is an instance of the plugin's ``Config`` dataclass."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    def check(self, ctx: CheckContext) -> list[str]:
        """Extra validation run before any process starts; return one message per problem."""
        return []

    def describe(self) -> dict:
        """What ``/info`` shows about this plugin."""
        cfg = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
        return {"plugin": type(self).__name__, **cfg}


@dataclass
class CheckContext:
    """What a plugin's ``check`` may look at: the other chosen plugins and the target hardware."""

    model: ModelPlugin | None = None
    quantization: QuantizationPlugin | None = None
    batching: BatchingPlugin | None = None
    cache: CachePlugin | None = None
    hardware: HardwarePlugin | None = None


# --------------------------------------------------------------------------------------------- model
class ModelPlugin(Plugin):
    """Loads weights and turns requests into model inputs and outputs into responses.

    One request carries one or more *items* (``{"input": ["a", "b"]}`` is two items); batching
    counts items. ``decode`` returns the list of items; ``postprocess`` returns one JSON-able
    output per item; ``encode`` builds the response body from one request's outputs.

    Example::

        class Doubler(ModelPlugin):
            task = "tensor"
            def decode(self, body): return [float(body["input"])]
            def load(self, device): self.device = device
            def preprocess(self, items): return torch.tensor(items)
            def forward(self, batch): return batch * 2
            def postprocess(self, out): return out.tolist()
            def encode(self, outputs, body): return {"output": outputs[0]}
    """

    kind: ClassVar[str] = "model"
    #: "embedding" models also get ``/v1/embeddings``; "classification" and "tensor" do not.
    task: ClassVar[str] = "tensor"
    #: items one request may carry; more is a 413/422 before anything is queued.
    max_items_per_request: ClassVar[int] = 256

    # --- API process -------------------------------------------------------------------------
    def decode(self, body: dict) -> list[Any]:
        """Validate a request body and return its items (JSON-able). Raise ``RequestError``."""
        raise NotImplementedError

    def encode(self, outputs: list[Any], body: dict) -> dict:
        """Build the response body from this request's per-item outputs."""
        raise NotImplementedError

    def identity(self) -> dict:
        """Model identity and a weights fingerprint; part of every cache key. Must be cheap."""
        return {"plugin": type(self).__name__, **self.describe()}

    def texts(self, items: list[Any]) -> list[str] | None:
        """The items as text, for the semantic cache; ``None`` when the model is not text-in."""
        return None

    # --- inference worker --------------------------------------------------------------------
    def load(self, device: str) -> None:
        """Load weights onto ``device`` (runs once per worker, after spawn)."""
        raise NotImplementedError

    @property
    def module(self) -> Any:
        """The ``torch.nn.Module`` that quantization and compilation rewrite (``None`` if none)."""
        return getattr(self, "_module", None)

    @module.setter
    def module(self, value: Any) -> None:
        self._module = value

    def preprocess(self, items: list[Any]) -> Any:
        """Turn a batch of items into model inputs (tensors on the device)."""
        return items

    def forward(self, batch: Any) -> Any:
        """Run the model on a preprocessed batch."""
        raise NotImplementedError

    def postprocess(self, outputs: Any) -> list[Any]:
        """Turn the model's outputs into one JSON-able value per item (numpy arrays are fine)."""
        return list(outputs)

    def calibration_items(self) -> list[Any]:
        """Inputs the quantization quality gate runs through both the reference and the rewrite."""
        return []

    def example_items(self, batch_size: int) -> list[Any]:
        """Items to warm up / compile with; defaults to calibration items repeated."""
        base = self.calibration_items() or []
        return (base * (batch_size // max(len(base), 1) + 1))[:batch_size] if base else []

    def streaming(self) -> bool:
        """True when answers are streamed: ``stream`` yields chunks per item, the client receives them as
        newline-delimited JSON as they are produced, and such requests run one at a time."""
        return False

    def stream(self, item: Any) -> Iterator[Any]:
        """Yield JSON-able chunks of the answer to one item (streaming models only; worker side)."""
        raise NotImplementedError

    def encode_chunk(self, chunk: Any, body: dict) -> dict:
        """One line of a streamed answer (API process)."""
        return {"chunk": chunk}

    def warmup_batches(self, batch_sizes: list[int]) -> list[list[Any]]:
        """Batches to run at start-up so that every shape real requests produce is compiled before
        the first request (e.g. one batch per sequence-length bucket for text models)."""
        return [self.example_items(size) for size in batch_sizes]

    def quality(self, reference: Any, candidate: Any) -> dict:
        """Agreement between reference and candidate ``forward`` outputs (e.g. cosine)."""
        return {}


class GenerativeModelPlugin(ModelPlugin):
    """A model that generates text token by token (chat, completions), served through the OpenAI
    routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``) by the generation engine
    (``framework.generation``) under ``batching=continuous``.

    The API process parses and validates OpenAI bodies itself (``framework/openai_generation.py``)
    and sends the worker a *prompt*: ``{"messages": [{"role", "content"}, ...]}`` for chat or
    ``{"text": "..."}`` for completions. Tokenizing happens in the worker (``prompt_ids``), so an API
    process never loads a tokenizer. ``decode`` / ``encode`` / ``/predict`` are not used.

    Example::

        class MyLM(GenerativeModelPlugin):
            def load(self, device):
                self.tokenizer, self.module = load_my_model()
            def prompt_ids(self, prompt):
                return self.tokenizer(prompt["text"])["input_ids"]
            def batched_forward(self, max_num_seqs, max_model_len, **hardware_options):
                return MyBatchedForward(self.module, max_num_seqs, max_model_len)
    """

    task: ClassVar[str] = "chat"
    max_items_per_request: ClassVar[int] = 1

    #: set by ``load``: a transformers tokenizer (``decode``, ``eos_token_id``) for detokenizing.
    tokenizer: Any = None

    def served_name(self) -> str:
        """The model id ``/v1/models`` lists and responses carry (API process; must be cheap)."""
        return str(getattr(self.config, "served_name", "") or type(self).__name__)

    def prompt_ids(self, prompt: dict) -> list[int]:
        """Token ids of a prompt (worker side): chat messages through the model's chat template, or a
        completion's text. Raise ``RequestError`` for a prompt this model cannot take."""
        raise NotImplementedError

    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation (besides a request's stop strings)."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [] if eos is None else [int(eos)]

    def batched_forward(self, max_num_seqs: int, max_model_len: int, compile_mode: str = "off",
                        packed_weights: bool = False) -> Any:
        """A ``framework.generation.BatchedCausalLM`` over the loaded weights, with a KV cache of
        ``max_num_seqs`` slots of ``max_model_len`` positions (worker side, after ``load``).
        The worker passes the hardware's settings as keywords; a forward may use or ignore each:
        ``compile_mode`` is ``hardware.compile`` (off | auto | default | max-autotune | reduce-overhead):
        a forward may compile its steps under it (and compile them in a ``warmup()`` method if it has
        one); ``packed_weights`` is ``hardware.packed_weights`` (run eager CPU matmuls on weights
        packed for the CPU's matmul library)."""
        raise NotImplementedError

    def kv_bytes_per_token(self) -> int | None:
        """Bytes of KV cache one token position takes (for the start-up report); ``None`` if unknown."""
        return None

    def generation_engine(self, device: str, config: Any) -> Any | None:
        """An engine of the model's own (e.g. vLLM's), built in the worker instead of loading the
        weights and stepping ``framework.generation.GenerationEngine`` over ``batched_forward``.
        ``config`` is the ``batching=continuous`` ``EngineConfig``. Return ``None`` (the default) for
        the framework's engine. The engine must implement ``framework.generation.EngineLike`` (the
        worker loop's admission, cancels, deadlines, metrics and spans then work unchanged), and this
        method must set ``self.tokenizer`` so ``prompt_ids`` works."""
        return None

    def warmup_prompt(self) -> dict:
        """A prompt generated once at start-up so the first request does not pay for cold paths."""
        return {"text": "Hello"}

    def calibration_prompts(self) -> list[dict]:
        """Prompts (``{"messages": [...]}`` or ``{"text": ...}``) the quantization quality gate generates
        from with the full-precision and the quantized weights (``framework.generation.quality``); chat
        messages fall back to their text for a model without a chat template. Default: a few built-in
        prompts; return ``[]`` to skip the gate."""
        from framework.generation.quality import DEFAULT_CALIBRATION_PROMPTS

        return [dict(p) for p in DEFAULT_CALIBRATION_PROMPTS]

    def check(self, ctx: CheckContext) -> list[str]:
        found = []
        if ctx.batching is not None and ctx.batching.engine_config() is None:
            found.append("batching: a generative model runs on the continuous-batching engine; "
                         "use batching=continuous")
        q = ctx.quantization
        # Schemes that rewrite nn.Linear in place (torchao) or cast in place run on the engine's batched
        # forward; the quantization plugin's own check refuses what the hardware cannot run (int4, fp16,
        # float8 on a CPU). Other plugins must rewrite in place too (checked when applied). Refused: a
        # scheme meant for another model kind (declared by ``generative_ok = False`` on its class).
        if q is not None and not q.is_identity() and getattr(q, "generative_ok", True) is False:
            found.append(f"quantization: quantization={q.scheme_name} cannot run on a generative model "
                         "(it does not rewrite the layers in place); use quantization=int8_weight_only, "
                         "bf16 or none")
        return found


# -------------------------------------------------------------------------------------- quantization
class QuantizationPlugin(Plugin):
    """Rewrites a loaded ``torch.nn.Module`` to another numeric format."""

    kind: ClassVar[str] = "quantization"
    #: the scheme's name in reports, traces and errors (``int8_dynamic``); the class name if empty.
    scheme: ClassVar[str] = ""

    def __init__(self, config: Any | None = None):
        super().__init__(config)
        #: what the last ``apply`` did (layers rewritten, kept in full precision...), for the
        #: worker's start-up report and ``/info``; set by ``apply``.
        self.summary: dict = {}

    def apply(self, module: Any, device: str) -> Any:
        """Return the rewritten module (may rewrite in place)."""
        return module

    @property
    def scheme_name(self) -> str:
        return self.scheme or type(self).__name__

    @property
    def calibration_file(self) -> str | None:
        """A JSON list or JSONL file of request bodies the quality gate runs besides the model's own
        calibration items (``quantization.calibration_file``); ``None`` for none."""
        return getattr(self.config, "calibration_file", None)

    def is_identity(self) -> bool:
        """True when ``apply`` leaves the numbers as they are (no quality gate needed)."""
        return False

    @property
    def min_quality(self) -> float | None:
        return getattr(self.config, "min_quality", None)


# ------------------------------------------------------------------------------------------ batching
@dataclass
class BatchDecision:
    """What the batcher decided: run ``size`` items now, or wait at most ``wait_s`` for more."""

    run: bool
    size: int = 0
    wait_s: float = 0.0


class BatchingPlugin(Plugin):
    """Decides when a batch runs and how many items it holds. Pure logic; the worker loop calls it.

    ``plan`` is called whenever the pending set changes or a wait ends; it must never ask to wait
    past the oldest pending request's deadline.
    """

    kind: ClassVar[str] = "batching"

    @property
    def max_batch_size(self) -> int:
        return int(getattr(self.config, "max_batch_size", 1))

    def plan(self, pending_items: int, oldest_arrival: float, earliest_deadline: float, now: float) -> BatchDecision:
        return BatchDecision(run=pending_items > 0, size=min(pending_items, self.max_batch_size))

    def max_request_items(self) -> int | None:
        """Items per queued chunk: a larger request is split into chunks of this size, run as separate
        queued requests and joined back in order (``Gateway._submit_split``); ``None``: never split."""
        return self.max_batch_size

    def record(self, batch_items: int, seconds: float) -> None:
        """Learn from a batch that just ran (``seconds`` of forward+pre/post time)."""

    def engine_config(self) -> Any:
        """The generation engine's budgets (a ``framework.generation.EngineConfig``) when this batcher
        schedules token generation step by step (``batching=continuous``); ``None`` for the batchers of
        one-shot models."""
        return None


# --------------------------------------------------------------------------------------------- cache
@dataclass
class CacheHit:
    value: bytes
    kind: str = "hit"  # "hit" or "semantic-hit"


@dataclass
class CacheRequest:
    """A lookup: the exact key, and the request as text for semantic lookups (``None`` if not text)."""

    key: str
    texts: list[str] | None = None
    scope: str = ""  # the config part of the key, so semantic hits never cross configs


class CachePlugin(Plugin):
    """Answers requests without touching the model. Runs in every API process."""

    kind: ClassVar[str] = "cache"
    #: True when ``get``/``put`` may take milliseconds (embedding a request, a network round trip):
    #: the API process then calls them in a thread instead of on its event loop. Exact local stores
    #: answer in microseconds and are best called inline.
    lookup_may_block: ClassVar[bool] = False

    @property
    def enabled(self) -> bool:
        return True

    @property
    def shared_across_processes(self) -> bool:
        """True when every API process (and ``hydraserve cache``) sees the same entries; False for a
        store inside each process, whose statistics the CLI then cannot report."""
        return True

    def open(self) -> None:
        """Open the store; called in each API process after it starts (after fork)."""

    def open_store(self) -> None:
        """Open only what admin commands (``hydraserve cache stats|clear``) need; by default ``open``.
        A plugin whose ``open`` does heavy work (loading an embedder) opens just its storage here."""
        self.open()

    def close(self) -> None:
        pass

    def get(self, request: CacheRequest) -> CacheHit | None:
        raise NotImplementedError

    def peek(self, request: CacheRequest) -> CacheHit | None:
        """A lookup that never blocks (e.g. an in-process front of a remote store), tried on the event
        loop before a ``lookup_may_block`` plugin's ``get`` goes to a thread: a front hit then costs
        a dict lookup, not a thread hop and a round trip. ``None``: not known here (``get`` decides)."""
        return None

    def put(self, request: CacheRequest, value: bytes) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def clear(self) -> int:
        """Remove every entry; return how many were removed."""
        return 0


# ------------------------------------------------------------------------------------------ hardware
@dataclass
class HardwareInfo:
    """What the target hardware can do, for capability checks."""

    accelerator: str  # "cpu" | "cuda" | "mps"
    available: bool = True
    cuda_capability: tuple[int, int] | None = None
    device_name: str = ""
    extra: dict = field(default_factory=dict)


class HardwarePlugin(Plugin):
    """Device placement, threads, compilation and workers per device."""

    kind: ClassVar[str] = "hardware"

    def info(self) -> HardwareInfo:
        raise NotImplementedError

    def accelerator(self) -> str:
        return self.info().accelerator

    def devices(self) -> int | str:
        return getattr(self.config, "devices", "auto")

    def workers_per_device(self) -> int:
        return int(getattr(self.config, "workers_per_device", 1))

    def setup_process(self) -> None:
        """Per-worker process settings (threads, compile cache folder); runs before ``load``."""

    def optimize(self, model: ModelPlugin, device: str, batch_sizes: list[int]) -> dict | None:
        """Compile / capture ``model`` and warm it up over the shapes it will see; the returned dict
        (compile mode, timings) is merged into the worker's start-up report shown in ``/info``."""
        return None

    def pad_batch_size(self, n: int) -> int:
        """Batch size to pad ``n`` items to (shape bucketing); ``n`` when not bucketing."""
        return n
