import math

import numpy as np
import pytest

from mlxllama.bench import roofline
from mlxllama.bench.roofline import (LLAMA2_7B, Accounting, account_params, account_shape, account_weights,
                                     crossover_batch, estimate, mean_context, measured_crossover,
                                     sweep_flattened)
from mlxllama.config import ModelArgs
from mlxllama.errors import UsageError
from mlxllama.weights import QuantizedWeight, expected_shapes

TINY = ModelArgs(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=4)


def tiny_weights(args=TINY):
    return {k: np.zeros(s, dtype=np.float16) for k, s in expected_shapes(args).items()}


def test_account_weights_by_hand_untied():
    acc = account_weights(TINY, tiny_weights())
    # per layer: q 8x8 + k 4x8 + v 4x8 + o 8x8 + gate/up 16x8 + down 8x16 = 576 weights, 2 norms of 8
    # embed 10x8 = 80, final norm 8, head 10x8 = 80; float16 = 2 bytes each
    assert acc.params == 80 + 2 * (576 + 16) + 8 + 80 == 1352
    assert acc.weight_bytes == 2 * 1352
    assert acc.matmul_params == 2 * 576 + 80
    # per token: everything but the embedding table, plus one 16-byte row of it
    assert acc.weight_bytes_per_token == 2 * 1352 - 160 + 16
    assert acc.kv_bytes_per_position == 2 * 2 * 1 * 4 * 2  # K+V, layers, kv heads, head_dim, fp16
    assert acc.attn_flops_per_position == 4 * 2 * 2 * 4
    assert acc.bytes_per_token(10) == 2560 + 10 * 32
    assert acc.flops_per_token(10) == 2 * 1232 + 10 * 64
    assert acc.bytes_per_step(10, batch=4) == 2560 + 4 * 10 * 32


def test_tied_embeddings_read_the_table_as_the_head():
    args = TINY.replace(tie_word_embeddings=True)
    acc = account_weights(args, tiny_weights(args))
    assert acc.weight_bytes == 2 * (1352 - 80)
    assert acc.weight_bytes_per_token == acc.weight_bytes + 16  # whole table as head + one row as embedding
    assert acc.matmul_params == 2 * 576 + 80


def test_quantized_weights_count_packed_scales_and_biases():
    w = tiny_weights()
    name = "model.layers.0.mlp.gate_proj"  # [16, 8] -> 4 bits, group 8: one uint32 per row, one scale+bias
    w[name] = QuantizedWeight(weight=np.zeros((16, 1), np.uint32), scales=np.zeros((16, 1), np.float16),
                              biases=np.zeros((16, 1), np.float16), group_size=8, bits=4)
    acc = account_weights(TINY, w)
    base = account_weights(TINY, tiny_weights())
    assert acc.weight_bytes == base.weight_bytes - 256 + (64 + 32 + 32)
    assert acc.weight_bytes_per_token == base.weight_bytes_per_token - 128
    assert acc.matmul_params == base.matmul_params and acc.params == base.params
    assert roofline.quant_label(w) == "float16/q4 g8"


def test_account_shape_matches_account_weights():
    exact = account_weights(TINY, tiny_weights())
    shaped = account_shape(TINY, 2.0, norm_bytes=2)
    assert shaped == exact


def test_llama2_7b_gguf_sizes_from_the_csv_header():
    # llama.cpp: F16; Q8_0 = 34 bytes / 32; Q4_0 = 18 bytes / 32 with a Q6_K head (210 bytes / 256); F32 norms
    f16 = account_shape(LLAMA2_7B, 2.0)
    q8 = account_shape(LLAMA2_7B, 34 / 32)
    q4 = account_shape(LLAMA2_7B, 18 / 32, head_bytes_per_weight=210 / 256)
    assert f16.params == 6_738_415_616
    assert f16.weight_bytes / 2**30 == pytest.approx(12.55, abs=0.005)
    assert q8.weight_bytes / 2**30 == pytest.approx(6.67, abs=0.005)
    assert q4.weight_bytes / 2**30 == pytest.approx(3.56, abs=0.005)
    assert f16.kv_bytes_per_position == 2 * 32 * 32 * 128 * 2 == 524288
    embed_table = 32000 * 4096 * 18 / 32
    assert q4.weight_bytes_per_token == q4.weight_bytes - embed_table + 4096 * 18 / 32


def test_parametric_path():
    acc = account_params(7_000_000_000, 4, group_size=64)
    assert acc.weight_bytes == 7e9 * (0.5 + 4 / 64)  # 4 bits + fp16 scale and bias per 64 weights
    assert acc.kv_bytes_per_position == 524288
    assert account_params(7_000_000_000, 16).weight_bytes == 14e9
    assert roofline.parse_params("7B") == 7_000_000_000
    assert roofline.parse_params("135M") == 135_000_000
    assert roofline.parse_params("6.74b") == 6_740_000_000
    for bad in ("seven", "0B", "-1B"):
        with pytest.raises(UsageError):
            roofline.parse_params(bad)
    with pytest.raises(UsageError):
        roofline.quant_bytes_per_weight(7)


def test_scores_by_hand():
    # 4 GB per token at 50 t/s = 200 GB/s achieved; on a 400 GB/s chip the score is 0.5
    assert roofline.achieved_gbps(4e9, 50) == pytest.approx(200)
    assert roofline.bandwidth_score(4e9, 50, 400) == pytest.approx(0.5)
    assert roofline.achieved_tflops(14e9, 1000) == pytest.approx(14)
    assert roofline.compute_score(14e9, 1000, 28) == pytest.approx(0.5)


def test_predictions_by_hand():
    acc = Accounting(params=100, matmul_params=1_000_000_000, weight_bytes=2_000_000_000,
                     weight_bytes_per_token=2_000_000_000, kv_bytes_per_position=1000, attn_flops_per_position=10)
    # decode: 2 GB + 1000 bytes x 1000 ctx = 2.001 GB at 100 GB/s -> 49.975 t/s
    assert roofline.predicted_decode_tps(acc, 100, ctx=1000) == pytest.approx(100e9 / 2.001e9)
    # batch 8 without a peak: 8 sequences per 2 GB + 8 MB step
    assert roofline.predicted_decode_tps(acc, 100, ctx=1000, batch=8) == pytest.approx(8 * 100e9 / 2.008e9)
    # with a 1 TFLOPS peak, batch 1000 is compute bound: 1e12 / (2e9 + 10 * 1000) t/s
    assert roofline.predicted_decode_tps(acc, 100, 1.0, ctx=1000, batch=1000) == pytest.approx(1e12 / (2e9 + 1e4))
    # prefill of 512: compute 512 * (2e9 + 10*256.5) / 1e12 s vs memory (2e9 + 512e3) / 100e9 s
    t = max(512 * (2e9 + 2565) / 1e12, (2e9 + 512_000) / 100e9)
    assert roofline.predicted_prefill_tps(acc, 512, 100, 1.0) == pytest.approx(512 / t)
    assert mean_context(512, 0) == 256.5 and mean_context(0, 128) == 64.5 and mean_context(100, 2) == 101.5


def test_a100_crossover_is_about_160():
    # fp16 weights: W = 2P bytes, so B* = peak / bw = 312e12 / 1935e9
    assert crossover_batch(312, 2 * 7e9, 7e9, 1935) == pytest.approx(161.24, abs=0.01)
    est = estimate(account_params(7_000_000_000, 16), bandwidth_gbps=1935, peak_tflops=312)
    assert est.crossover_batch == pytest.approx(161.24, abs=0.01)
    # 4-bit weights (0.5625 bytes each) cross over 3.6x sooner
    est4 = estimate(account_params(7_000_000_000, 4), bandwidth_gbps=1935, peak_tflops=312)
    assert est4.crossover_batch == pytest.approx(312e12 / 1935e9 * 0.5625 / 2, rel=1e-9)


def test_crossover_with_kv_cache():
    # W/bw = 1 s; per sequence 2P/peak = 0.1 s, KV 0.05 s -> B* = 1 / 0.05 = 20
    assert crossover_batch(1, 1e9, 0.05e12, 1, kv_bytes_per_seq=0.05e9) == pytest.approx(20)
    assert math.isinf(crossover_batch(1, 1e9, 0.05e12, 1, kv_bytes_per_seq=0.2e9))


def test_measured_crossover():
    assert measured_crossover([1, 2, 4, 8, 16], [10, 20, 39, 60, 62]) == pytest.approx(6.2)
    assert measured_crossover([2, 4], [1, 2]) is None
    assert measured_crossover([1], [1]) is None
    assert measured_crossover([1, 8], [10, 60]) is None  # two points are no finding
    assert measured_crossover([1, 4, 16], [10, 39, 62]) is None
    assert sweep_flattened([1, 2, 4, 8, 16], [10, 20, 39, 60, 62])
    assert not sweep_flattened([1, 2, 4, 8], [10, 20, 39, 60])


def test_estimate_m2_ultra_7b_q4():
    est = estimate(account_params(7_000_000_000, 4), bandwidth_gbps=800, peak_tflops=27.2, ctx=512)
    assert est.weight_bytes == 3_937_500_000
    assert est.kv_bytes == 512 * 524288
    assert est.tg_tps == pytest.approx(800e9 / (3_937_500_000 + 512 * 524288))
    assert est.pp_bound == "compute"
    assert est.crossover_batch == pytest.approx(27.2e12 * 0.5625 / (2 * 800e9))
    no_peak = estimate(account_params(7_000_000_000, 4), bandwidth_gbps=800)
    assert no_peak.pp_tps is None and no_peak.crossover_batch is None
    with pytest.raises(UsageError):
        estimate(account_params(7_000_000_000, 4), bandwidth_gbps=0)
