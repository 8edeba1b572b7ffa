"""Distributed inference (mlxllama/distributed.py): shard plans and sharded loading in this process; tensor and
pipeline runs as separate rank processes on 127.0.0.1 over MLX's ring backend, started as mlx.launch starts them
(MLX_RANK and a hostfile) and once by mlx.launch itself; every run bounded in time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_hf_folder

pytest.importorskip("mlx.core")

from mlxllama import loaders  # noqa: E402
from mlxllama.distributed import Plan, pipeline_layers  # noqa: E402
from mlxllama.errors import ModelFileError, UsageError  # noqa: E402
from mlxllama.weights import GGMLWeight, QuantizedWeight, cut  # noqa: E402

RANK = Path(__file__).parent / "dist_rank.py"
RUN_TIMEOUT = 240  # seconds for one multi-process run on a loaded 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_dir) -> Path:
    # 6 layers, so that a pipeline can balance its ranks; intermediate 128 so that quantized cuts fall on groups
    return make_hf_folder(tmp_path_factory.mktemp("dist") / "tiny", tokenizer_dir=sp_dir, num_hidden_layers=6,
                          intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory, sp_dir) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("dist") / "tied", seed=3, tokenizer_dir=sp_dir,
                          intermediate_size=128, tie_word_embeddings=True)


# -- plans and sharded loading, in this process ---------------------------------------------------------------------

def _materialize(w):
    if isinstance(w, QuantizedWeight):
        return [np.asarray(w.weight), np.asarray(w.scales), np.asarray(w.biases)]
    if isinstance(w, GGMLWeight):
        return [np.asarray(w.blocks)]
    return [np.asarray(w)]


def _assert_shard_equals_cut(path: Path, plan: Plan):
    args, full, _ = loaders.load(path)
    _, part, _ = loaders.load(path, shard=plan.shard)
    kept = {k for k in full if plan.shard(args, k, tuple(full[k].shape)) is not None}
    assert set(part) == kept
    for name, w in part.items():
        want = cut(full[name], *plan.shard(args, name, tuple(full[name].shape)))
        for a, b in zip(_materialize(w), _materialize(want)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    return args, full, part


def _nbytes(weights: dict) -> int:
    return sum(w.nbytes for w in weights.values())


def test_tensor_shards_of_a_float_folder_are_views_halving_the_bytes(tiny):
    for rank in (0, 1):
        args, full, part = _assert_shard_equals_cut(tiny, Plan("tensor", rank, 2))
        assert part["model.layers.0.self_attn.q_proj"].shape == (args.num_attention_heads * args.head_dim // 2,
                                                                   args.hidden_size)
        assert part["model.layers.0.mlp.down_proj"].shape == (args.hidden_size, args.intermediate_size // 2)
        assert isinstance(part["model.layers.0.mlp.up_proj"], np.memmap)  # nothing read yet
        assert 0.45 < _nbytes(part) / _nbytes(full) < 0.55


def test_bfloat16_folders_are_widened_only_where_kept(tmp_path, sp_dir):
    pytest.importorskip("torch")
    folder = make_hf_folder(tmp_path / "bf16", dtype="bfloat16", tokenizer_dir=sp_dir, intermediate_size=128)
    for plan in (Plan("tensor", 1, 2), Plan("pipeline", 1, 2)):
        _, full, part = _assert_shard_equals_cut(folder, plan)
        assert all(type(w) is np.ndarray and w.dtype == np.float32 for w in part.values())
        assert _nbytes(part) < 0.6 * _nbytes(full)


def test_pipeline_shards_keep_whole_layers(tiny):
    plan = Plan("pipeline", 1, 2)
    args, full, part = _assert_shard_equals_cut(tiny, plan)
    assert "model.embed_tokens" not in part and "lm_head" not in part
    assert [plan.local_name(args, k) for k in part if k.endswith("o_proj")] == \
        [f"model.layers.{i}.self_attn.o_proj" for i in range(len(plan.layers(args)))]
    assert pipeline_layers(args, 2) == [2, 4]  # rank 0 also holds the embedding table and the head
    assert sum(pipeline_layers(args, 3)) == args.num_hidden_layers


def test_quantized_mlx_folder_is_cut_on_group_boundaries(tmp_path, tiny):
    from mlxllama.convert import convert_model

    q32 = convert_model(str(tiny), tmp_path / "q32", quantize=True, bits=4, group_size=32, dtype="float32")
    _, full, part = _assert_shard_equals_cut(q32, Plan("tensor", 1, 2))
    assert isinstance(part["model.layers.0.self_attn.o_proj"], QuantizedWeight)
    assert 0.45 < _nbytes(part) / _nbytes(full) < 0.55
    # o_proj's input is 4 heads x 16: half of it (32 columns) is inside one group of 64
    q64 = convert_model(str(tiny), tmp_path / "q64", quantize=True, bits=4, group_size=64, dtype="float32")
    with pytest.raises(ModelFileError, match="o_proj.*group boundaries"):
        loaders.load(q64, shard=Plan("tensor", 0, 2).shard)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16"])
def test_gguf_rows_and_columns_are_cut_before_the_repack(tmp_path, qtype):
    from gguf.constants import GGMLQuantizationType as QT
    from test_gguf import hf_weights, write_gguf

    path = tmp_path / f"m-{qtype}.gguf"
    write_gguf(path, hf_weights(), QT[qtype])
    for rank in (0, 1):  # q/k rows also un-permuted per head
        _assert_shard_equals_cut(path, Plan("tensor", rank, 2))
    _assert_shard_equals_cut(path, Plan("pipeline", 1, 2))


@pytest.mark.filterwarnings("ignore:.*requantized")
def test_gguf_k_quants_are_cut_on_their_blocks(tmp_path):
    from gguf.constants import GGMLQuantizationType as QT
    from test_gguf import hf_weights, write_gguf

    path = tmp_path / "m-q4_k.gguf"
    write_gguf(path, hf_weights(), QT.Q4_K)
    _assert_shard_equals_cut(path, Plan("pipeline", 0, 2))  # rows, then the per-row requantization
    # o_proj's input is 4 heads x 64: half of it (128 columns) ends inside a 256-value Q4_K block
    with pytest.raises(ModelFileError, match="attn_output.*Q4_K blocks of 256"):
        loaders.load(path, shard=Plan("tensor", 0, 2).shard)


def test_sizes_that_do_not_divide_are_refused(tiny):
    args, _, _ = loaders.load(tiny)
    with pytest.raises(UsageError, match=r"num_key_value_heads \(2\) does not divide by 3"):
        Plan("tensor", 0, 3).check(args)
    with pytest.raises(UsageError, match="only 6 layers"):
        Plan("pipeline", 0, 8).check(args)


# -- ranks as processes ---------------------------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(tmp_path: Path, n: int, argv: list[str], env: dict | None = None) -> list[subprocess.Popen]:
    """n ranks of argv, each with MLX_RANK and MLX_HOSTFILE (a ring over 127.0.0.1), as mlx.launch sets them."""
    hostfile = tmp_path / f"hosts-{time.monotonic_ns()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    base = dict(os.environ, MLX_HOSTFILE=str(hostfile), **(env or {}))
    return [subprocess.Popen(argv, env=dict(base, MLX_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for r in range(n)]


def _finish(procs, timeout: float = RUN_TIMEOUT) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _reference(model, n: int) -> tuple[list[int], int]:
    """Greedy tokens of one process on the same backend, and its resident weight bytes."""
    import mlxllama
    from mlxllama.generate import generate_step

    sys.path.insert(0, str(RANK.parent))
    from dist_rank import PROMPT

    m, _ = mlxllama.load(model, backend="mlx")
    ids = PROMPT if m.args.vocab_size > 1000 else [t % m.args.vocab_size for t in PROMPT]
    return list(generate_step(m, ids, n, prefill_step_size=3)), m.resident_nbytes


def _run_ranks(tmp_path, n, mode, model, tokens, fault=None, env=None):
    argv = [sys.executable, str(RANK), mode, str(model), str(tokens)] + ([fault] if fault else [])
    return _finish(_start(tmp_path, n, argv, env))


def _check_equal_and_halved(results, ref_tokens, ref_bytes, n):
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    lines = [_json_lines(o) for _, o, _ in results]
    assert lines[0][-1]["tokens"] == ref_tokens
    shares = [ls[0]["resident"] / ref_bytes for ls in lines]
    assert all(0.6 / n < s < 1.4 / n for s in shares), shares  # each rank holds about 1/n of the weights
    return shares


@pytest.mark.parametrize("mode, fixture", [("tensor", "tiny"), ("tensor", "tiny_tied"), ("pipeline", "tiny")])
def test_two_ranks_give_the_tokens_of_one_process(tmp_path, request, mode, fixture):
    model = request.getfixturevalue(fixture)
    ref_tokens, ref_bytes = _reference(model, 12)
    _check_equal_and_halved(_run_ranks(tmp_path, 2, mode, model, 12), ref_tokens, ref_bytes, 2)


def _family_folder(folder: Path, sp_dir: Path, family: str) -> Path:
    """The tiny model with LLaMA's attention_bias (q/k/v/o biases) or as Qwen3 (per-head q/k norms)."""
    from safetensors.numpy import load_file, save_file

    make_hf_folder(folder, seed=5, tokenizer_dir=sp_dir, intermediate_size=128)
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(7)
    d = cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        if family == "bias":
            for n in "qkvo":
                w[p + f"{n}_proj.bias"] = (0.1 * rng.standard_normal(w[p + f"{n}_proj.weight"].shape[0])).astype(
                    np.float32)
        else:
            w[p + "q_norm.weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
            w[p + "k_norm.weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    if family == "bias":
        cfg["attention_bias"] = True
    else:
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    save_file(w, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_generations_in_turn_keep_their_own_caches(tmp_path, tiny, mode):
    import mlxllama
    from dist_rank import PROMPT
    from mlxllama.generate import generate_step

    m, _ = mlxllama.load(tiny, backend="mlx")
    want = [list(generate_step(m, ids, 6, prefill_step_size=3)) for ids in (PROMPT, PROMPT[::-1])]
    results = _run_ranks(tmp_path, 2, mode, tiny, 6, fault="interleave")
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:]
    got = _json_lines(results[0][1])[-1]
    assert [got["tokens"], got["tokens2"]] == want


def test_two_tensor_ranks_batch_two_requests_as_one_process(tmp_path, tiny):
    """The engine's batched step (forward_batch) over two tensor-parallel ranks: two requests in one forward pass
    per step give the tokens each gives alone in one process."""
    import mlxllama
    from dist_rank import PROMPT
    from mlxllama.generate import generate_step

    m, _ = mlxllama.load(tiny, backend="mlx")
    want = [list(generate_step(m, ids, 6, prefill_step_size=3)) for ids in (PROMPT, PROMPT[::-1])]
    results = _run_ranks(tmp_path, 2, "tensor", tiny, 6, fault="batch")
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:]
    got = _json_lines(results[0][1])[-1]
    assert [got["tokens"], got["tokens2"]] == want and got["batched"] > 0


def _wait_healthy(base: str, procs, timeout: float = RUN_TIMEOUT) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the parallel server did not come up")


def test_serve_parallel_batches_over_the_ranks_as_one_process(tmp_path, tiny):
    """`mlxllama serve --parallel tensor` on two loopback ranks: concurrent greedy requests are batched over the
    ranks and each answers as one process does alone; SIGTERM on rank 0 ends both ranks with exit 0."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import mlxllama

    m, tok = mlxllama.load(tiny, backend="mlx")
    prompts = ["hello world", "the quick brown fox"]
    want = [mlxllama.generate(m, tok, p, max_tokens=6) for p in prompts]
    port = _free_ports(1)[0]
    cli = [sys.executable, "-c", "from mlxllama_cli.app import main; main()", "serve", "-m", str(tiny), "--backend",
           "mlx", "--port", str(port), "--parallel", "tensor", "--max-batch", "2"]
    procs = _start(tmp_path, 2, cli)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, procs)
        body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "stop": ["never-appears"]}
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: httpx.post(base + "/v1/completions", json=dict(body, prompt=p),
                                                     timeout=120).json()["choices"][0]["text"], prompts))
        procs[0].send_signal(signal.SIGTERM)
        results = _finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert got == want
    assert [rc for rc, _, _ in results] == [0, 0], [e[-2000:] for _, _, e in results]


@pytest.mark.parametrize("family", ["bias", "qk_norm"])
def test_tensor_parallel_keeps_biases_and_head_norms(tmp_path, sp_dir, family):
    model = _family_folder(tmp_path / family, sp_dir, family)
    ref_tokens, ref_bytes = _reference(model, 8)
    _check_equal_and_halved(_run_ranks(tmp_path, 2, "tensor", model, 8), ref_tokens, ref_bytes, 2)


@pytest.mark.skipif(shutil.which("mlx.launch") is None and not (Path(sys.executable).parent / "mlx.launch").exists(),
                    reason="mlx.launch is not installed")
def test_mlx_launch_runs_the_cli(tmp_path, tiny):
    launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    cli = [sys.executable, "-c", "from mlxllama_cli.app import main; main()"]
    gen = ["generate", "hello world", "-m", str(tiny), "--no-chat", "-n", "10", "--backend", "mlx"]
    one = subprocess.run(cli + gen, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert one.returncode == 0, one.stderr
    port = _free_ports(1)[0]
    for mode in ("tensor", "pipeline"):
        two = subprocess.run([launch, "--hosts", "127.0.0.1", "-n", "2", "--starting-port", str(port), "--"] + cli
                             + gen + ["--parallel", mode], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                             stdin=subprocess.DEVNULL)
        assert two.returncode == 0, two.stderr
        assert two.stdout == one.stdout  # rank 0 alone prints
        assert two.stderr.count("rank ") >= 2  # each rank says what it holds


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path, tiny):
    start = time.monotonic()
    # MLX's ring raises when a peer's sockets close, but now and then (about 1 run in 3 here) a collective already
    # queued waits forever instead: the watchdog ends that one
    env = {"MLXLLAMA_DIST_TIMEOUT": "10"}
    clear = ("lost another rank while", "no answer from the other ranks for 10 s while")
    (rc0, _, err0), (rc1, _, _) = _run_ranks(tmp_path, 2, "tensor", tiny, 40, fault="die:1:4", env=env)
    assert rc1 == 9 and rc0 == 1
    # MLX's ring writes "[ring] ..." lines from its own threads, unsynchronized with ours: one can end up glued to the
    # front of our line, so the line is looked for anywhere, as for rank 1 below
    assert "error: rank 0: " in err0
    assert any(c in err0 for c in clear) and "Traceback" not in err0
    (rc0, _, _), (rc1, _, err1) = _run_ranks(tmp_path, 2, "pipeline", tiny, 40, fault="die:0:4", env=env)
    assert rc0 == 9 and rc1 == 1
    assert "error: rank 1: " in err1 and any(c in err1 for c in clear) and "Traceback" not in err1
    assert time.monotonic() - start < RUN_TIMEOUT


def test_a_rank_that_stops_answering_trips_the_watchdog(tmp_path, tiny):
    argv = [sys.executable, str(RANK), "pipeline", str(tiny), "40"]
    procs = _start(tmp_path, 2, argv, env={"MLXLLAMA_DIST_TIMEOUT": "3"})
    try:
        assert procs[1].stdout.readline().startswith("{")  # rank 1 has loaded its shard
        procs[1].send_signal(signal.SIGSTOP)  # as if its machine vanished: no answer, sockets left open
        start = time.monotonic()
        rc0, _, err0 = _finish(procs[:1])[0]
        assert time.monotonic() - start < 60
        assert rc0 == 1 and "no answer from the other ranks for 3 s" in err0
    finally:
        procs[1].kill()
        procs[1].wait()


@pytest.mark.slow
@pytest.mark.parametrize("mode, n", [("pipeline", 2), ("tensor", 3)])  # SmolLM2 has 3 KV heads: tensor needs 3
def test_smollm2_over_ranks_gives_the_tokens_of_one_process(tmp_path, smollm2, mode, n):
    ref_tokens, ref_bytes = _reference(smollm2, 8)
    _check_equal_and_halved(_run_ranks(tmp_path, n, mode, smollm2, 8), ref_tokens, ref_bytes, n)


# -- the estimate ---------------------------------------------------------------------------------------------------

def test_cluster_estimate_arithmetic():
    from mlxllama.bench import cluster

    ln = cluster.Link("test", "ring", 1.0, 100.0, "made up")  # 1 GB/s, 100 us
    kw = dict(bytes_per_token=40e9, weight_bytes=40e9, layers=80, hidden=8192, vocab=128000, bandwidth_gbps=800,
              nodes=2, ln=ln)
    t = cluster.estimate(mode="tensor", **kw)
    allreduce = 2 * (100e-6 + 8192 * 2 / 2 / 1e9)  # 2 (N-1) messages of M / N bytes
    gather = 100e-6 + 64000 * 2 / 1e9
    assert t.read_s == pytest.approx(40e9 / 2 / 800e9)
    assert t.link_s == pytest.approx(163 * allreduce + gather)
    p = cluster.estimate(mode="pipeline", **kw)
    assert p.read_s == pytest.approx(40e9 / 800e9) and p.link_s == pytest.approx(2 * (100e-6 + 16384 / 1e9))
    assert t.memory_bytes == p.memory_bytes == 20e9
    one = cluster.estimate(mode="tensor", **dict(kw, nodes=1))
    assert one.link_s == 0 and one.tps == pytest.approx(800 / 40)


def test_estimate_cli_says_which_mode_wins():
    from typer.testing import CliRunner

    from mlxllama_cli.app import app

    run = CliRunner().invoke(app, ["estimate", "--chip", "M2 Ultra", "--params", "70B", "--bits", "4", "--nodes", "2",
                                   "--link", "tb5"])
    assert run.exit_code == 0, run.output
    assert "wins        tensor" in run.output and "2 hops a token" in run.output
    run = CliRunner().invoke(app, ["estimate", "--chip", "M2 Ultra", "--params", "70B", "--nodes", "2", "--link",
                                   "tb4", "--parallel", "pipeline"])
    assert run.exit_code == 0 and "wins        pipeline" in run.output
    bad = CliRunner().invoke(app, ["estimate", "--chip", "M2 Ultra", "--params", "7B", "--nodes", "2",
                                   "--link", "wifi"])
    assert bad.exit_code != 0


def test_submissions_record_the_cluster_and_score_tensor_runs_against_every_node():
    from mlxllama.bench import roofline, submissions
    from mlxllama.bench.hardware import Machine

    acc = roofline.account_params(7_000_000_000, 4)
    fast = 1.5 * 400e9 / acc.bytes_per_step(roofline.mean_context(0, 8))  # 1.5x one node's roofline
    test = submissions.make_test(0, 8, 1, [fast], acc)

    def sub(cluster):
        return submissions.make_submission(
            machine=Machine(system="Darwin", os="macOS 15", cpu="Apple M2 Max", cpu_cores=12, memory_bytes=1 << 36),
            chip=None, rated_bandwidth_gbps=400, model_id="m", model_sha256="0" * 64, quant="q4 g64",
            accounting=acc, backend="mlx", device="gpu", tests=[test], cluster=cluster)

    assert "cluster" not in sub(None) and any("implausible" in r for r in submissions.validate(sub(None)))
    two = sub({"nodes": 2, "link": "tb5", "parallel": "tensor"})
    assert submissions.validate(two) == []
    assert any("implausible" in r for r in submissions.validate(sub({"nodes": 2, "link": "tb5",
                                                                      "parallel": "pipeline"})))
    assert any("cluster.nodes" in r for r in submissions.validate(sub({"nodes": 1, "link": "x", "parallel": "tensor"})))


def test_parallel_outside_mlx_launch_is_one_clear_line(tiny):
    cli = [sys.executable, "-c", "from mlxllama_cli.app import main; main()"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    r = subprocess.run(cli + ["generate", "hi", "-m", str(tiny), "--parallel", "tensor"], capture_output=True,
                       text=True, timeout=RUN_TIMEOUT, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --parallel tensor needs 2 or more ranks: start it with mlx.launch, e.g. mlx.launch --hosts "
        "127.0.0.1 -n 2 -- mlxllama generate ... --parallel tensor"]
    r = subprocess.run(cli + ["generate", "hi", "-m", str(tiny), "--parallel", "sideways"], capture_output=True,
                       text=True, timeout=RUN_TIMEOUT, env=env)
    assert r.returncode == 2 and "tensor, pipeline" in r.stderr
