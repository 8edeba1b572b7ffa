"""KV cache: preallocated per layer, grown in steps, written in place."""

from __future__ import annotations


class KVCache:
    step = 256

    def __init__(self, ops, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int):
        self.ops = ops
        self.shape = (batch, kv_heads, 0, head_dim)
        self.max_len = max_len
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.offset = 0  # tokens already stored
        self.capacity = 0

    def _grow(self, needed: int) -> None:
        new_cap = min(self.max_len, ((needed + self.step - 1) // self.step) * self.step)
        new_cap = max(new_cap, needed)
        b, h, _, d = self.shape
        for i in range(len(self.keys)):
            extra_k = self.ops.zeros((b, h, new_cap - self.capacity, d))
            extra_v = self.ops.zeros((b, h, new_cap - self.capacity, d))
            if self.keys[i] is None:
                self.keys[i], self.values[i] = extra_k, extra_v
            else:
                self.keys[i] = self.ops.concatenate([self.keys[i][:, :, : self.capacity], extra_k], axis=2)
                self.values[i] = self.ops.concatenate([self.values[i][:, :, : self.capacity], extra_v], axis=2)
        self.capacity = new_cap

    def update(self, layer: int, k, v):
        """Store k, v [B, KV, L, D] at the current offset; return the keys and values up to it, inclusive."""
        start, end = self.offset, self.offset + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, :, start:end, :] = k
        self.values[layer][:, :, start:end, :] = v
        return self.keys[layer][:, :, :end, :], self.values[layer][:, :, :end, :]

    def advance(self, n: int) -> None:
        self.offset += n

    def state(self):
        return [a for a in self.keys + self.values if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state())
