"""`mlxllama serve` against real clients over a real loopback socket: the official openai package, httpx."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mlxllama
from conftest import make_hf_folder
from mlxllama.engine import Engine
from mlxllama.prefix_cache import PrefixCache
from mlxllama.server.app import (
    ServeConfig,
    _malloc_trim,
    accepted_names,
    create_app,
    make_engine,
    release_free_memory,
)

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MODEL_ID = "tiny"


def with_template(d: Path) -> Path:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def chat_folder(tiny_hf, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_chat") / "tiny"
    shutil.copytree(tiny_hf, d)
    return with_template(d)


@pytest.fixture(scope="module")
def tiny(chat_folder):
    return mlxllama.load(chat_folder, backend="numpy")


@contextmanager
def serving(model_, tok, **options):
    """A uvicorn server in a thread on a socket bound here (127.0.0.1, a free port), its engine made as
    `mlxllama serve` makes it (options: ServeConfig's); yields (base_url, engine)."""
    import uvicorn

    config = ServeConfig(shutdown_timeout=2.0, prefix_cache_bytes=options.pop("prefix_cache_bytes", 32 << 20),
                         **options)
    engine = make_engine(model_, tok, config).start()
    app = create_app(engine, MODEL_ID, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(tiny):
    with serving(*tiny, max_batch=8) as s:
        yield s


def client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_for(cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


MSGS = [[{"role": "user", "content": c}] for c in ("Hello world!", "The quick brown fox", "Numbers: 1 2 3",
                                                   "Memory bandwidth", "def main():", "café crème")]


def solo_chat(tiny, messages, n):
    m, tok = tiny
    return mlxllama.generate(m, tok, messages, max_tokens=n)


def test_openai_chat_and_stream(server, tiny):
    base, _ = server
    c = client(base)
    r = c.chat.completions.create(model=MODEL_ID, messages=MSGS[0], max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert text == solo_chat(tiny, MSGS[0], 12)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=MSGS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same prompt again: its KV comes from the prefix cache, streamed requests included
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_openai_completions_with_logprobs(server, tiny):
    base, _ = server
    m, tok = tiny
    r = client(base).completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=6, temperature=0,
                                        logprobs=2)
    assert r.choices[0].text == mlxllama.generate(m, tok, "The quick brown", max_tokens=6)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_second_chat_turn_reuses_the_first(server):
    base, _ = server
    c = client(base)
    turn1 = [{"role": "user", "content": "Apple Silicon has unified memory"}]
    a = c.chat.completions.create(model=MODEL_ID, messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": a.choices[0].message.content},
                     {"role": "user", "content": "and more?"}]
    b = c.chat.completions.create(model=MODEL_ID, messages=turn2, max_tokens=8, temperature=0)
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 1


def test_parallel_greedy_requests_equal_their_solo_outputs(server, tiny):
    base, engine = server
    c = client(base)
    expect = [solo_chat(tiny, msgs, 16) for msgs in MSGS]
    before = dict(engine.stats.batch_sizes)

    def ask(msgs):
        return c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, temperature=0,
                                         stream=True)

    with ThreadPoolExecutor(len(MSGS)) as pool:
        streams = list(pool.map(ask, MSGS))
        got = list(pool.map(lambda s: "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices),
                            streams))
    assert got == expect
    batched = {k: v - before.get(k, 0) for k, v in engine.stats.batch_sizes.items() if k > 1}
    assert any(v > 0 for v in batched.values())  # they did share steps


def test_disconnect_frees_the_sequence(server, tiny, monkeypatch):
    base, engine = server
    to_numpy = tiny[0].ops.to_numpy

    def slow(x):  # the tiny model would finish 200 tokens before a loaded machine's client looks
        time.sleep(0.01)
        return to_numpy(x)

    monkeypatch.setattr(tiny[0].ops, "to_numpy", slow)
    cancelled = engine.stats.requests["cancelled"]
    body = {"model": MODEL_ID, "messages": MSGS[1], "max_tokens": 200, "temperature": 1.0, "seed": 1,
            "stop": ["never-appears"], "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", base + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    break
            assert engine.active == 1
    assert wait_for(lambda: engine.stats.requests["cancelled"] > cancelled and engine.active == 0)


def test_errors_are_openai_json(server):
    base, _ = server
    url = base + "/v1/chat/completions"
    ok = {"model": MODEL_ID, "messages": MSGS[0], "max_tokens": 2}
    json_type = {"content-type": "application/json"}
    cases = [
        (b"{not json", "invalid_json", None),
        (b'{"model": "\xff\xfe"}', "invalid_json", None),  # not UTF-8
        (b"[" * 10_000 + b"]" * 10_000, "invalid_json", None),  # nested past the parser's recursion limit
        (b"[1, 2]", "invalid_value", None),
        (dict(ok, temperature="hot"), "invalid_value", "temperature"),
        (dict(ok, temperature=5), "invalid_value", "temperature"),
        (dict(ok, top_p=0), "invalid_value", "top_p"),
        (dict(ok, max_tokens=0), "invalid_value", "max_tokens"),
        (dict(ok, seed=-1), "invalid_value", "seed"),
        (dict(ok, messages=[]), "invalid_value", "messages"),
        (dict(ok, messages=[{"role": "user", "content": "x"}] * 5000), "invalid_value", "messages"),
        (dict(ok, messages=[{"role": "wizard", "content": "x"}]), "invalid_value", "messages.0.role"),
        (dict(ok, messages=[{"role": "user", "content": "word " * 2000}]), "context_length_exceeded", "messages"),
        (dict(ok, n=2), "invalid_value", "n"),
        (dict(ok, tools=[{"type": "function"}]), "invalid_value", "tools.0.function"),
        (dict(ok, tool_choice="required"), "invalid_value", "tool_choice"),
        (dict(ok, response_format={"type": "json_schema"}), "invalid_value", "response_format"),
        (dict(ok, top_logprobs=2), "invalid_value", "top_logprobs"),
        (dict(ok, stop=["x"] * 17), "invalid_value", "stop"),
        (dict(ok, stop=5), "invalid_value", "stop"),
        (dict(ok, messages=[{"role": "user", "content": 5}]), "invalid_value", "messages.0.content"),
    ]
    with httpx.Client(timeout=30) as h:
        for body, code, param in cases:
            r = h.post(url, content=body, headers=json_type) if isinstance(body, bytes) else h.post(url, json=body)
            assert r.status_code == 400, (body[:40] if isinstance(body, bytes) else list(body), r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["code"] == code and err["message"] and "Value error" not in err["message"], err
            assert err["param"] == param, err
        r = h.post(base + "/v1/completions", json={"model": MODEL_ID, "prompt": [5, 10 ** 9]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = h.post(base + "/v1/completions", json={"model": MODEL_ID, "prompt": "x", "echo": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        r = h.post(url, content=b"x" * (9 << 20), headers=json_type)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = h.post(url, json=dict(ok, model="gpt-4"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
        for method, path, status in (("POST", "/v1/responses", 404), ("POST", "/v1/embeddings", 404),
                                     ("GET", "/nowhere", 404), ("GET", "/v1/chat/completions", 405),
                                     ("DELETE", "/v1/models", 405)):
            r = h.request(method, base + path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        # the engine is still serving
        assert h.post(url, json=ok).status_code == 200
        assert h.get(base + "/health").json() == {"status": "ok"}
        assert h.get(base + "/v1/models").json()["data"][0]["id"] == MODEL_ID
        text = h.get(base + "/metrics").text
    for name in ("mlxllama_requests_total", "mlxllama_prompt_tokens_total", "mlxllama_completion_tokens_total",
                 "mlxllama_queue_depth", "mlxllama_batch_size_bucket", "mlxllama_prefix_cache_hit_tokens_total",
                 "mlxllama_decode_tokens_per_second", "mlxllama_achieved_gbps", "mlxllama_kv_cache_bytes",
                 "process_resident_memory_bytes", 'mlxllama_http_requests_total{path="other",status="404"}'):
        assert name in text, name


def test_full_queue_answers_429(tiny, monkeypatch):
    m, tok = tiny
    to_numpy = m.ops.to_numpy

    def slow(x):  # steps slow enough that the first request is still running (every step reads a token back)
        time.sleep(0.02)
        return to_numpy(x)

    monkeypatch.setattr(m.ops, "to_numpy", slow)
    long = {"model": MODEL_ID, "messages": MSGS[2], "max_tokens": 200, "temperature": 1.0, "seed": 3,
            "stop": ["never-appears"], "stream": True}
    with serving(m, tok, max_batch=1, max_queue=1) as (base, engine):
        with httpx.Client(timeout=30) as h1, httpx.Client(timeout=30) as h2, httpx.Client(timeout=30) as h3:
            with h1.stream("POST", base + "/v1/chat/completions", json=long) as r1:
                assert wait_for(lambda: engine.active == 1)
                with h2.stream("POST", base + "/v1/chat/completions", json=long) as r2:
                    assert wait_for(lambda: engine.stats.waiting == 1)
                    r3 = h3.post(base + "/v1/chat/completions", json=dict(long, stream=False))
                    assert r3.status_code == 429 and r3.headers["retry-after"] == "1"
                    assert r3.json()["error"]["type"] == "rate_limit_error"
                    assert r1.status_code == 200 and r2.status_code == 200


def test_api_key(tiny):
    with serving(*tiny, api_key="s3cret") as (base, _):
        with httpx.Client(timeout=30) as h:
            body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}
            assert h.post(base + "/v1/completions", json=body).status_code == 401
            r = h.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert h.get(base + "/health").status_code == 200
        from openai import AuthenticationError, OpenAI

        with pytest.raises(AuthenticationError):
            client(base).models.list()
        ok = OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2).usage.completion_tokens >= 1


def test_cli_serve_and_sigterm(chat_folder, tmp_path):
    """`mlxllama serve` in its own process: streams to the openai client; SIGTERM finishes in-flight requests
    and exits 0."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", "mlxllama_cli.app", "serve", "-m", str(chat_folder),
                             "--backend", "numpy", "--port", str(port), "--model-id", MODEL_ID,
                             "--shutdown-timeout", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(base) or proc.poll() is not None, 60) and proc.poll() is None
        c = client(base)
        stream = c.chat.completions.create(model=MODEL_ID, messages=MSGS[0], max_tokens=40, temperature=0,
                                           stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        proc.send_signal(signal.SIGTERM)
        rest = [ch for ch in stream]
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out, out
        assert "requests that leave them out get: temp 0.8, top-k 40" in out  # llama.cpp's: no generation config
        assert '"POST /v1/chat/completions" 200' in out and "finish=" in out  # the access log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def tiny32(sp_dir, tmp_path_factory):
    """The tiny model with a head of 32, so that --kv-group-size 32 fits."""
    d = with_template(make_hf_folder(tmp_path_factory.mktemp("tiny32") / "tiny", tokenizer_dir=sp_dir, head_dim=32))
    return mlxllama.load(d, backend="numpy")


@pytest.mark.parametrize("kv", [dict(kv_bits=8, kv_group_size=32), dict(kv_dtype="float16")], ids=["8bit", "float16"])
def test_quantized_kv_server_answers(tiny32, kv):
    m, tok = tiny32
    with serving(m, tok, max_batch=4, **kv) as (base, engine):
        c = client(base)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda msgs: c.chat.completions.create(
                model=MODEL_ID, messages=msgs, max_tokens=12, temperature=0), MSGS[:2]))
        again = c.chat.completions.create(model=MODEL_ID, messages=MSGS[0], max_tokens=12, temperature=0)
    for msgs, r in zip(MSGS[:2], got):
        assert r.usage.completion_tokens >= 1
        assert r.choices[0].message.content == mlxllama.generate(m, tok, msgs, max_tokens=12, **kv)
    # the two race: the later may reuse the template's start the earlier stored, never more
    shared = max(r.usage.prompt_tokens_details.cached_tokens for r in got)
    assert shared < min(r.usage.prompt_tokens for r in got) // 2
    # the prefix cache keeps quantized or float16 KV as stored: a repeat reuses its whole prompt and answers the same
    assert again.usage.prompt_tokens_details.cached_tokens > shared
    assert again.choices[0].message.content == got[0].choices[0].message.content


def test_rotating_window_server_answers_past_the_window(tiny):
    m, tok = tiny
    window = 16
    with serving(m, tok, max_kv_size=window) as (base, engine):
        r = client(base).completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=40,
                                            temperature=0, stop=["never-appears"])
    assert r.usage.prompt_tokens + r.usage.completion_tokens > window
    assert r.choices[0].text == mlxllama.generate(m, tok, "The quick brown", max_tokens=40, max_kv_size=window)


def test_cli_serve_refuses_what_does_not_fit(chat_folder):
    """The fit check counts --max-batch sequences at the context: a million of them do not fit; one line, exit 2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
    sock.close()
    r = subprocess.run([sys.executable, "-m", "mlxllama_cli.app", "serve", "-m", str(chat_folder), "--backend",
                        "numpy", "--port", port, "--max-batch", "1000000"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "does not fit" in r.stderr and "batch 1000000" in r.stderr
    for args, message in ((["--kv-bits", "3"], "--kv-bits must be 4 or 8"),
                          (["--speculate", "draft"], "needs a draft model")):
        bad = subprocess.run([sys.executable, "-m", "mlxllama_cli.app", "serve", "-m", str(chat_folder), "--port",
                              port, *args], env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_speculative_server_equals_plain_serving(tiny):
    """--speculate lookup with batching on: concurrent greedy streams each give their solo plain output, a request
    with logprobs (decoded plainly in the batch) too, and drafts were verified and kept."""
    from mlxllama.speculative import SpeculativeConfig

    m, tok = tiny
    prompts = MSGS + [[{"role": "user", "content": "one two three one two three one two"}]]
    expect = [solo_chat(tiny, msgs, 24) for msgs in prompts]
    config = SpeculativeConfig("lookup", 4, adaptive=False)  # always draft where lookup finds a match
    with serving(m, tok, max_batch=4, speculate="lookup",
                 engine_options={"speculate": config}) as (base, engine):
        c = client(base)

        def ask(msgs):
            return c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=24, temperature=0,
                                             stream=True)

        with ThreadPoolExecutor(len(prompts) + 1) as pool:
            with_lp = pool.submit(lambda: c.completions.create(model=MODEL_ID, prompt="The quick brown",
                                                               max_tokens=6, temperature=0, logprobs=1))
            streams = list(pool.map(ask, prompts))
            got = list(pool.map(lambda s: "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices),
                                streams))
        r = with_lp.result()
        metrics = httpx.get(base + "/metrics", timeout=30).text
    assert got == expect
    assert r.choices[0].text == mlxllama.generate(m, tok, "The quick brown", max_tokens=6)
    assert len(r.choices[0].logprobs.token_logprobs) == r.usage.completion_tokens
    assert engine.spec_stats.drafted > 0 and engine.spec_stats.accepted > 0
    assert f"mlxllama_speculative_accepted_tokens_total {engine.spec_stats.accepted}" in metrics
    assert any(k > 1 and v for k, v in engine.stats.batch_sizes.items())


def test_speculative_server_with_a_draft_model(tiny, sp_dir, tmp_path):
    m, tok = tiny
    draft = make_hf_folder(tmp_path / "draft", seed=0, tokenizer_dir=sp_dir, num_hidden_layers=1)
    with serving(m, tok, max_batch=2, speculate="draft", num_draft=3, draft_model=str(draft)) as (base, engine):
        c = client(base)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda msgs: c.chat.completions.create(
                model=MODEL_ID, messages=msgs, max_tokens=16, temperature=0).choices[0].message.content, MSGS[:2]))
    assert got == [solo_chat(tiny, msgs, 16) for msgs in MSGS[:2]]
    assert engine.spec_stats.forwards > 0


@pytest.mark.slow
def test_smollm2_parallel_equals_solo(smollm2):
    m, tok = mlxllama.load(smollm2, backend="numpy")
    questions = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 2+2?", "Name three fruits."]
    expect = [mlxllama.generate(m, tok, [{"role": "user", "content": q}], max_tokens=24) for q in questions]
    with serving(m, tok, max_batch=4) as (base, _):
        c = client(base)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda q: c.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": q}], max_tokens=24,
                temperature=0).choices[0].message.content, questions))
    assert got == expect


def test_chat_loop_hook_reuses_the_history(tiny):
    """What `mlxllama chat` calls per turn: Engine.stream_generate with the whole history, one engine kept."""
    m, tok = tiny
    engine = Engine(m, tok, max_batch=1, prefix_cache=PrefixCache(16 << 20))
    history = [{"role": "user", "content": "Hello world!"}]
    reply = "".join(r.text for r in engine.stream_generate(history, max_tokens=8, system="Be brief."))
    assert reply == mlxllama.generate(m, tok, history, max_tokens=8, system="Be brief.")
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    before = engine.stats.cached_tokens
    last = list(engine.stream_generate(history, max_tokens=8, system="Be brief."))[-1]
    first_turn = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + history[:1])))
    assert engine.stats.cached_tokens - before >= first_turn - 1
    assert last.finish_reason in ("stop", "length")


def test_requests_without_sampling_values_get_the_servers_defaults(tiny):
    m, tok = tiny
    body = {"model": MODEL_ID, "messages": MSGS[3], "max_tokens": 12, "seed": 7}
    llama_cpp = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    with serving(m, tok) as (base, engine), httpx.Client(timeout=60) as h:
        assert h.get(base + "/v1/models").json()["data"][0]["defaults"] == dict(llama_cpp, repetition_penalty=1.0,
                                                                               max_tokens=min(2048, engine.ctx))
        implicit = h.post(base + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        explicit = h.post(base + "/v1/chat/completions", json=dict(body, **llama_cpp)).json()
        hot = h.post(base + "/v1/chat/completions", json=dict(body, temperature=1.0, top_k=0, top_p=1.0,
                                                              min_p=0.0)).json()
    assert implicit == explicit["choices"][0]["message"]["content"]
    assert implicit != hot["choices"][0]["message"]["content"]  # the old default: temperature 1, nothing cut
    with serving(m, tok, sampling={"temperature": 0.0}, max_tokens=5) as (base, _), httpx.Client(timeout=60) as h:
        r = h.post(base + "/v1/chat/completions", json={"messages": MSGS[3]}).json()  # no model, no max_tokens
    assert r["choices"][0]["message"]["content"] == solo_chat(tiny, MSGS[3], 5)
    assert r["usage"]["completion_tokens"] <= 5


def test_model_names_launch_reference_and_any(tiny, chat_folder):
    m, tok = tiny
    config = ServeConfig(model="default", shutdown_timeout=2.0)
    engine = make_engine(m, tok, config).start()
    try:
        app = create_app(engine, MODEL_ID, config, accepted_names(MODEL_ID, config, chat_folder))
        assert app.state.model_names == {MODEL_ID, "default", str(chat_folder), chat_folder.name}
    finally:
        engine.shutdown(2.0)
    body = {"messages": MSGS[0], "max_tokens": 2}
    with serving(m, tok, model="default") as (base, _), httpx.Client(timeout=60) as h:
        for name in (MODEL_ID, "default"):
            assert h.post(base + "/v1/chat/completions", json=dict(body, model=name)).status_code == 200
        r = h.post(base + "/v1/chat/completions", json=dict(body, model="gpt-4o"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with serving(m, tok, any_model=True) as (base, _), httpx.Client(timeout=60) as h:
        r = h.post(base + "/v1/chat/completions", json=dict(body, model="gpt-4o"))
        assert r.status_code == 200 and r.json()["model"] == MODEL_ID


@contextmanager
def slow_model(model, seconds: float = 0.01):
    to_numpy = model.ops.to_numpy

    def slow(x):  # the tiny model would otherwise finish before the client goes (every step reads a token back)
        time.sleep(seconds)
        return to_numpy(x)

    model.ops.to_numpy = slow
    try:
        yield
    finally:
        del model.ops.to_numpy


def test_a_non_streaming_client_that_times_out_frees_its_sequence(tiny):
    m, tok = tiny
    body = {"model": MODEL_ID, "messages": MSGS[4], "max_tokens": 200, "temperature": 1.0, "seed": 2,
            "stop": ["never-appears"]}
    with slow_model(m), serving(m, tok) as (base, engine):
        engine.eos = set()  # the request cannot end on its own
        with httpx.Client(timeout=0.5) as h, pytest.raises(httpx.TimeoutException):
            h.post(base + "/v1/chat/completions", json=body)
        gone = time.monotonic()
        assert wait_for(lambda: engine.active == 0, 1.0), "the sequence still runs 1 s after its client left"
        assert time.monotonic() - gone < 1.0 and engine.stats.requests["cancelled"] == 1
        assert engine.kv_bytes_running() == 0


def test_sixteen_dropped_streams_free_their_slots_and_kv(tiny):
    m, tok = tiny
    body = {"model": MODEL_ID, "max_tokens": 200, "temperature": 1.0, "stop": ["never-appears"], "stream": True}
    with slow_model(m, 0.05), serving(m, tok, max_batch=16) as (base, engine):
        engine.eos = set()  # no stream ends on its own: each must be cancelled
        with ExitStack() as stack:
            lines = []  # kept: a dropped line iterator closes its response
            for i in range(16):
                h = stack.enter_context(httpx.Client(timeout=60))
                r = stack.enter_context(h.stream("POST", base + "/v1/chat/completions",
                                                 json=dict(body, seed=i, messages=MSGS[i % len(MSGS)])))
                lines.append(r.iter_lines())
                next(lines[-1])  # the role chunk: the request is in
            assert wait_for(lambda: engine.active == 16, 10), (engine.active, engine.stats.requests)
            assert engine.kv_bytes_running() > 0
        gone = time.monotonic()
        assert wait_for(lambda: engine.active == 0, 2.0), f"{engine.active} sequences still run"
        assert engine.stats.requests["cancelled"] == 16 and engine.kv_bytes_running() == 0
        print(f"16 streams freed in {time.monotonic() - gone:.3f} s")
        with httpx.Client(timeout=60) as h:  # the server still answers, and its gauges say so
            assert h.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
            samples = {s.name: s for f in text_string_to_metric_families(h.get(base + "/metrics").text)
                       for s in f.samples}
    assert samples["mlxllama_running_sequences"].value == 0


def test_metrics_parse_while_the_engine_runs(tiny):
    """Scrapes during generation: valid exposition text every time, and the KV gauges add up."""
    m, tok = tiny
    with serving(m, tok, max_batch=4) as (base, engine), httpx.Client(timeout=60) as h:
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(h.post, base + "/v1/completions", json={"prompt": p, "max_tokens": 24, "seed": i})
                    for i, p in enumerate(["one", "two", "three", "four"] * 3)]
            scrapes = 0
            while not all(j.done() for j in jobs):
                fams = {f.name: f for f in text_string_to_metric_families(h.get(base + "/metrics").text)}
                assert "mlxllama_batch_size" in fams and "process_resident_memory_bytes" in fams
                scrapes += 1
            assert all(j.result().status_code == 200 for j in jobs)
        fams = {f.name: f for f in text_string_to_metric_families(h.get(base + "/metrics").text)}
    held = {s.labels["holder"]: s.value for s in fams["mlxllama_kv_cache_bytes"].samples}
    assert held["running"] == 0 and held["prefix_cache"] == engine.prefix_cache.nbytes > 0
    assert scrapes > 0


def test_prefix_cache_entries_hold_only_their_tokens():
    """An entry stored from a slice of a large buffer keeps a copy of the slice, not the buffer."""
    big = np.ones((1, 2, 4096, 16), np.float32)
    pc = PrefixCache(1 << 20)
    assert pc.store([1, 2, 3], [(big[:, :, :3], big[:, :, :3])])
    (k, v), = pc._entries[next(iter(pc._entries))].kv
    assert k.base is None and k.nbytes == 3 * 2 * 16 * 4 and pc.nbytes == 2 * k.nbytes
    with pytest.raises(ValueError):
        pc.store([1, 2], [(big[:, :, :3], big[:, :, :3])])
    mx = pytest.importorskip("mlx.core")
    buf = mx.ones((1, 2, 1 << 16, 16))
    mx.eval(buf)
    pc = PrefixCache(1 << 20, eval=mx.eval)
    before = mx.get_active_memory()
    pc.store([1, 2, 3], [(buf[:, :, :3], buf[:, :, :3])])
    del buf
    assert mx.get_active_memory() < before - (4 << 20)  # the 8 MB buffer is gone; the entry holds 768 bytes
    assert pc.lookup([1, 2, 3, 4])[0] == 3


def test_access_log_and_server_errors(tiny, caplog):
    m, tok = tiny
    caplog.set_level(logging.INFO, logger="mlxllama.server")
    with serving(m, tok) as (base, engine), httpx.Client(timeout=60) as h:
        h.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        h.get(base + "/nowhere")
        real = engine.tokenizer.encode
        engine.tokenizer.encode = lambda text: 1 / 0  # a bug in the server's own path: a 500, logged
        try:
            r = h.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        finally:
            engine.tokenizer.encode = real
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    access = [rec.getMessage() for rec in caplog.records if rec.name == "mlxllama.server.access"]
    assert any('"POST /v1/completions" 200' in a and "prompt=" in a and "completion=3" in a for a in access)
    assert any('"GET /nowhere" 404' in a for a in access)
    assert any('"POST /v1/completions" 500' in a for a in access)
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert errors and errors[0].exc_info and errors[0].exc_info[0] is ZeroDivisionError


def test_serve_help_examples_stand_on_their_own_lines():
    r = subprocess.run([sys.executable, "-m", "mlxllama_cli.app", "serve", "--help"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, COLUMNS="80"))
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert "mlxllama serve -m default --port 8080 --max-batch 8" in lines
    assert "mlxllama serve -m default --speculate lookup --num-draft 8" in lines
    assert "--temp" in r.stdout and "--any-model" in r.stdout and "fused" in r.stdout  # --numpy-weights' modes


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists() or _malloc_trim() is None, reason="needs glibc and /proc")
def test_freed_kv_buffers_go_back_to_the_os():
    """KV-sized numpy buffers freed between live small ones stay resident until the server trims the heap."""
    warm = np.ones((1, 3, 2100, 64), np.float32)  # a freed buffer this size raises glibc's mmap threshold past it
    del warm
    held = []
    for _ in range(100):
        held += [np.ones((1, 3, 2100, 64), np.float32), np.ones(1000)]
    before = _rss_mb()
    held = [a for a in held if a.size == 1000]
    release_free_memory()
    assert _rss_mb() < before - 100, (before, _rss_mb())  # 161 MB of KV-sized buffers were freed


def test_the_server_trims_the_heap_after_requests_finish(tiny, monkeypatch):
    import mlxllama.server.app as server_app

    calls = []
    monkeypatch.setattr(server_app, "release_free_memory", lambda: calls.append(time.monotonic()))
    with serving(*tiny) as (base, _), httpx.Client(timeout=60) as h:
        assert h.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert wait_for(lambda: calls, 6.0), "no trim after a finished request"


def test_logit_bias_steers_greedy_decoding(server, tiny):
    """OpenAI's logit_bias goes through the engine's pipeline: +100 on one token makes greedy pick it every step;
    malformed biases are 400s naming the field."""
    base, _ = server
    c = client(base)
    forced = tiny[1].encode("x")[-1]
    got = c.chat.completions.create(model=MODEL_ID, messages=MSGS[0], max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})
    plain = c.chat.completions.create(model=MODEL_ID, messages=MSGS[0], max_tokens=4, temperature=0)
    assert got.choices[0].message.content == tiny[1].decode([forced] * 4) != plain.choices[0].message.content
    with httpx.Client(timeout=30) as h:
        for bias in ({"abc": 1}, {"5": 500}):
            r = h.post(base + "/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS[0],
                                                              "logit_bias": bias})
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
