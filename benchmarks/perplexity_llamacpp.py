"""Perplexity of mlxllama against llama.cpp (llama-cpp-python, logits_all=True) on the same GGUF and token ids.

Both score the same windows the same way (mlxllama.perplexity: llama-perplexity's convention); the ratio of the
two perplexities is printed. Usage: python benchmarks/perplexity_llamacpp.py [GGUF] [TEXT] [--ctx 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def llamacpp_logprobs(gguf: Path, windows: np.ndarray):
    from llama_cpp import Llama

    from mlxllama.perplexity import log_softmax, scored_positions

    ctx = windows.shape[1]
    llm = Llama(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, seed=0)
    pos = scored_positions(ctx)
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        yield log_softmax(np.array(llm.scores[:ctx])[pos])[None]


def compare(gguf: Path, text: Path, ctx: int = 512, backend: str = "numpy") -> dict:
    import mlxllama
    from mlxllama.perplexity import kl_of, make_windows, model_logprobs, nll_of, summarize

    model, tok = mlxllama.load(str(gguf), backend=backend)
    windows = make_windows(tok.encode(text.read_text(encoding="utf-8")), ctx, tok.bos_id if tok.add_bos else None)
    ours, theirs, kls, sames = [], [], [], []
    for w, a, b in zip(windows, model_logprobs(model, windows), llamacpp_logprobs(gguf, windows)):
        ours.append(nll_of(a, w[None]))
        theirs.append(nll_of(b, w[None]))
        kl, same = kl_of(b, a)
        kls.append(kl)
        sames.append(same)
    n = len(windows)
    mine = summarize(np.concatenate(ours).ravel(), n, ctx, np.concatenate(kls).ravel(), np.concatenate(sames).ravel())
    peer = summarize(np.concatenate(theirs).ravel(), n, ctx)
    return {"mlxllama": mine, "llama.cpp": peer, "ratio": mine.ppl / peer.ppl}


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import smollm2_path

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("text", nargs="?", default=str(HERE / "data" / "alice-ch1-2.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--backend", default="numpy")
    a = ap.parse_args()
    r = compare(Path(a.gguf) if a.gguf else smollm2_path(), Path(a.text), a.ctx, a.backend)
    print(f"mlxllama ({a.backend}): {r['mlxllama'].line()}")
    print(f"llama.cpp:        {r['llama.cpp'].line()}")
    print(f"ratio mlxllama / llama.cpp perplexity: {r['ratio']:.5f}")


if __name__ == "__main__":
    main()
