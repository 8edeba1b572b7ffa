"""KV cache: one buffer per layer for keys and one for values, written in place.

Where the caller knows how many tokens the cache will hold (generation knows prompt + max_tokens), the buffers are
allocated once for exactly that; otherwise (`grow=True`: a chat, a server slot) they start at `step` tokens and
grow by whole steps, each growth one copy. What the forward pass uses: `offset` (tokens stored), `update` and
`advance`; `trim` rolls back (rejected speculative tokens).
"""

from __future__ import annotations


class KVCache:
    step = 256

    def __init__(self, ops, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 grow: bool = False):
        self.ops = ops
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.max_len = max_len
        self.grow = grow
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.offset = 0  # tokens stored
        self.capacity = 0  # tokens the buffers hold

    def _reserve(self, needed: int) -> None:
        if needed > self.max_len:
            raise ValueError(f"the KV cache holds at most {self.max_len} tokens; {needed} needed")
        cap = min(self.max_len, -(-needed // self.step) * self.step) if self.grow else self.max_len
        shape = (self.batch, self.kv_heads, cap - self.capacity, self.head_dim)
        for i in range(len(self.keys)):
            extra_k, extra_v = self.ops.zeros(shape), self.ops.zeros(shape)
            if self.keys[i] is None:
                self.keys[i], self.values[i] = extra_k, extra_v
            else:
                self.keys[i] = self.ops.concatenate([self.keys[i][:, :, : self.capacity], extra_k], axis=2)
                self.values[i] = self.ops.concatenate([self.values[i][:, :, : self.capacity], extra_v], axis=2)
        self.capacity = cap

    def update(self, layer: int, k, v):
        """Store k, v [B, KV, L, D] at the current offset; return the keys and values up to it, inclusive."""
        start, end = self.offset, self.offset + k.shape[2]
        if end > self.capacity:
            self._reserve(end)
        self.keys[layer][:, :, start:end, :] = k
        self.values[layer][:, :, start:end, :] = v
        return self.keys[layer][:, :, :end, :], self.values[layer][:, :, :end, :]

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> int:
        """Forget the last n tokens (at most all of them); returns how many were forgotten."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def prefix(self, n: int) -> list:
        """Copies of the first n tokens' keys and values, [(k, v)] per layer, k and v [B, KV, n, D]: what a prefix
        cache saves, and gives back to a fresh cache through update() and advance()."""
        cat = self.ops.concatenate
        return [(cat([k[:, :, :n]], axis=2), cat([v[:, :, :n]], axis=2)) for k, v in zip(self.keys, self.values)]

    def state(self):
        return [a for a in self.keys + self.values if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state())
