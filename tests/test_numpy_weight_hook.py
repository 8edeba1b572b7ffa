"""The numpy backend's hook for weight types it does not know (contract in backends/numpy_ops.py's doc): a type
with prepare_numpy lays itself out, computes its own products (matmul) and embedding rows (dequantize), and its
nbytes is what the model accounts."""

from __future__ import annotations

import numpy as np

from mlxllama.backends import numpy_ops
from mlxllama.generate import generate_step
from mlxllama.model import Model
from test_fastpaths import TOKENS, logits, tiny


class Prepared:
    """What FakeWeight.prepare_numpy returns: rows [out, in] held as float16 (so its products differ measurably
    from float32 mode's, and its bytes are half)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows.astype(np.float16)
        self.shape = (rows.shape[1], rows.shape[0])
        self.calls = 0

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def matmul(self, x2: np.ndarray) -> np.ndarray:
        assert x2.dtype == np.float32 and x2.flags.c_contiguous and x2.ndim == 2
        self.calls += 1
        return x2 @ self.rows.astype(np.float32).T

    def dequantize(self, o0: int, o1: int, out: np.ndarray) -> np.ndarray:
        out[:] = self.rows[o0:o1]
        return out


class FakeWeight:
    """A loader's tensor of a type the backend does not know: float16 rows behind an opaque wrapper."""

    def __init__(self, w: np.ndarray):
        self.w = np.asarray(w, np.float32)
        self.shape = self.w.shape

    @property
    def nbytes(self) -> int:
        return self.w.size * 2

    @staticmethod
    def prepare_numpy(parts: list) -> Prepared:
        return Prepared(np.concatenate([p.w for p in parts]))


def test_a_weight_type_that_prepares_itself():
    args, weights = tiny(bits=None)
    fake = {k: FakeWeight(v) if np.ndim(v) == 2 else v for k, v in weights.items()}
    half = {k: np.asarray(v, np.float16).astype(np.float32) if np.ndim(v) == 2 else v for k, v in weights.items()}
    ops = numpy_ops.NumpyOps("float32", threads=2)
    model = Model(args, fake, ops)
    assert ops.prepared_nbytes(next(v for v in fake.values() if isinstance(v, FakeWeight))) > 0
    held = [w for w in model.layers[0] if isinstance(w, Prepared)]
    assert held, "the layer holds what prepare_numpy returned"
    assert model.resident_nbytes < Model(args, half, numpy_ops.NumpyOps("float32")).resident_nbytes
    want = logits(Model(args, half, numpy_ops.NumpyOps("float32", threads=1)), TOKENS, 20)
    got = logits(model, TOKENS, 20)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert all(w.calls > 0 for w in held)
    ids = TOKENS[0, :10].tolist()
    assert list(generate_step(model, ids, 6)) == list(generate_step(Model(args, half, numpy_ops.NumpyOps()), ids, 6))
