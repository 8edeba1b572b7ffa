"""The KL table: what 4-bit weights and float16 / 8- / 4-bit KV caches cost, in KL divergence from a float32
reference, on a real English text (benchmarks/data/alice-ch1-2.txt: chapters I-II of Alice's Adventures in
Wonderland, Project Gutenberg eBook #11, public domain).

The reference is an F32 copy of the model made by dequantizing its Q4_1 tensors (the original bf16 weights are not
available offline). Q4_1 itself therefore differs from it only by how the product is computed; the cost of 4-bit
weights is measured by requantizing the F32 copy (MLX affine 4-bit and 8-bit, group 64), which is what a Q4_1 of
the original costs on top of it, to first order. Usage: python benchmarks/kl_table.py [GGUF] [--backend numpy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import smollm2_path

    from mlxllama import backends, loaders
    from mlxllama.cache import CacheSettings
    from mlxllama.model import Model
    from mlxllama.perplexity import kl_of, make_windows, model_logprobs, nll_of, summarize
    from mlxllama.quant import dequantize, quantize_weights
    from mlxllama.weights import QuantizedWeight

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("--text", default=str(HERE / "data" / "alice-ch1-2.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--backend", default="numpy")
    a = ap.parse_args()
    path = Path(a.gguf) if a.gguf else smollm2_path()
    args, weights, tok = loaders.load(path)
    # the dequantization in float32 (scale * q + bias), as numpy's float32 mode and mx.quantized_matmul form it
    f32 = {k: dequantize(QuantizedWeight(w.weight, w.scales.astype(np.float32), w.biases.astype(np.float32),
                                         w.group_size, w.bits)) if isinstance(w, QuantizedWeight)
           else np.asarray(w, np.float32) for k, w in weights.items()}
    windows = make_windows(tok.encode(Path(a.text).read_text(encoding="utf-8")), a.ctx,
                           tok.bos_id if tok.add_bos else None)
    ops = backends.get_ops(a.backend, numpy_weights="float32")
    base = Model(args, dict(f32), ops)
    t0 = time.perf_counter()
    full = CacheSettings(kv_dtype="float32") if ops.float_bytes == 4 else CacheSettings()  # the reference's KV
    base_lp = list(model_logprobs(base, windows, cache_settings=full))
    ref = summarize(np.concatenate([nll_of(lp, w[None]) for lp, w in zip(base_lp, windows)]).ravel(),
                    len(windows), a.ctx)
    print(f"text: {a.text}, {windows.size} tokens in {len(windows)} windows of {a.ctx}; backend {ops.name}; "
          f"reference F32 (dequantized Q4_1): PPL {ref.ppl:.4f} +/- {ref.ppl_err:.4f} ({time.perf_counter() - t0:.0f} s)")
    del base
    q4, _ = quantize_weights(f32, args, 64, 4, np.float32)
    q8, _ = quantize_weights(f32, args, 64, 8, np.float32)
    quant_ops = backends.get_ops(a.backend, numpy_weights="quantized")
    rows = [
        ("Q4_1 (as stored; weights kept packed)", weights, quant_ops, full),
        ("F32 copy, KV float16", f32, ops, CacheSettings(kv_dtype="float16")),
        ("F32 copy, KV 8-bit g64", f32, ops, CacheSettings(kv_bits=8)),
        ("F32 copy, KV 4-bit g64", f32, ops, CacheSettings(kv_bits=4)),
        ("Q4_1, KV 8-bit g64", weights, quant_ops, CacheSettings(kv_bits=8)),
        ("Q4_1, KV 4-bit g64", weights, quant_ops, CacheSettings(kv_bits=4)),
        ("F32 copy requantized 8-bit g64", q8, quant_ops, full),
        ("F32 copy requantized 4-bit g64", q4, quant_ops, full),
    ]
    print("| weights / KV | PPL | KL mean +- err | KL p99 | top-1 agree |")
    print("|---|---:|---:|---:|---:|")
    print(f"| F32 reference, KV {8 * (4 if full.kv_dtype else ops.kv_bytes)}-bit | {ref.ppl:.4f} | 0 | 0 | 100% |")
    for name, w, o, s in rows:
        m = Model(args, dict(w), o)
        nll, kls, same = [], [], []
        for lp, b, win in zip(model_logprobs(m, windows, cache_settings=s), base_lp, windows):
            nll.append(nll_of(lp, win[None]))
            kl, sm = kl_of(b, lp)
            kls.append(kl)
            same.append(sm)
        r = summarize(np.concatenate(nll).ravel(), len(windows), a.ctx, np.concatenate(kls).ravel(),
                      np.concatenate(same).ravel())
        k = r.kl
        print(f"| {name} | {r.ppl:.4f} | {k.mean:.5f} +- {k.err:.5f} | {k.p99:.5f} | {100 * k.top1:.2f}% |",
              flush=True)


if __name__ == "__main__":
    main()
