"""benchmarks/gpu_decode.py on MLX's CPU device with a tiny shape: the table, the JSON, and that mlxllama and mlx-lm
run the same model on the same weights (greedy tokens and logits agree)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
    pytest.skip("needs mlx and mlx-lm", allow_module_level=True)

import mlx.core as mx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_decode.py"


def load_script():
    if "gpu_decode" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
        sys.modules["gpu_decode"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_decode"])
    return sys.modules["gpu_decode"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_decode") / "sub" / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--quick", "--device", "cpu",
                           "--formats", "q4,f16", "--batches", "1,4", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_table_lists_every_format_engine_and_test(quick_run):
    stdout, _ = quick_run
    assert "measured bandwidth: copy" in stdout and "loop: plain loop" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("format"))
    assert header.split() == ["format", "engine", "test", "tok/s", "MB/token", "GB/s", "of", "copy", "vs", "mlx-lm"]
    cells = [line.split() for line in stdout.splitlines() if line.startswith(("q4 ", "f16 "))]
    seen = {(c[0], c[1], " ".join(c[2:-5])) for c in cells}
    tests = ["pp64", "tg16", "tg8 b1", "tg8 b4"]
    assert seen == {(f, e, t) for f in ("q4", "f16") for e in ("mlxllama", "mlx-lm") for t in tests}
    for c in cells:
        assert float(c[-5]) > 0 and c[-2].endswith("%") and c[-1].endswith("x")
        if c[1] == "mlx-lm":
            assert c[-1] == "1.00x"


def test_json_rows_are_complete_and_consistent(quick_run):
    _, result = quick_run
    assert result["shape"] == "tiny" and result["compute_dtype"] == "float32"
    assert result["device"].startswith("Device(cpu")
    probe = result["probe"]
    assert probe["copy_gbps"] > 0 and probe["read_gbps"] > 0
    assert [f["format"] for f in result["formats"]] == ["q4", "f16"]
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 4
    by_key = {(r["format"], r["engine"], r["test"]): r for r in rows}
    for r in rows:
        assert r["tok_s"] > 0 and len(r["samples_tok_s"]) == result["reps"]
        assert r["bytes_per_token"] > 0
        assert r["gbps"] == pytest.approx(r["bytes_per_token"] * r["tok_s"] / 1e9)
        assert r["frac_copy"] == pytest.approx(r["gbps"] / probe["copy_gbps"])
        peer = by_key[(r["format"], "mlx-lm", r["test"])]
        assert r["ratio_to_mlx_lm"] == pytest.approx(r["tok_s"] / peer["tok_s"])
        assert r["bytes_per_token"] == peer["bytes_per_token"]  # the same weights for both engines
    for f in result["formats"]:
        a = f["agreement"]
        assert a["same_prefix"] == a["n"] == 16, a


def test_bytes_per_token_match_the_shape(quick_run):
    """Decode bytes per token from the tensors equal the shape's arithmetic (float32 resident on the CPU)."""
    import mlxllama.bench.roofline as rl

    gd = load_script()
    _, result = quick_run
    args = gd.SHAPES["tiny"]
    costs = {"q4": rl.quant_bytes_per_weight(4, 64, scale_bytes=4), "f16": 4.0}
    rows = {(r["format"], r["test"]): r for r in result["rows"] if r["engine"] == "mlxllama"}
    for fmt, cost in costs.items():
        acc = rl.account_shape(args, cost, norm_bytes=4, kv_bytes=4)
        tg = rows[(fmt, "tg16")]
        assert tg["bytes_per_token"] == pytest.approx(acc.bytes_per_token(16 + 17 / 2))
        b4 = rows[(fmt, "tg8 b4")]
        assert b4["bytes_per_token"] == pytest.approx(acc.bytes_per_step(16 + 9 / 2, 4) / 4)


@pytest.mark.parametrize("fmt", ["f16", "q4"])
def test_same_greedy_tokens_as_mlx_lm(fmt):
    """mlxllama and mlx-lm on the same random weights (GQA here): same greedy tokens, logits to float32 noise."""
    gd = load_script()
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        args = gd.SHAPES["tiny"].replace(num_key_value_heads=2)
        weights = gd.make_weights(args, fmt, seed=3)
        ops = gd.MLXOps()
        engines = [gd.mlxllama_engine(args, weights, ops),
                   gd.mlx_lm_engine(args, weights, ops.float_dtype, gd.import_mlx_lm())]
        prompt = mx.array([[5, 77, 301, 12, 9, 460, 33]], dtype=mx.int32)
        a = gd.agreement(engines, prompt, 12)
    finally:
        mx.set_default_device(previous)
    toks = a["tokens"]
    assert toks["mlxllama"] == toks["mlx-lm"]
    assert len(set(toks["mlxllama"])) > 1  # not a degenerate model that repeats one token
    tolerance = 1e-3 if ops.float_dtype == mx.float32 else 3e-2  # float16 where MLX sees a GPU
    assert a["max_abs_logit_diff"] < tolerance * a["logit_std"]


def test_mlx_lm_models_import_without_transformers():
    """The CUDA machine lacks transformers (imported by mlx_lm/__init__): the model code must still load."""
    code = (f"import sys; sys.modules['transformers'] = None; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            "import gpu_decode; llama, cache, version, how = gpu_decode.import_mlx_lm(); "
            "print(llama.Model.__name__, cache.make_prompt_cache.__name__, how)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("Model make_prompt_cache mlx_lm.models only")


def test_missing_mlx_lm_is_skipped_with_one_line(monkeypatch, capsys):
    gd = load_script()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else real(name, *a))
    result = gd.main(["--shape", "tiny", "--quick", "--device", "cpu", "--formats", "q4", "--batches", "1"])
    out = capsys.readouterr().out
    assert "mlx-lm: skipped (not installed; pip install mlx-lm): timing mlxllama alone" in out
    assert {r["engine"] for r in result["rows"]} == {"mlxllama"} and result["formats"][0]["agreement"] is None
    assert "no peer to agree with" in out
