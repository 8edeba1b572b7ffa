"""Bytes and FLOPs per token, bandwidth-normalized scores, and roofline predictions.

Units: bytes, FLOPs, seconds; bandwidth in GB/s (1e9 B/s) and peaks in TFLOPS (1e12 FLOP/s), as chips are rated.

Decoding one token reads every weight once (batch 1 is memory-bound), except the embedding table, of which it reads
one row; the output head is read in full (it is the embedding table when the embeddings are tied). It also reads the
KV cache: 2 (K and V) * layers * kv_heads * head_dim * ctx * kv dtype bytes at context length ctx.
FLOPs per token: 2 per weight multiply-accumulate (every linear and the head) + attention 4 * layers * heads *
head_dim * ctx (q.k scores and the weighted sum of v, 2 FLOPs per MAC each). Norms, RoPE and softmax are ignored.

Roofline:
    decode, batch B:  t_step >= max((W + B*K*ctx) / bw,  B * F / peak)     tok/s = B / t_step
    prefill N tokens: t      >= max(W / bw,  N * F / peak)                  tok/s = N / t
where W is the weight bytes read per step, K the KV bytes per position, F the FLOPs per token, P the weight MACs
per token (so F = 2P + attention). Decode turns compute-bound where the two bounds meet. Ignoring the KV cache:
    B* = peak * W / (2 * P * bw)
For fp16 weights W = 2P bytes, so B* = peak / bw: an A100 at 312 TFLOPS and 1935 GB/s gives B* = 161; 4-bit
weights (W ~ 0.56P) move it down ~3.6x. With the KV cache, B* = (W/bw) / (F/peak - K*ctx/bw), infinite when the
KV reads alone outrun the compute (attention-bound: batching never helps).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..config import ModelArgs
from ..errors import UsageError
from ..weights import LAYER_LINEARS, QUANT_BITS, GGMLWeight, QuantizedWeight

# Shape assumed by the parametric path (--params N --bits B) for the KV cache and attention FLOPs.
LLAMA2_7B = ModelArgs(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128)


def _shape(vocab, hidden, inter, layers, heads, kv_heads, head_dim, tied=False) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                     tie_word_embeddings=tied)


# The published config.json of each model: what `--params N` stands for (the nearest by parameter count).
KNOWN_SHAPES = {
    "SmolLM2-135M": _shape(49152, 576, 1536, 30, 9, 3, 64, tied=True),
    "SmolLM2-360M": _shape(49152, 960, 2560, 32, 15, 5, 64, tied=True),
    "Llama-3.2-1B": _shape(128256, 2048, 8192, 16, 32, 8, 64, tied=True),
    "SmolLM2-1.7B": _shape(49152, 2048, 8192, 24, 32, 32, 64, tied=True),
    "Llama-3.2-3B": _shape(128256, 3072, 8192, 28, 24, 8, 128, tied=True),
    "Llama-2-7B": LLAMA2_7B,
    "Llama-3.1-8B": _shape(128256, 4096, 14336, 32, 32, 8, 128),
    "Llama-2-13B": _shape(32000, 5120, 13824, 40, 40, 40, 128),
    "CodeLlama-34B": _shape(32000, 8192, 22016, 48, 64, 8, 128),
    "Llama-3.1-70B": _shape(128256, 8192, 28672, 80, 64, 8, 128),
    "Llama-3.1-405B": _shape(128256, 16384, 53248, 126, 128, 8, 128),
}
SHAPE_TOLERANCE = 1.25  # --params within this factor of a known model's count means that model


def shape_params(args: ModelArgs) -> int:
    return account_shape(args, 2.0).params


def nearest_shape(params: int) -> tuple[str, ModelArgs, bool]:
    """(name, shape, exact): the known model nearest to `params` weights; exact when within SHAPE_TOLERANCE."""
    name = min(KNOWN_SHAPES, key=lambda k: abs(math.log(shape_params(KNOWN_SHAPES[k]) / params)))
    ratio = shape_params(KNOWN_SHAPES[name]) / params
    return name, KNOWN_SHAPES[name], 1 / SHAPE_TOLERANCE <= ratio <= SHAPE_TOLERANCE


@dataclass(frozen=True)
class Accounting:
    params: int                   # every weight element (logical, unpacked), the whole embedding table included
    matmul_params: int            # weight MACs per token: every linear plus the output head
    weight_bytes: int             # every stored tensor: the memory the weights take
    weight_bytes_per_token: int   # read per decode step: all but the embedding table, plus one row of it
    kv_bytes_per_position: int    # K and V, all layers, one position
    attn_flops_per_position: int  # 4 * layers * heads * head_dim

    def kv_bytes(self, ctx: float) -> float:
        return self.kv_bytes_per_position * ctx

    def bytes_per_step(self, ctx: float, batch: int = 1) -> float:
        """Bytes one decode step reads: the weights once, the KV cache of each of `batch` sequences."""
        return self.weight_bytes_per_token + batch * self.kv_bytes(ctx)

    def bytes_per_token(self, ctx: float) -> float:
        return self.bytes_per_step(ctx, 1)

    def flops_per_token(self, ctx: float) -> float:
        return 2 * self.matmul_params + self.attn_flops_per_position * ctx

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Accounting":
        return cls(**{f.name: int(d[f.name]) for f in fields(cls)})


def _nbytes(t) -> int:
    return int(t.nbytes)


def _elements(t) -> int:
    shape = tuple(t.shape)
    return int(np.prod(shape))


def _kv_and_attention(args: ModelArgs, kv_bytes: float) -> tuple[int, int]:
    """kv_bytes per K or V element: a float size, or a quantized cache's (cache.kv_element_bytes)."""
    kv = round(2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * kv_bytes)
    attn = 4 * args.num_hidden_layers * args.num_attention_heads * args.head_dim
    return kv, attn


def account_weights(args: ModelArgs, weights: dict, kv_bytes: int = 2) -> Accounting:
    """Exact accounting from a loaded model's tensors (the internal layout of mlxllama.weights).

    kv_bytes is the KV cache element size the backend uses (2 for float16, 4 for float32).
    """
    embed = weights["model.embed_tokens"]
    head = weights.get("lm_head", embed)
    vocab = embed.shape[0]
    total_bytes = sum(_nbytes(t) for t in weights.values())
    per_token = total_bytes - _nbytes(embed) + math.ceil(_nbytes(embed) / vocab)
    if "lm_head" not in weights:
        per_token += _nbytes(embed)  # tied: the table is read again, whole, as the output head
    linears = [weights[f"model.layers.{i}.{k}"] for i in range(args.num_hidden_layers) for k in LAYER_LINEARS]
    kv, attn = _kv_and_attention(args, kv_bytes)
    return Accounting(
        params=sum(_elements(t) for t in weights.values()),
        matmul_params=sum(_elements(t) for t in linears) + _elements(head),
        weight_bytes=total_bytes,
        weight_bytes_per_token=per_token,
        kv_bytes_per_position=kv,
        attn_flops_per_position=attn,
    )


def quant_label(weights: dict) -> str:
    """How the linears are stored: 'q4 g32', 'float16', or a '/'-joined mix ('q4 g32/q6 g32')."""
    kinds = []
    for name, t in weights.items():
        if ".layers." not in name or not name.endswith(LAYER_LINEARS):
            continue
        kind = f"q{t.bits} g{t.group_size}" if isinstance(t, QuantizedWeight) else \
            t.qtype if isinstance(t, GGMLWeight) else str(t.dtype)
        if kind not in kinds:
            kinds.append(kind)
    return "/".join(kinds) or "unknown"


def account_shape(args: ModelArgs, linear_bytes_per_weight: float, *, embed_bytes_per_weight: float | None = None,
                  head_bytes_per_weight: float | None = None, norm_bytes: int = 4, kv_bytes: int = 2) -> Accounting:
    """Accounting from a shape and per-tensor storage costs (bytes per weight, block scales included).

    The embedding table and the head default to the linears' cost; norms are stored at norm_bytes per element.
    """
    h, v, d = args.hidden_size, args.vocab_size, args.head_dim
    per_layer = (h * args.num_attention_heads * d * 2 + h * args.num_key_value_heads * d * 2
                 + 3 * h * args.intermediate_size)
    linear = per_layer * args.num_hidden_layers
    norms = h * (2 * args.num_hidden_layers + 1)
    embed_cost = linear_bytes_per_weight if embed_bytes_per_weight is None else embed_bytes_per_weight
    head_cost = embed_cost if head_bytes_per_weight is None else head_bytes_per_weight
    embed_bytes = v * h * embed_cost
    head_bytes = v * h * head_cost
    body = linear * linear_bytes_per_weight + norms * norm_bytes
    stored = body + embed_bytes + (0 if args.tie_word_embeddings else head_bytes)
    kv, attn = _kv_and_attention(args, kv_bytes)
    return Accounting(
        params=linear + norms + v * h * (1 if args.tie_word_embeddings else 2),
        matmul_params=linear + v * h,
        weight_bytes=round(stored),
        weight_bytes_per_token=round(body + h * embed_cost + head_bytes),
        kv_bytes_per_position=kv,
        attn_flops_per_position=attn,
    )


def parse_params(text: str) -> int:
    """'7B' -> 7e9, '135M' -> 135e6, '6.74b' -> 6.74e9, '7000000000' -> 7e9."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise UsageError(f"--params: cannot read {text!r}; write e.g. 7B, 135M or 6.74B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    n = round(float(m.group(1)) * scale)
    if n <= 0:
        raise UsageError(f"--params must be positive, got {text!r}")
    return n


def quant_bytes_per_weight(bits: int, group_size: int = 64, scale_bytes: int = 2) -> float:
    """MLX affine quantization: bits/8 per weight plus a scale and a bias (scale_bytes each) per group.

    16 and 32 bits mean unquantized float16/float32.
    """
    if bits in (16, 32):
        return bits / 8
    if bits not in QUANT_BITS:
        raise UsageError(f"--bits must be one of {', '.join(map(str, QUANT_BITS + (16, 32)))}, got {bits}")
    if group_size <= 0:
        raise UsageError(f"--group-size must be positive, got {group_size}")
    return bits / 8 + 2 * scale_bytes / group_size


def account_params(params: int, bits: int, group_size: int = 64, kv_bytes: int = 2,
                   shape: ModelArgs = LLAMA2_7B) -> Accounting:
    """The parametric path: `params` weights all read per token at `bits` (group scale/bias overhead included).

    The KV cache and attention FLOPs follow `shape` (LLaMA-2 7B unless told otherwise); the one-row saving on the
    embedding table is ignored (about 2% for a 7B model).
    """
    cost = quant_bytes_per_weight(bits, group_size)
    kv, attn = _kv_and_attention(shape, kv_bytes)
    nbytes = round(params * cost)
    return Accounting(params=params, matmul_params=params, weight_bytes=nbytes, weight_bytes_per_token=nbytes,
                      kv_bytes_per_position=kv, attn_flops_per_position=attn)


# --- mean contexts of llama-bench style tests ---

def mean_context(n_prompt: int, n_gen: int) -> float:
    """Mean number of positions attended per token: a token at position i attends i+1 positions.

    pp N (n_gen 0): (N+1)/2. tg N after a prompt of n_prompt: n_prompt + (N+1)/2.
    """
    if n_gen == 0:
        return (n_prompt + 1) / 2
    return n_prompt + (n_gen + 1) / 2


# --- derived figures ---

def achieved_gbps(bytes_per_token: float, tokens_per_s: float) -> float:
    return bytes_per_token * tokens_per_s / 1e9


def bandwidth_score(bytes_per_token: float, tokens_per_s: float, bandwidth_gbps: float) -> float:
    """Achieved bytes/s over the bandwidth (rated or measured): 1.0 means the memory bus never idles."""
    return achieved_gbps(bytes_per_token, tokens_per_s) / bandwidth_gbps


def achieved_tflops(flops_per_token: float, tokens_per_s: float) -> float:
    return flops_per_token * tokens_per_s / 1e12


def compute_score(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    return achieved_tflops(flops_per_token, tokens_per_s) / peak_tflops


def predicted_decode_tps(acc: Accounting, bandwidth_gbps: float, peak_tflops: float | None = None,
                         ctx: float = 0.0, batch: int = 1) -> float:
    """Roofline tok/s of batched decode (all sequences together)."""
    t = acc.bytes_per_step(ctx, batch) / (bandwidth_gbps * 1e9)
    if peak_tflops:
        t = max(t, batch * acc.flops_per_token(ctx) / (peak_tflops * 1e12))
    return batch / t


def predicted_prefill_tps(acc: Accounting, n_prompt: int, bandwidth_gbps: float,
                          peak_tflops: float | None = None) -> float:
    """Roofline tok/s of processing an n_prompt prompt in one pass: min(compute bound, N * bw / bytes)."""
    ctx = mean_context(n_prompt, 0)
    t = (acc.weight_bytes_per_token + acc.kv_bytes(n_prompt)) / (bandwidth_gbps * 1e9)
    if peak_tflops:
        t = max(t, n_prompt * acc.flops_per_token(ctx) / (peak_tflops * 1e12))
    return n_prompt / t


def crossover_batch(peak_tflops: float, weight_bytes: float, matmul_params: float, bandwidth_gbps: float,
                    kv_bytes_per_seq: float = 0.0, attn_flops_per_seq: float = 0.0) -> float:
    """Batch size where decode turns compute-bound: B* = peak * W / (2 * P * bw) without the KV terms.

    With the KV cache (kv_bytes_per_seq = K*ctx read per sequence, attn_flops_per_seq = attention FLOPs per token):
    B* = (W / bw) / ((2P + A) / peak - K*ctx / bw), or inf when the denominator is not positive.
    """
    peak = peak_tflops * 1e12
    bw = bandwidth_gbps * 1e9
    per_seq = (2 * matmul_params + attn_flops_per_seq) / peak - kv_bytes_per_seq / bw
    if per_seq <= 0:
        return math.inf
    return (weight_bytes / bw) / per_seq


MIN_SWEEP_POINTS = 4  # batch sizes, batch 1 among them: fewer cannot show where the curve bends
FLAT_GAIN = 1.10        # the last doubling of the batch gained less than this: the curve has flattened


def measured_crossover(batches: list[int], tokens_per_s: list[float]) -> float | None:
    """Where the measured batch-1 line (B * tg1) meets the measured plateau (the best tok/s): best / tg1.

    The same construction as the roofline crossover, with the machine's effective bandwidth and compute in place
    of the rated ones. None without batch 1 and at least MIN_SWEEP_POINTS batch sizes. If the curve has not
    flattened by the largest batch (sweep_flattened) this is a lower bound.
    """
    pairs = sorted(zip(batches, tokens_per_s))
    if not pairs or pairs[0][0] != 1 or len(pairs) < MIN_SWEEP_POINTS:
        return None
    return max(t for _, t in pairs) / pairs[0][1]


def sweep_flattened(batches: list[int], tokens_per_s: list[float]) -> bool:
    """Whether tok/s stopped rising: the largest batch gained less than FLAT_GAIN over the one before."""
    pairs = sorted(zip(batches, tokens_per_s))
    return len(pairs) >= 2 and pairs[-1][1] < FLAT_GAIN * pairs[-2][1]


@dataclass(frozen=True)
class Estimate:
    weight_bytes: int
    kv_bytes: float              # at ctx
    bytes_per_token: float       # decode at ctx
    flops_per_token: float       # decode at ctx
    bandwidth_gbps: float
    peak_tflops: float | None
    ctx: int
    n_prompt: int
    tg_tps: float                # roofline decode tok/s at batch 1, context ctx
    pp_tps: float | None         # roofline prefill tok/s for n_prompt (None without a peak)
    pp_bound: str | None         # "compute" or "memory"
    crossover_batch: float | None       # weights only: peak * W / (2 P bw)
    crossover_batch_kv: float | None    # with the KV cache at ctx


def estimate(acc: Accounting, bandwidth_gbps: float, peak_tflops: float | None = None, ctx: int = 512,
             n_prompt: int = 512) -> Estimate:
    if not bandwidth_gbps or bandwidth_gbps <= 0:
        raise UsageError("a positive bandwidth is needed (--chip or --bandwidth)")
    if ctx < 0 or n_prompt <= 0:
        raise UsageError("--ctx must be >= 0 and --prompt > 0")
    pp = pp_bound = cross = cross_kv = None
    if peak_tflops:
        pp = predicted_prefill_tps(acc, n_prompt, bandwidth_gbps, peak_tflops)
        pp_bound = "memory" if math.isclose(pp, predicted_prefill_tps(acc, n_prompt, bandwidth_gbps), rel_tol=1e-9) \
            else "compute"
        cross = crossover_batch(peak_tflops, acc.weight_bytes_per_token, acc.matmul_params, bandwidth_gbps)
        cross_kv = crossover_batch(peak_tflops, acc.weight_bytes_per_token, acc.matmul_params, bandwidth_gbps,
                                   acc.kv_bytes(ctx), acc.attn_flops_per_position * ctx)
    return Estimate(
        weight_bytes=acc.weight_bytes, kv_bytes=acc.kv_bytes(ctx), bytes_per_token=acc.bytes_per_token(ctx),
        flops_per_token=acc.flops_per_token(ctx), bandwidth_gbps=bandwidth_gbps, peak_tflops=peak_tflops,
        ctx=ctx, n_prompt=n_prompt, tg_tps=predicted_decode_tps(acc, bandwidth_gbps, peak_tflops, ctx),
        pp_tps=pp, pp_bound=pp_bound, crossover_batch=cross, crossover_batch_kv=cross_kv,
    )
