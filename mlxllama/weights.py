"""The single internal weight layout every loader produces and every backend consumes.

Names follow the HF/MLX LLaMA convention (without the `.weight` suffix for linears, see NAMES):
    model.embed_tokens            [vocab, hidden]
    model.layers.{i}.input_layernorm            [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj   [out, in]   (q/k rows in HF order: non-interleaved RoPE)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias  [out]     (args.qkv_bias; o_proj.bias with args.o_bias)
    model.layers.{i}.self_attn.{q,k}_norm       [head_dim]  (args.qk_norm)
    model.layers.{i}.post_attention_layernorm   [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj    [out, in]
    model.norm                                  [hidden]
    lm_head                                     [vocab, hidden]   (absent when embeddings are tied)
Each value is a numpy array (float32 or float16, possibly a read-only memmap), a QuantizedWeight in
MLX's affine layout, or a GGMLWeight: a GGUF tensor's raw blocks, kept as the file stores them (K-quants and the
other types with no exact affine form; each backend lays them out, see GGMLWeight). bfloat16 files are widened
to float32 (exact); ModelArgs.torch_dtype remembers it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelFileError, plain

if TYPE_CHECKING:
    from .config import ModelArgs

logger = logging.getLogger(__name__)

# MLX's affine quantization as every part of mlxllama accepts it (config, convert, quant, roofline).
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizedWeight:
    """MLX affine quantization: w[r, c] = scales[r, c // g] * q[r, c] + biases[r, c // g].

    q is packed little-end-first into uint32: element j of a word sits at bits [bits*j, bits*(j+1)).
    """

    weight: np.ndarray  # uint32 [rows, cols * bits // 32]
    scales: np.ndarray  # float16 or float32 [rows, cols // group_size]
    biases: np.ndarray  # same dtype and shape as scales
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes


class SymmetricWeight(QuantizedWeight):
    """A QuantizedWeight whose biases are bias_factor * scales in the scales' dtype (GGUF's Q4_0, Q5_0, Q8_0): they
    are formed when read, one tensor at a time, not held, so a loaded model does not carry them all at once (the
    numpy kernel forms them itself; MLX lays them out per tensor). nbytes counts them as held, as the layout
    states them."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray, bias_factor: float, group_size: int, bits: int):
        self.weight, self.scales, self.group_size, self.bits = weight, scales, group_size, bits
        self.bias_factor = float(bias_factor)

    @property
    def biases(self) -> np.ndarray:
        return (self.scales.astype(np.float32) * np.float32(self.bias_factor)).astype(self.scales.dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + 2 * self.scales.nbytes


@dataclass
class GGMLWeight:
    """A GGUF quantized matrix as stored: blocks [rows, row_bytes] uint8 (a memmap view until laid out), each row
    cols / block_elements blocks of the GGML type `qtype` (a gguf GGMLQuantizationType name, "Q4_K", ...).

    Its float values are gguf.quants.dequantize's, exactly. The numpy backend multiplies the blocks as they are
    (backends/kquants.py, through prepare_numpy); MLX maps the types that have an exact affine form onto
    mx.quantized_matmul and decodes the others per product (backends/mlx_ops.py)."""

    qtype: str
    blocks: np.ndarray
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    @staticmethod
    def prepare_numpy(parts: list):
        """The numpy backend's layout of same-input projections fused by output rows (the backend's
        prepare_linear hook): the raw blocks and a numba kernel, or float32 [in, out] where numba is missing."""
        kquants = _kquants()
        if kquants is None:
            return np.ascontiguousarray(np.concatenate([p.dequantize() for p in parts]).T)
        return kquants.prepare_numpy(parts)

    def numpy_nbytes(self) -> int:
        """Bytes prepare_numpy will hold for this tensor: the file's, or float32's without numba."""
        return self.nbytes if _kquants() is not None else 4 * self.shape[0] * self.shape[1]

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 [rows, cols], equal to gguf.quants.dequantize's."""
        import gguf.quants
        from gguf.constants import GGMLQuantizationType

        rows = np.ascontiguousarray(self.blocks[start:stop])
        return gguf.quants.dequantize(rows, GGMLQuantizationType[self.qtype]).astype(np.float32, copy=False)


def _kquants():
    """backends.kquants (numba kernels over GGUF blocks), or None where numba cannot be imported (once, a warning)."""
    try:
        from .backends import kquants
    except ImportError as e:
        if not _NO_NUMBA:
            _NO_NUMBA.append(e)
            logger.warning("numba is not usable (%s): GGUF quantized weights are widened to float32 on the numpy "
                           "backend (pip install 'mlxllama[fast-cpu]')", str(e).splitlines()[0] if str(e) else e)
        return None
    return kquants


_NO_NUMBA: list = []

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def expected_shapes(args: "ModelArgs") -> dict[str, tuple[int, ...]]:
    h, d = args.hidden_size, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens": (args.vocab_size, h), "model.norm": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head"] = (args.vocab_size, h)
    per_layer = {
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "self_attn.q_proj": (args.num_attention_heads * d, h),
        "self_attn.k_proj": (args.num_key_value_heads * d, h),
        "self_attn.v_proj": (args.num_key_value_heads * d, h),
        "self_attn.o_proj": (h, args.num_attention_heads * d),
        "mlp.gate_proj": (args.intermediate_size, h),
        "mlp.up_proj": (args.intermediate_size, h),
        "mlp.down_proj": (h, args.intermediate_size),
    }
    if args.qkv_bias:
        per_layer.update({f"self_attn.{n}_proj.bias": (per_layer[f"self_attn.{n}_proj"][0],) for n in "qkv"})
    if args.o_bias:
        per_layer["self_attn.o_proj.bias"] = (h,)
    if args.qk_norm:
        per_layer.update({"self_attn.q_norm": (d,), "self_attn.k_norm": (d,)})
    for i in range(args.num_hidden_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    return shapes


def check_weights(weights: dict, args: "ModelArgs", source: str) -> None:
    """Every expected tensor is present with the shape the config implies; nothing unexpected."""
    want = expected_shapes(args)
    missing = [k for k in want if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{source}: missing tensor {missing[0]}{more}")
    extra = [k for k in weights if k not in want]
    if extra:
        raise ModelFileError(f"{source}: unexpected tensor {plain(extra[0])}")
    for k, s in want.items():
        w = weights[k]
        shape = w.shape if isinstance(w, (QuantizedWeight, GGMLWeight)) else tuple(w.shape)
        if tuple(shape) != s:
            raise ModelFileError(f"{source}: tensor {k} has shape {tuple(shape)}, config implies {s}")


def cut(w, rows: slice = slice(None), cols: slice = slice(None)):
    """w[rows, cols] for a 2-D weight, or w[rows] for a vector, as a view where the layout allows (a memmap stays
    unread). Quantized weights are cut on group boundaries; a column range inside a group is refused."""
    if isinstance(w, QuantizedWeight):
        c0, c1, _ = cols.indices(w.shape[1])
        g = w.group_size
        if c0 % g or c1 % g:
            raise ModelFileError(f"columns {c0}:{c1} of a weight quantized in groups of {g} do not fall on group "
                                 "boundaries")
        words = slice(c0 * w.bits // 32, c1 * w.bits // 32)
        groups = slice(c0 // g, c1 // g)
        return QuantizedWeight(w.weight[rows, words], w.scales[rows, groups], w.biases[rows, groups], g, w.bits)
    if isinstance(w, GGMLWeight):
        return _cut_blocks(w, rows, cols)
    return w[rows] if w.ndim == 1 else w[rows, cols]


def _cut_blocks(w: GGMLWeight, rows: slice, cols: slice) -> GGMLWeight:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[w.qtype]]
    c0, c1, _ = cols.indices(w.shape[1])
    if c0 % block or c1 % block:
        raise ModelFileError(f"columns {c0}:{c1} of a {w.qtype} weight do not fall on its blocks of {block}")
    part = w.blocks[rows, c0 // block * type_size: c1 // block * type_size]
    return GGMLWeight(w.qtype, part, (part.shape[0], c1 - c0))
