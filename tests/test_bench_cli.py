import json
import sys
import types
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mlxllama.bench import hardware, submissions
from mlxllama.bench.hardware import Machine
from mlxllama.errors import UsageError
from mlxllama_cli.bench import bench_app, estimate, parse_batches
from test_bench_submissions import sample_submission

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def fake_run(monkeypatch):
    """Stands in for mlxllama.bench.run (the timed run): records its arguments, returns fixture submissions."""
    calls = []
    result = {"subs": [sample_submission("M2 Max", tg=(60.0, 62.0), pp=(500.0, 505.0))]}

    def run_bench(**kwargs):
        calls.append(kwargs)
        kwargs["progress"]("tg128", 1, 1)
        return result["subs"]

    monkeypatch.setitem(sys.modules, "mlxllama.bench.run", types.SimpleNamespace(run_bench=run_bench))
    monkeypatch.setattr(hardware, "detect", lambda: MAC)  # --chip is checked against the machine
    return calls, result


MAC = Machine(system="Darwin", os="macOS 14.5", cpu="Apple M2 Ultra", cpu_cores=24, memory_bytes=192 << 30)
X86 = Machine(system="Linux", os="Linux 6.8", cpu="AMD EPYC 7763", cpu_cores=2, memory_bytes=8 << 30)


def test_bench_refuses_a_chip_the_machine_is_not(fake_run, monkeypatch):
    calls, _ = fake_run
    monkeypatch.setattr(hardware, "detect", lambda: X86)
    res = runner.invoke(bench_app, ["--chip", "M2"])
    assert isinstance(res.exception, UsageError) and calls == []  # refused before anything runs
    assert "M2 (10-core GPU) is not this machine's chip (AMD EPYC 7763, Linux 6.8)" in str(res.exception)
    assert "--bandwidth" in str(res.exception)


def test_bench_default_prints_llama_bench_rows(fake_run):
    calls, _ = fake_run
    res = runner.invoke(bench_app, [])
    assert res.exit_code == 0, res.output
    kwargs = calls[0]
    assert {k: kwargs[k] for k in ("models", "n_prompt", "n_gen", "repetitions", "batches", "backend", "chip",
                                   "bandwidth_gbps")} == {
        "models": [], "n_prompt": 512, "n_gen": 128, "repetitions": 5, "batches": [1], "backend": "auto",
        "chip": None, "bandwidth_gbps": None}
    lines = res.stdout.splitlines()
    assert lines[0].startswith("M2 Max (38-core GPU): rated 400 GB/s, 13.6 TFLOPS fp16; measured copy 330.0 GB/s")
    header = next(line for line in lines if line.startswith("| model"))
    assert header.split(" | ")[:9] == ["| model", "weights", "resident", "params", "quant", "backend", "device",
                                       "test", "t/s"]
    tg = next(line for line in lines if "| tg128 |" in line).strip("| ").split(" | ")
    assert tg[:9] == ["LLaMA-2 7B", "3.56 GiB", "3.56 GiB", "6.74 B", "Q4_0", "mlx", "gpu", "tg128",
                      "61.00 ± 1.41"]
    step = sample_submission()["tests"][1]["bytes_per_step"]
    assert float(tg[9]) == pytest.approx(61.0 * step / 1e9, abs=0.05)       # GB/s
    assert float(tg[10]) == pytest.approx(61.0 * step / 400e9, abs=0.005)   # score vs rated
    assert float(tg[11]) == pytest.approx(61.0 * step / 370e9, abs=0.005)   # score vs measured read
    pp = next(line for line in lines if "| pp512 |" in line).strip("| ").split(" | ")
    assert pp[8] == "502.50 ± 3.54" and pp[9] == "-" and pp[13] != "-"     # FLOP score for pp


def test_bench_options_are_parsed(fake_run, tmp_path):
    calls, _ = fake_run
    res = runner.invoke(bench_app, ["-m", "a.gguf", "-m", "b", "-p", "0", "-n", "64", "-r", "2", "--batch",
                                    "8, 1,8", "--backend", "numpy", "--chip", "apple m2 ultra", "--bandwidth",
                                    "790", "-o", "json"])
    assert res.exit_code == 0, res.output
    kw = calls[0]
    assert kw["models"] == ["a.gguf", "b"] and kw["n_prompt"] == 0 and kw["n_gen"] == 64
    assert kw["repetitions"] == 2 and kw["batches"] == [1, 8] and kw["backend"] == "numpy"
    assert kw["chip"].name == "M2 Ultra (76-core GPU)" and kw["bandwidth_gbps"] == 790
    rows = json.loads(res.stdout)
    assert [r["test"] for r in rows] == ["pp512", "tg128"] and rows[1]["tps_mean"] == 61.0


def test_bench_csv(fake_run):
    res = runner.invoke(bench_app, ["-o", "csv"])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].startswith("model,size_gib,file_gib,params_b,quant,backend,device,chip,test")
    assert len(lines) == 3 and ",tg128," in lines[2]


def test_bench_submit_and_sweep_plot(fake_run, tmp_path):
    _, result = fake_run
    result["subs"] = [sample_submission("M2 Max", batches={2: [118.0], 4: [230.0], 8: [420.0]})]
    res = runner.invoke(bench_app, ["--batch", "1,2,4,8", "--submit", str(tmp_path / "subs"), "--plot",
                                    str(tmp_path / "sweep.png")])
    assert res.exit_code == 0, res.output
    files = list((tmp_path / "subs").glob("*.json"))
    assert len(files) == 1 and submissions.validate(submissions.read(files[0])) == []
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
    sweep = next(line for line in res.stdout.splitlines() if line.startswith("batch sweep"))
    assert "measured crossover >= 7.0" in sweep and "lower bound" in sweep and "predicted" in sweep  # 420 / 60


@pytest.mark.parametrize("batches, expect", [
    ({8: [420.0]}, "measured crossover not measured (2 batch sizes"),  # two points are no finding
    ({2: [118.0], 4: [230.0], 8: [420.0], 16: [430.0]}, "measured crossover 7.1,"),  # flat: a finding
])
def test_bench_sweep_needs_enough_points(fake_run, batches, expect):
    _, result = fake_run
    result["subs"] = [sample_submission("M2 Max", batches=batches)]
    res = runner.invoke(bench_app, ["--batch", ",".join(["1", *map(str, batches)])])
    assert res.exit_code == 0, res.output
    sweep = next(line for line in res.stdout.splitlines() if line.startswith("batch sweep"))
    assert expect in sweep, sweep


def test_bench_says_why_a_measured_score_is_above_one(fake_run):
    _, result = fake_run
    sub = sample_submission("M2 Max", tg=(600.0, 620.0))
    sub["measured_bandwidth"].update(read_gbps=100.0, nbytes=64 << 20, threads=8, llc_bytes=48 << 20)
    result["subs"] = [sub]
    res = runner.invoke(bench_app, [])
    tg = next(line for line in res.stdout.splitlines() if "| tg128 |" in line).strip("| ").split(" | ")
    assert tg[11].endswith(" †") and float(tg[11][:-2]) > 1
    note = next(line for line in res.stdout.splitlines() if line.startswith("† tg128"))
    assert "not much larger than the 48 MiB last-level cache" in note


@pytest.mark.parametrize("args,message", [
    (["--batch", "1,0"], "--batch: '0' is not a positive integer"),
    (["--batch", "x"], "--batch: 'x'"),
    (["-o", "xml"], "-o must be one of md, json, csv"),
    (["--chip", "Z80"], "unknown chip 'Z80'"),
    (["-p", "0", "-n", "0"], "nothing to run"),
    (["-r", "0"], "-r must be at least 1"),
    (["--bandwidth", "-5"], "--bandwidth must be a positive number"),
])
def test_bench_usage_errors(fake_run, args, message):
    res = runner.invoke(bench_app, args)
    assert isinstance(res.exception, UsageError) and message in str(res.exception)
    assert fake_run[0] == []  # nothing ran


def test_parse_batches():
    assert parse_batches("64,1, 8") == [1, 8, 64]


def test_validate_command(tmp_path):
    good = submissions.write(sample_submission(), tmp_path)
    bad_sub = sample_submission(tg=(1e6,))
    bad_sub["tests"][0]["samples_tps"] = [0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bad_sub))
    junk = tmp_path / "junk.json"
    junk.write_text("[")
    res = runner.invoke(bench_app, ["validate", str(good)])
    assert res.exit_code == 0 and res.stdout.strip() == f"{good}: ok"
    res = runner.invoke(bench_app, ["validate", str(good), str(bad), str(junk)])
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[0] == f"{good}: ok"
    assert lines[1].startswith(f"{bad}: tests[0].samples_tps[0]: rate 0 t/s is not positive")
    assert lines[2].startswith(f"{bad}: tests[1]: tg128 1000000.00 t/s is") and "implausible" in lines[2]
    assert lines[3].startswith(f"{junk}: not valid JSON")
    assert len(lines) == 4


def test_report_command_on_reference_data(tmp_path):
    out = tmp_path / "report"
    res = runner.invoke(bench_app, ["report", str(REPO / "benchmarks" / "reference"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "### LLaMA-2 7B · Q4_0" in res.stdout
    for chip in ("M2 10c", "M2 Pro 19c", "M2 Max 38c", "M2 Ultra 76c"):
        assert f"| {chip} |" in res.stdout
    assert (out / "bench-report.png").stat().st_size > 10_000
    assert (out / "bench-report.html").read_text().startswith("<!DOCTYPE html>")
    assert "58 submissions" in res.stderr


def test_report_defaults_to_bundled_reference(tmp_path):
    res = runner.invoke(bench_app, ["report", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "| M2 Ultra 76c |" in res.stdout


def test_report_errors(tmp_path):
    res = runner.invoke(bench_app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, UsageError) and "no such file or folder" in str(res.exception)
    (tmp_path / "empty").mkdir()
    res = runner.invoke(bench_app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, UsageError) and "no valid submissions" in str(res.exception)


def estimate_app():
    app = typer.Typer()
    app.command()(estimate)
    app.command("unused")(lambda: None)  # two commands, so `estimate` is invoked by name as in the real app
    return app


def test_estimate_m2_ultra_7b_q4():
    res = runner.invoke(estimate_app(), ["estimate", "--chip", "M2 Ultra", "--params", "7B", "--bits", "4"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "M2 Ultra (76-core GPU): 800 GB/s, 27.2 TFLOPS" in out
    assert "Llama-2-7B's shape: 6.74 B params" in out and "32 layers, 32 KV heads x 128" in out
    assert "weights     3.79 GB" in out and "KV cache    268.4 MB at ctx 512" in out
    assert "tg          200.7 t/s" in out  # the README's figure
    assert "batch 9.6" in out


@pytest.mark.parametrize("params, shape, kv", [
    ("1B", "Llama-3.2-1B", "16 layers, 8 KV heads x 64 (GQA 4:1)"),
    ("3B", "Llama-3.2-3B", "28 layers, 8 KV heads x 128 (GQA 3:1)"),
    ("8B", "Llama-3.1-8B", "32 layers, 8 KV heads x 128 (GQA 4:1)"),
    ("13B", "Llama-2-13B", "40 layers, 40 KV heads x 128"),
    ("70B", "Llama-3.1-70B", "80 layers, 8 KV heads x 128 (GQA 8:1)"),
])
def test_estimate_uses_each_sizes_real_shape(params, shape, kv):
    res = runner.invoke(estimate_app(), ["estimate", "--chip", "M2 Ultra", "--params", params, "--bits", "4"])
    assert res.exit_code == 0, res.output
    assert f"{shape}'s shape" in res.stdout and kv in res.stdout


def test_estimate_reads_a_config(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(estimate_app(), ["estimate", "--chip", "M2 Ultra", "--config", str(tmp_path), "--bits", "4"])
    assert res.exit_code == 0, res.output
    ref = runner.invoke(estimate_app(), ["estimate", "--chip", "M2 Ultra", "--params", "3B", "--bits", "4"])
    tg = [line for line in res.stdout.splitlines() if line.startswith("tg")]
    assert tg == [line for line in ref.stdout.splitlines() if line.startswith("tg")]  # the same shape as 3B
    assert "3.21 B params" in res.stdout


def test_estimate_a100_crossover():
    res = runner.invoke(estimate_app(), ["estimate", "--bandwidth", "1935", "--tflops", "312", "--params", "7B"])
    assert res.exit_code == 0, res.output
    assert "decode turns compute-bound at batch 161.2" in res.stdout
    res = runner.invoke(estimate_app(), ["estimate", "--chip", "A100 80GB PCIe", "--params", "7B", "--bits", "16"])
    assert "batch 161.2" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["--chip", "M2"], "give one of -m MODEL, --params N"),
    (["--chip", "M2", "--params", "7B", "-m", "x"], "give one of -m MODEL, --params N"),
    (["--chip", "M2", "--params", "7B", "--config", "x.json"], "give one of -m MODEL, --params N"),
    (["--chip", "M2", "--config", "nowhere/config.json"], "--config nowhere/config.json: no such file"),
    (["--params", "7B"], "give --chip NAME or --bandwidth"),
    (["--bandwidth", "100", "--params", "7B", "--bits", "7"], "--bits must be one of"),
    (["--bandwidth", "100", "--params", "lots"], "--params: cannot read 'lots'"),
])
def test_estimate_errors(args, message):
    res = runner.invoke(estimate_app(), ["estimate", *args])
    assert isinstance(res.exception, UsageError) and message in str(res.exception)


@pytest.mark.slow
def test_estimate_real_default_model():
    res = runner.invoke(estimate_app(), ["estimate", "--chip", "M2 Max", "-m", "default", "--ctx", "64"])
    assert res.exit_code == 0, res.output
    assert "(q4 g32)" in res.stdout and "30 layers, 3 KV heads x 64" in res.stdout
    assert "KV cache    1.5 MB at ctx 64 (fp16, 23040 bytes per position)" in res.stdout
