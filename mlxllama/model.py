"""The forward pass of every supported family (LLaMA, Mistral, Qwen2, Qwen3), written once over the backend
contract (backends/contract.py). Families differ only by switches in ModelArgs: q/k/v and o biases, per-head
q/k RMSNorm, sliding-window attention, tied embeddings and the RoPE scaling."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .cache import CacheSettings, KVCache, make_cache
from .config import ModelArgs
from .memory import return_freed_memory
from .rope import rope_inv_freq


class Layer(NamedTuple):  # a tuple, so that mx.compile can take a layer's weights as inputs
    attn_norm: object
    qkv: object  # q, k and v projections fused by output rows
    o: object
    mlp_norm: object
    gate_up: object  # gate and up projections fused by output rows
    down: object
    qkv_bias: object = None  # [(H + 2 KV) * Dh], where the family has q/k/v biases
    o_bias: object = None
    qk_norm: object = None  # [H + KV, Dh]: q_norm for each q head, then k_norm for each k head


class Model:
    def __init__(self, args: ModelArgs, weights: dict, ops, release: bool = False, vocab_start: int | None = None):
        """release=True empties `weights` as each tensor is laid out for the backend, so that the loader's copy
        and the backend's never coexist in full (lower peak memory while loading).

        A rank of a distributed run (distributed.py) passes the args of its part (heads and MLP rows, or layers)
        and only its weights; vocab_start: the first vocabulary row its embedding table and head hold (tensor
        parallel). Without an embedding table (a later pipeline stage) the model runs only blocks()."""
        self.args, self.ops = args, ops
        self.vocab_start = vocab_start
        self.weights_nbytes = sum(w.nbytes for w in weights.values())
        take = weights.pop if release else weights.__getitem__
        self.embed = self.lm_head = self.norm = None
        if "model.embed_tokens" in weights:
            self.embed = ops.prepare_embedding(take("model.embed_tokens"))
        if args.tie_word_embeddings:
            self.lm_head = None if self.embed is None else ops.tied_head(self.embed)
        elif "lm_head" in weights:
            self.lm_head = ops.prepare_linear([take("lm_head")])
        self.layers = []
        H, KV = args.num_attention_heads, args.num_key_value_heads
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            qkv_bias = o_bias = qk_norm = None
            if args.qkv_bias:
                qkv_bias = ops.prepare_norm(np.concatenate([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            if args.o_bias:
                o_bias = ops.prepare_norm(take(p + "self_attn.o_proj.bias"))
            if args.qk_norm:
                q_norm, k_norm = take(p + "self_attn.q_norm"), take(p + "self_attn.k_norm")
                qk_norm = ops.prepare_norm(np.concatenate([np.broadcast_to(q_norm, (H, q_norm.shape[0])),
                                                           np.broadcast_to(k_norm, (KV, k_norm.shape[0]))]))
            self.layers.append(Layer(
                attn_norm=ops.prepare_norm(take(p + "input_layernorm")),
                qkv=ops.prepare_linear([take(p + f"self_attn.{n}_proj") for n in "qkv"]),
                o=ops.prepare_linear([take(p + "self_attn.o_proj")]),
                mlp_norm=ops.prepare_norm(take(p + "post_attention_layernorm")),
                gate_up=ops.prepare_linear([take(p + "mlp.gate_proj"), take(p + "mlp.up_proj")]),
                down=ops.prepare_linear([take(p + "mlp.down_proj")]),
                qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
            ))
            if release:
                return_freed_memory(collect=False)  # the loader's copy of this layer, laid out again, leaves at once
        if "model.norm" in weights:
            self.norm = ops.prepare_norm(take("model.norm"))
        self.rope = ops.rope_table(rope_inv_freq(args))
        if release:
            return_freed_memory()
        # The per-layer pieces around attention; a backend may compile them for single-token steps.
        self._attn_in = ops.compile(self._attn_in_impl)
        self._attn_out_mlp = ops.compile(self._attn_out_mlp_impl)
        self._decode = ops.decode_program(self)  # the whole single-token step as one call, where the backend has it

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the weights as the backend holds them (numpy's float32 mode: 4 per weight)."""
        held = {id(w): w for w in (self.embed, self.norm, self.lm_head) if w is not None}
        for layer in self.layers:
            held.update((id(w), w) for w in layer if w is not None)
        return sum(int(w.nbytes) for w in held.values())

    @property
    def device(self) -> str:
        return self.ops.device()

    def make_cache(self, batch_size: int = 1, max_len: int | None = None,
                   settings: CacheSettings | None = None) -> KVCache:
        """A cache for exactly max_len tokens, allocated once; without max_len, one that grows up to the context.
        settings: quantized K/V or a rotating window (cache.CacheSettings)."""
        return make_cache(self.ops, self.args, batch_size, max_len, settings)

    def __call__(self, tokens, cache: KVCache, last_only: bool = False):
        """tokens [B, L] (ints) -> logits [B, L, vocab], or [B, 1, vocab] with last_only."""
        tokens = self.ops.asarray(tokens)
        if self._decode is not None and tuple(tokens.shape) == (1, 1):
            logits = self._decode(tokens, cache)
            if logits is not None:
                return logits
        elif tokens.shape[0] == 1:
            logits = self._program_rows([tokens[0]], [cache], [1 if last_only else tokens.shape[1]])
            if logits is not None:
                return logits[None]
        with self.ops.forward_scope(tokens.shape[0] * tokens.shape[1]):  # the rows the blocks run, head or not
            h = self.hidden(tokens, cache)
            return self.head(h[:, -1:, :] if last_only else h)

    def head(self, h):
        """Logits of the whole vocabulary: a rank holding part of it gathers the others' (all_gather)."""
        return self.ops.all_gather(self.ops.linear(self.ops.rms_norm(h, self.norm, self.args.rms_norm_eps),
                                                   self.lm_head))

    def hidden(self, tokens, cache: KVCache):
        """Run the transformer blocks over tokens [B, L], filling the cache; returns hidden states [B, L, D]."""
        tokens = self.ops.asarray(tokens)
        with self.ops.forward_scope(tokens.shape[0] * tokens.shape[1]):
            return self.blocks(self.ops.all_sum(self.ops.embedding(self.embed, tokens, self.vocab_start)), cache)

    def fill(self, tokens, cache: KVCache) -> None:
        """hidden() whose result is not needed (prompt chunks): a pipeline need not send it back."""
        self.hidden(tokens, cache)

    def blocks(self, h, cache: KVCache):
        """Run the transformer blocks over hidden states h [B, L, D], filling the cache."""
        B, L, _ = h.shape
        offset = cache.offset
        with self.ops.forward_scope(B * L):
            for i, layer in enumerate(self.layers):
                h = self._attn_out_mlp(h, self._attend(h, i, cache, offset), layer)
        cache.advance(L)
        return h

    def _attend(self, h, i: int, cache: KVCache, offset):
        """Layer i's attention output [B, H, L, D] for h, its keys and values stored (q, k and v are not held
        past it: a long prompt's activations are dropped as soon as they are used)."""
        a = self.args
        q, k, v = self._attn_in(h, self.layers[i], offset)
        k, v = cache.update(i, k, v)
        return self.ops.attention(q, k, v, a.head_dim ** -0.5, causal=True, window=a.sliding_window)

    def _attn_in_impl(self, h, layer: Layer, offset):
        """h [B, L, hidden] -> q [B, H, L, D], k and v [B, KV, L, D], q and k rotated for positions offset..."""
        H = self.args.num_attention_heads
        qk, v = self._qkv_heads(h, layer)
        qk = self.ops.rope(qk, offset, self.rope)
        return qk[:, :H], qk[:, H:], v

    def _qkv_heads(self, h, layer: Layer):
        """h [B, L, hidden] -> q and k heads together [B, H + KV, L, D] (normed, not rotated), v [B, KV, L, D]."""
        ops, a = self.ops, self.args
        B, L, _ = h.shape
        H, KV, D = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        qkv = ops.linear(ops.rms_norm(h, layer.attn_norm, a.rms_norm_eps), layer.qkv)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        # q and k heads are normed and rotated together: one call each
        qk = qkv[..., : (H + KV) * D].reshape(B, L, H + KV, D)
        if layer.qk_norm is not None:
            qk = ops.rms_norm(qk, layer.qk_norm, a.rms_norm_eps)
        v = qkv[..., (H + KV) * D:].reshape(B, L, KV, D).transpose(0, 2, 1, 3)
        return qk.transpose(0, 2, 1, 3), v

    def forward_batch(self, chunks: list, caches: list, rows: list[int] | None = None, tokens=None):
        """One step over several sequences, each with its own cache: chunks[i] is sequence i's new token ids (one
        decode token, a speculating sequence's token and drafts, or a piece of its prompt). The linears run once
        over all sequences' rows, flattened together; RoPE and attention run per sequence against its own cache.
        Returns the logits of the last rows[i] positions of each chunk (default 1 each), concatenated:
        [sum(rows), vocab]; None when rows are all 0 (prompt pieces only: no output head). tokens: the chunks
        concatenated as a backend array [1, total] already (a distributed rank's, received)."""
        ops, a = self.ops, self.args
        rows = [1] * len(chunks) if rows is None else rows
        if tokens is None:
            logits = self._program_rows(chunks, caches, rows)
            if logits is not None:
                return logits if len(logits) else None
        H = a.num_attention_heads
        lens = [len(c) for c in chunks]
        ends = np.cumsum(lens)
        if tokens is None:
            tokens = ops.asarray(np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks])[None, :])
        with ops.forward_scope(int(ends[-1])):
            h = ops.all_sum(ops.embedding(self.embed, tokens, self.vocab_start))
            for i, layer in enumerate(self.layers):
                qk, v = self._qkv_heads(h, layer)
                outs = []
                for cache, n, end in zip(caches, lens, ends):
                    span = slice(int(end) - n, int(end))
                    qk_s = ops.rope(qk[:, :, span], cache.offset, self.rope)
                    k, vv = cache.update(i, qk_s[:, H:], v[:, :, span])
                    outs.append(ops.attention(qk_s[:, :H], k, vv, a.head_dim ** -0.5, causal=True,
                                              window=a.sliding_window))
                h = self._attn_out_mlp(h, outs[0] if len(outs) == 1 else ops.concatenate(outs, axis=2), layer)
            for cache, n in zip(caches, lens):
                cache.advance(n)
            last = [h[:, int(e) - r: int(e)] for e, r in zip(ends, rows) if r]
            if not last:
                return None
            return self.head(last[0] if len(last) == 1 else ops.concatenate(last, axis=1))[0]

    def _program_rows(self, chunks: list, caches: list, rows: list[int]):
        """The backend's compiled multi-row step where it has one and takes this step (see forward_batch for the
        arguments; [0, vocab] where every rows[i] is 0), else None."""
        program = getattr(self._decode, "rows", None)
        return None if program is None else program(chunks, caches, rows)

    def _attn_out_mlp_impl(self, h, o, layer: Layer):
        """The attention output projection and the MLP, each added to the residual stream h."""
        ops, a = self.ops, self.args
        B, L, _ = h.shape
        F = a.intermediate_size
        # o and down are row-parallel on a tensor-parallel rank: each holds part of the sum (all_sum adds them)
        attn = ops.all_sum(ops.linear(o.transpose(0, 2, 1, 3).reshape(B, L, -1), layer.o))
        del o
        h = h + (attn if layer.o_bias is None else attn + layer.o_bias)
        del attn
        gu = ops.linear(ops.rms_norm(h, layer.mlp_norm, a.rms_norm_eps), layer.gate_up)
        act = ops.swiglu(gu[..., :F], gu[..., F:])
        del gu  # a long prompt's [L, 2F] is not held through the down product
        return h + ops.all_sum(ops.linear(act, layer.down))


def prefill(model, tokens, cache, step: int = 512, progress=None):
    """Run tokens [B, n] through the model in chunks of `step`, every position but the last only through the blocks
    (filling the cache), the last also through the output head. Returns the logits of the last position, [B, 1, V].
    The engine prefills a lone sequence this way (a chunk per step); the draft model and bench's untimed context
    too. progress(done, n) before and after each chunk."""
    n = tokens.shape[1]
    if progress is not None:
        progress(0, n)
    for s in range(0, n - 1, step):
        model.fill(tokens[:, s: min(s + step, n - 1)], cache)
        model.ops.eval(*cache.state())
        if progress is not None:
            progress(min(s + step, n - 1), n)
    return model(tokens[:, n - 1:], cache, last_only=True)
