"""Every feature composes through the one engine step: {no speculation, lookup, draft} x {plain, logprobs,
penalties, a processor} x {float KV, 8-bit KV, rotating, 8-bit + rotating} x {prefix cache on, off} x {batch 1, 4}.

Every cell decodes greedily and gives exactly the tokens of the same request run plainly: one stream at a time, no
speculation, no prefix cache, the same cache kind and the same logits pipeline (penalties and processors change the
tokens, so their reference runs them too). Logprob cells also match the reference's logprobs. Prefix-cache cells
run every prompt twice through one engine; the second run starts from the first one's stored KV where the cache
kind keeps it (a rotating window that wrapped stores nothing). numpy runs every cell; MLX a subset (it is slow on
a CPU)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import make_hf_folder
from mlxllama.cache import CacheSettings
from mlxllama.engine import Engine, RequestParams
from mlxllama.prefix_cache import PrefixCache
from mlxllama.sampling import SamplingParams
from mlxllama.speculative import SpeculativeConfig

N_TOKENS = 14
SHAPE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=96,
             vocab_size=400)
KV = {"float": CacheSettings(), "8-bit": CacheSettings(kv_bits=8, kv_group_size=32),
      "rotating": CacheSettings(max_kv_size=24), "8-bit+rotating": CacheSettings(kv_bits=8, kv_group_size=32,
                                                                                max_kv_size=24)}
SPEC = ("none", "lookup", "draft")
FEATURES = ("plain", "logprobs", "penalties", "processor")
HAS_MLX = importlib.util.find_spec("mlx") is not None


def _demote(logits_ids, row):  # a user processor: tokens whose id is a multiple of 3 lose 2 logits
    row = row.copy()
    row[::3] -= 2.0
    return row


def _params(feature: str) -> RequestParams:
    p = RequestParams(max_tokens=N_TOKENS, ignore_eos=True)
    if feature == "logprobs":
        p.logprobs, p.top_logprobs = True, 2
    elif feature == "penalties":
        p.sampling = SamplingParams(repetition_penalty=1.2)
        p.frequency_penalty, p.presence_penalty = 0.4, 0.2
    elif feature == "processor":
        p.logits_processors = [_demote]
    return p


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sp_dir):
    folder = make_hf_folder(tmp_path_factory.mktemp("comp"), seed=3, tokenizer_dir=sp_dir, **SHAPE)
    draft_folder = make_hf_folder(tmp_path_factory.mktemp("comp_draft"), seed=3, tokenizer_dir=sp_dir,
                                  num_hidden_layers=1, **SHAPE)
    return folder, draft_folder, {}


def _models(folders, backend: str):
    """(model, draft model, prompts) on a backend, loaded once per module."""
    import mlxllama

    folder, draft_folder, loaded = folders
    if backend not in loaded:
        model, _ = mlxllama.load(str(folder), backend=backend)
        draft, _ = mlxllama.load(str(draft_folder), backend=backend)
        rng = np.random.default_rng(0)
        loop = [int(t) for t in rng.integers(5, 390, 5)]
        prompts = [loop * 2 + [7], [int(t) for t in rng.integers(5, 390, 9)], loop + [11, 12] + loop,
                   [int(t) for t in rng.integers(5, 390, 4)] * 3]
        loaded[backend] = model, draft, prompts
    return loaded[backend]


def _engine(model, draft, kv: str, spec: str, prefix: bool, batch: int) -> Engine:
    settings = KV[kv]
    speculate = None
    if spec != "none":
        speculate = SpeculativeConfig(spec, 3, draft_model=draft if spec == "draft" else None, adaptive=False)
    return Engine(model, None, max_batch=batch, max_queue=8, prefill_chunk=6,
                  make_cache=lambda n: model.make_cache(1, max_len=n, settings=settings), speculate=speculate,
                  prefix_cache=PrefixCache(64 << 20) if prefix else None)


def _run(engine: Engine, prompts: list, feature: str, batch: int) -> list:
    """[(tokens, logprobs)] per prompt: all submitted at once (batch 4) or one after another (batch 1)."""
    def collect(handle):
        evs = [ev for ev in handle]
        assert evs[-1].error is None, evs[-1].error
        evs = [ev for ev in evs if ev.token is not None]
        return [ev.token for ev in evs], [ev.logprob for ev in evs]

    if batch == 1:
        return [collect(engine.submit(p, _params(feature))) for p in prompts]
    handles = [engine.submit(p, _params(feature)) for p in prompts]
    return [collect(h) for h in handles]


_REFERENCE: dict = {}


def _reference(backend, model, draft, prompts, feature: str, kv: str) -> list:
    key = (backend, feature, kv)
    if key not in _REFERENCE:
        _REFERENCE[key] = _run(_engine(model, draft, kv, "none", False, 1), prompts, feature, 1)
    return _REFERENCE[key]


def _cells(backend: str):
    for spec in SPEC:
        for feature in FEATURES:
            for kv in KV:
                for prefix in (False, True):
                    for batch in (1, 4):
                        subset = (spec in ("none", "lookup") and feature == "plain" and kv in ("float", "8-bit+rotating")
                                and not prefix)
                        if backend == "numpy" or subset:
                            yield spec, feature, kv, prefix, batch


CELLS = [("numpy", c) for c in _cells("numpy")] + ([("mlx", c) for c in _cells("mlx")] if HAS_MLX else [])


@pytest.mark.parametrize("backend,cell", CELLS, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c)))
def test_every_greedy_cell_gives_the_plain_tokens(folders, backend, cell):
    model, draft, prompts = _models(folders, backend)
    spec, feature, kv, prefix, batch = cell
    want = _reference(backend, model, draft, prompts, feature, kv)
    engine = _engine(model, draft, kv, spec, prefix, batch)
    runs = 2 if prefix else 1
    for _ in range(runs):
        got = _run(engine, prompts, feature, batch)
        assert [t for t, _ in got] == [t for t, _ in want]
        if feature == "logprobs":
            for (_, lp), (_, ref) in zip(got, want):
                np.testing.assert_allclose(lp, ref, atol=2e-3 if backend == "mlx" else 1e-4)
    if spec == "draft" or (spec == "lookup" and feature != "penalties"):  # penalties steer away from repeats
        assert engine.spec_stats.drafted > 0
    if prefix and kv in ("float", "8-bit"):
        assert engine.stats.cached_tokens > 0
