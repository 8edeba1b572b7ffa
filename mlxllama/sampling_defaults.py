"""Sampling defaults for requests that give none (`chat`, `serve`): the model's generation_config.json where its
folder has one, else llama.cpp's."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ConfigError

# llama.cpp's defaults (common/common.h, common_params_sampling): temp 0.80, top_k 40, top_p 0.95, min_p 0.05,
# penalty_repeat 1.00 (off). Sampling, because greedy decoding sends a small model into loops.
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}
# What transformers assumes for a key generation_config.json leaves out.
HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
SAMPLING_KEYS = tuple(LLAMA_CPP_DEFAULTS)
FLAGS = {"temperature": "temp", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
         "repetition_penalty": "repetition-penalty"}
DEFAULTS_HELP = ("Sampling defaults: the model's generation_config.json where it has one, else llama.cpp's (temp "
                 "0.8, top-k 40, top-p 0.95, min-p 0.05, repetition-penalty 1.0); each flag overrides one.")


def generation_defaults(model_path: Path | None) -> tuple[dict, str]:
    """(sampling values, where they came from): generation_config.json's sampling keys when the model folder has
    any, with transformers' defaults for the rest (do_sample false means greedy); else llama.cpp's defaults."""
    from .config import read_json

    path = model_path / "generation_config.json" if model_path is not None and model_path.is_dir() else None
    if path is None or not path.is_file():
        return dict(LLAMA_CPP_DEFAULTS), "llama.cpp defaults"
    gen = read_json(path, ConfigError, 1 << 20, "generation config")
    if not isinstance(gen, dict) or not any(k in gen for k in (*SAMPLING_KEYS, "do_sample")):
        return dict(LLAMA_CPP_DEFAULTS), "llama.cpp defaults"
    values = dict(HF_DEFAULTS)
    for key in SAMPLING_KEYS:
        v = gen.get(key)
        if v is None:
            continue
        ok = isinstance(v, int) if key == "top_k" else isinstance(v, (int, float)) and math.isfinite(v)
        if isinstance(v, bool) or not ok:
            raise ConfigError(f"{path}: {key} must be a number, got {v!r}"[:200])
        values[key] = v
    if gen.get("do_sample") is False:
        values["temperature"] = 0.0
    return values, "the model's generation_config.json"


def with_overrides(model_path: Path | None, given: dict) -> tuple[dict, str]:
    """generation_defaults with the values in `given` that are not None in their place; the source names them."""
    defaults, source = generation_defaults(model_path)
    values = {k: given[k] if given.get(k) is not None else defaults[k] for k in defaults}
    overridden = [FLAGS[k] for k, v in given.items() if v is not None]
    return values, source + (f"; --{', --'.join(overridden)} given" if overridden else "")


def describe(values: dict) -> str:
    return ", ".join(f"{FLAGS[k].replace('repetition-penalty', 'repeat-penalty')} {values[k]:g}"
                     for k in SAMPLING_KEYS)
