"""Multi-row steps of the compiled program (numpy_step.DecodeProgram.rows, attached by NumpyOps.decode_program):
T rows in total (up to MAX_ROWS), belonging to S sequences, each with its own plain float KVCache, in one compiled
call.

A sequence's rows sit at positions offset, offset + 1, ... of its cache (causal within the chunk, the sliding window
honoured). The phases are the single-token program's (per layer: qkv, the K/V heads, o, gate_up, down; then the
head), claimed and counted through atomic counters the same way, each product in two phases:
- its input, a unit per row: the row formed (norm, SiLU gate) and rounded as PackedLinear.quantize_input rounds
  it, into shared buffers, so a row's numbers are the op-by-op path's and no thread rounds every row;
- the product, a unit per chunk of output rows, every input row passing over a chunk while its weights are in
  cache;
- attention takes two phases: the keys (units: (sequence, K/V head) pairs), every row's key and value written at
  its position; then the queries (units: a K/V head's query heads over QUERY_ROWS rows of a sequence), each row
  attending to the positions it may see, so one sequence's verification rows are shared by every thread;
- the head runs only over the rows whose logits are wanted (none: no head at all).
"""

from __future__ import annotations

import logging
import time
import weakref

import numpy as np
from numba import njit

from .numpy_step import (DOWN, GATE_UP, O, PAD, QKV, _DH, _H, _KV, _PF, _QK_NORM, _QKV_BIAS, _WINDOW, _chunking,
                         _claim, _done, _keys, _kv, _quantize, _queries, _rms_norm, _silu_gate, _wait, _weight, bare,
                         kv_addresses)
from .numpy_threads import ThreadChoice
from .qmatvec import _rows

logger = logging.getLogger(__name__)

# Steps of several sequences up to the engine's prefill_step (a served burst's prompts) are one call: against op by op,
# SmolLM2's 8 prompts of 16 rows 169 -> 102 ms (Zen 4, two threads).
MAX_ROWS = 512
# A lone sequence's steps (speculative verification, a prompt piece where its cache holds buffers) take the program up
# to this many rows; its longer pieces and a fresh cache's first piece run op by op. Taking them too (a 512-row
# prompt 633 -> 515 ms) made a new install's first `mlxllama generate` compile this program as well: 20.7 -> 34.7 s.
LONE_ROWS = 64
# Logits of at most this many rows a call: a whole prompt's (perplexity, echoed logprobs) steps op by op rather than
# keep a [512, vocab] buffer (100 MB for SmolLM2) for the model's lifetime.
MAX_LOGIT_ROWS = 64
# Steps of up to this many rows time their thread count; longer ones (prompt pieces) are bound by the products'
# arithmetic and take every thread, as the op-by-op products do.
TIMED_ROWS = 64
_START, _COUNT, _OFFSET, _CAP = range(4)  # seqs' columns: first row, rows, cache offset, cache capacity
NORM, GATE, AS_IS = range(3)  # how a phase forms its input rows
ROW_PHASES = 10  # per layer: qkv's input and product, the keys, the queries, then o's, gate_up's and down's input and
# product
QUERY_ROWS = 2  # rows of a sequence per query unit: one sequence's verification rows spread over the threads
# bufs: the rounded inputs (shared, flat), the shared activations, then the attention scratch (per thread)
_XF, _XQ, _DX, _H_ROWS, _QKV_OUT, _ATTN, _Y, _GU, _LOGITS, _ZEROS, _ATT_SCRATCH = range(11)


@njit(cache=True, nogil=True)
def _norm_row(h, rows, k, w, eps, out):
    """out[k] = rms_norm(h[rows[k]]) * w: as numpy_ops.rms_norm forms a single row where rows holds one, else as
    it forms several (float32 throughout)."""
    if rows.shape[0] == 1:
        _rms_norm(h[rows[0]], w, eps, out[0])
        return
    d, x = h.shape[1], h[rows[k]]
    ss = np.float32(0)
    for i in range(d):
        ss += x[i] * x[i]
    s = np.float32(1) / np.sqrt(ss / np.float32(d) + np.float32(eps))
    for i in range(d):
        out[k, i] = (x[i] * s) * w[i]


@njit(cache=True, nogil=True)
def _views(n, T, bufs):
    """The shared buffers for T rounded input rows of width n, as PackedLinear.input_buffers shapes them: xq
    [T, n], dxs [2, n / 32, T]."""
    return bufs[_XQ][: T * n].reshape((T, n)), bufs[_DX][: 2 * (n // 32) * T].reshape((2, n // 32, T))


@njit(cache=True, nogil=True)
def _products(tag, W, stag, meta, bfac, i, xin, T, y, h, bias, residual, sync, j, c):
    """y[:T, rows] = linear i's rows of chunk c and every further chunk this thread claims, for the rounded T
    input rows xin (_views'); with residual, also h[:T, rows] += y + bias."""
    n_out = y.shape[1]
    chunk, n = _chunking(n_out)
    w, sc, bi = _weight(W, stag, meta, i)
    while c < n:
        o0, o1 = c * chunk, min(n_out, c * chunk + chunk)
        _rows(tag, w, sc, bi, bfac[i], meta[i, 0], meta[i, 1], xin[0], xin[1], y, o0, o1, meta[i, _PF])
        if residual:
            for r in range(T):
                for o in range(o0, o1):
                    h[r, o] = h[r, o] + (y[r, o] + bias[o])
        _done(sync, j)
        c = _claim(sync, j)


@njit(cache=True, nogil=True)
def _form(sync, j, kind, src, rows, w, eps, x, m, xin):
    """Phase j, a unit per row: row k of a product's input into x[k] (NORM of src[rows[k]] times w; GATE:
    silu(gate) * up of src [T, 2F]; AS_IS: x is src), rounded into xin for the product whose meta row is m."""
    T, F = rows.shape[0], x.shape[1]
    k = _claim(sync, j)
    while k < T:
        if kind == NORM:
            _norm_row(src, rows, k, w, eps, x)
        elif kind == GATE:
            _silu_gate(src[k, :F], src[k, F:], x[k])
        _quantize(x[k: k + 1], m, xin[0][k: k + 1], xin[1][:, :, k: k + 1])
        _done(sync, j)
        k = _claim(sync, j)
    _wait(sync, j, T)


@njit(cache=True, nogil=True)
def _linear(sync, j, i, kind, src, rows, nw, eps, x, tag, W, stag, meta, bfac, y, h, bias, residual, bufs):
    """Phases j (the input rows formed and rounded, _form) and j + 1 (linear i's chunks of output rows)."""
    T = rows.shape[0]
    xin = _views(x.shape[1], T, bufs)
    _form(sync, j, kind, src, rows, nw, eps, x, meta[i], xin)
    _products(tag, W, stag, meta, bfac, i, xin, T, y, h, bias, residual, sync, j + 1, _claim(sync, j + 1))
    _wait(sync, j + 1, _chunking(y.shape[1])[1])


@njit(inline="always")
def _query_units(seqs, s, KV):
    """Sequence s's query units: its rows by QUERY_ROWS, for each K/V head."""
    return (seqs[s, _COUNT] + QUERY_ROWS - 1) // QUERY_ROWS * KV


@njit(cache=True, nogil=True)
def _heads(tid, sync, j, l, seqs, K, V, cos, sin, qkv_bias, qk_norm, dims, eps, scale, bufs):
    """Phase j: units (sequence, K/V head), each writing its rows' keys and values; phase j + 1: units (sequence,
    block of QUERY_ROWS rows, K/V head), each attending its rows' query heads causally."""
    qkv, attn = bufs[_QKV_OUT], bufs[_ATTN]
    hv, tmp, scores = bufs[_ATT_SCRATCH][0][tid], bufs[_ATT_SCRATCH][1][tid], bufs[_ATT_SCRATCH][2][tid]
    KV, S = dims[_KV], seqs.shape[0]
    u = _claim(sync, j)
    while u < S * KV:
        s, g = u // KV, u % KV
        start, count, offset, cap = seqs[s, _START], seqs[s, _COUNT], seqs[s, _OFFSET], seqs[s, _CAP]
        _keys(l, g, start, count, offset, qkv, qkv_bias, qk_norm, _kv(K[s, l], dims, cap), _kv(V[s, l], dims, cap),
              cos, sin, dims, eps, hv[0], tmp)
        _done(sync, j)
        u = _claim(sync, j)
    _wait(sync, j, S * KV)
    units = 0
    for s in range(S):
        units += _query_units(seqs, s, KV)
    u = _claim(sync, j + 1)
    while u < units:
        s, rest = 0, u
        while rest >= _query_units(seqs, s, KV):
            rest -= _query_units(seqs, s, KV)
            s += 1
        r0, g = rest // KV * QUERY_ROWS, rest % KV
        start, count, offset, cap = seqs[s, _START], seqs[s, _COUNT], seqs[s, _OFFSET], seqs[s, _CAP]
        _queries(l, g, start + r0, min(QUERY_ROWS, count - r0), offset + r0, qkv, qkv_bias, qk_norm,
                 _kv(K[s, l], dims, cap), _kv(V[s, l], dims, cap), cos, sin, dims, eps, scale, hv, tmp, scores, attn)
        _done(sync, j + 1)
        u = _claim(sync, j + 1)
    _wait(sync, j + 1, units)


@njit(cache=True, nogil=True)
def _layer(tid, sync, l, seqs, every, tag, W, stag, meta, bfac, K, V, cos, sin, norms,
           qkv_bias, o_bias, qk_norm, dims, eps, scale, bufs):
    """Layer l's phases over the T rows (every: 0..T - 1): each product's input formed, then the product; the keys
    and the queries (_heads) after qkv."""
    T = every.shape[0]
    h, qkv, attn, y, gu, zeros = (bufs[_H_ROWS], bufs[_QKV_OUT], bufs[_ATTN], bufs[_Y], bufs[_GU], bufs[_ZEROS])
    i, j, D, F = 4 * l, ROW_PHASES * l, h.shape[1], gu.shape[1] // 2
    x, xf = bufs[_XF][: T * D].reshape((T, D)), bufs[_XF][: T * F].reshape((T, F))
    _linear(sync, j, i + QKV, NORM, h, every, norms[2 * l], eps, x, tag, W, stag, meta, bfac,
            qkv, h, zeros, False, bufs)
    _heads(tid, sync, j + 2, l, seqs, K, V, cos, sin, qkv_bias, qk_norm, dims, eps, scale, bufs)
    _linear(sync, j + 4, i + O, AS_IS, attn[:T], every, zeros, eps, attn[:T], tag, W, stag,
            meta, bfac, y, h, o_bias[l], True, bufs)
    _linear(sync, j + 6, i + GATE_UP, NORM, h, every, norms[2 * l + 1], eps, x, tag, W, stag,
            meta, bfac, gu, h, zeros, False, bufs)
    _linear(sync, j + 8, i + DOWN, GATE, gu[:T], every, zeros, eps, xf, tag, W, stag, meta,
            bfac, y, h, zeros, True, bufs)


@njit(cache=True, nogil=True)
def rows_step(tid, nthr, sync, seqs, want, tag, W, stag, meta, bfac, K, V, cos, sin, norms,
              qkv_bias, o_bias, qk_norm, dims, eps, scale, bufs):
    """A step of T rows for thread tid of nthr, from the rows' embeddings in bufs[_H_ROWS]: every layer, then the
    final norm and the head (linear 4 * layers) of rows `want` into bufs[_LOGITS] (no head where want is empty).
    seqs [S, 4]: each sequence's first row, rows, cache offset and capacity; K, V [S, layers]: the addresses of
    its cache's buffers. sync: int64 zeros [2 * (ROW_PHASES * layers + 2) * PAD]."""
    T = seqs[-1, _START] + seqs[-1, _COUNT]
    every = np.arange(T)
    L = dims[0]
    s = bufs[_ATT_SCRATCH]
    bufs = (bare(bufs[0]), bare(bufs[1]), bare(bufs[2]), bare(bufs[3]), bare(bufs[4]), bare(bufs[5]), bare(bufs[6]),
            bare(bufs[7]), bare(bufs[8]), bare(bufs[9]), (bare(s[0]), bare(s[1]), bare(s[2])))
    seqs, meta, norms, cos, sin = bare(seqs), bare(meta), bare(norms), bare(cos), bare(sin)
    qkv_bias, o_bias, qk_norm = bare(qkv_bias), bare(o_bias), bare(qk_norm)
    for l in range(L):
        _layer(tid, sync, l, seqs, every, tag, W, stag, meta, bfac, K, V, cos, sin, norms,
               qkv_bias, o_bias, qk_norm, dims, eps, scale, bufs)
    if want.shape[0] == 0:
        return
    h, D = bufs[_H_ROWS], bufs[_H_ROWS].shape[1]
    x = bufs[_XF][: want.shape[0] * D].reshape((want.shape[0], D))
    _linear(sync, ROW_PHASES * L, 4 * L, NORM, h, want, norms[2 * L], eps, x, tag, W, stag, meta,
            bfac, bufs[_LOGITS], h, bufs[_ZEROS], False, bufs)


class RowsProgram:
    """The multi-row step of one DecodeProgram: its weights and counters, buffers of its own (sized by the most
    rows and the longest cache seen, grown on demand), each cache's buffer addresses taken again when it grows."""

    def __init__(self, program):
        self.program = program
        p, a = program, program.model.args
        self.D, self.H, self.KV, self.Dh, self.F = (a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                                    a.head_dim, a.intermediate_size)
        self.vocab = p.lins[-1].shape[1]
        self._addresses = weakref.WeakKeyDictionary()  # cache -> (its first key buffer, K row, V row, buffers)
        self._choices: dict[tuple, ThreadChoice] = {}  # (rows' bit length, thread options) -> timed choice
        self.rows = self.cap = self.wanted = 0
        self.bufs = None
        self.sync = np.zeros(2 * (ROW_PHASES * a.num_hidden_layers + 2) * PAD, np.int64)

    def _takes(self, cache, n: int, lone: bool) -> bool:
        """A plain float KVCache of one sequence with room for its n rows: in its buffers for a lone sequence; else
        within its length (the buffers are reserved here)."""
        from ..cache import KVCache

        if type(cache) is not KVCache or cache.bits is not None or cache.batch != 1:
            return False
        if lone:
            return cache.keys[0] is not None and cache.offset + n <= cache.capacity
        return cache.offset + n <= cache.max_len

    def _kv_rows(self, cache):
        """(K row, V row): the addresses of the cache's per-layer buffers (numpy_step.kv_addresses), or None."""
        src = cache.keys[0][0]
        held = self._addresses.get(cache)
        if held is not None and held[0] is src:
            return held[1], held[2]
        ks, vs = [k[0] for k in cache.keys], [v[0] for v in cache.values]
        rows = kv_addresses(ks, vs)
        if rows is None:
            return None
        self._addresses[cache] = (src,) + rows + ((ks, vs),)
        return rows

    def _grow(self, rows: int, cap: int, wanted: int) -> None:
        """Buffers for at least `rows` rows, `wanted` of them with logits, and caches of `cap` positions."""
        n = self.program.threads
        if (self.bufs is not None and rows <= self.rows and cap <= self.cap and wanted <= self.wanted
                and n == self.bufs[_ATT_SCRATCH][0].shape[0]):
            return
        self.rows, self.cap, self.wanted = max(rows, self.rows, 8), max(cap, self.cap), max(wanted, self.wanted, 8)
        logger.debug("multi-row step buffers: %d rows, caches of %d positions, %d threads", self.rows, self.cap, n)
        T, f32 = self.rows, np.float32
        D, H, KV, Dh, F = self.D, self.H, self.KV, self.Dh, self.F
        rep, width = H // KV, max(D, H * Dh, F)
        scratch = (np.zeros((n, rep, Dh), f32), np.zeros((n, max(Dh, rep)), f32), np.zeros((n, rep * self.cap), f32))
        self.bufs = (np.zeros(T * width, f32), np.zeros(T * width, np.int16), np.zeros(2 * (width // 32) * T, f32),
                     np.zeros((T, D), f32), np.zeros((T, (H + 2 * KV) * Dh), f32), np.zeros((T, H * Dh), f32),
                     np.zeros((T, D), f32), np.zeros((T, 2 * F), f32), np.zeros((self.wanted, self.vocab), f32),
                     np.zeros(D, f32), scratch)

    def __call__(self, chunks: list, caches: list, rows: list[int]):
        """Logits [sum(rows), vocab] of each chunk's last rows[i] positions ([0, vocab] where every rows[i] is 0),
        the caches written and advanced; or None: a step this program does not take (nothing changed), or another
        thread is stepping the model."""
        lock = self.program._lock
        if not lock.acquire(blocking=False):
            return None
        try:
            return self._call(chunks, caches, rows)
        finally:
            lock.release()

    def _call(self, chunks: list, caches: list, rows: list[int]):
        lens = [len(c) for c in chunks]
        T = sum(lens)
        lone = len(caches) == 1
        if (not 0 < T <= (LONE_ROWS if lone else MAX_ROWS) or sum(rows) > MAX_LOGIT_ROWS
                or not all(self._takes(c, n, lone) for c, n in zip(caches, lens))):
            return None
        for c, n in zip(caches, lens):
            c.reserve(c.offset + n)
        kv = [self._kv_rows(c) for c in caches]
        if any(r is None for r in kv) or len({r[0].dtype for r in kv}) > 1:  # float32 and float16 caches apart
            return None
        starts = np.concatenate([[0], np.cumsum(lens)])
        want = np.concatenate([np.arange(e - r, e) for e, r in zip(starts[1:], rows)] + [np.zeros(0, int)])
        seqs = np.array([[s, n, c.offset, c.capacity] for s, n, c in zip(starts, lens, caches)], np.int64)
        self._grow(T, max(c.capacity for c in caches), len(want))
        self._step(chunks, seqs, want.astype(np.int64), kv)
        for c, n in zip(caches, lens):
            c.advance(n)
        return self.bufs[_LOGITS][: len(want)].copy()

    def _step(self, chunks: list, seqs: np.ndarray, want: np.ndarray, kv: list) -> None:
        p, ops = self.program, self.program.ops
        T = int(seqs[-1, 0] + seqs[-1, 1])
        p.rope.get(int((seqs[:, 2] + seqs[:, 1]).max()) - 1, 1)  # the table grown to cover every position
        tokens = np.concatenate([np.asarray(c, np.int64).reshape(-1) for c in chunks])[None, :]
        with ops.forward_scope(T):
            self.bufs[_H_ROWS][:T] = ops.embedding(p.model.embed, tokens).reshape(T, -1)
            K, V = np.stack([r[0] for r in kv]), np.stack([r[1] for r in kv])
            args = (seqs, want, p.tag, p.W, p.stag, p.meta, p.bfac, K, V,
                    p.rope.cos, p.rope.sin, p.norms, p.qkv_bias, p.o_bias, p.qk_norm, p.dims, p.eps, p.scale,
                    self.bufs)
            choice = self._thread_choice(T) if T <= TIMED_ROWS else None
            threads = choice.pick() if choice is not None else p.threads
            p.meta[:, _PF] = ops.step_prefetch()
            t0 = time.perf_counter()
            p._run(rows_step, min(threads, p.threads), args, self.sync)
            if choice is not None:
                choice.record(threads, (time.perf_counter() - t0) / T)

    def _thread_choice(self, rows: int) -> ThreadChoice:
        """One or more threads for steps of about `rows` rows, by timing them per row as single-row steps are
        timed: on cores other processes hold, a thread that is descheduled between units stalls the others. (Their
        prefetch is the single-row steps' choice: a property of the machine's memory, not of the load.)"""
        options = tuple(sorted({t for t, _ in self.program.ops.step_options()}))
        key = (rows.bit_length(), options)
        if key not in self._choices:
            self._choices[key] = ThreadChoice(options)
        return self._choices[key]
