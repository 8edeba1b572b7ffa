"""A whole single-token decode step of the numpy backend in one compiled call (numba), for "fused" weights.

DecodeProgram(tokens, cache) embeds the token (ops.embedding), runs every layer (RMSNorm, the fused qkv product and its bias,
per-head q/k norm, RoPE from the model's table, the K/V write at the cache's offset, GQA attention over the held
positions (sliding window honoured), the o product, RMSNorm, gate_up, SiLU gate, down) and the output head, and
returns float32 logits [1, 1, vocab]: the op-by-op path's numbers (the same qmatvec kernel on inputs rounded the
same way; the norms' and attention's sums in another order, so an input may now and then round to the neighbouring
int16 step: the tests allow 2e-4 of the largest logit).

Threads: every thread runs the same program step(tid, nthreads, ...), phase after phase (per layer: qkv, the K/V
heads, o, gate_up, down; then the head). A phase's units (chunks of output rows, K/V heads) are claimed through an
atomic counter and counted done through another; a thread moves to the next phase once every unit of this one is
done. So a thread waits only for units another thread has claimed and not finished: one that starts late, or is
descheduled between units, finds its share done by the other and catches up without computing anything (an
arrival barrier would make every thread wait for the slowest at each phase). The residual stream is shared, each
o/down chunk adding its own rows; a thread that claims a unit first rounds the phase's input (norm, SiLU gate) into
its own buffers (what it rounds cannot change before the phase is done). A waiting thread spins SPIN times, then yields its core
(sched_yield) at each further check, so a core held by another process costs time slices, not a livelock. The
caller's thread is thread 0; the others are handed the step once per token (a late one is waited for at the next
step, before the counters are reset).

What it takes (decided once at load, DecodeProgram.build returns None otherwise): every projection and the output
head a qmatvec.PackedLinear, all with one kernel path, input rounding and scales dtype; one process (no vocabulary
split). Anything else (float32 or "quantized" weight modes, GGUF K-quant blocks) steps op by op. What it takes per
step (the call returns None otherwise, and the caller runs the op-by-op path): batch 1, one token, a plain float
KVCache with room for the token (float32, or float16 where its conversion is native: numpy_attend; not a quantized
or rotating one), no other thread stepping the same model.
MLXLLAMA_DECODE_PROGRAM=0 turns it off. Steps of several rows (of several sequences up to numpy_rows.MAX_ROWS, of
one up to numpy_rows.LONE_ROWS: Model.forward_batch, speculative verification, prompt pieces) run the same phases in
one call too (DecodeProgram.rows: numpy_rows.RowsProgram).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import platform
import threading

import llvmlite.binding as llvm
import llvmlite.ir as ir
import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numpy_attend import HALF_NATIVE, kv_view, pointer, put_row, pv, qk, wide
from .qmatvec import PackedLinear, _rows, quantize_input, running_max

logger = logging.getLogger(__name__)

SPIN = 4000  # checks (each with a pause) before a waiting thread starts yielding its core
CHUNK = 32  # output rows claimed at a time are a multiple of this
# meta's columns past bits, group, rows, code bytes a row and scales a row: the inputs' rounding limit, and the bytes
# ahead that each product's blocks prefetch (set for each step: its timed option)
_LIM, _PF = 5, 6
QKV, O, GATE_UP, DOWN = 0, 1, 2, 3  # a layer's products, index 4 * layer + kind in the weight lists
PHASES = 5  # per layer: qkv, K/V heads (cache write and attention), o, gate_up, down
PAD = 8  # int64s per counter: each on its own 64-byte cache line (a spinning thread does not slow the claims)
_ATTN_FM = {"reassoc", "contract", "nsz", "arcp"}  # sums over the head size vectorized

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _register_yield() -> bool:
    """Make sched_yield linkable from compiled code (libc's, by address)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        llvm.add_symbol("sched_yield", ctypes.cast(libc.sched_yield, ctypes.c_void_p).value)
        return True
    except (OSError, AttributeError):
        logger.debug("no sched_yield: waiting threads only pause", exc_info=True)
        return False


_HAVE_YIELD = _register_yield()


@intrinsic
def _atomic_add(typingctx, arr, idx, val):
    """arr[idx] += val atomically (int64 array); returns the value before."""
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", builder.gep(a.data, [args[1]]), args[2], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, arr, idx):
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(a.data, [args[1]]), "acquire", 8)

    return sig, codegen


_U8 = np.empty(0, np.uint8)


@njit(cache=True, nogil=True)
def _kv(address, dims, cap):
    """A cache layer's buffer (numpy_attend.kv_view: float32, or float16 bits behind a uint64 address)."""
    return kv_view(address, dims[_KV], dims[_DH], cap)


@njit(inline="always")
def bare(a):
    """a's data as an array that owns no reference: its views count none either, so threads slicing one shared
    buffer do not take turns at the atomic count on its owner's cache line. The caller keeps a alive."""
    return carray(pointer(a.ctypes.data, a), a.shape)


@intrinsic
def _relax(typingctx, yield_core):
    """A spin-wait hint (x86's pause), or, with yield_core, sched_yield."""
    sig = types.none(types.boolean)

    def codegen(context, builder, signature, args):
        if _HAVE_YIELD:
            with builder.if_then(args[0]):
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                    "sched_yield")
                builder.call(fn, [])
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _claim(sync, j):
    """The next unit of phase j's work (a chunk of rows, a K/V head): counter 2j hands them out."""
    return _atomic_add(sync, 2 * j * PAD, 1)


@njit(cache=True, nogil=True)
def _done(sync, j):
    _atomic_add(sync, (2 * j + 1) * PAD, 1)


@njit(cache=True, nogil=True)
def _wait(sync, j, units):
    """Until every unit of phase j is done (counter 2j + 1): spin with a pause, then yield the core at each check."""
    spins = 0
    while _atomic_load(sync, (2 * j + 1) * PAD) < units:
        spins += 1
        _relax(spins > SPIN)


@njit(cache=True, nogil=True)
def _chunking(n_out):
    """Rows per claim and the number of chunks: about sqrt(16 n_out) rows, a multiple of CHUNK. A claim is two
    atomic adds on lines every thread writes: with two threads on Zen 4, SmolLM2's claims of 32 rows (18K weights)
    made its decode step 25% slower than these (one thread: no difference). The last claim of a phase leaves the
    other threads idle for up to its length, so claims grow only with the square root of the rows."""
    chunk = max(CHUNK, int(math.sqrt(16.0 * n_out)) // CHUNK * CHUNK)
    return chunk, (n_out + chunk - 1) // chunk


@njit(inline="always")
def _weight(W, stag, meta, i):
    """Linear i's codes, scales and biases as arrays over the addresses W holds (meta: bits, group, rows, code
    bytes a row, scales a row, the input limit)."""
    return (carray(pointer(W[i, 0], _U8), (meta[i, 2], meta[i, 3])),
            carray(pointer(W[i, 1], stag), (meta[i, 2], meta[i, 4])),
            carray(pointer(W[i, 2], stag), (meta[i, 2], meta[i, 4])))


@njit(cache=True, nogil=True)
def _chunks(tag, W, stag, meta, bfac, i, xq, dxs, y, h, bias, residual, sync, j, c):
    """y[0, rows] = linear i's rows of chunk c and every further chunk this thread claims; with residual, also
    h[rows] += y[rows] + bias[rows] (the rows are this thread's alone)."""
    n_out = y.shape[1]
    chunk, n = _chunking(n_out)
    w, sc, bi = _weight(W, stag, meta, i)
    while c < n:
        o0, o1 = c * chunk, min(n_out, c * chunk + chunk)
        _rows(tag, w, sc, bi, bfac[i], meta[i, 0], meta[i, 1], xq, dxs, y, o0, o1, meta[i, _PF])
        if residual:
            for o in range(o0, o1):
                h[o] = h[o] + (y[0, o] + bias[o])
        _done(sync, j)
        c = _claim(sync, j)


@njit(cache=True, nogil=True)
def _quantize(x, m, xq, dxs):
    """x [rows, n] rounded for the product whose meta row is m (its weight bits, and the inputs' limit |xq| <= lim
    in column _LIM)."""
    quantize_input(x, np.float32(m[_LIM]), m[0], xq, dxs)


@njit(cache=True, nogil=True)
def _rms_norm(x, w, eps, out):
    """out = x / rms(x) * w, as numpy_ops.rms_norm forms one row (the scale in float64, then float32 products)."""
    d = x.shape[0]
    ss = np.float32(0)
    for i in range(d):
        ss += x[i] * x[i]
    s = np.float32(1.0 / math.sqrt(np.float64(ss) / d + eps))
    for i in range(d):
        out[i] = (x[i] * s) * w[i]


@njit(cache=True, nogil=True)
def _head_norm(x, w, eps):
    """x *= w / rms(x) in place, as numpy_ops.rms_norm forms several rows (float32 throughout)."""
    d = x.shape[0]
    ss = np.float32(0)
    for i in range(d):
        ss += x[i] * x[i]
    s = np.float32(1) / np.sqrt(ss / np.float32(d) + np.float32(eps))
    for i in range(d):
        x[i] = (x[i] * s) * w[i]


@njit(cache=True, nogil=True)
def _head_in(qkv, bias, has_bias, j, Dh, out):
    """out = head j of the qkv product (plus its bias)."""
    for d in range(Dh):
        out[d] = qkv[0, j * Dh + d] + bias[j * Dh + d] if has_bias else qkv[0, j * Dh + d]


@njit(cache=True, nogil=True)
def _rope(x, cos, sin, pos, tmp):
    """x = x * cos + [x2, x1] * sin at `pos` (numpy_layouts.RopeTable's folded sin), in place."""
    half = x.shape[0] // 2
    for d in range(half):
        tmp[d] = x[d + half]
        tmp[d + half] = x[d]
    for d in range(x.shape[0]):
        x[d] = x[d] * cos[pos, d] + tmp[d] * sin[pos, d]


@intrinsic
def _f32_from_bits(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=_ATTN_FM)
def _exp(x):
    """exp(x) for float32 x <= 0 to ~2e-7 relative, in operations a loop vectorizes: x = n ln2 + y (two-part ln2),
    e**y by its Taylor polynomial (|y| <= ln2 / 2), 2**n from the exponent bits."""
    x = max(x, np.float32(-87.0))
    # the nearest integer by truncation (x <= 0): np.rint compiles to a call per element, which no loop vectorizes
    k = np.int32(x * np.float32(1.4426950408889634) - np.float32(0.5))
    n = np.float32(k)
    y = (x - n * np.float32(0.693145751953125)) - n * np.float32(1.428606765330187e-06)
    p = np.float32(1 / 720) * y + np.float32(1 / 120)
    p = p * y + np.float32(1 / 24)
    p = p * y + np.float32(1 / 6)
    p = p * y + np.float32(0.5)
    p = (p * y + np.float32(1)) * y + np.float32(1)
    return p * _f32_from_bits((k + np.int32(127)) << np.int32(23))


@njit(cache=True, nogil=True, fastmath=_ATTN_FM, error_model="numpy")
def _silu_gate(g, u, out):
    """out = silu(g) * u elementwise, with sigmoid from exp(-|g|) (within _exp's range for any g); numpy's error
    model, since Python's checks each division for zero and keeps the loop scalar (1536 values: 7.2 -> 2.0 us)."""
    for f in range(g.shape[0]):
        v = g[f]
        e = _exp(-abs(v))
        d = np.float32(1) / (np.float32(1) + e)
        out[f] = v * (d if v >= 0 else e * d) * u[f]


@njit(cache=True, nogil=True, fastmath=_ATTN_FM)
def _scores(q, Kg, t0, t1, scores, cap):
    """scores[r * cap + t] = q[r] . Kg[t], each key row read once for the group."""
    rep, Dh = q.shape
    for t in range(t0, t1):
        for r in range(rep):
            s = np.float32(0)
            for d in range(Dh):
                s += q[r, d] * wide(Kg[t, d])
            scores[r * cap + t] = s


@njit(cache=True, nogil=True, fastmath=_ATTN_FM)
def _attend(q, K, V, g, t0, t1, scores, norm, attn):
    """The query heads of K/V head g, q [rep, Dh] (rotated and scaled; overwritten): attn[0, head g * rep + r] =
    softmax(q[r] . K[g, t0:t1]) @ V[g, t0:t1]. scores [rep * cap]: row r's at r * cap; norm [rep]: scratch.
    Head sizes that are multiples of 32 take numpy_attend's products."""
    rep, Dh = q.shape
    Vg, cap, T = V[0, g], scores.shape[0] // rep, t1 - t0
    fast = Dh % 32 == 0
    kv0 = (g * K.shape[2] + t0) * Dh
    if fast:
        qk(q, 0, K, kv0, T, Dh, scores, t0, rep, cap)
    else:
        _scores(q, K[0, g], t0, t1, scores, cap)
    for r in range(rep):
        row = scores[r * cap + t0: r * cap + t1]  # indexed from 0: from t0, numba checks each index's sign
        m = running_max(row, 0, row.shape[0], False, np.float32(-3.0e38))
        den = np.float32(0)
        for t in range(row.shape[0]):
            p = _exp(row[t] - m)
            row[t] = p
            den += p
        norm[r] = np.float32(1) / den
    if fast:
        pv(scores, t0, V, kv0, T, Dh, q, 0, rep, cap)
    else:
        q[:] = 0
        for t in range(t0, t1):  # q accumulates: a separate output array would keep this loop from vectorizing
            for r in range(rep):
                p = scores[r * cap + t]
                for d in range(Dh):
                    q[r, d] += p * wide(Vg[t, d])
    base = g * rep * Dh
    for r in range(rep):
        for d in range(Dh):
            attn[0, base + r * Dh + d] = q[r, d] * norm[r]


# dims: the model's sizes, an int64 array
_L, _D, _H, _KV, _DH, _F, _WINDOW, _QKV_BIAS, _O_BIAS, _QK_NORM = range(10)


@njit(cache=True, nogil=True)
def _keys(l, g, start, count, offset, qkv, qkv_bias, qk_norm, K, V, cos, sin, dims, eps, k, tmp):
    """K/V head g of a sequence's rows start.. (count of them): each row's rotated key and value into the cache at
    its position."""
    H, KV, Dh = dims[_H], dims[_KV], dims[_DH]
    bias = dims[_QKV_BIAS] != 0
    for r in range(count):
        pos, row = offset + r, qkv[start + r: start + r + 1]
        _head_in(row, qkv_bias[l], bias, H + g, Dh, k)
        if dims[_QK_NORM]:
            _head_norm(k, qk_norm[l, H + g], eps)
        _rope(k, cos, sin, pos, tmp)
        put_row(K[0, g, pos], k)
        _head_in(row, qkv_bias[l], bias, H + KV + g, Dh, k)
        put_row(V[0, g, pos], k)


@njit(cache=True, nogil=True)
def _queries(l, g, start, count, offset, qkv, qkv_bias, qk_norm, K, V, cos, sin, dims, eps, scale, hv, tmp, scores,
             attn):
    """The query heads of K/V head g, row by row of the sequence: attention over the positions each row sees."""
    H, KV, Dh, window = dims[_H], dims[_KV], dims[_DH], dims[_WINDOW]
    rep, bias = H // KV, dims[_QKV_BIAS] != 0
    for r in range(count):
        pos, row = offset + r, qkv[start + r: start + r + 1]
        for e in range(rep):
            q = hv[e]
            _head_in(row, qkv_bias[l], bias, g * rep + e, Dh, q)
            if dims[_QK_NORM]:
                _head_norm(q, qk_norm[l, g * rep + e], eps)
            _rope(q, cos, sin, pos, tmp)
            for d in range(Dh):
                q[d] *= scale
        t0 = pos + 1 - window if 0 < window < pos + 1 else 0
        _attend(hv, K, V, g, t0, pos + 1, scores, tmp, attn[start + r: start + r + 1])


@njit(cache=True, nogil=True)
def causal_rows(q, K, V, g, r0, r1, past, window, scale, hv, tmp, scores, out):
    """Rows r0..r1 of a prompt's query heads of K/V head g, each against the keys its position sees: q [H, L, Dh]
    rotated (scaled here), K and V [1, KV, past + L, Dh] (float32, or float16 bits), row i at position past + i, a
    window (0: none) as _queries honours it; into out [L, H * Dh]. hv [rep, Dh], tmp [max(Dh, rep)], scores
    [rep * (past + L)]."""
    rep, Dh = hv.shape
    for i in range(r0, r1):
        pos = past + i
        for e in range(rep):
            for d in range(Dh):
                hv[e, d] = q[g * rep + e, i, d] * scale
        t0 = pos + 1 - window if 0 < window < pos + 1 else 0
        _attend(hv, K, V, g, t0, pos + 1, scores, tmp, out[i: i + 1])


@njit(cache=True, nogil=True)
def _group(l, g, pos, qkv, qkv_bias, qk_norm, K, V, cos, sin, dims, eps, scale, hv, tmp, scores, attn):
    """K/V head g: the token's rotated key and its value into the cache at pos, then its query heads' attention
    into attn over the positions the window lets them see. hv [rep, Dh]."""
    _keys(l, g, 0, 1, pos, qkv, qkv_bias, qk_norm, K, V, cos, sin, dims, eps, hv[0], tmp)
    _queries(l, g, 0, 1, pos, qkv, qkv_bias, qk_norm, K, V, cos, sin, dims, eps, scale, hv, tmp, scores, attn)


@njit(cache=True, nogil=True)
def _attention_block(tid, sync, l, pos, tag, W, stag, meta, bfac, K, V, cos, sin, norms, qkv_bias, o_bias,
                     qk_norm, dims, eps, scale, bufs):
    """Phases 5l (qkv), 5l + 1 (K/V heads: cache write and attention), 5l + 2 (o, added to h)."""
    xD, xqD, dxsD, xO, xqO, dxsO = bufs[0][tid], bufs[1][tid], bufs[2][tid], bufs[3][tid], bufs[4][tid], bufs[5][tid]
    hv, tmp, scores, h, qkv, attn, y = (bufs[9][tid], bufs[10][tid], bufs[11][tid], bufs[12], bufs[13], bufs[14],
                                        bufs[15])
    i, j = 4 * l, PHASES * l
    c = _claim(sync, j)
    if c < _chunking(qkv.shape[1])[1]:  # h holds still until this phase is done: round it now
        _rms_norm(h, norms[2 * l], eps, xD[0])
        _quantize(xD, meta[i + QKV], xqD, dxsD)
        _chunks(tag, W, stag, meta, bfac, i + QKV, xqD, dxsD, qkv, h, o_bias[l], False, sync, j, c)
    _wait(sync, j, _chunking(qkv.shape[1])[1])
    g = _claim(sync, j + 1)
    while g < dims[_KV]:
        _group(l, g, pos, qkv, qkv_bias, qk_norm, K, V, cos, sin, dims, eps, scale, hv, tmp, scores, attn)
        _done(sync, j + 1)
        g = _claim(sync, j + 1)
    _wait(sync, j + 1, dims[_KV])
    c = _claim(sync, j + 2)
    if c < _chunking(y.shape[1])[1]:
        xO[0, :] = attn[0]
        _quantize(xO, meta[i + O], xqO, dxsO)
        _chunks(tag, W, stag, meta, bfac, i + O, xqO, dxsO, y, h, o_bias[l], True, sync, j + 2, c)
    _wait(sync, j + 2, _chunking(y.shape[1])[1])


@njit(cache=True, nogil=True)
def _mlp_block(tid, sync, l, tag, W, stag, meta, bfac, norms, zeros, eps, bufs):
    """Phases 5l + 3 (gate_up) and 5l + 4 (down(silu(gate) * up), added to h)."""
    xD, xqD, dxsD, xF, xqF, dxsF = bufs[0][tid], bufs[1][tid], bufs[2][tid], bufs[6][tid], bufs[7][tid], bufs[8][tid]
    h, y, gu = bufs[12], bufs[15], bufs[16]
    i, j, F = 4 * l, PHASES * l + 3, xF.shape[1]
    c = _claim(sync, j)
    if c < _chunking(gu.shape[1])[1]:
        _rms_norm(h, norms[2 * l + 1], eps, xD[0])
        _quantize(xD, meta[i + GATE_UP], xqD, dxsD)
        _chunks(tag, W, stag, meta, bfac, i + GATE_UP, xqD, dxsD, gu, h, zeros, False, sync, j, c)
    _wait(sync, j, _chunking(gu.shape[1])[1])
    c = _claim(sync, j + 1)
    if c < _chunking(y.shape[1])[1]:
        _silu_gate(gu[0, :F], gu[0, F:], xF[0])
        _quantize(xF, meta[i + DOWN], xqF, dxsF)
        _chunks(tag, W, stag, meta, bfac, i + DOWN, xqF, dxsF, y, h, zeros, True, sync, j + 1, c)
    _wait(sync, j + 1, _chunking(y.shape[1])[1])


@njit(cache=True, nogil=True)
def step(tid, nthr, sync, pos, tag, W, stag, meta, bfac, K, V, cap, cos, sin, norms, qkv_bias, o_bias, qk_norm,
         dims, eps, scale, bufs):
    """One decode step for thread tid of nthr from the token's embedding in bufs[12] (the residual stream): every
    layer, the final norm and the head (linear 4 * layers) into bufs[17] [1, vocab]. W [linears, 3]: the addresses
    of each linear's bytes, scales and biases (scales' dtype: stag's; shapes in meta); K, V [layers]: the addresses
    of the cache's [1, KV, cap, Dh] buffers (kv_addresses). sync: int64 zeros
    [2 * (PHASES * layers + 1) * PAD]: per phase, the units claimed and the units done. A thread waits only for
    units another has claimed and not finished: one that starts late (or is descheduled between units) finds the
    work done by the others and catches up without computing anything."""
    L = dims[_L]
    for l in range(L):
        _attention_block(tid, sync, l, pos, tag, W, stag, meta, bfac, _kv(K[l], dims, cap), _kv(V[l], dims, cap), cos, sin,
                         norms,
                         qkv_bias, o_bias, qk_norm, dims, eps, scale, bufs)
        _mlp_block(tid, sync, l, tag, W, stag, meta, bfac, norms, bufs[18], eps, bufs)
    xD, xqD, dxsD, h, logits = bufs[0][tid], bufs[1][tid], bufs[2][tid], bufs[12], bufs[17]
    j = PHASES * L
    c = _claim(sync, j)
    if c < _chunking(logits.shape[1])[1]:
        _rms_norm(h, norms[2 * L], eps, xD[0])
        _quantize(xD, meta[4 * L], xqD, dxsD)
        _chunks(tag, W, stag, meta, bfac, 4 * L, xqD, dxsD, logits, h, h, False, sync, j, c)
    _wait(sync, j, _chunking(logits.shape[1])[1])


def enabled() -> bool:
    """MLXLLAMA_DECODE_PROGRAM=0 turns the program off (A/B timing)."""
    return os.environ.get("MLXLLAMA_DECODE_PROGRAM", "1").strip() not in ("0", "off", "false", "no")


def _linears(model) -> list | None:
    """The products in program order (4 per layer, then the head), or None where one is not a PackedLinear or
    they differ in kernel path, input rounding or scales dtype."""
    lins = [w for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [model.lm_head]
    if not all(isinstance(w, PackedLinear) for w in lins):
        return None
    if len({(w._tag.dtype, w.lim, w.scales.dtype) for w in lins}) != 1:
        return None
    return lins


def _stacked(vectors: list, shape: tuple) -> np.ndarray:
    """Per-layer vectors (None: absent) as one float32 array [layers, *shape] (zeros where absent)."""
    out = np.zeros((len(vectors),) + shape, np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            out[i] = np.asarray(v, np.float32).reshape(shape)
    return out


def _address(a: np.ndarray) -> int:
    """The address of a C-order array's first element (the program reads it there: the caller keeps a alive)."""
    if not a.flags.c_contiguous:
        raise ValueError("the decode program reads C-order arrays only")
    return a.ctypes.data


def kv_addresses(ks: list, vs: list) -> tuple[np.ndarray, np.ndarray] | None:
    """The addresses of a cache's per-layer K and V buffers: int64 for float32 ones, uint64 for float16 ones (read
    as their bits, where half-precision conversion is native); None for anything else (not C-order, mixed, or
    another dtype)."""
    arrays = ks + vs
    if not all(a.flags.c_contiguous for a in arrays):
        return None
    if all(a.dtype == np.float32 for a in arrays):
        kind = np.int64
    elif HALF_NATIVE and all(a.dtype == np.float16 for a in arrays):
        kind = np.uint64
    else:
        return None
    return np.array([_address(a) for a in ks], kind), np.array([_address(a) for a in vs], kind)


class DecodeProgram:
    """The compiled decode step of one model on one NumpyOps: weights referenced as laid out (nothing copied but
    the norms and biases; the program reads them by address, and this object keeps them alive), every buffer
    allocated here; the KV buffers' addresses are taken again when a cache grows or another cache comes."""

    def __init__(self, model, ops, lins: list):
        a = model.args
        self.model, self.ops, self.rope = model, ops, model.rope
        L, D, H, KV, Dh, F = (a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                              a.head_dim, a.intermediate_size)
        self.threads = ops.threads
        self.lins, self.tag = lins, lins[0]._tag
        self._held = [(w.bytes, w.scales, w.scales if w.biases is None else w.biases) for w in lins]
        self.W = np.array([[_address(a) for a in held] for held in self._held], np.int64)
        self.stag = np.empty(0, lins[0].scales.dtype)
        self.meta = np.array([[w.bits, w.group_size, w.bytes.shape[0], w.bytes.shape[1], w.scales.shape[1],
                               int(w.lim), 0] for w in lins], np.int64)
        self.bfac = np.array([w.bias_factor for w in lins], np.float32)
        layers = model.layers
        self.norms = _stacked([n for y in layers for n in (y.attn_norm, y.mlp_norm)] + [model.norm], (D,))
        self.qkv_bias = _stacked([y.qkv_bias for y in layers], ((H + 2 * KV) * Dh,))
        self.o_bias = _stacked([y.o_bias for y in layers], (D,))
        self.qk_norm = _stacked([y.qk_norm for y in layers], (H + KV, Dh))
        self.dims = np.array([L, D, H, KV, Dh, F, a.sliding_window or 0, a.qkv_bias, a.o_bias, a.qk_norm], np.int64)
        self.eps, self.scale = np.float32(a.rms_norm_eps), np.float32(Dh ** -0.5)
        self.sync = np.zeros(2 * (PHASES * L + 1) * PAD, np.int64)
        self._bufs = self._buffers(lins, D, H, KV, F, Dh)
        self._kv_src = self.K = self.V = None
        self._pool = None
        self._helpers: list = []
        self._lock = threading.Lock()  # the buffers serve one step at a time
        self.rows = None  # steps of several rows (numpy_rows.RowsProgram), attached by NumpyOps.decode_program

    @classmethod
    def build(cls, model, ops) -> "DecodeProgram | None":
        """The program for this model, or None where it does not apply (the module doc says when)."""
        if not enabled() or model.vocab_start is not None or model.embed is None or model.norm is None:
            return None
        lins = _linears(model)
        if lins is None:
            logger.debug("decode program: not every product is a fused PackedLinear; op-by-op steps")
            return None
        return cls(model, ops, lins)

    def _buffers(self, lins: list, D: int, H: int, KV: int, F: int, Dh: int) -> tuple:
        """Per thread (first axis): the rounded inputs of products of D, H * Dh and F inputs (each as float, rounded,
        dx and s per block), the query rows of a K/V head, a scratch vector, the scores. Shared: the residual
        stream, the qkv product, attention's output, the o or down product, gate_up's, the logits, zeros [D]."""
        n, xq, f32 = self.threads, lins[0].input_buffers(1)[0].dtype, np.float32
        rep = H // KV

        def rounded(width):
            return (np.zeros((n, 1, width), f32), np.zeros((n, 1, width), xq),
                    np.zeros((n, 2, width // 32, 1), f32))

        per_thread = rounded(D) + rounded(H * Dh) + rounded(F) + (
            np.zeros((n, rep, Dh), f32), np.zeros((n, max(Dh, rep)), f32), np.zeros((n, 256 * rep), f32))
        shared = (np.zeros(D, f32), np.zeros((1, (H + 2 * KV) * Dh), f32), np.zeros((1, H * Dh), f32),
                  np.zeros((1, D), f32), np.zeros((1, 2 * F), f32), np.zeros((1, lins[-1].shape[1]), f32),
                  np.zeros(D, f32))
        return per_thread + shared

    def _takes(self, cache) -> bool:
        """A plain float KVCache of one sequence, already holding buffers with room for this token."""
        from ..cache import KVCache

        return (type(cache) is KVCache and cache.bits is None and cache.batch == 1 and cache.keys[0] is not None
                and cache.offset < cache.capacity)

    def _kv_lists(self, cache) -> bool:
        """The cache's K and V buffers' addresses (again only when they were reallocated); False where
        kv_addresses takes none."""
        src = cache.keys[0][0]
        if src is self._kv_src:
            return True
        ks, vs = [k[0] for k in cache.keys], [v[0] for v in cache.values]
        addresses = kv_addresses(ks, vs)
        if addresses is None:
            return False
        self.K, self.V = addresses
        self._kv_held, self._kv_src, self._cap = (ks, vs), src, ks[0].shape[2]
        rep = self.dims[_H] // self.dims[_KV]
        if self._bufs[11].shape[1] < cache.capacity * rep:
            scores = np.zeros((self.threads, cache.capacity * rep), np.float32)
            self._bufs = self._bufs[:11] + (scores,) + self._bufs[12:]
        return True

    def __call__(self, tokens, cache):
        """Logits [1, 1, vocab] of tokens [1, 1] (the cache advanced past it), or None: this cache or step is not
        one the program takes (nothing was changed)."""
        if not self._lock.acquire(blocking=False):  # another thread is stepping this model: op by op
            return None
        try:
            if not self._takes(cache) or not self._kv_lists(cache):
                return None
            return self._step(tokens, cache)
        finally:
            self._lock.release()

    def _step(self, tokens, cache):
        pos = cache.offset
        self.rope.get(pos, 1)  # the table grown to cover pos
        ops = self.ops
        with ops.forward_scope(1):
            self._bufs[12][:] = ops.embedding(self.model.embed, tokens).reshape(-1)
            args = (pos, self.tag, self.W, self.stag, self.meta, self.bfac, self.K, self.V, self._cap, self.rope.cos,
                    self.rope.sin, self.norms, self.qkv_bias, self.o_bias, self.qk_norm, self.dims, self.eps,
                    self.scale, self._bufs)
            self.meta[:, _PF] = ops.step_prefetch()
            self._run(step, min(ops.step_threads(), self.threads), args)
        cache.advance(1)
        return self._bufs[17].copy().reshape(1, 1, -1)

    def _run(self, fn, nthr: int, args: tuple, sync: np.ndarray | None = None) -> None:
        """Thread 0 here, the others handed the step fn (step, or numpy_rows.rows_step); a helper that is still running
        (it started late and finds nothing left to do) is waited for at the next step, before the counters are
        reset. sync: fn's counters (default: step's)."""
        helpers, self._helpers = self._helpers, []
        for f in helpers:
            f.result()
        sync = self.sync if sync is None else sync
        sync[:] = 0
        if nthr == 1:
            fn(0, 1, sync, *args)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="mlxllama-step")
        self._helpers = [self._pool.submit(fn, t, nthr, sync, *args) for t in range(1, nthr)]
        fn(0, nthr, sync, *args)
