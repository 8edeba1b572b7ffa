"""Model families: what sets LLaMA, Mistral, Qwen2 and Qwen3 apart, in one table.

They share one forward pass (model.py). A family differs from LLaMA only by switches carried in ModelArgs:
q/k/v (and o) projection biases, an RMSNorm over each q and k head before RoPE, and sliding-window attention.
Each family names its HF `architectures`/`model_type`, its GGUF architecture (the metadata key prefix), and
whether convert_hf_to_gguf permuted its q/k rows for interleaved RoPE (LLaMA-style models only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    gguf_arch: str
    gguf_permuted: bool  # GGUF q/k rows permuted for interleaved RoPE
    qkv_bias: bool | None = None  # None: from config's attention_bias (which also puts a bias on o)
    qk_norm: bool = False  # per-head RMSNorm of q and k (q_norm, k_norm) before RoPE
    windowed: bool = False  # config's sliding_window applies to every layer


LLAMA = Family("llama", ("LlamaForCausalLM",), ("llama",), "llama", gguf_permuted=True)
FAMILIES = (
    LLAMA,
    Family("mistral", ("MistralForCausalLM",), ("mistral",), "llama", gguf_permuted=True, windowed=True),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), "qwen2", gguf_permuted=False, qkv_bias=True),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), "qwen3", gguf_permuted=False, qk_norm=True),
)

# Refused by name with one line: their feed-forward is a mixture of experts, not one MLP.
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM",
                     "DeepseekV3ForCausalLM", "Llama4ForCausalLM", "Llama4ForConditionalGeneration",
                     "OlmoeForCausalLM", "GraniteMoeForCausalLM", "PhimoeForCausalLM", "DbrxForCausalLM")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama4", "olmoe",
                   "granitemoe", "phimoe", "dbrx")


def by_name(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def for_hf(architectures: list | None, model_type) -> Family | None:
    """The family of an HF config: by `architectures` where given, else by `model_type`."""
    if architectures:
        return next((f for f in FAMILIES for a in architectures if a in f.architectures), None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def for_gguf(arch) -> Family | None:
    """GGUF files name the architecture of the converter; Mistral is written as "llama"."""
    return next((f for f in FAMILIES if f.gguf_arch == arch), None)


SUPPORTED = ", ".join(a for f in FAMILIES for a in f.architectures)
GGUF_SUPPORTED = ", ".join(dict.fromkeys(f.gguf_arch for f in FAMILIES))

# GGUF tensor names -> internal names (mlxllama/weights.py). Biases and q/k norms exist only where the
# family's switches ask for them.
GGUF_TO_INTERNAL = {
    "token_embd.weight": "model.embed_tokens",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj",
    "output_norm.weight": "model.norm",
    "output.weight": "lm_head",
}
