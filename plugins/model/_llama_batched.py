"""A batched Llama forward over a pre-allocated KV cache, for the generation engine.

Reads the weights of a loaded transformers ``LlamaForCausalLM`` (SmolLM2 is one; so are Llama,
TinyLlama, ...) and implements ``framework.generation.BatchedCausalLM``. A step's decode rows and
prefill chunks are packed into one token sequence for the projections and the MLP, so the weights are
read once per step however many sequences join (on a CPU decode is bound by reading the weights);
only attention is split, batched over decode rows and per chunk for prefill. The KV cache is
[layers, slots, kv_heads, max_model_len, head_dim], allocated once: no per-step cache objects.

The norms and the MLP are the loaded model's own modules (their numerics are transformers');
attention is written here, because that is where per-row positions and the slot cache come in.

Compiled decode (``compile_mode`` other than ``"off"``): a step that is decode rows only runs each
decoder layer through one ``torch.compile``'d graph (regional compilation: all layers share it, their
weights are its inputs, so compiling costs one layer, not thirty). Its shapes are static per batch
bucket (1, 2, 4, 8, 16, ... up to max_num_seqs: missing rows are padded onto a scratch KV slot past the
real ones, whose results are dropped); attention reads the slots up to a length bucket (the next power
of two >= the longest row, at least 16, at most max_model_len) with a mask, and that length is the
graph's one dynamic dimension, so each batch bucket compiles once (``warmup`` does it at start-up).
The graph only reads the cache: it attends to the cached positions plus the row's own new key, and
returns K and V, which one ``index_put_`` per step writes for all layers (a graph that mutated its
input cache would copy it whole); no Python ints come out of tensors inside the graph.
Prefill and mixed steps (decode rows + prefill chunks) stay eager.

Packed weights (``packed_weights``, ``hardware.packed_weights``; eager steps only): the model's float32
Linear layers run on oneDNN with their weights packed once (``_packed_linear.py``), 1.5-1.9x faster
matmuls at decode batch sizes on a CPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from framework.generation.model import DecodeBatch, PrefillChunk
from plugins.model._packed_linear import pack_linears

log = logging.getLogger("hydraserve.generation")

#: ``hardware.compile`` values and the torch.compile mode each means for the decode graph (None: eager).
#: ``auto`` (hardware's default) stays eager for generation: compiling costs minutes of start-up on a
#: small CPU and did not measurably speed decode up on the loaded 2-core machine it was measured on
#: (benchmarks/results/compiled_decode.md); ask for it with hardware.compile=default or max-autotune.
DECODE_COMPILE_MODES = {"off": None, "auto": None, "default": "default",
                        "max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "reduce-overhead"}
_MIN_LENGTH_BUCKET = 16


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes the compiled graph is built for: powers of two, then ``max_num_seqs``."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBatchedForward:
    def __init__(self, model: Any, max_num_seqs: int, max_model_len: int, compile_mode: str = "off",
                 packed_weights: bool = False):
        if compile_mode not in DECODE_COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(DECODE_COMPILE_MODES)}, got {compile_mode!r}")
        cfg = model.config
        if getattr(cfg, "model_type", None) != "llama":
            raise ValueError(f"LlamaBatchedForward runs Llama-architecture models, got {cfg.model_type!r}")
        self.model = model
        self.compile_mode = DECODE_COMPILE_MODES[compile_mode]
        # Eager steps only: the compiled graph takes the weights as its inputs, and an opaque oneDNN
        # tensor is not one torch.compile traces. Packing swaps the model's Linear modules, so it runs
        # before the modules are read below.
        self.report = {"packed_weights": packed_weights and self.compile_mode is None}
        if self.report["packed_weights"]:
            self.report.update(pack_linears(model))
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.layers[0].self_attn.scaling
        dtype = self.embed.weight.dtype
        # Everything the forward allocates lives where the weights are (the engine hands it CPU tensors).
        self.device = device = self.embed.weight.device
        # cos/sin for every position, computed exactly as transformers' rotary embedding does per position.
        rotary = inner.rotary_emb
        positions = torch.arange(max_model_len, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.float().cpu()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * rotary.attention_scaling).to(device=device, dtype=dtype)
        # The compiled decode pads its batch onto one scratch slot past the real ones, and its slots hold
        # one position more than ever attended, so no length bucket is the whole axis (that would be a
        # shape the dynamic length specializes on: a second graph per bucket).
        compiled = self.compile_mode is not None
        self.scratch_slot = max_num_seqs
        shape = (len(self.layers), max_num_seqs + compiled, self.num_kv_heads, max_model_len + compiled, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.compiled_steps = 0  # decode steps run by the compiled graph (eager ones are not counted)
        self._decode_graph = None
        self._ranges: dict[int, torch.Tensor] = {}
        if self.compile_mode is not None:
            self._decode_graph = torch.compile(self._decode_layer, mode=self.compile_mode, dynamic=False,
                                               fullgraph=True)

    def _qkv(self, attn, h: torch.Tensor, n: int, cos: torch.Tensor, sin: torch.Tensor):
        """Query, key and value of ``n`` tokens, rotary position applied (the eager and the compiled
        step share it): [n, heads, hd], [n, kv_heads, hd], [n, kv_heads, hd]."""
        q = attn.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # --- KV copies for the prefix cache (framework.generation.prefix_cache) -------------------------
    def read_kv(self, slot: int, start: int, end: int) -> torch.Tensor:
        """K and V of positions ``start..end-1`` of ``slot``: [2, layers, kv_heads, end - start, hd]."""
        return torch.stack((self.k_cache[:, slot, :, start:end], self.v_cache[:, slot, :, start:end]))

    def write_kv(self, slot: int, start: int, kv: torch.Tensor) -> None:
        end = start + kv.shape[3]
        self.k_cache[:, slot, :, start:end] = kv[0]
        self.v_cache[:, slot, :, start:end] = kv[1]

    # --- compiled decode ---------------------------------------------------------------------------
    def _length_bucket(self, longest: int) -> int:
        n = _MIN_LENGTH_BUCKET
        while n < longest:
            n *= 2
        return min(n, self.max_model_len)

    def _range(self, length: int) -> torch.Tensor:
        """``arange(length)``: the graph reads the attended length from its shape (its dynamic dim)."""
        r = self._ranges.get(length)
        if r is None:
            r = self._ranges[length] = torch.arange(length, device=self.device)
            torch._dynamo.mark_dynamic(r, 0, min=2, max=self.max_model_len)
        return r

    def _decode_layer(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      slots: torch.Tensor, positions: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                      arange: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder layer for ``B`` decode rows (the compiled graph: every layer runs the same one,
        its weights are inputs, so compiling costs one layer, not the model). It only reads the layer's
        cache ``kc``/``vc`` (a graph that wrote its input cache would copy it whole) and returns the
        new K and V, which the caller writes."""
        b = x.shape[0]
        attn = layer.self_attn
        q, k, v = self._qkv(attn, layer.input_layernorm(x), b, cos, sin)
        length = arange.shape[0]
        keys, values = kc[slots, :, :length], vc[slots, :, :length]  # [B, kvh, L, hd]
        qg = q.view(b, self.num_kv_heads, self.groups, self.head_dim)
        # The row's own key comes last, after the cached positions 0..positions[i]-1 (built here: the
        # length is the graph's dynamic dimension).
        cached = torch.matmul(qg, keys.transpose(-1, -2))  # [B, kvh, groups, L]
        cached = cached.masked_fill(~(arange[None, :] < positions[:, None])[:, None, None, :], float("-inf"))
        own = (qg * k[:, :, None, :]).sum(-1, keepdim=True)  # [B, kvh, groups, 1]
        probs = torch.softmax(torch.cat((cached, own), dim=-1) * self.scaling, dim=-1)
        o = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * v[:, :, None, :]
        x = x + attn.o_proj(o.reshape(b, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x)), k, v

    def _decode_all(self, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    arange: torch.Tensor) -> torch.Tensor:
        """One decode token for each of ``B`` rows, all layers: [B, vocab] logits."""
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [B, 1, hd]
        x = self.embed(token_ids)  # [B, hidden]
        new_k, new_v = [], []
        for layer_idx, layer in enumerate(self.layers):
            x, k, v = self._decode_graph(layer, x, cos, sin, slots, positions, self.k_cache[layer_idx],
                                         self.v_cache[layer_idx], arange)
            new_k.append(k)
            new_v.append(v)
        # Every layer's new K and V in one write each (padded rows write the scratch slot).
        self.k_cache[:, slots, :, positions] = torch.stack(new_k, dim=1)
        self.v_cache[:, slots, :, positions] = torch.stack(new_v, dim=1)
        return self.lm_head(self.norm(x))

    def _compiled_decode(self, decode: DecodeBatch) -> torch.Tensor:
        b = decode.token_ids.shape[0]
        bucket = next(n for n in self.batch_buckets if n >= b)
        length = self._length_bucket(int(decode.positions.max()) + 1)
        pad = bucket - b
        device = self.device
        slots, token_ids, positions = (t.to(device) for t in decode)
        if pad:
            slots = torch.cat((slots, torch.full((pad,), self.scratch_slot, dtype=slots.dtype, device=device)))
            token_ids = torch.cat((token_ids, torch.zeros(pad, dtype=token_ids.dtype, device=device)))
            positions = torch.cat((positions, torch.zeros(pad, dtype=positions.dtype, device=device)))
        logits = self._decode_all(token_ids, positions, slots, self._range(length))
        self.compiled_steps += 1
        logits = logits[:b]
        if logits.device.type != "cpu":
            logits = logits.float().cpu()
        return logits

    @torch.inference_mode()
    def warmup(self) -> dict:
        """Compile every batch bucket now (each once: the attended length is dynamic) by decoding on the
        scratch slot; returns ``{"compile_mode", "compile_ms", "batch_buckets"}``. No-op when eager."""
        report = {"compile_mode": self.compile_mode or "off", "compile_ms": 0.0, "batch_buckets": []}
        if self._decode_graph is None:
            return report
        t = time.perf_counter()
        for bucket in self.batch_buckets:
            slots = torch.full((bucket,), self.scratch_slot, device=self.device)
            # distinct tensors: dynamo guards on inputs aliasing each other, the engine's never do
            token_ids, positions = (torch.zeros(bucket, dtype=torch.long, device=self.device) for _ in range(2))
            self._decode_all(token_ids, positions, slots, self._range(self._length_bucket(2)))
        self.k_cache[:, self.scratch_slot].zero_()
        self.v_cache[:, self.scratch_slot].zero_()
        report["compile_ms"] = round((time.perf_counter() - t) * 1000.0, 1)
        report["batch_buckets"] = list(self.batch_buckets)
        log.info("compiled decode (%s): batch buckets %s in %.0f ms", self.compile_mode, self.batch_buckets,
                 report["compile_ms"])
        return report

    @torch.inference_mode()
    def forward_step(self, decode: DecodeBatch | None,
                     prefill: list[PrefillChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b = 0 if decode is None else decode.token_ids.shape[0]
        if b and not prefill and self._decode_graph is not None:
            return self._compiled_decode(decode), None
        device = self.device
        if b and decode.token_ids.device != device:
            decode = DecodeBatch(*(t.to(device) for t in decode))
        tokens = [decode.token_ids] if b else []
        positions = [decode.positions] if b else []
        for chunk in prefill:
            n = chunk.token_ids.shape[0]
            tokens.append(chunk.token_ids.to(device))
            positions.append(torch.arange(chunk.start, chunk.start + n, device=device))
        token_ids, pos = torch.cat(tokens), torch.cat(positions)
        total = token_ids.shape[0]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # [T, 1, hd]
        attend_decode = self._decode_attention(decode) if b else None
        attend_chunks = self._chunk_attention(prefill, b)
        x = self.embed(token_ids[None, :])  # [1, T, hidden]
        for layer_idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), total, cos, sin)
            kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
            outs = []
            if b:
                outs.append(attend_decode(q[:b], k[:b], v[:b], kc, vc))
            outs.extend(fn(q, k, v, kc, vc) for fn in attend_chunks)
            o = torch.cat(outs) if len(outs) > 1 else outs[0]  # [T, heads * hd]
            x = x + attn.o_proj(o[None])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        # Logits only where a token is sampled (a prompt's last, a draft's every position): the lm_head
        # is a large share of the weights.
        last = list(range(b))
        offset = b
        for chunk in prefill:
            offset += chunk.token_ids.shape[0]
            last.extend(range(offset - chunk.num_logits, offset))
        logits = self.lm_head(self.norm(x[0, last]))
        if logits.device.type != "cpu":  # sampling (and its per-request CPU generators) runs on the CPU
            logits = logits.float().cpu()
        return (logits[:b] if b else None), (logits[b:] if prefill else None)

    def _decode_attention(self, decode: DecodeBatch):
        slots, positions = decode.slots, decode.positions
        b = slots.shape[0]
        length = int(positions.max()) + 1
        lo = int(slots[0])
        # Rows come in slot order; consecutive slots attend through a view, others through a gather.
        contiguous = int(slots[-1]) - lo + 1 == b
        mask = (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]

        def attend(q, k, v, kc, vc):
            kc[slots, :, positions] = k
            vc[slots, :, positions] = v
            if contiguous:
                keys, values = kc[lo:lo + b, :, :length], vc[lo:lo + b, :, :length]
            else:
                keys, values = kc[slots, :, :length], vc[slots, :, :length]
            # One query per row as two batched matmuls: CPU SDPA with a mask and enable_gqa measured
            # ~2.8 ms a call for q_len=1 here, this ~0.1 ms. Query head h reads kv head h // groups,
            # as transformers' repeat_kv does.
            qg = q.view(b, self.num_kv_heads, self.groups, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scaling  # [b, kvh, groups, len]
            scores = scores.masked_fill(~mask, float("-inf"))
            return torch.matmul(torch.softmax(scores, dim=-1), values).reshape(b, -1)

        return attend

    def _chunk_attention(self, prefill: list[PrefillChunk], offset: int):
        fns = []
        for chunk in prefill:
            n = chunk.token_ids.shape[0]
            fns.append(self._one_chunk(chunk.slot, chunk.start, n, offset))
            offset += n
        return fns

    def _one_chunk(self, slot: int, start: int, n: int, offset: int):
        end = start + n
        # query i (position start+i) sees keys 0..start+i; a first chunk is plain causal attention.
        device = self.device
        mask = None if start == 0 else (torch.arange(end, device=device)[None, :]
                                        <= torch.arange(start, end, device=device)[:, None])

        def attend(q, k, v, kc, vc):
            kc[slot, :, start:end] = k[offset:offset + n].transpose(0, 1)
            vc[slot, :, start:end] = v[offset:offset + n].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q[offset:offset + n].transpose(0, 1)[None], kc[slot:slot + 1, :, :end], vc[slot:slot + 1, :, :end],
                attn_mask=mask, is_causal=mask is None, scale=self.scaling, enable_gqa=True)
            return o[0].transpose(0, 1).reshape(n, -1)

        return attend
