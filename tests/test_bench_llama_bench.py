"""llama-bench's test shapes: `bench import` of real llama-bench output (tests/data/llama-bench, see its README) and
`bench -d/--depth`, `-pg`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlxllama.bench import hub_submit, llama_bench, submissions
from mlxllama.bench.roofline import Accounting
from mlxllama.errors import UsageError
from mlxllama_cli.bench import bench_app, parse_depths, parse_pg
from test_bench_cli import fake_run  # noqa: F401  (fixture)

DATA = Path(__file__).parent / "data" / "llama-bench"
JSON, JSONL = DATA / "smollm2-llama-bench.json", DATA / "smollm2-llama-bench.jsonl"
runner = CliRunner()


def test_parse_json_and_jsonl():
    rows = llama_bench.parse(JSON.read_text())
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in rows] == [
        (512, 0, 0), (0, 128, 0), (256, 64, 0), (512, 0, 256), (0, 128, 256), (256, 64, 256)]
    assert [(r["n_prompt"], r["n_gen"]) for r in llama_bench.parse(JSONL.read_text())] == [(64, 0), (0, 16)]
    with pytest.raises(UsageError, match="not llama-bench output"):
        llama_bench.parse('[{"model": 1}]')
    with pytest.raises(UsageError, match="neither llama-bench -o json nor -o jsonl"):
        llama_bench.parse("name,value\n1,2\n")


def test_convert_real_llama_bench_output(smollm2):
    rows = llama_bench.parse(JSON.read_text())
    (sub,) = llama_bench.convert(rows, model=smollm2)
    assert submissions.validate(sub) == []
    assert hub_submit.privacy_problems(sub) == []  # llama-bench's model_filename is a path: only the name is kept
    assert sub["model"]["id"] == smollm2.name and sub["model"]["quant"] == "Q4_1"
    assert sub["model"]["sha256"] == submissions.model_sha256(smollm2)
    assert sub["backend"] == "llama.cpp CPU" and sub["device"] == "cpu" and sub["machine"]["cpu"] == "AMD EPYC"
    assert sub["source"] == "llama-bench, llama.cpp build 0c1e570 (1)" and sub["versions"]["llama.cpp"] == "0c1e570"
    assert sub["settings"]["n_threads"] == 2 and sub["date"] == rows[0]["test_time"]
    acc = Accounting.from_dict(sub["model"]["accounting"])
    assert acc.weight_bytes == rows[0]["model_size"] and acc.params == rows[0]["model_n_params"]
    assert acc.kv_bytes_per_position == 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, f16
    tests = {t["name"]: t for t in sub["tests"]}
    assert list(tests) == ["pp512", "tg128", "pp256+tg64", "pp512@d256", "tg128@d256", "pp256+tg64@d256"]
    for row, t in zip(rows, sub["tests"]):
        assert t["samples_tps"] == row["samples_ts"]
    deep = tests["tg128@d256"]
    assert deep["n_depth"] == 256
    assert deep["bytes_per_step"] == acc.weight_bytes_per_token + (256 + 64.5) * acc.kv_bytes_per_position
    assert deep["bytes_per_step"] > tests["tg128"]["bytes_per_step"]


def test_import_cli(smollm2, tmp_path):
    res = runner.invoke(bench_app, ["import", str(JSONL), "--format", "llama-bench", "--out", str(tmp_path / "o"),
                                    "--model", str(smollm2), "--chip", "M2 Max"])
    assert res.exit_code == 0, res.output
    (written,) = tmp_path.joinpath("o").glob("*.json")
    sub = submissions.read(written)
    assert res.stdout.strip() == f"wrote {written}"
    assert sub["chip"]["name"] == "M2 Max (38-core GPU)" and sub["chip"]["rated_bandwidth_gbps"] == 400
    assert [t["name"] for t in sub["tests"]] == ["pp64", "tg16"]


def test_import_errors(smollm2, tiny_hf, tmp_path):
    def run(*args):
        return runner.invoke(bench_app, ["import", *map(str, args)])

    res = run(JSON, "--format", "csv", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "--format: only llama-bench is supported" in str(res.exception)
    moved = tmp_path / "moved.json"
    rows = json.loads(JSON.read_text())
    for r in rows:
        r["model_filename"] = str(tmp_path / "elsewhere" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    moved.write_text(json.dumps(rows))
    res = run(moved, "--format", "llama-bench", "--out", tmp_path / "est")  # someone else's run: no GGUF here
    assert res.exit_code == 0, res.output
    (written,) = (tmp_path / "est").glob("*.json")
    sub = submissions.read(written)
    assert "model_size and model_n_params" in sub["source"] and sub["model"]["sha256"] is None
    assert sub["model"]["accounting"]["weight_bytes"] == rows[0]["model_size"]
    assert sub["model"]["accounting"]["params"] == rows[0]["model_n_params"]
    for r in rows:
        r["model_n_params"] = 360_000_000  # another model than the one given
    moved.write_text(json.dumps(rows))
    res = run(moved, "--format", "llama-bench", "--out", tmp_path / "o", "--model", smollm2)
    assert "has 134515008 parameters but llama-bench ran a model with 360000000" in str(res.exception)
    res = run(JSON, "--format", "llama-bench", "--out", tmp_path / "o", "--model", tiny_hf)
    assert "--model" in str(res.exception) and "no such file" in str(res.exception)  # a GGUF file, not a folder
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_depth_and_pg_options(fake_run):
    calls, _ = fake_run
    res = runner.invoke(bench_app, ["-d", "0, 512,512", "-pg", "256,64"])
    assert res.exit_code == 0, res.output
    assert calls[0]["depths"] == [0, 512] and calls[0]["pg"] == (256, 64)
    res = runner.invoke(bench_app, [])
    assert calls[1]["depths"] == [0] and calls[1]["pg"] is None
    assert parse_depths("4096") == [4096]
    for bad in ("-1", "a", ""):
        with pytest.raises(UsageError, match="-d/--depth"):
            parse_depths(bad)
    for bad in ("512", "512,0", "a,b", "1,2,3"):
        with pytest.raises(UsageError, match="-pg: expected PP,TG"):
            parse_pg(bad)


def test_run_bench_depth_and_pg_shapes(tiny_hf):
    from mlxllama.bench.run import run_bench

    (sub,) = run_bench(models=[str(tiny_hf)], n_prompt=8, n_gen=4, repetitions=1, batches=[1, 2], backend="numpy",
                       depths=[0, 6], pg=(4, 2))
    assert submissions.validate(sub) == []
    assert [t["name"] for t in sub["tests"]] == ["pp8", "tg4", "tg4@B2", "pp4+tg2", "pp8@d6", "tg4@d6", "tg4@d6@B2",
                                                 "pp4+tg2@d6"]
    assert sub["model"]["id"] == tiny_hf.name  # a local model is named, not located
    acc = Accounting.from_dict(sub["model"]["accounting"])
    tests = {t["name"]: t for t in sub["tests"]}
    assert tests["tg4@d6@B2"]["bytes_per_step"] == acc.bytes_per_step(6 + 2.5, 2)
    assert all(s > 0 for t in sub["tests"] for s in t["samples_tps"])
