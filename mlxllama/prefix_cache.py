"""A prefix cache: token-id prefixes mapped to the KV they produced, bounded by bytes, least recently used evicted.

Entries live in a radix tree over token ids (edges hold runs of tokens). A lookup walks the tree as far as the new
prompt agrees with some stored sequence; the KV of those first m tokens is a prefix of that entry's KV (position p's
keys and values depend only on tokens 0..p), so any entry below the point where the walk stops serves it.
A stored sequence that extends an entry (a chat's next turn extends the previous one) replaces it.

The budget counts what the entries hold in memory: each stored array is copied into a buffer of its own on insert
(a slice of a sequence's preallocated cache would keep the whole buffer alive, on MLX even after a concatenate),
and an evicted entry's arrays are dropped at once.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    kv: list  # [(k, v)] per layer, k and v [1, KV, len(tokens), D]
    nbytes: int
    used: int = 0


@dataclass
class _Node:
    edge: tuple[int, ...] = ()
    children: dict = field(default_factory=dict)  # first token of the child's edge -> _Node
    entries: set = field(default_factory=set)  # ids of the entries whose tokens pass through or end here


def own(a):
    """A copy of array `a` in a buffer of its own (np.array and mx.array both copy; a lazy backend's copy is
    evaluated by the cache's `eval`); a cache's stored parts (cache.Stored, a tuple of arrays) part by part."""
    if isinstance(a, tuple):
        return type(a)(own(p) for p in a)
    return np.array(a) if isinstance(a, np.ndarray) else type(a)(a)


def _arrays(a) -> list:
    return list(a) if isinstance(a, tuple) else [a]


def _positions(a) -> int:
    return int(_arrays(a)[0].shape[2])


class PrefixCache:
    def __init__(self, max_bytes: int, eval: Callable | None = None):
        """eval(*arrays): the backend's, to run a lazy backend's copies at once (ops.eval)."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the prefix cache budget must be a byte count >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._eval = eval
        self.nbytes = 0
        self._root = _Node()
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        self.hits = self.misses = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens) -> tuple[int, list | None]:
        """(m, kv): the longest stored prefix of `tokens`, m tokens long, and its KV [(k, v)] per layer, each
        sliced to m positions (views: copy them into the sequence's own cache); (0, None) on a miss."""
        tokens = tuple(int(t) for t in tokens)
        with self._lock:
            node, m = self._root, 0
            entry_ids = set()
            while m < len(tokens):
                child = node.children.get(tokens[m])
                if child is None:
                    break
                n = _common(child.edge, tokens, m)
                m += n
                entry_ids = child.entries
                if n < len(child.edge):
                    break
                node = child
            if m == 0 or not entry_ids:
                self.misses += 1
                return 0, None
            entry = self._entries[max(entry_ids, key=lambda i: self._entries[i].used)]
            entry.used = next(self._clock)
            self.hits += 1
            self.hit_tokens += m
            return m, [(k[:, :, :m], v[:, :, :m]) for k, v in entry.kv]

    def store(self, tokens, kv: list) -> bool:
        """Save the KV [(k, v)] per layer of `tokens`, each [1, KV, len(tokens), D] (copied: views of a larger
        buffer are fine). False if it does not fit the budget at all."""
        tokens = tuple(int(t) for t in tokens)
        nbytes = sum(int(k.nbytes) + int(v.nbytes) for k, v in kv)
        if not tokens or nbytes > self.max_bytes:
            return False
        if any(_positions(k) != len(tokens) or _positions(v) != len(tokens) for k, v in kv):
            raise ValueError("the KV to store must hold exactly the tokens' positions")
        kv = [(own(k), own(v)) for k, v in kv]
        if self._eval is not None:
            self._eval(*(a for pair in kv for part in pair for a in _arrays(part)))
        with self._lock:
            for i, e in list(self._entries.items()):
                if len(e.tokens) <= len(tokens) and tokens[: len(e.tokens)] == e.tokens:
                    self._remove(i)  # the new entry covers it
                elif len(e.tokens) > len(tokens) and e.tokens[: len(tokens)] == tokens:
                    e.used = next(self._clock)
                    return True  # already covered by a longer entry
            while self.nbytes + nbytes > self.max_bytes and self._entries:
                self._remove(min(self._entries, key=lambda i: self._entries[i].used))
            i = next(self._ids)
            self._entries[i] = _Entry(tokens, kv, nbytes, next(self._clock))
            self.nbytes += nbytes
            self._insert(tokens, i)
            return True

    def clear(self) -> None:
        with self._lock:
            self._root, self._entries, self.nbytes = _Node(), {}, 0

    def _insert(self, tokens: tuple, i: int) -> None:
        node, m = self._root, 0
        while m < len(tokens):
            child = node.children.get(tokens[m])
            if child is None:
                node.children[tokens[m]] = _Node(tokens[m:], {}, {i})
                return
            n = _common(child.edge, tokens, m)
            if n < len(child.edge):  # split the edge where the new sequence leaves it
                lower = _Node(child.edge[n:], child.children, set(child.entries))
                child.edge, child.children = child.edge[:n], {lower.edge[0]: lower}
            child.entries.add(i)
            node, m = child, m + n

    def _remove(self, i: int) -> None:
        entry = self._entries.pop(i)
        self.nbytes -= entry.nbytes
        node, m, tokens = self._root, 0, entry.tokens
        while m < len(tokens):
            child = node.children[tokens[m]]
            child.entries.discard(i)
            if not child.entries:
                del node.children[tokens[m]]
                return
            node, m = child, m + len(child.edge)


def _common(edge: tuple, tokens: tuple, start: int) -> int:
    n = 0
    for a, b in zip(edge, tokens[start:]):
        if a != b:
            break
        n += 1
    return n
