"""The `mlxllama` command end to end, as a user runs it (subprocesses), on the default and tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mlxllama(*args, input=None, timeout=300, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mlxllama_cli.app", *args], input=input, capture_output=True,
                          timeout=timeout, env=e, cwd=ROOT)


def test_help_lists_every_command_with_examples():
    r = mlxllama("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "convert", "download", "info", "models", "bench", "estimate"):
        assert cmd in r.stdout.decode()
    for cmd in ("generate", "chat", "convert", "download", "info", "models", "bench", "estimate"):
        r = mlxllama(cmd, "--help")
        assert r.returncode == 0, cmd
        assert "mlxllama " in r.stdout.decode(), f"{cmd} --help shows no example"


@pytest.mark.slow
def test_generate_default_model_streams_answer_and_stats():
    r = mlxllama("generate", "What is the capital of France?", "--max-tokens", "12", "--backend", "numpy")
    assert r.returncode == 0, r.stderr.decode()
    assert "Paris" in r.stdout.decode()
    err = r.stderr.decode()
    assert "Prompt:" in err and "Generation:" in err and "Peak memory:" in err


@pytest.mark.slow
def test_generate_reads_stdin_and_stops_at_stop_string():
    r = mlxllama("generate", "-", "--max-tokens", "24", "--backend", "numpy", "--stop", "Paris",
                 input="What is the capital of France?".encode())
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "Paris" not in out and out.strip()


def test_generate_tiny_hf_model_with_sampling(tiny_hf):
    r = mlxllama("generate", "The quick brown", "-m", str(tiny_hf), "--max-tokens", "8", "--temp", "0.8",
                 "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.1",
                 "--seed", "3", "--backend", "numpy")
    assert r.returncode == 0, r.stderr.decode()
    again = mlxllama("generate", "The quick brown", "-m", str(tiny_hf), "--max-tokens", "8", "--temp", "0.8",
                     "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.1",
                     "--seed", "3", "--backend", "numpy")
    assert r.stdout == again.stdout  # a seed makes sampling reproducible


@pytest.mark.slow
def test_chat_repl_history_reset_exit():
    script = "My name is Ada.\n/reset\nWhat is 2 plus 2?\n/exit\n"
    r = mlxllama("chat", "--max-tokens", "8", "--backend", "numpy", input=script.encode())
    assert r.returncode == 0, r.stderr.decode()
    assert "[history cleared]" in r.stderr.decode()
    assert r.stdout.decode().count(">> ") >= 3


@pytest.mark.slow
def test_convert_default_then_generate_from_folder(tmp_path):
    dst = tmp_path / "smollm2-mlx"
    r = mlxllama("convert", "default", str(dst))
    assert r.returncode == 0, r.stderr.decode()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4} or cfg["quantization"]["bits"] == 4
    refused = mlxllama("convert", "default", str(dst))
    assert refused.returncode != 0 and "already exists" in refused.stderr.decode()
    r = mlxllama("generate", "What is the capital of France?", "-m", str(dst), "--max-tokens", "8",
                 "--backend", "numpy")
    assert r.returncode == 0 and "Paris" in r.stdout.decode()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_convert_quantize_tiny_model_loads_in_mlxllama(tmp_path, tiny_hf):
    dst = tmp_path / "q8"
    r = mlxllama("convert", str(tiny_hf), str(dst), "-q", "--bits", "8", "--group-size", "32")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((dst / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    import mlxllama as api

    model, tok = api.load(str(dst), backend="numpy")
    assert api.generate(model, tok, "The quick", max_tokens=4) is not None


def test_info_reports_backends_and_auto_choice():
    r = mlxllama("info")
    assert r.returncode == 0
    out = r.stdout.decode()
    assert "backends:" in out and "auto picks:" in out and "numpy" in out and "python:" in out


def test_models_lists_default(tmp_path):
    r = mlxllama("models", env={"HF_HOME": str(tmp_path)})
    assert r.returncode == 0
    assert "default" in r.stdout.decode()


@pytest.mark.slow
def test_bench_tiny_run_on_default_model():
    r = mlxllama("bench", "-p", "16", "-n", "4", "-r", "1", "--backend", "numpy", "-o", "json")
    assert r.returncode == 0, r.stderr.decode()
    rows = json.loads(r.stdout.decode())  # llama-bench -o json style: one row per test
    assert [row["test"] for row in rows] == ["pp16", "tg4"]
    assert all(row["tps_mean"] > 0 for row in rows)
    tg = rows[1]
    assert tg["gbps"] > 0 and tg["roofline_tps"] > 0


def test_estimate_m2_ultra():
    r = mlxllama("estimate", "--chip", "M2 Ultra", "--params", "7B", "--bits", "4")
    assert r.returncode == 0, r.stderr.decode()
    assert "t/s" in r.stdout.decode() or "tok/s" in r.stdout.decode()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["generate.py", "stream.py", "chat.py"])
def test_examples_run_on_default_model(script):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--max-tokens", "6", "--backend", "numpy"],
                       capture_output=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip()


@pytest.mark.slow
def test_convert_example(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "convert.py"), str(tmp_path / "out"), "--backend",
                        "numpy"], capture_output=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_version_short_help_and_bare_command():
    r = mlxllama("--version")
    assert r.returncode == 0 and r.stdout.decode().strip() == "mlxllama 0.1.0"
    r = mlxllama("-h")
    assert r.returncode == 0 and "Commands:" in r.stdout.decode()
    r = mlxllama()  # bare: the help on stdout and success, not an error
    assert r.returncode == 0 and "Commands:" in r.stdout.decode() and r.stderr == b""
    r = mlxllama("bench", "-h")
    assert r.returncode == 0 and "-m, --model MODEL" in r.stdout.decode() and "<list[" not in r.stdout.decode()


def test_help_follows_the_terminal_width_and_keeps_examples_whole():
    wide = mlxllama("generate", "--help", env={"COLUMNS": "200"}).stdout.decode()
    example = 'echo "Write a haiku about memory bandwidth" | mlxllama generate - --temp 0.7 --top-p 0.9 --seed 0'
    assert example in wide  # one line, pasteable
    assert any(len(line) > 100 for line in wide.splitlines())  # option help uses the width
    narrow = mlxllama("generate", "--help", env={"COLUMNS": "60"}).stdout.decode()
    assert example in narrow  # examples are never rewrapped
    for text in (wide, narrow):
        assert "<list[str]>" not in text and "--stop TEXT" in text


def test_chat_help_describes_every_option_and_the_defaults():
    out = mlxllama("chat", "--help", env={"COLUMNS": "200"}).stdout.decode()
    options = [line for line in out.splitlines() if line.startswith("  -")]
    assert len(options) >= 14
    for line in options:
        assert len(line.split("  ")) > 2 or line.rstrip().endswith(")"), f"no description: {line!r}"
    assert "temp 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition-penalty 1.0" in " ".join(out.split())
    assert "/reset" in out and "/system" in out and "/stats" in out


def test_generate_quiet_and_stats_json(tiny_hf):
    base = ("generate", "The quick brown", "-m", str(tiny_hf), "--max-tokens", "5", "--backend", "numpy")
    quiet = mlxllama(*base, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr.decode() == "" and quiet.stdout.strip()
    r = mlxllama(*base, "--stats", "json")
    assert r.returncode == 0, r.stderr.decode()
    stats = json.loads(r.stderr.decode().strip().splitlines()[-1])
    assert stats["generation_tokens"] == 5 and stats["finish_reason"] == "length" and stats["prompt_tokens"] > 0
    assert set(stats) >= {"prompt_tps", "generation_tps", "peak_memory_gb", "prompt_time_s"}
    bad = mlxllama(*base, "--stats", "xml")
    assert bad.returncode == 2 and "--stats must be text or json" in bad.stderr.decode()
