"""Attention's products in LLVM IR (backends/numpy_attend.py) and the compiled step's attention (numpy_step._attend)
against float64 numpy, on head sizes the IR takes (multiples of 32) and on those left to plain loops."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")


@pytest.fixture(scope="module")
def kernels():
    from numba import njit

    from mlxllama.backends import numpy_attend

    @njit
    def qk(q, qoff, K, koff, T, Dh, out, ooff, rows=1, ostride=0):
        numpy_attend.qk(q, qoff, K, koff, T, Dh, out, ooff, rows, ostride)

    @njit
    def pv(p, poff, V, voff, T, Dh, out, ooff, rows=1, pstride=0):
        numpy_attend.pv(p, poff, V, voff, T, Dh, out, ooff, rows, pstride)

    return qk, pv


@pytest.mark.parametrize("Dh", [32, 64, 96, 128])
@pytest.mark.parametrize("T", [1, 7, 8, 9, 40])
def test_products_match_numpy(kernels, Dh, T):
    qk, pv = kernels
    rng = np.random.default_rng(Dh * 100 + T)
    q = rng.standard_normal((2, Dh)).astype(np.float32)
    K = rng.standard_normal((3 + T, Dh)).astype(np.float32)
    out = np.full(T + 5, 7.0, np.float32)
    qk(q, Dh, K, 3 * Dh, T, Dh, out, 2)
    want = K[3:3 + T].astype(np.float64) @ q[1].astype(np.float64)
    np.testing.assert_allclose(out[2:2 + T], want, rtol=0, atol=1e-5 * np.sqrt(Dh) * np.abs(want).max())
    assert (out[:2] == 7).all() and (out[2 + T:] == 7).all()  # nothing outside the keys' scores written

    p = rng.random(T + 1).astype(np.float32)
    o = np.full((2, Dh), 7.0, np.float32)
    pv(p, 1, K, 3 * Dh, T, Dh, o, Dh)
    want = p[1:].astype(np.float64) @ K[3:3 + T].astype(np.float64)
    np.testing.assert_allclose(o[1], want, rtol=0, atol=1e-5 * T * np.abs(want).max())
    assert (o[0] == 7).all()


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("Dh,T", [(32, 9), (64, 40), (96, 17), (128, 8)])
@pytest.mark.parametrize("half", [False, True])
def test_rows_give_the_bits_of_one_call_a_row(kernels, rows, Dh, T, half):
    """Several rows in one call (pv's sharing each value vector read) sum in the same order as one call a row: the
    same bits."""
    qk, pv = kernels
    rng = np.random.default_rng(rows * 1000 + Dh + T)
    q = rng.standard_normal((rows + 1, Dh)).astype(np.float32)
    K = rng.standard_normal((T + 2, Dh)).astype(np.float16 if half else np.float32)
    K = K.view(np.uint16) if half else K
    cap = T + 6
    alone, shared = np.full(rows * cap, 7.0, np.float32), np.full(rows * cap, 7.0, np.float32)
    for r in range(rows):
        qk(q, (r + 1) * Dh, K, 2 * Dh, T, Dh, alone, r * cap + 3)
    qk(q, Dh, K, 2 * Dh, T, Dh, shared, 3, rows, cap)
    np.testing.assert_array_equal(shared, alone)
    p = rng.random(rows * cap).astype(np.float32)
    alone, shared = np.full((rows + 1, Dh), 7.0, np.float32), np.full((rows + 1, Dh), 7.0, np.float32)
    for r in range(rows):
        pv(p, r * cap + 1, K, 2 * Dh, T, Dh, alone, (r + 1) * Dh)
    pv(p, 1, K, 2 * Dh, T, Dh, shared, Dh, rows, cap)
    np.testing.assert_array_equal(shared, alone)
    assert (shared[0] == 7).all()


@pytest.mark.parametrize("Dh,rep,T,t0", [(64, 3, 200, 0), (64, 3, 13, 5), (128, 4, 77, 3), (96, 2, 41, 0),
                                         (80, 2, 33, 1), (16, 2, 9, 0)])
def test_attend_matches_softmax_attention(Dh, rep, T, t0):
    from mlxllama.backends.numpy_step import _attend

    rng = np.random.default_rng(Dh + T)
    KV, cap = 2, 256
    K = rng.standard_normal((1, KV, cap, Dh)).astype(np.float32)
    V = rng.standard_normal((1, KV, cap, Dh)).astype(np.float32)
    for g in range(KV):
        q = (rng.standard_normal((rep, Dh)) * 0.2).astype(np.float32)
        s = q.astype(np.float64) @ K[0, g, t0:t0 + T].T.astype(np.float64)
        p = np.exp(s - s.max(1, keepdims=True))
        want = (p / p.sum(1, keepdims=True)) @ V[0, g, t0:t0 + T].astype(np.float64)
        attn = np.zeros((1, KV * rep * Dh), np.float32)
        _attend(q, K, V, g, t0, t0 + T, np.zeros(rep * cap, np.float32), np.zeros(rep, np.float32), attn)
        got = attn[0, g * rep * Dh:(g + 1) * rep * Dh].reshape(rep, Dh)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("Dh,T", [(32, 9), (64, 40), (128, 7)])
def test_products_read_float16_bits(kernels, Dh, T):
    qk, pv = kernels
    rng = np.random.default_rng(Dh + T)
    q = rng.standard_normal((1, Dh)).astype(np.float32)
    K16 = rng.standard_normal((T, Dh)).astype(np.float16)
    out = np.zeros(T, np.float32)
    qk(q, 0, K16.view(np.uint16), 0, T, Dh, out, 0)
    want = K16.astype(np.float64) @ q[0].astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.sqrt(Dh) * np.abs(want).max())
    p = rng.random(T).astype(np.float32)
    o = np.zeros((1, Dh), np.float32)
    pv(p, 0, K16.view(np.uint16), 0, T, Dh, o, 0)
    want = p.astype(np.float64) @ K16.astype(np.float64)
    np.testing.assert_allclose(o[0], want, rtol=0, atol=1e-5 * T * np.abs(want).max())
