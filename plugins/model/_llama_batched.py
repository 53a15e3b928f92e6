"""A batched Llama forward over a pre-allocated KV cache, for the generation engine.

Reads the weights of a loaded transformers ``LlamaForCausalLM`` (SmolLM2 is one; so are Llama,
TinyLlama, ...) and implements ``framework.generation.BatchedCausalLM``. A step's decode rows and
prefill chunks are packed into one token sequence for the projections and the MLP, so the weights are
read once per step however many sequences join (on a CPU decode is bound by reading the weights);
only attention is split, batched over decode rows and per chunk for prefill. The KV cache is
[layers, slots, kv_heads, max_model_len, head_dim], allocated once: no per-step cache objects.

The norms and the MLP are the loaded model's own modules (their numerics are transformers');
attention is written here, because that is where per-row positions and the slot cache come in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from framework.generation.model import DecodeBatch, PrefillChunk


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBatchedForward:
    def __init__(self, model: Any, max_num_seqs: int, max_model_len: int):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "llama":
            raise ValueError(f"LlamaBatchedForward runs Llama-architecture models, got {cfg.model_type!r}")
        self.model = model
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
        shape = (len(self.layers), max_num_seqs, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    @torch.inference_mode()
    def forward_step(self, decode: DecodeBatch | None,
                     prefill: list[PrefillChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b = 0 if decode is None else decode.token_ids.shape[0]
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
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(total, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(total, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(total, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
            outs = []
            if b:
                outs.append(attend_decode(q[:b], k[:b], v[:b], kc, vc))
            outs.extend(fn(q, k, v, kc, vc) for fn in attend_chunks)
            o = torch.cat(outs) if len(outs) > 1 else outs[0]  # [T, heads * hd]
            x = x + attn.o_proj(o[None])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        # Logits only where a token is sampled: the lm_head is a large share of the weights.
        last = list(range(b))
        offset = b
        for chunk in prefill:
            offset += chunk.token_ids.shape[0]
            last.append(offset - 1)
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
