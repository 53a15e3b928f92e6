"""What the load generator sends: a JSONL file, or a generated text/vector/chat workload.

A chat workload (``kind=chat``, see ``chat_workload``) is streamed OpenAI chat completions; so is a
JSONL file whose every body has ``"stream": true`` (it is then read as SSE, see ``framework.bench.chat``).

JSONL format (``bench.workload.kind=jsonl bench.workload.path=requests.jsonl``), one request a line::

    {"input": "How do I reset my password?"}                              <- a request body
    {"body": {"input": "hello"}, "headers": {"X-Request-Timeout-Ms": "500"}}  <- body + headers

A line is read as ``{"body", "headers"}`` only when it has a ``body`` object and no keys besides
``body`` and ``headers``; anything else is the body itself. Requests are sent in file order and the
file is cycled when the run needs more requests than it has lines.

Generated text workloads control how many requests a cache can answer: ``repeat_ratio`` of the
requests repeat an earlier request exactly (cache ``hit``), ``paraphrase_ratio`` reword an earlier
request with a template (``semantic-hit`` for a semantic cache, ``miss`` for an exact one), the rest
are new sentences. Ratios are exact (counts are rounded), order is shuffled with ``seed``, and the
first request is always new. Everything comes from the lists below: nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import orjson

SUBJECTS = [
    "My order", "The invoice", "Our quarterly report", "The mobile app", "My password", "The shipping label",
    "The new laptop", "Your support team", "The refund request", "My subscription", "The search page",
    "The weekly newsletter", "The delivery driver", "The payment form", "Our team calendar",
    "The hotel booking", "The train ticket", "The coffee machine", "The printer on floor three",
    "The account settings page",
]
PREDICATES = [
    "has not arrived", "shows the wrong amount", "keeps crashing", "needs to be reset",
    "was charged twice", "cannot be downloaded", "looks different today", "is much slower than usual",
    "was cancelled without notice", "asks for a code I never received", "displays an error message",
    "is missing an item", "stopped working", "needs approval", "was updated yesterday",
    "cannot be found", "was sent to the wrong address", "is in a foreign language",
    "should be renewed", "takes forever to load",
]
TAILS = [
    "What should I do?", "How can I fix it?", "Who can help me?", "Is this a known issue?",
    "Can you check it for me?", "When will it be resolved?", "Is there a workaround?",
    "Should I contact someone else?", "How long does this usually take?", "Can I get a refund?",
    "What information do you need?", "Can you explain why?", "Is my data safe?",
    "Could this happen again?", "What are my options?",
]
# Rewordings that keep the meaning (and the embedding close): prefixes, suffixes, synonym swaps.
PARAPHRASE_WRAPPERS = [
    "Could you tell me this: {s}", "Quick question: {s}", "{s} Thanks in advance.", "Hi there. {s}",
    "Please help. {s}", "{s} I need an answer soon.", "Hello! {s}", "{s} Thank you.",
]
SYNONYMS = {
    "order": "purchase", "invoice": "bill", "fix": "repair", "help": "assist", "wrong": "incorrect",
    "slower": "more sluggish", "crashing": "failing", "arrived": "shown up", "cancelled": "canceled",
    "usually": "normally", "issue": "problem", "check": "look at", "options": "choices",
    "resolved": "fixed", "forever": "ages", "laptop": "notebook", "ticket": "pass",
}
KINDS = ("fresh", "repeat", "paraphrase")
RECENT = 4  # repeats and paraphrases prefer requests older than the last RECENT new ones


@dataclass
class Request:
    """One request: its encoded JSON body, extra headers, and how it was generated."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = ""  # "fresh" | "repeat" | "paraphrase" for generated workloads


@dataclass
class Workload:
    requests: list[Request]
    warmup: list[Request]
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def request(self, index: int) -> Request:
        return self.requests[index % len(self.requests)]

    def warmup_request(self, index: int) -> Request:
        pool = self.warmup or self.requests
        return pool[index % len(pool)]

    def mix(self) -> dict[str, float]:
        """The fraction of requests of each kind (``{}`` for a JSONL file)."""
        counts = {k: sum(1 for r in self.requests if r.kind == k) for k in KINDS}
        total = sum(counts.values())
        return {k: round(v / total, 4) for k, v in counts.items()} if total else {}


# ----------------------------------------------------------------------------------- generated text
def fresh_sentences(seed: int) -> Any:
    """An endless, seeded stream of distinct sentences built from the lists above."""
    combos = list(product(range(len(SUBJECTS)), range(len(PREDICATES)), range(len(TAILS))))
    rng = random.Random(seed)
    rng.shuffle(combos)
    round_ = 0
    while True:
        for s, p, t in combos:
            text = f"{SUBJECTS[s]} {PREDICATES[p]}. {TAILS[t]}"
            yield text if round_ == 0 else f"{text} (reference {round_})"
        round_ += 1


def paraphrases(text: str) -> list[str]:
    """Every template rewording of ``text`` that differs from it."""
    out = [w.format(s=text) for w in PARAPHRASE_WRAPPERS]
    words = text.split(" ")
    swapped = [SYNONYMS.get(w.lower().strip(".?!,"), None) for w in words]
    if any(swapped):
        new = []
        for word, syn in zip(words, swapped, strict=True):
            new.append(word if syn is None else syn + word[len(word.rstrip(".?!,")):])
        out.append(" ".join(new))
    return [p for p in out if p != text]


def _kinds(n: int, repeat_ratio: float, paraphrase_ratio: float, rng: random.Random) -> list[str]:
    n_repeat = round(n * repeat_ratio)
    n_para = round(n * paraphrase_ratio)
    if n_repeat + n_para >= n:  # at least one new request: repeats need something to repeat
        n_repeat = max(0, n - 1 - n_para)
        n_para = min(n_para, n - 1 - n_repeat)
    kinds = ["repeat"] * n_repeat + ["paraphrase"] * n_para + ["fresh"] * (n - n_repeat - n_para)
    rng.shuffle(kinds)
    first_fresh = kinds.index("fresh")
    kinds[0], kinds[first_fresh] = kinds[first_fresh], kinds[0]
    return kinds


def _mixed_units(n: int, repeat_ratio: float, paraphrase_ratio: float, seed: int,
                 new_unit, reword) -> list[tuple[str, Any]]:
    """(kind, unit) pairs: ``new_unit()`` makes a new one, ``reword(unit, rng, used)`` a paraphrase."""
    rng = random.Random(seed)
    units: list[tuple[str, Any]] = []
    originals: list[Any] = []
    used: set[str] = set()
    for kind in _kinds(n, repeat_ratio, paraphrase_ratio, rng):
        # Repeat an older request when there is one: the newest may still be in flight (a miss).
        older = originals[:-RECENT] if len(originals) > RECENT else originals
        if kind == "fresh":
            unit = new_unit()
            originals.append(unit)
        elif kind == "repeat":
            unit = rng.choice(older)
        else:
            unit = reword(rng.choice(older), rng, used)
        used.add(json.dumps(unit))
        units.append((kind, unit))
    return units


def text_workload(n: int, repeat_ratio: float = 0.0, paraphrase_ratio: float = 0.0, seed: int = 0,
                  items_per_request: int = 1, headers: dict[str, str] | None = None,
                  warmup: int = 64) -> Workload:
    """``n`` text requests ``{"input": "..."}`` (or a list of ``items_per_request`` texts)."""
    stream = fresh_sentences(seed)

    def new_unit() -> list[str]:
        return [next(stream) for _ in range(items_per_request)]

    def reword(unit: list[str], rng: random.Random, used: set[str]) -> list[str]:
        for _ in range(16):  # bounded: pick another template if this rewording was already sent
            candidate = [rng.choice(paraphrases(text)) for text in unit]
            if json.dumps(candidate) not in used:
                return candidate
        return [f"{rng.choice(PARAPHRASE_WRAPPERS).format(s=t)} ({rng.random():.6f})" for t in unit]

    def body(unit: list[str]) -> bytes:
        return orjson.dumps({"input": unit[0] if items_per_request == 1 else unit})

    units = _mixed_units(n, repeat_ratio, paraphrase_ratio, seed, new_unit, reword)
    hdrs = dict(headers or {})
    warm_stream = fresh_sentences(seed + 7919)
    warm = [Request(body([f"Warm-up: {next(warm_stream)}" for _ in range(items_per_request)]), hdrs)
            for _ in range(warmup)]
    return Workload(
        requests=[Request(body(u), hdrs, kind) for kind, u in units],
        warmup=warm,
        description={"kind": "text", "requests": n, "repeat_ratio": repeat_ratio,
                     "paraphrase_ratio": paraphrase_ratio, "items_per_request": items_per_request,
                     "seed": seed},
    )


def vector_workload(n: int, dim: int, repeat_ratio: float = 0.0, paraphrase_ratio: float = 0.0,
                    seed: int = 0, items_per_request: int = 1, headers: dict[str, str] | None = None,
                    warmup: int = 64) -> Workload:
    """``n`` requests ``{"input": [[x1..xdim], ...]}`` for tensor models (e.g. ``model=tiny``)."""
    rng = random.Random(seed)

    def vec(r: random.Random) -> list[float]:
        return [round(r.uniform(-1.0, 1.0), 6) for _ in range(dim)]

    def new_unit() -> list[list[float]]:
        return [vec(rng) for _ in range(items_per_request)]

    def reword(unit: list[list[float]], r: random.Random, used: set[str]) -> list[list[float]]:
        return [[round(x + r.uniform(-1e-3, 1e-3), 6) for x in v] for v in unit]

    units = _mixed_units(n, repeat_ratio, paraphrase_ratio, seed, new_unit, reword)
    hdrs = dict(headers or {})
    warm_rng = random.Random(seed + 7919)
    return Workload(
        requests=[Request(orjson.dumps({"input": u}), hdrs, kind) for kind, u in units],
        warmup=[Request(orjson.dumps({"input": [vec(warm_rng) for _ in range(items_per_request)]}), hdrs)
                for _ in range(warmup)],
        description={"kind": "vector", "requests": n, "dim": dim, "repeat_ratio": repeat_ratio,
                     "paraphrase_ratio": paraphrase_ratio, "items_per_request": items_per_request,
                     "seed": seed},
    )


# ------------------------------------------------------------------------------------------- chat
DISTS = ("fixed", "uniform", "normal")
# Prompt words: the sentence lists above split into words, plus filler; a word is roughly one to two
# tokens for a BPE tokenizer (SmolLM2's), so ``prompt_tokens`` is approximate.
FILLER = ("please", "describe", "explain", "the", "history", "of", "a", "small", "river", "town", "and", "its",
          "bridges", "markets", "weather", "people", "music", "food", "trains", "schools", "gardens", "in",
          "detail", "with", "examples", "for", "a", "curious", "reader", "who", "likes", "stories", "about",
          "science", "travel", "mountains", "libraries", "ships", "clocks", "lamps", "winter", "summer")


def _chat_words() -> list[str]:
    words = [w.strip(".?!,").lower() for line in (*SUBJECTS, *PREDICATES, *TAILS) for w in line.split()]
    return sorted(set(words) | set(FILLER))


def dist_problems(spec: Any, name: str) -> list[tuple[str, str]]:
    """Config problems of a length distribution ``{dist: fixed|uniform|normal, mean, min, max, std}``."""
    if not isinstance(spec, dict):
        return [(name, f"must be a mapping like {{dist: uniform, min: 32, max: 128}}, got {spec!r}")]
    dist = spec.get("dist", "fixed")
    unknown = set(spec) - {"dist", "mean", "min", "max", "std"}
    out = []
    if unknown:
        out.append((name, f"unknown keys {sorted(unknown)}; valid keys are dist, mean, min, max, std"))
    if dist not in DISTS:
        return out + [(f"{name}.dist", f"must be one of {', '.join(DISTS)}, got {dist!r}")]
    need = {"fixed": ("mean",), "uniform": ("min", "max"), "normal": ("mean",)}[dist]
    for key in need:
        if not isinstance(spec.get(key), (int, float)):
            out.append((f"{name}.{key}", f"required for dist={dist} (a number >= 1)"))
    for key in ("mean", "min", "max", "std"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value < (0 if key == "std" else 1)):
            out.append((f"{name}.{key}", f"must be a number >= {0 if key == 'std' else 1}, got {value!r}"))
    lo, hi = spec.get("min"), spec.get("max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
        out.append((f"{name}.min", f"must be <= max, got min {lo} > max {hi}"))
    return out


def sample_length(spec: dict, rng: random.Random) -> int:
    """One length from ``spec`` (see ``dist_problems``): uniform in [min, max], normal(mean, std)
    clamped to [min, max] where given (std defaults to mean / 4), fixed the mean; at least 1."""
    dist = spec.get("dist", "fixed")
    lo, hi = spec.get("min"), spec.get("max")
    if dist == "uniform":
        value = rng.uniform(float(lo), float(hi))
    elif dist == "normal":
        mean = float(spec["mean"])
        value = rng.gauss(mean, float(spec.get("std", mean * 0.25)))
    else:  # fixed: exactly the mean (min and max only bound uniform and normal)
        return max(int(round(float(spec["mean"]))), 1)
    if lo is not None:
        value = max(value, float(lo))
    if hi is not None:
        value = min(value, float(hi))
    return max(int(round(value)), 1)


def chat_body(prompt: str, max_tokens: int, model: str | None, ignore_eos: bool = True,
              temperature: float = 0.0) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "stream": True, "stream_options": {"include_usage": True},
                            "temperature": temperature}
    if ignore_eos:
        body["ignore_eos"] = True
    if model:
        body = {"model": model, **body}
    return body


def chat_workload(n: int, prompt_tokens: dict, output_tokens: dict, model: str | None = None,
                  seed: int = 0, ignore_eos: bool = True, temperature: float = 0.0,
                  headers: dict[str, str] | None = None, warmup: int = 16) -> Workload:
    """``n`` streamed chat requests: prompts of ~``prompt_tokens`` words from the lists above, each
    asking for ``output_tokens`` (``max_tokens``; with ``ignore_eos`` the server generates exactly that).
    Every prompt starts with its own number, so no two share a prefix a cache could reuse."""
    words = _chat_words()
    rng = random.Random(seed)
    hdrs = dict(headers or {})

    def one(index: int, r: random.Random, tag: str) -> tuple[Request, int, int]:
        n_words = sample_length(prompt_tokens, r)
        max_tokens = sample_length(output_tokens, r)
        text = " ".join([f"{tag}{index}:", *(r.choice(words) for _ in range(max(n_words - 1, 0)))])
        body = chat_body(text, max_tokens, model, ignore_eos, temperature)
        return Request(orjson.dumps(body), hdrs, "fresh"), n_words, max_tokens

    made = [one(i, rng, "Request-") for i in range(n)]
    warm_rng = random.Random(seed + 7919)
    warm = [one(i, warm_rng, "Warm-up-")[0] for i in range(warmup)]
    p_words = [m[1] for m in made]
    outs = [m[2] for m in made]
    return Workload(
        requests=[m[0] for m in made], warmup=warm,
        description={"kind": "chat", "requests": n, "model": model, "seed": seed, "streaming": True,
                     "prompt_tokens": dict(prompt_tokens), "output_tokens": dict(output_tokens),
                     "ignore_eos": ignore_eos, "temperature": temperature,
                     "prompt_words_mean": round(sum(p_words) / n, 2), "max_tokens_mean": round(sum(outs) / n, 2),
                     "max_tokens_total": sum(outs)})


# ---------------------------------------------------------------------------------------- JSONL
def load_jsonl(path: str | Path, max_lines: int = 1_000_000, headers: dict[str, str] | None = None) -> Workload:
    """Read a JSONL workload; errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"bench.workload.path: no such file {str(path)!r}; write one request body per line")
    requests: list[Request] = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if len(requests) >= max_lines:
                break
            line = line.strip()
            if not line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object (a request body, or "
                                 '{"body": {...}, "headers": {...}})')
            extra = dict(headers or {})
            if isinstance(obj.get("body"), dict) and set(obj) <= {"body", "headers"}:
                line_headers = obj.get("headers") or {}
                if not isinstance(line_headers, dict):
                    raise ValueError(f"{path}:{lineno}: 'headers' must be an object of strings")
                extra.update({str(k): str(v) for k, v in line_headers.items()})
                obj = obj["body"]
            requests.append(Request(orjson.dumps(obj), extra))
    if not requests:
        raise ValueError(f"bench.workload.path: {path} has no requests")
    streaming = all(b'"stream":true' in r.body for r in requests)
    if streaming:  # chat bodies: ask for the usage chunk, so output tokens are counted, not guessed
        for r in requests:
            body = orjson.loads(r.body)
            if "messages" in body:
                body.setdefault("stream_options", {"include_usage": True})
                r.body = orjson.dumps(body)
    return Workload(requests=requests, warmup=[],
                    description={"kind": "jsonl", "path": str(path), "requests": len(requests),
                                 "streaming": streaming})


def write_jsonl(workload: Workload, path: str | Path) -> Path:
    """Save a workload in the JSONL format above (e.g. to replay a generated one)."""
    path = Path(path)
    with open(path, "wb") as fh:
        for req in workload.requests:
            line = {"body": orjson.loads(req.body), "headers": req.headers} if req.headers else orjson.loads(req.body)
            fh.write(orjson.dumps(line) + b"\n")
    return path


def build(spec: dict, total: int, extra_headers: dict[str, str] | None = None) -> Workload:
    """A workload from ``bench.workload`` (``total``: requests the run will send, for sizing)."""
    kind = spec.get("kind", "text")
    n = int(spec.get("requests") or total or 1)
    common = dict(repeat_ratio=float(spec.get("repeat_ratio", 0.0)),
                  paraphrase_ratio=float(spec.get("paraphrase_ratio", 0.0)), seed=int(spec.get("seed", 0)),
                  items_per_request=int(spec.get("items_per_request", 1)), headers=extra_headers)
    if kind == "text":
        return text_workload(n, **common)
    if kind == "vector":
        return vector_workload(n, dim=int(spec.get("dim", 8)), **common)
    if kind == "chat":
        return chat_workload(n, dict(spec.get("prompt_tokens") or {"dist": "fixed", "mean": 64}),
                             dict(spec.get("output_tokens") or {"dist": "fixed", "mean": 64}),
                             model=spec.get("model"), seed=int(spec.get("seed", 0)),
                             ignore_eos=bool(spec.get("ignore_eos", True)),
                             temperature=float(spec.get("temperature", 0.0)), headers=extra_headers)
    if kind == "jsonl":
        if not spec.get("path"):
            raise ValueError("bench.workload.path: required when bench.workload.kind=jsonl")
        return load_jsonl(spec["path"], headers=extra_headers)
    raise ValueError(f"bench.workload.kind: must be text, vector, chat or jsonl, got {kind!r}")
