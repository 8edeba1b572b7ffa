"""Model configuration: one dataclass, read from an HF config.json or from GGUF metadata.

The family (families.py) is decided here, once, and carried as switches: the forward pass never asks for a name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import families
from .errors import ConfigError, shown as _show
from .jsonio import read_json
from .weights import QUANT_BITS, QUANT_GROUP_SIZES

SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "float16"
    quantization: dict | None = None  # {"group_size": g, "bits": b} for MLX folders
    rope_freq_factors: list[float] | None = None  # GGUF's rope_freqs tensor (llama3 scaling baked per frequency)
    family: str = "llama"  # families.py; the switches below carry what the forward pass needs of it
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it

    def validate(self, source: str = "config") -> "ModelArgs":
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {_show(v)}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            positive(name)
        limits = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
                  "num_hidden_layers": 1024, "num_attention_heads": 1024, "head_dim": 1024,
                  "max_position_embeddings": 1 << 24}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"{source}: {name}={getattr(self, name)} is beyond any supported model (max {limit})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{source}: {name} must be a positive number, got {_show(v)}")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(source)
        if self.quantization is not None:
            q = self.quantization
            for where, qq in [("", q)] + [(f" for {_show(k)}", v) for k, v in q.items() if isinstance(v, dict)]:
                bits, group = qq.get("bits"), qq.get("group_size")
                if type(bits) is not int or type(group) is not int or bits not in QUANT_BITS \
                        or group not in QUANT_GROUP_SIZES:
                    raise ConfigError(f"{source}: unsupported quantization{where} "
                                      f"{_show({'bits': bits, 'group_size': group})} "
                                      f"(bits {'|'.join(map(str, QUANT_BITS))}, "
                                      f"group_size {'|'.join(map(str, QUANT_GROUP_SIZES))})")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1):
            raise ConfigError(f"{source}: sliding_window must be a positive integer, got {_show(self.sliding_window)}")
        return self

    def _validate_rope_scaling(self, source: str) -> None:
        rs = self.rope_scaling
        rope_type = rs.get("rope_type", rs.get("type"))
        if rope_type not in ("llama3", "linear", "default"):
            raise ConfigError(f"{source}: unsupported rope_scaling type {_show(rope_type)} (supported: llama3, linear)")
        if rope_type == "default":
            return

        def number(key, default=None):
            v = rs.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                raise ConfigError(f"{source}: rope_scaling.{key} must be a positive number, got {_show(v)}")
            return v

        number("factor")
        if rope_type == "llama3":  # the defaults are rope_inv_freq's
            low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
            number("original_max_position_embeddings", 8192)
            if not high > low:
                raise ConfigError(f"{source}: rope_scaling.high_freq_factor ({high}) must be larger than "
                                  f"low_freq_factor ({low})")

    def to_hf_dict(self) -> dict[str, Any]:
        fam = families.by_name(self.family)
        d = {
            "architectures": [fam.architectures[0]],
            "model_type": fam.model_types[0],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "hidden_act": "silu",
            "attention_bias": self.o_bias if fam.qkv_bias is None else self.qkv_bias,
            "mlp_bias": False,
        }
        if fam.windowed:
            d["sliding_window"] = self.sliding_window
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        if self.quantization is not None:
            d["quantization"] = dict(self.quantization)
        return d

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(d: dict, key: str, kind, source: str, default=...):
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: missing required key {key!r}")
        return default
    v = d[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{source}: {key} must be an integer, got {_show(v)}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ConfigError(f"{source}: {key} must be a number, got {_show(v)}")
    if kind is bool and not isinstance(v, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {_show(v)}")
    if kind is dict and not isinstance(v, dict):
        raise ConfigError(f"{source}: {key} must be an object, got {_show(v)}")
    return float(v) if kind is float else v


def _hf_family(d: dict, source: str):
    """The family of an HF config (families.py), or a ConfigError saying why it is not run."""
    archs = d.get("architectures")
    model_type = d.get("model_type")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{source}: unsupported architecture {_show(archs)}: architectures must be a list of names")
    moe = [a for a in archs or [] if a in families.MOE_ARCHITECTURES] or \
        ([model_type] if not archs and model_type in families.MOE_MODEL_TYPES else [])
    if moe:
        raise ConfigError(f"{source}: {_show(moe[0])} is a mixture-of-experts model, which mlxllama does not run "
                          f"(supported: {families.SUPPORTED})")
    fam = families.for_hf(archs, model_type)
    if fam is None:
        what = f"architecture {_show(archs)}" if archs else f"model_type {_show(model_type)}"
        raise ConfigError(f"{source}: unsupported {what}; mlxllama runs {families.SUPPORTED}")
    return fam


def _hf_special_ids(d: dict, source: str) -> tuple[int | None, list[int]]:
    """(bos_token_id, eos_token_ids) of an HF config."""
    eos = d.get("eos_token_id")
    if eos is None:
        eos_list = []
    elif _is_int(eos):
        eos_list = [eos]
    elif isinstance(eos, list) and all(_is_int(e) for e in eos):
        eos_list = eos
    else:
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list of integers")
    bos = d.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise ConfigError(f"{source}: bos_token_id must be an integer")
    return bos, eos_list


def from_hf_dict(d: Any, source: str = "config.json") -> ModelArgs:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    fam = _hf_family(d, source)
    if d.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    attention_bias = _get(d, "attention_bias", bool, source, False)
    qkv_bias = attention_bias if fam.qkv_bias is None else fam.qkv_bias
    o_bias = attention_bias if fam.qkv_bias is None else False
    layer_types = d.get("layer_types") or []
    if d.get("use_sliding_window") or (isinstance(layer_types, list) and len(set(layer_types)) > 1):
        raise ConfigError(f"{source}: sliding-window attention on some layers only (use_sliding_window, layer_types) "
                          "is not supported")
    window = _get(d, "sliding_window", int, source, None) if fam.windowed else None
    rope = d.get("rope_parameters")  # transformers 5 keeps rope_theta and the scaling here
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {_show(rope)}")
    rope_theta = _get(rope or d, "rope_theta", float, source, 10000.0)
    if rope and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        rope_scaling = _get(d, "rope_scaling", dict, source, None)
    act = d.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act {_show(act)} is not supported (LLaMA uses silu)")
    hf_quant = d.get("quantization_config")
    if isinstance(hf_quant, dict) and hf_quant.get("quant_method", "mlx") != "mlx":
        raise ConfigError(f"{source}: {_show(hf_quant.get('quant_method'))} quantization is not supported; use a "
                          "float16/bfloat16 safetensors copy of the model, an MLX copy or a GGUF file")
    hidden = _get(d, "hidden_size", int, source)
    heads = _get(d, "num_attention_heads", int, source)
    if heads > 0 and hidden % heads and "head_dim" not in d:
        raise ConfigError(f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    bos, eos_list = _hf_special_ids(d, source)
    quant = d.get("quantization", d.get("quantization_config"))
    if quant is not None:
        if not isinstance(quant, dict):
            raise ConfigError(f"{source}: quantization must be an object")
        overrides = {k: v for k, v in quant.items() if isinstance(v, dict)}  # mlx-lm's per-layer settings
        quant = {"group_size": quant.get("group_size"), "bits": quant.get("bits"), **overrides}
    dtype = d.get("torch_dtype", d.get("dtype", "float16"))
    args = ModelArgs(
        vocab_size=_get(d, "vocab_size", int, source),
        hidden_size=hidden,
        intermediate_size=_get(d, "intermediate_size", int, source),
        num_hidden_layers=_get(d, "num_hidden_layers", int, source),
        num_attention_heads=heads,
        num_key_value_heads=_get(d, "num_key_value_heads", int, source, heads),
        head_dim=_get(d, "head_dim", int, source, hidden // heads if heads > 0 else 0),
        rms_norm_eps=_get(d, "rms_norm_eps", float, source, 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_get(d, "max_position_embeddings", int, source, 2048),
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, source, False),
        bos_token_id=bos,
        eos_token_id=eos_list,
        torch_dtype=dtype if isinstance(dtype, str) else "float16",
        quantization=quant,
        family=fam.name,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=fam.qk_norm,
        sliding_window=window,
    )
    return args.validate(source)


def load_config(path: str | Path) -> ModelArgs:
    return from_hf_dict(read_json(path, ConfigError, 1 << 20, "config"), str(path))


def from_gguf_metadata(meta: dict[str, Any], source: str = "gguf") -> ModelArgs:
    """meta maps GGUF keys (e.g. 'llama.block_count') to Python values (ints, floats, strs, lists)."""
    arch = meta.get("general.architecture")
    fam = families.for_gguf(arch)
    experts = meta.get(f"{arch}.expert_count") if isinstance(arch, str) else None
    if experts or arch in families.MOE_MODEL_TYPES:
        raise ConfigError(f"{source}: {_show(arch)} is a mixture-of-experts model"
                          f"{f' ({arch}.expert_count={_show(experts)})' if experts else ''}, which mlxllama does not run")
    if fam is None:
        raise ConfigError(f"{source}: unsupported architecture {_show(arch)}; mlxllama runs {families.GGUF_SUPPORTED}")

    def g(key, kind, default=...):
        return _get(meta, f"{arch}.{key}", kind, source, default)

    heads = g("attention.head_count", int)
    hidden = g("embedding_length", int)
    if heads <= 0:
        raise ConfigError(f"{source}: {arch}.attention.head_count must be positive")
    head_dim = g("attention.key_length", int, g("rope.dimension_count", int, hidden // heads))
    if g("attention.value_length", int, head_dim) != head_dim:
        raise ConfigError(f"{source}: {arch}.attention.value_length ({meta[arch + '.attention.value_length']}) differs "
                          f"from the key length ({head_dim}); not supported")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else None
    if not isinstance(vocab, int):
        raise ConfigError(f"{source}: vocabulary size unknown (no {arch}.vocab_size and no tokenizer.ggml.tokens)")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab:
        raise ConfigError(f"{source}: tokenizer.ggml.tokens has {len(tokens)} tokens but {arch}.vocab_size is {vocab}; "
                          "token ids past the embedding would be out of range")
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": g("rope.scaling.factor", float)}
    elif scaling_type not in (None, "none"):
        raise ConfigError(f"{source}: unsupported rope scaling {_show(scaling_type)}")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_list = [t for t in (eos, eot) if isinstance(t, int) and not isinstance(t, bool)]
    args = ModelArgs(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=g("feed_forward_length", int),
        num_hidden_layers=g("block_count", int),
        num_attention_heads=heads,
        num_key_value_heads=g("attention.head_count_kv", int, heads),
        head_dim=head_dim,
        rms_norm_eps=g("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=g("rope.freq_base", float, 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=g("context_length", int, 2048),
        tie_word_embeddings=False,  # the GGUF loader sets this from the tensors present
        bos_token_id=_get(meta, "tokenizer.ggml.bos_token_id", int, source, None),
        eos_token_id=sorted(set(eos_list)),
        torch_dtype="float16",
        family=fam.name,
        qk_norm=fam.qk_norm,
        sliding_window=g("attention.sliding_window", int, None),
        # qkv_bias and o_bias: the GGUF loader sets them from the tensors present
    )
    return args.validate(source)
