"""Perplexity of mlxllama against llama.cpp (llama-cpp-python, logits_all=True) on the same GGUF and token ids.

Both score the same windows the same way (mlxllama.perplexity: llama-perplexity's convention); the ratio of the
two perplexities, the mean KL(llama.cpp || mlxllama) and the top-1 agreement are printed.

  python benchmarks/perplexity_llamacpp.py [GGUF] [TEXT] [--ctx 512] [--backend numpy|mlx] [--windows N]
      [--kv-dtype float16]        mlxllama's KV cache in float16 (llama.cpp's default cache type)
      [--llamacpp-kv f16|f32]     llama.cpp's KV cache type (default f16, its own default)
      [--round-like-llamacpp]     numpy: round each product's input as llama.cpp's CPU products do (Q8_K / Q8_0 /
                                  Q8_1, bit for bit; kquants.llamacpp_activations). A diagnostic, not a user option
      [--save-llamacpp OUT.npz]   also write llama.cpp's log-probabilities as a --save-logits file, so that
                                  `mlxllama perplexity --kl-base OUT.npz` compares against llama.cpp
  python benchmarks/perplexity_llamacpp.py GGUF --floor
                                  llama.cpp against itself: its F32 KV cache against its F16 one (its own noise)
  python benchmarks/perplexity_llamacpp.py GGUF --sensitivity 1e-6
                                  mlxllama (numpy, rounding like llama.cpp) against itself with its input embeddings
                                  perturbed by that relative amount: how far 8-bit activations carry a float32
                                  rounding difference
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
log = logging.getLogger("perplexity_llamacpp")


@dataclass(frozen=True)
class Options:
    ctx: int = 512
    backend: str = "numpy"
    windows: int | None = None  # the first N windows only
    kv_dtype: str | None = None  # mlxllama's cache: None (the backend's float) or "float16"
    llamacpp_kv: str = "f16"
    round_like_llamacpp: bool = False
    save_llamacpp: Path | None = None


def llamacpp_logprobs(gguf: Path, windows: np.ndarray, kv: str = "f16"):
    from llama_cpp import Llama

    from mlxllama.perplexity import log_softmax, scored_positions

    ctx = windows.shape[1]
    types = {"f16": {}, "f32": {"type_k": 0, "type_v": 0}}[kv]  # GGML_TYPE_F32 = 0
    llm = Llama(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, seed=0, **types)
    pos = scored_positions(ctx)
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        yield log_softmax(np.array(llm.scores[:ctx])[pos])[None]


def round_like_llamacpp(model) -> int:
    """Every GGUF-block product of a numpy model rounds its input as llama.cpp's CPU product does; returns how many."""
    from mlxllama.backends.kquants import KQuantLinear

    held = [model.embed, model.lm_head] + [w for layer in model.layers for w in layer]
    linears = {id(w): w for w in held if isinstance(w, KQuantLinear)}
    for w in linears.values():
        w.activations = "llama.cpp"
    return len(linears)


def _load(gguf: Path, text: Path, o: Options):
    import mlxllama
    from mlxllama.perplexity import make_windows

    model, tok = mlxllama.load(str(gguf), backend=o.backend)
    windows = make_windows(tok.encode(text.read_text(encoding="utf-8")), o.ctx, tok.bos_id if tok.add_bos else None)
    if o.round_like_llamacpp:
        if o.backend != "numpy":
            raise SystemExit("--round-like-llamacpp is a numpy backend diagnostic")
        log.info("rounding the input of %d GGUF products like llama.cpp", round_like_llamacpp(model))
    return model, windows[: o.windows] if o.windows else windows


def score(windows: np.ndarray, ours, theirs, keep: list | None = None) -> dict:
    """PerplexityResults of two streams of log-probabilities over the same windows (KL of `ours` from `theirs`)."""
    from mlxllama.perplexity import kl_of, nll_of, summarize

    mine, peer, kls, sames = [], [], [], []
    for w, a, b in zip(windows, ours, theirs):
        mine.append(nll_of(a, w[None]))
        peer.append(nll_of(b, w[None]))
        kl, same = kl_of(b, a)
        kls.append(kl)
        sames.append(same)
        if keep is not None:
            keep.append(b.astype(np.float16))
    n, ctx = windows.shape
    cat = np.concatenate
    ours_r = summarize(cat(mine).ravel(), n, ctx, cat(kls).ravel(), cat(sames).ravel())
    theirs_r = summarize(cat(peer).ravel(), n, ctx)
    return {"mlxllama": ours_r, "llama.cpp": theirs_r, "ratio": ours_r.ppl / theirs_r.ppl}


def compare(gguf: Path, text: Path, ctx: int = 512, backend: str = "numpy", options: Options | None = None) -> dict:
    from mlxllama.cache import CacheSettings
    from mlxllama.perplexity import _write_npz, model_logprobs

    o = options or Options(ctx=ctx, backend=backend)
    model, windows = _load(gguf, text, o)
    settings = CacheSettings(kv_dtype=o.kv_dtype).validate(model.args.head_dim)
    keep = [] if o.save_llamacpp else None
    r = score(windows, model_logprobs(model, windows, cache_settings=settings),
              llamacpp_logprobs(gguf, windows, o.llamacpp_kv), keep)
    if keep is not None:
        _write_npz(o.save_llamacpp, windows=windows, logprobs=np.concatenate(keep))
    return r


def floor(gguf: Path, text: Path, o: Options) -> dict:
    """llama.cpp with an F32 KV cache, scored against llama.cpp with its default F16 one."""
    _, windows = _load(gguf, text, o)
    return score(windows, llamacpp_logprobs(gguf, windows, "f32"), llamacpp_logprobs(gguf, windows, "f16"))


def sensitivity(gguf: Path, text: Path, o: Options, eps: float) -> dict:
    """mlxllama rounding like llama.cpp, its input embeddings perturbed by eps (relative, random), scored against
    the same unperturbed: the spread a float32 rounding difference grows into through 8-bit activations."""
    from mlxllama.perplexity import model_logprobs

    model, windows = _load(gguf, text, o)
    base = list(model_logprobs(model, windows))
    plain, rng = model.ops.embedding, np.random.default_rng(0)

    def perturbed(table, ids, start=None):
        e = plain(table, ids, start)
        return (e * (1 + eps * rng.standard_normal(e.shape))).astype(np.float32)

    model.ops.embedding = perturbed
    return score(windows, model_logprobs(model, windows), iter(base))


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("text", nargs="?", default=str(HERE / "data" / "alice-ch1-2.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--llamacpp-kv", choices=("f16", "f32"), default="f16")
    ap.add_argument("--round-like-llamacpp", action="store_true")
    ap.add_argument("--save-llamacpp", type=Path, default=None)
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--sensitivity", type=float, default=None)
    return ap.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import smollm2_path

    a = _args()
    gguf = Path(a.gguf) if a.gguf else smollm2_path()
    o = Options(ctx=a.ctx, backend=a.backend, windows=a.windows, kv_dtype=a.kv_dtype, llamacpp_kv=a.llamacpp_kv,
                round_like_llamacpp=a.round_like_llamacpp or a.sensitivity is not None, save_llamacpp=a.save_llamacpp)
    if a.floor:
        r, names = floor(gguf, Path(a.text), o), ("llama.cpp F32 KV", "llama.cpp F16 KV")
    elif a.sensitivity is not None:
        r, names = sensitivity(gguf, Path(a.text), o, a.sensitivity), ("perturbed", "unperturbed")
    else:
        r = compare(gguf, Path(a.text), options=o)
        names = (f"mlxllama ({a.backend}{', KV ' + a.kv_dtype if a.kv_dtype else ''}"
                 f"{', rounding like llama.cpp' if a.round_like_llamacpp else ''})", f"llama.cpp (KV {a.llamacpp_kv})")
    log.info("%s: %s", names[0], r["mlxllama"].line())
    log.info("%s: %s", names[1], r["llama.cpp"].line())
    log.info("ratio of the perplexities: %.5f", r["ratio"])


if __name__ == "__main__":
    main()
