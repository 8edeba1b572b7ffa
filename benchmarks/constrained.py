"""Constrained decoding: the mask's cost per token (llguidance vs xgrammar on the model's vocabulary), JSON Schema
coverage of both, and constrained decode tok/s at batch 1 and 8 as a ratio to unconstrained, in one run.

    python benchmarks/constrained.py [-m default] [--tokens 48] [--rounds 2]

Decode runs on the engine (continuous batching), greedy, the same prompts with and without a JSON schema, in paired
rounds (A B B A). tok/s counts the steps that run the whole batch (a constrained answer that ends its JSON early
leaves a smaller batch behind; those steps are not counted on either side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "address": {"$ref": "#/$defs/address"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
    },
    "required": ["name", "age", "color", "address", "hobbies"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                          "required": ["city", "zip"], "additionalProperties": False}},
}
DOCUMENT = ('{"name": "Ada Lovelace", "age": 36, "color": "blue", "address": {"city": "London", "zip": "W1"}, '
            '"hobbies": ["mathematics", "poetry", "engines"]}')

COVERAGE = {
    "$ref/$defs": {"$defs": {"a": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/n"},
                                                                                          {"type": "null"}]}}}},
                       "$ref": "#/$defs/n"},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "enum": {"enum": ["a", "b", 3, None]},
    "const": {"const": "x"},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 8},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "format uuid": {"type": "string", "format": "uuid"},
    "format date": {"type": "string", "format": "date"},
    "integer min/max": {"type": "integer", "minimum": -5, "maximum": 1000},
    "number exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    "type list": {"type": ["string", "null"]},
}


def lscpu() -> str:
    import platform
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
        simd = [f for f in ("avx2", "avx512f", "neon") if f" {f}" in flags]
        return f"{model} ({', '.join(simd) or 'no avx2/avx512'})"
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "?"


def llguidance_masks(tok, ids: list[int]) -> list[float]:
    from mlxllama.constrain import make_constraint

    c = make_constraint(tok, tok.vocab_size, json_schema=SCHEMA)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        mask = c.allowed()
        times.append(time.perf_counter() - t0)
        assert mask[t], "the document leaves the schema"
        c.accept([t])
    return times


def xgrammar_masks(tok, ids: list[int]) -> list[float]:
    import xgrammar as xgr

    from mlxllama.constrain import token_bytes

    info = xgr.TokenizerInfo(token_bytes(tok)[0], xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.eos_ids))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                             separators=(", ", ": "))
    m = xgr.GrammarMatcher(compiled)
    bits = np.zeros((1, (tok.vocab_size + 31) // 32), dtype=np.int32)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bits)
        np.unpackbits(bits.view(np.uint8), bitorder="little")  # the same bool mask llguidance's path makes
        times.append(time.perf_counter() - t0)
        assert m.accept_token(t), "the document leaves the schema"
    return times


def coverage(tok) -> dict[str, tuple[bool, bool]]:
    import xgrammar as xgr

    from mlxllama.constrain import make_constraint, token_bytes
    from mlxllama.errors import UsageError

    info = xgr.TokenizerInfo(token_bytes(tok)[0], xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.eos_ids))
    compiler = xgr.GrammarCompiler(info)
    out = {}
    for name, schema in COVERAGE.items():
        try:
            make_constraint(tok, tok.vocab_size, json_schema=schema)
            ll = True
        except UsageError:
            ll = False
        try:
            compiler.compile_json_schema(json.dumps(schema))
            xg = True
        except Exception:  # noqa: BLE001  (xgrammar raises several kinds for what it does not support)
            xg = False
        out[name] = (ll, xg)
    return out


def decode_tps(model, tok, prompts: list[list[int]], tokens: int, constrained: bool) -> float:
    """Decode tok/s over the steps that run the whole batch (a constrained answer may end early: the steps after
    that run a smaller batch and are not counted, on either side)."""
    from mlxllama.constrain import constraint_factory
    from mlxllama.engine import Engine, RequestParams

    factory = constraint_factory(tok, model.args.vocab_size, json_schema=SCHEMA) if constrained else None
    engine = Engine(model, tok, max_batch=len(prompts), max_queue=len(prompts), prefill_step=512)
    for p in prompts:
        engine.submit(p, RequestParams(max_tokens=tokens, constraint=factory))
    while any(s.prefilling for s in engine._running) or engine._waiting:  # prefill outside the timing
        engine.step()
    seconds, produced = 0.0, 0
    while True:
        full = len(engine._running) == len(prompts)
        t0 = time.perf_counter()
        if not engine.step():
            break
        if full:
            seconds += time.perf_counter() - t0
            produced += len(prompts)
    return produced / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import mlxllama

    model, tok = mlxllama.load(mlxllama.api.resolve(a.model), backend=a.backend)
    print(f"CPU: {lscpu()}; model {a.model} ({model.device}), vocabulary {tok.vocab_size}")
    ids = tok.encode(DOCUMENT, add_special_tokens=False) + sorted(tok.eos_ids)[:1]
    ll, xg = llguidance_masks(tok, ids), xgrammar_masks(tok, ids)
    for name, ts in (("llguidance", ll), ("xgrammar", xg)):
        us = [t * 1e6 for t in ts]
        print(f"mask {name:10s}: mean {statistics.mean(us):7.1f} us/token, median {statistics.median(us):7.1f}, "
              f"max {max(us):8.1f} over {len(us)} tokens")
    cov = coverage(tok)
    print("JSON Schema coverage (llguidance / xgrammar):")
    for name, (l_ok, x_ok) in cov.items():
        print(f"  {name:28s} {'yes' if l_ok else 'NO ':3s} / {'yes' if x_ok else 'NO'}")
    print(f"  total: llguidance {sum(v[0] for v in cov.values())}/{len(cov)}, "
          f"xgrammar {sum(v[1] for v in cov.values())}/{len(cov)}")
    chat = [[{"role": "user", "content": f"Describe person number {i} as JSON."}] for i in range(8)]
    prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True)) for c in chat]
    decode_tps(model, tok, prompts[:2], 4, False)  # warm-up (first-call compilation, caches)
    decode_tps(model, tok, prompts[:2], 4, True)
    for batch in (1, 8):
        free, bound = [], []
        for r in range(a.rounds):  # A B B A ...: neither side always runs first
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                (bound if constrained else free).append(decode_tps(model, tok, prompts[:batch], a.tokens,
                                                                   constrained))
        f, b = statistics.median(free), statistics.median(bound)
        print(f"batch {batch}: unconstrained {f:6.1f} tok/s, JSON schema {b:6.1f} tok/s, ratio {b / f:.2f}x "
              f"(target >= 0.9x)")


if __name__ == "__main__":
    main()
