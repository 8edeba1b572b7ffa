"""The LLaMA forward pass, written once over a backend's ops (backends/numpy_ops.py, backends/mlx_ops.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .cache import KVCache
from .config import ModelArgs, rope_inv_freq
from .weights import QuantizedWeight


@dataclass
class Layer:
    attn_norm: object
    qkv: object  # q, k and v projections fused by output rows
    o: object
    mlp_norm: object
    gate_up: object  # gate and up projections fused by output rows
    down: object


class Model:
    def __init__(self, args: ModelArgs, weights: dict, ops):
        self.args, self.ops = args, ops
        self.backend = ops.name
        self.weights_nbytes = sum(w.nbytes for w in weights.values())
        self.embed = ops.prepare_embedding(weights["model.embed_tokens"])
        self.layers = []
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(Layer(
                attn_norm=ops.prepare_norm(weights[p + "input_layernorm"]),
                qkv=ops.prepare_linear([weights[p + f"self_attn.{n}_proj"] for n in "qkv"]),
                o=ops.prepare_linear([weights[p + "self_attn.o_proj"]]),
                mlp_norm=ops.prepare_norm(weights[p + "post_attention_layernorm"]),
                gate_up=ops.prepare_linear([weights[p + "mlp.gate_proj"], weights[p + "mlp.up_proj"]]),
                down=ops.prepare_linear([weights[p + "mlp.down_proj"]]),
            ))
        self.norm = ops.prepare_norm(weights["model.norm"])
        if args.tie_word_embeddings:
            self.lm_head = ops.tied_head(self.embed)
        else:
            self.lm_head = ops.prepare_linear([weights["lm_head"]])
        self.rope = ops.rope_table(rope_inv_freq(args), args.max_position_embeddings)
        self.quantization = _describe_quant(weights)

    @property
    def device(self) -> str:
        return self.ops.device()

    def make_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        a = self.args
        return KVCache(self.ops, a.num_hidden_layers, batch_size, a.num_key_value_heads, a.head_dim,
                       max_len or a.max_position_embeddings)

    def __call__(self, tokens, cache: KVCache, last_only: bool = False):
        """tokens [B, L] (ints) -> logits [B, L, vocab], or [B, 1, vocab] with last_only."""
        tokens = self.ops.asarray(tokens)
        with self.ops.forward_scope(tokens.shape[0] * (1 if last_only else tokens.shape[1])):
            h = self.hidden(tokens, cache)
            return self.head(h[:, -1:, :] if last_only else h)

    def head(self, h):
        return self.ops.linear(self.ops.rms_norm(h, self.norm, self.args.rms_norm_eps), self.lm_head)

    def hidden(self, tokens, cache: KVCache):
        """Run the transformer blocks over tokens [B, L], filling the cache; returns hidden states [B, L, D]."""
        ops, a = self.ops, self.args
        tokens = ops.asarray(tokens)
        B, L = tokens.shape
        H, KV, D, F = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.intermediate_size
        offset = cache.offset
        scale = D ** -0.5
        with ops.forward_scope(B * L):
            h = ops.embedding(self.embed, tokens)
            for i, layer in enumerate(self.layers):
                x = ops.rms_norm(h, layer.attn_norm, a.rms_norm_eps)
                qkv = ops.linear(x, layer.qkv)
                # q and k heads rotate together: one rope call
                qk = ops.rope(qkv[..., : (H + KV) * D].reshape(B, L, H + KV, D).transpose(0, 2, 1, 3),
                              offset, self.rope)
                v = qkv[..., (H + KV) * D:].reshape(B, L, KV, D).transpose(0, 2, 1, 3)
                k, v = cache.update(i, qk[:, H:], v)
                o = ops.attention(qk[:, :H], k, v, scale, causal=True)
                h = h + ops.linear(o.transpose(0, 2, 1, 3).reshape(B, L, H * D), layer.o)
                x = ops.rms_norm(h, layer.mlp_norm, a.rms_norm_eps)
                gu = ops.linear(x, layer.gate_up)
                h = h + ops.linear(ops.swiglu(gu[..., :F], gu[..., F:]), layer.down)
        cache.advance(L)
        return h


def _describe_quant(weights: dict) -> str:
    kinds = {(w.bits, w.group_size) for w in weights.values() if isinstance(w, QuantizedWeight)}
    floats = {str(w.dtype) for w in weights.values() if not isinstance(w, QuantizedWeight)}
    if not kinds:
        return "F16" if floats == {"float16"} else ("F32" if "float32" in floats else "/".join(sorted(floats)))
    return "+".join(f"Q{b}g{g}" for b, g in sorted(kinds))
