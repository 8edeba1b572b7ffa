"""KV caches: per layer, buffers for keys and values written in place, under one protocol.

Where the caller knows how many tokens the cache will hold (generation knows prompt + max_tokens), the buffers are
allocated once for exactly that; otherwise (`grow=True`: a chat, a server slot) they start at `step` tokens and
grow by whole steps, each growth one copy. What the forward pass uses: `offset` (tokens stored), `update` and
`advance`; `trim` rolls back (rejected speculative tokens).

The protocol, per model (one object holds every layer), because every layer of a sequence stores the same
positions at the same time: a step's offset, a rollback and a prefix are one decision for the whole model.

  offset, update(layer, k, v), advance(n)   the forward pass: store this step's K/V, attend to what is held
  trim(n), can_trim_after(n)                rollback (rejected speculative rows); whether a step of n rows can
                                            still be rolled back afterwards (a wrapped ring cannot)
  prefix_length(n), prefix(n)               the first n positions as a prefix cache entry: per layer (K, V), each
                                            a Stored tuple of the cache's own parts (float K; or quantized data,
                                            scales, biases), sliceable like one array along positions; no
                                            re-encoding, so a restored prefix is bit for bit what was computed
  load_prefix(kv, m)                        such an entry's first m positions into a fresh cache of the same kind
  bytes_per_position, stored, nbytes, state the accounting (accounting.py) and evaluation

Two independent choices, so every combination exists:
  storage   float K/V in the backend's dtype; or float16 (`dtype="float16"`: half the bytes of a float32
            backend, llama.cpp's default cache type and the numpy backend's unless asked otherwise; `update`
            returns them widened to the backend's dtype); or
            quantized along head_dim as stored (`bits` 8 or 4: MLX's affine format, a scale and a bias per
            group); `update` then returns QuantizedKV tuples that ops.attention attends to without widening the
            cache (on MLX, mx.quantized_matmul, as mlx-lm does).
  window    every position (KVCache, QuantizedKVCache), or RotatingKVCache: at most `max_size` positions, the
            first `keep` (attention sinks) and a ring of the most recent max_size - keep (mlx-lm's). Positions
            keep counting (RoPE sees the true ones).
CacheSettings says which one a generation, a chat or a server slot wants; for_backend fills in the backend's float
storage (ops.kv_dtype) where it leaves it unset; make_cache builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .accounting import kv_element_bytes  # noqa: F401  (re-exported)
from .backends.contract import QuantizedKV
from .errors import UsageError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
KV_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class CacheSettings:
    """kv_bits: None (float K/V) or 4 / 8; kv_group_size: the quantization group along head_dim;
    max_kv_size: None (every position) or a rotating window of that many positions, the first `keep` kept;
    kv_dtype: a float cache's storage: None (the backend's choice, its kv_dtype: float16 on the numpy backend, as
    llama.cpp's cache; the activations' dtype on MLX), "float16" or "float32" (a float32 backend's dtype)."""

    kv_bits: int | None = None
    kv_group_size: int = 64
    max_kv_size: int | None = None
    keep: int = 4
    kv_dtype: str | None = None

    def validate(self, head_dim: int | None = None) -> "CacheSettings":
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise UsageError(f"--kv-bits must be 4 or 8, got {self.kv_bits}")
        if self.kv_group_size not in KV_GROUP_SIZES:
            raise UsageError(f"--kv-group-size must be 32, 64 or 128, got {self.kv_group_size}")
        if self.kv_bits is not None and head_dim is not None and head_dim % self.kv_group_size:
            raise UsageError(f"--kv-group-size {self.kv_group_size} does not divide the head size {head_dim}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise UsageError(f"--kv-dtype must be float16 or float32, got {self.kv_dtype}")
        if self.kv_dtype is not None and self.kv_bits is not None:
            raise UsageError(f"--kv-dtype {self.kv_dtype} is a float cache; it does not combine with --kv-bits")
        if self.max_kv_size is not None:
            if self.max_kv_size <= self.keep:
                raise UsageError(f"--max-kv-size must be more than the {self.keep} kept first tokens, "
                                 f"got {self.max_kv_size}")
        return self

    @property
    def default(self) -> bool:
        return self.kv_bits is None and self.max_kv_size is None and self.kv_dtype is None


def for_backend(settings: CacheSettings | None, ops) -> CacheSettings:
    """settings with a float cache's storage as `ops` keeps it: kv_dtype "float16" or "float32", or None (the
    backend's float dtype). What the caches and the byte counts (accounting) take; settings it returned come back
    unchanged."""
    s = settings or CacheSettings()
    if s.kv_bits is not None:
        return s
    if s.kv_dtype == "float32" and ops.float_bytes != 4:
        raise UsageError(f"--kv-dtype float32: the {ops.name} backend computes in {8 * ops.float_bytes}-bit floats "
                         "here; its cache is float16")
    return replace(s, kv_dtype=s.kv_dtype or ops.kv_dtype)


def make_cache(ops, args, batch: int, max_len: int | None = None, settings: CacheSettings | None = None):
    """The cache `settings` asks for, for a model of `args`: exactly max_len tokens, or growing up to the context."""
    s = for_backend((settings or CacheSettings()).validate(args.head_dim), ops)
    shape = (ops, args.num_hidden_layers, batch, args.num_key_value_heads, args.head_dim)
    length = max_len or args.max_position_embeddings
    if s.max_kv_size is not None:
        if args.sliding_window is not None and s.max_kv_size > args.sliding_window:
            raise UsageError(f"--max-kv-size {s.max_kv_size} is more than the model's sliding window "
                             f"({args.sliding_window}); give at most that")
        return RotatingKVCache(*shape, max_size=min(s.max_kv_size, length), keep=s.keep, bits=s.kv_bits,
                               group_size=s.kv_group_size, dtype=s.kv_dtype)
    if s.kv_bits is not None:
        return QuantizedKVCache(*shape, length, grow=max_len is None, bits=s.kv_bits, group_size=s.kv_group_size)
    return KVCache(*shape, length, grow=max_len is None, dtype=s.kv_dtype)


class Stored(tuple):
    """The stored parts of K or V for some positions (float: one array; quantized: data, scales, biases), each
    [B, KV, n, ...]: indexing with a tuple slices every part alike, and nbytes adds them up (a prefix cache entry)."""

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return Stored(p[idx] for p in self)
        return tuple.__getitem__(self, idx)

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self)


class KVCache:
    step = 256

    def __init__(self, ops, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 grow: bool = False, bits: int | None = None, group_size: int = 64, dtype: str | None = None):
        self.ops = ops
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.max_len = max_len
        self.grow = grow
        if bits is not None:
            CacheSettings(kv_bits=bits, kv_group_size=group_size).validate(head_dim)
        self.bits, self.group_size = bits, group_size
        CacheSettings(kv_bits=bits, kv_dtype=dtype).validate()
        dtype = None if dtype == "float32" else dtype
        self.dtype = dtype  # None: the backend's float dtype; "float16": stored as float16, read back widened
        self._stored_dtype = ops.float16_dtype if dtype == "float16" else None
        # per layer, a tuple of buffers for the keys and one for the values (one array; quantized: data, scales,
        # biases)
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.offset = 0  # tokens stored
        self.capacity = 0  # tokens the buffers hold

    # What is stored for k [B, KV, L, D]: a tuple of arrays [B, KV, L, ...].
    def _encode(self, k) -> tuple:
        if self.bits is None:
            return (k,) if self._stored_dtype is None else (k.astype(self._stored_dtype),)
        q = self.ops.quantize_kv(k, self.group_size, self.bits)
        return (q.data, q.scales, q.biases)

    def _decode(self, parts: tuple):
        if self.bits is None:
            if self._stored_dtype is None or self.ops.attends_half:
                return parts[0]
            return parts[0].astype(self.ops.float_dtype)
        return QuantizedKV(*parts, self.group_size, self.bits)

    def _reserve(self, needed: int, like: tuple) -> None:
        if needed > self.max_len:
            raise ValueError(f"the KV cache holds at most {self.max_len} tokens; {needed} needed")
        cap = min(self.max_len, -(-needed // self.step) * self.step) if self.grow else self.max_len
        for i in range(len(self.keys)):
            for store in (self.keys, self.values):
                extra = tuple(self.ops.zeros((self.batch, self.kv_heads, cap - self.capacity) + p.shape[3:],
                                             dtype=p.dtype) for p in like)
                if store[i] is None:
                    store[i] = extra
                else:
                    store[i] = tuple(self.ops.concatenate([a[:, :, : self.capacity], e], axis=2)
                                     for a, e in zip(store[i], extra))
        self.capacity = cap

    def reserve(self, needed: int) -> None:
        """Buffers for at least `needed` positions before they are written (a plain float cache; a compiled step
        writes into them in place)."""
        if needed > self.capacity:
            dtype = self._stored_dtype or self.ops.float_dtype
            self._reserve(needed, (self.ops.zeros((self.batch, self.kv_heads, 0, self.head_dim), dtype=dtype),))

    def _write(self, layer: int, start: int, ks: tuple, vs: tuple) -> None:
        end = start + ks[0].shape[2]
        if end > self.capacity:
            self._reserve(end, ks)
        for store, new in ((self.keys[layer], ks), (self.values[layer], vs)):
            for buf, part in zip(store, new):
                buf[:, :, start:end, ...] = part

    def update(self, layer: int, k, v):
        """Store k, v [B, KV, L, D] at the current offset; return the keys and values up to it, inclusive."""
        end = self.offset + k.shape[2]
        self._write(layer, self.offset, self._encode(k), self._encode(v))
        return (self._decode(tuple(a[:, :, :end] for a in self.keys[layer])),
                self._decode(tuple(a[:, :, :end] for a in self.values[layer])))

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> int:
        """Forget the last n tokens (at most all of them); returns how many were forgotten."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def can_trim_after(self, n: int) -> bool:
        """Whether, after n more tokens are stored, up to n of them can still be trimmed."""
        return True

    @property
    def stored(self) -> int:
        """Positions held (what attention reads)."""
        return self.offset

    @property
    def bytes_per_position(self) -> float:
        """K and V of one position, every layer (quantized: scales and biases included)."""
        element = kv_element_bytes(self.ops.float_bytes, self.bits, self.group_size, self.dtype)
        return 2 * len(self.keys) * self.batch * self.kv_heads * self.head_dim * element

    def prefix_length(self, n: int) -> int:
        """How many of the first n positions are held intact (prefix() can save them)."""
        return min(n, self.offset)

    def prefix(self, n: int) -> list:
        """Copies of the first n positions, [(K, V)] per layer, each a Stored tuple of this cache's parts [B, KV, n,
        ...]: what a prefix cache saves, and gives back to a fresh cache of the same kind through load_prefix."""
        cat = self.ops.concatenate

        def copy(parts):
            return Stored(cat([p[:, :, :n]], axis=2) for p in parts)

        return [(copy(k), copy(v)) for k, v in zip(self.keys, self.values)]

    def load_prefix(self, kv: list, m: int) -> None:
        """The first m positions of a prefix() result (or a slice of one) into this fresh cache."""
        for layer, (k, v) in enumerate(kv):
            self._write(layer, 0, tuple(p[:, :, :m] for p in k), tuple(p[:, :, :m] for p in v))
        self.advance(m)

    def state(self):
        return [a for parts in self.keys + self.values if parts is not None for a in parts]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state())


class QuantizedKVCache(KVCache):
    """Keys and values quantized as they are stored (ops.quantize_kv: mx.quantize's format on MLX, bit for bit the
    same in numpy); update returns QuantizedKV tuples."""

    def __init__(self, ops, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 grow: bool = False, bits: int = 8, group_size: int = 64):
        super().__init__(ops, num_layers, batch, kv_heads, head_dim, max_len, grow, bits, group_size)


class RotatingKVCache(KVCache):
    """At most max_size positions: the first `keep` and the latest max_size - keep, in a ring; float or quantized
    storage (bits), like any cache.

    One token at a time, the new one overwrites the oldest ring slot and attention gets the whole buffer (its
    order does not matter to a single query: keys were rotated before they were stored). A chunk of several
    tokens that overflows gets the kept positions in temporal order with the chunk appended, so that its causal
    mask holds, and the buffer is rewritten in order from that (mlx-lm's RotatingKVCache does the same).
    """

    def __init__(self, ops, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_size: int,
                 keep: int = 4, bits: int | None = None, group_size: int = 64, dtype: str | None = None):
        if max_size <= keep:
            raise UsageError(f"a rotating KV cache needs more than {keep} positions, got {max_size}")
        super().__init__(ops, num_layers, batch, kv_heads, head_dim, max_size, True, bits, group_size, dtype)
        self.max_size, self.keep = max_size, keep
        self._next = keep  # the ring slot the next single token goes to, once the buffer is full
        self._pending = None  # the ring slot after this step's update (the same for every layer)

    @property
    def stored(self) -> int:
        """Positions held (at most max_size)."""
        return min(self.offset, self.max_size)

    def _in_order(self, buf):
        """The held positions of one buffer, oldest first."""
        if self.offset <= self.max_size or self._next == self.keep:
            return buf[:, :, : self.stored]
        return self.ops.concatenate([buf[:, :, : self.keep], buf[:, :, self._next:], buf[:, :, self.keep: self._next]],
                                    axis=2)

    def update(self, layer: int, k, v):
        L = k.shape[2]
        if self.offset + L <= self.max_size:  # not full yet: an ordinary cache
            self._pending = self.keep
            return super().update(layer, k, v)
        ks, vs = self._encode(k), self._encode(v)
        if self.capacity < self.max_size:
            self._reserve(self.max_size, ks)
        if L == 1 and self.offset >= self.max_size:
            slot = self._next
            for store, new in ((self.keys[layer], ks), (self.values[layer], vs)):
                for buf, part in zip(store, new):
                    buf[:, :, slot: slot + 1] = part
            self._pending = slot + 1 if slot + 1 < self.max_size else self.keep
            return self._decode(self.keys[layer]), self._decode(self.values[layer])
        ring = self.max_size - self.keep
        out = []
        for store, new in ((self.keys[layer], ks), (self.values[layer], vs)):
            full = tuple(self.ops.concatenate([self._in_order(buf), part], axis=2) for buf, part in zip(store, new))
            for buf, f in zip(store, full):
                buf[:, :, : self.keep] = f[:, :, : self.keep]
                buf[:, :, self.keep:] = f[:, :, f.shape[2] - ring:]
            out.append(self._decode(full))
        self._pending = self.keep
        return out[0], out[1]

    def advance(self, n: int) -> None:
        super().advance(n)
        if self._pending is not None:
            self._next, self._pending = self._pending, None

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n and self.offset > self.max_size:
            raise UsageError(f"a rotating KV cache of {self.max_size} positions cannot roll back once it has "
                             f"wrapped ({self.offset} tokens seen): the overwritten positions are gone")
        self.offset -= n
        return n

    def can_trim_after(self, n: int) -> bool:
        return self.offset + n <= self.max_size

    def prefix_length(self, n: int) -> int:
        return min(n, self.offset) if self.offset <= self.max_size else 0
