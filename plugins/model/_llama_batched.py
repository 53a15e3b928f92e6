"""A batched Llama forward over a pre-allocated KV cache, for the generation engine.

Reads the weights of a loaded transformers ``LlamaForCausalLM`` (SmolLM2 is one; so are Llama,
TinyLlama, ...) and implements ``framework.generation.BatchedCausalLM``: prefill a chunk of one
sequence, or decode one token for many sequences at once, each row at its own position and attending
only to its own slot. The KV cache is [layers, slots, kv_heads, max_model_len, head_dim], allocated
once: no per-step allocation or cache objects, which is most of eager ``generate``'s overhead at batch 1.

The norms and the MLP are the loaded model's own modules (so their numerics are transformers'); only
attention is written here, because it is where the per-row positions and the slot cache come in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = self.layers[0].self_attn.scaling
        dtype = self.embed.weight.dtype
        # cos/sin for every position, computed exactly as transformers' rotary embedding does per position.
        rotary = inner.rotary_emb
        positions = torch.arange(max_model_len, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(dtype)
        self.sin = (emb.sin() * rotary.attention_scaling).to(dtype)
        shape = (len(self.layers), max_num_seqs, self.num_kv_heads, max_model_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)

    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # --- BatchedCausalLM --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        n = token_ids.shape[0]
        end = start + n
        cos, sin = self.cos[start:end], self.sin[start:end]  # [n, hd]
        if start == 0:
            mask = None  # plain causal attention over the chunk itself
        else:
            # query i (position start+i) sees keys 0..start+i
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        x = self.embed(token_ids[None, :])  # [1, n, hidden]
        for layer_idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
            kc[slot, :, start:end] = k[0]
            vc[slot, :, start:end] = v[0]
            keys, values = kc[slot:slot + 1, :, :end], vc[slot:slot + 1, :, :end]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        # Only the last position's logits are needed: the lm_head is a large share of the weights.
        return self.lm_head(self.norm(x[:, -1]))[0]

    @torch.inference_mode()
    def decode(self, slots: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b = token_ids.shape[0]
        length = int(positions.max()) + 1
        lo = int(slots[0])
        # Rows come in slot order; consecutive slots attend through a view, others through a gather.
        contiguous = int(slots[-1]) - lo + 1 == b
        cos, sin = self.cos[positions][:, None, None, :], self.sin[positions][:, None, None, :]  # [b,1,1,hd]
        mask = (torch.arange(length)[None, :] <= positions[:, None])[:, None, None, :]  # [b, 1, 1, len]
        x = self.embed(token_ids[:, None])  # [b, 1, hidden]
        for layer_idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
            kc[slots, :, positions] = k[:, :, 0]
            vc[slots, :, positions] = v[:, :, 0]
            if contiguous:
                keys, values = kc[lo:lo + b, :, :length], vc[lo:lo + b, :, :length]
            else:
                keys, values = kc[slots, :, :length], vc[slots, :, :length]
            # Grouped-query attention for one query per row as two batched matmuls: CPU SDPA with a mask
            # and enable_gqa measured ~2.8 ms a call here (flash kernel for q_len=1), these ~0.1 ms.
            # q head h reads kv head h // groups, as transformers' repeat_kv does.
            qg = q.view(b, self.num_kv_heads, self.groups, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scaling  # [b, kvh, groups, len]
            scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1), values)  # [b, kvh, groups, hd]
            x = x + attn.o_proj(o.reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, 0]))
