"""A bounded soak of `mlxllama serve` on loopback: does it hold under mixed, partly hostile load?

It starts the real server (a subprocess, `mlxllama serve`) and, for --seconds, runs --threads client threads that
send good requests (chat and completions, streamed and not, with and without sampling values, a few without
max_tokens), streams dropped after two chunks, non-streamed requests abandoned by a short client timeout, and
hostile requests (bad JSON, bad UTF-8, deep nesting, bad values, unknown routes, methods and models, bodies over
the limit...). /metrics is scraped at 10 Hz throughout. A greedy answer is taken before and after. Then SIGTERM
arrives with 4 requests in flight.

Printed: requests ok and failed, 5xx, error-shape violations, RSS after warm-up and at the end against the prefix
cache's budget, the cache gauges, p50/p99 latency of good requests, the greedy answers, and how SIGTERM went. The
exit code is 1 when a check fails (the checks: no 5xx, no failed good request or scrape, every hostile request a
4xx with OpenAI's error body, RSS growth after warm-up <= 1.2 x budget + 64 MB, the greedy answer unchanged,
SIGTERM drains the in-flight requests with exit code 0 and no traceback).

    python benchmarks/serve_soak.py --seconds 600 --prefix-cache-mib 128     # the release soak
    python benchmarks/serve_soak.py --seconds 60                              # CI
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import free_port  # noqa: E402  (the benchmark beside this one)

TOPICS = ["the sky", "a robot", "a CPU cache", "inflation", "the water cycle", "vaccines", "the Roman empire",
          "machine learning", "a car engine", "photosynthesis", "leadership", "the beach", "airplanes", "relativity",
          "the internet", "dreams", "volcanoes", "bread", "chess", "the moon", "rivers", "music", "glass", "bees"]
ASKS = ["Explain {}.", "Write two sentences about {}.", "What is interesting about {}?", "Describe {} briefly.",
        "Give three facts about {}."]
GREEDY = [{"role": "user", "content": "What is the capital of France?"}]
ERROR_KEYS = {"message", "type", "param", "code"}
UNBOUNDED = {"share": 0.05}  # the share of good requests without max_tokens (--unbounded)
RUNNING_KV = 'mlxllama_kv_cache_bytes{holder="running"}'


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # (kind, why), the first few
    statuses: Counter = field(default_factory=Counter)

    def add(self, kind: str, ok: bool, status: int, why: str = "", seconds: float | None = None) -> None:
        ok = bool(ok)
        with self.lock:
            self.counts[(kind, ok)] += 1
            self.statuses[status] += 1
            if seconds is not None and ok:
                self.latencies.append(seconds)
            if not ok and len(self.failures) < 20:
                self.failures.append((kind, status, why[:200]))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def good_body(rng: random.Random, model: str, history: dict, unbounded: float = 0.05) -> tuple[str, dict]:
    """A good request: a chat (sometimes the next turn of an earlier one) or a completion."""
    ask = rng.choice(ASKS).format(rng.choice(TOPICS))
    body: dict = {"model": model, "max_tokens": rng.randint(4, 40)}
    if rng.random() < unbounded:
        del body["max_tokens"]  # as a new user's client does: the server's default cap applies
    if rng.random() < 0.3:
        body["temperature"] = 0
    elif rng.random() < 0.3:
        body.update(temperature=0.7, top_p=0.9, seed=rng.randrange(1000))
    if rng.random() < 0.25:
        body["prompt"] = f"{ask}\n"
        return "/v1/completions", body
    prev = history.get("chat")
    short = prev and sum(len(str(m.get("content") or "")) for m in prev) < 400  # stays far inside any context
    if short and rng.random() < 0.4:
        messages = prev + [{"role": "user", "content": ask}]
    else:
        messages = [{"role": "user", "content": ask}]
    body["messages"] = messages[-12:]
    return "/v1/chat/completions", body


def hostile_requests(model: str) -> list[tuple[str, str, bytes | None, dict]]:
    """(name, method and path, raw body or None, json body): each must get a 4xx with OpenAI's error body."""
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    chat = "POST /v1/chat/completions"
    return [
        ("bad json", chat, b"{not json", {}),
        ("bad utf-8", chat, b'{"model": "\xff\xfe", "messages": []}', {}),
        ("deep nesting", chat, b"[" * 10_000 + b"]" * 10_000, {}),
        ("not an object", chat, b"[1, 2, 3]", {}),
        ("wrong type", chat, None, dict(ok, temperature="hot")),
        ("out of range", chat, None, dict(ok, top_p=7)),
        ("no messages", chat, None, dict(ok, messages=[])),
        ("unknown role", chat, None, dict(ok, messages=[{"role": "wizard", "content": "x"}])),
        ("content type", chat, None, dict(ok, messages=[{"role": "user", "content": 5}])),
        ("too many stops", chat, None, dict(ok, stop=["x"] * 40)),
        ("n=2", chat, None, dict(ok, n=2)),
        ("max_tokens 0", chat, None, dict(ok, max_tokens=0)),
        ("unknown model", chat, None, dict(ok, model="gpt-4o-not-here")),
        ("token ids out of range", "POST /v1/completions", None, {"model": model, "prompt": [1, 10 ** 9]}),
        ("over the context", chat, None, dict(ok, messages=[{"role": "user", "content": "word " * 9000}])),
        ("body too large", chat, b"x" * (9 << 20), {}),
        ("unknown route", "POST /v1/embeddings", None, {"input": "x"}),
        ("wrong method", "GET /v1/chat/completions", None, {}),
    ]


def error_shape_ok(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == ERROR_KEYS and isinstance(err["message"], str) and bool(err["message"])


def send_hostile(h: httpx.Client, base: str, case, tally: Tally, shape_bad: Counter) -> None:
    name, route, raw, body = case
    method, path = route.split(" ", 1)
    if raw is not None:
        r = h.request(method, base + path, content=raw, headers={"content-type": "application/json"})
    elif method == "GET":
        r = h.request(method, base + path)
    else:
        r = h.request(method, base + path, json=body)
    good = 400 <= r.status_code < 500 and error_shape_ok(r)
    if not error_shape_ok(r):
        with tally.lock:
            shape_bad[name] += 1
    tally.add("hostile", good, r.status_code, f"{name}: {r.status_code} {r.text[:120]}")


def send_good(h: httpx.Client, base: str, rng: random.Random, model: str, history: dict, tally: Tally,
              mode: str) -> None:
    """mode: "plain", "stream", "drop" (a stream dropped after two chunks) or "abandon" (the client gives up)."""
    path, body = good_body(rng, model, history, UNBOUNDED["share"])
    t0 = time.perf_counter()
    if mode == "abandon":
        body.update(max_tokens=400, stop=["zzqx"])
        try:
            r = h.post(base + path, json=body, timeout=0.3)
            tally.add("abandoned", r.status_code < 500, r.status_code, r.text[:120])
        except httpx.TimeoutException:
            tally.add("abandoned", True, 0)
        return
    if mode == "plain":
        r = h.post(base + path, json=body)
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        if ok and "messages" in body:
            history["chat"] = body["messages"] + [r.json()["choices"][0]["message"]]
        tally.add("good", ok, r.status_code, r.text[:200], time.perf_counter() - t0)
        return
    body.update(stream=True)
    with h.stream("POST", base + path, json=body) as r:
        if r.status_code != 200:
            r.read()
            tally.add("good", False, r.status_code, r.text[:200])
            return
        chunks, finish = 0, None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            obj = json.loads(line[6:])
            if "error" in obj:
                tally.add("good", False, 200, line[:200])
                return
            if obj.get("choices") and obj["choices"][0].get("finish_reason"):
                finish = obj["choices"][0]["finish_reason"]
            if mode == "drop" and chunks == 2:
                break
    if mode == "drop":
        tally.add("dropped", True, 200)
    else:
        tally.add("good", finish in ("stop", "length"), 200, f"finish {finish}", time.perf_counter() - t0)


def client_thread(i: int, base: str, model: str, until: float, tally: Tally, shape_bad: Counter) -> None:
    rng = random.Random(i)
    history: dict = {}
    hostile = hostile_requests(model)
    with httpx.Client(timeout=900) as h:
        while time.monotonic() < until:
            x = rng.random()
            try:
                if x < 0.25:
                    send_hostile(h, base, rng.choice(hostile), tally, shape_bad)
                else:
                    mode = rng.choices(("plain", "stream", "drop", "abandon"), weights=(35, 35, 20, 10))[0]
                    send_good(h, base, rng, model, history, tally, mode)
            except Exception as e:  # noqa: BLE001  (a transport error is a failed request, counted)
                tally.add("good", False, -1, f"{type(e).__name__}: {e}")


class Scraper(threading.Thread):
    """/metrics at 10 Hz: failures, and the last values of the gauges."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.stop, self.ok, self.failed, self.last = base, threading.Event(), 0, 0, {}

    def run(self):
        with httpx.Client(timeout=10) as h:
            while not self.stop.is_set():
                try:
                    r = h.get(self.base + "/metrics")
                    r.raise_for_status()
                    self.last = parse_metrics(r.text)
                    self.ok += 1
                except Exception:  # noqa: BLE001
                    self.failed += 1
                self.stop.wait(0.1)


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def greedy(base: str, model: str) -> str:
    r = httpx.post(base + "/v1/chat/completions", timeout=300,
                   json={"model": model, "messages": GREEDY, "max_tokens": 24, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlxllama_cli.app", "serve", "-m", args.model, "--port", str(port),
           "--prefix-cache-bytes", str(args.prefix_cache_mib << 20), "--max-batch", str(args.max_batch),
           "--backend", args.backend, "--shutdown-timeout", "60", *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    proc.log = lines
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start:\n" + "".join(lines[-20:]))


def sigterm_drain(proc: subprocess.Popen, base: str, model: str) -> dict:
    """SIGTERM with 4 requests in flight (2 streamed, 2 not): do they all finish, and does the server exit 0?"""
    body = {"model": model, "messages": [{"role": "user", "content": "Count from one to thirty in words."}],
            "max_tokens": 48, "temperature": 0}
    results: list = [None] * 4
    started = threading.Barrier(5, timeout=120)

    def one(i):
        with httpx.Client(timeout=120) as h:
            if i % 2:
                started.wait()
                r = h.post(base + "/v1/chat/completions", json=body)
                results[i] = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                return
            with h.stream("POST", base + "/v1/chat/completions", json=dict(body, stream=True)) as r:
                lines = r.iter_lines()
                next(lines)
                started.wait()
                finish = [json.loads(x[6:])["choices"][0].get("finish_reason") for x in lines
                          if x.startswith("data: {") and '"choices":[{' in x]
                results[i] = bool(finish) and finish[-1] in ("stop", "length")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        started.wait()
        time.sleep(0.3)  # the non-streamed ones are in
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for f in futures:
            try:
                f.result()
            except Exception:  # noqa: BLE001
                pass
    code = proc.wait(timeout=120)
    return {"finished": sum(bool(x) for x in results), "exit": code, "seconds": time.monotonic() - t0,
            "traceback": any("Traceback" in line for line in proc.log)}


def pct(xs: list, q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def report(args, tally: Tally, shape_bad: Counter, scraper: Scraper, rss: tuple, answers: tuple, term: dict) -> bool:
    budget = args.prefix_cache_mib << 20
    limit = 1.2 * budget + (64 << 20)
    growth = rss[1] - rss[0]
    c = tally.counts
    g = scraper.last
    fivexx = sum(n for s, n in tally.statuses.items() if s >= 500)
    checks = {
        "no 5xx": fivexx == 0,
        "no failed good request": c[("good", False)] == 0,
        "every hostile request a 4xx with OpenAI's error body": c[("hostile", False)] == 0 and not shape_bad,
        "no failed /metrics scrape": scraper.failed == 0,
        "RSS growth after warm-up <= 1.2 x budget + 64 MB": growth <= limit,
        "greedy answer unchanged": answers[0] == answers[1],
        "SIGTERM: 4 in flight finished, exit 0, no traceback": (term["finished"] == 4 and term["exit"] == 0
                                                                and not term["traceback"]),
    }
    mb = 1e6
    rows = [
        ("duration, client threads", f"{args.seconds} s, {args.threads}"),
        ("good requests ok / failed", f"{c[('good', True)]} / {c[('good', False)]}"),
        ("streams dropped after two chunks", f"{c[('dropped', True)]}"),
        ("non-streamed requests abandoned (client timeout)", f"{c[('abandoned', True)] + c[('abandoned', False)]}"),
        ("hostile requests 4xx+OpenAI body / not", f"{c[('hostile', True)]} / {c[('hostile', False)]}"),
        ("5xx responses", f"{fivexx}"),
        ("error-shape violations", f"{sum(shape_bad.values())}" + (f" {dict(shape_bad)}" if shape_bad else "")),
        ("/metrics scrapes ok / failed", f"{scraper.ok} / {scraper.failed}"),
        ("latency of good requests p50 / p99", f"{pct(tally.latencies, 50):.2f} s / {pct(tally.latencies, 99):.2f} s"),
        ("RSS idle at start -> after warm-up -> end (idle)", f"{rss[2] / mb:.0f} -> {rss[0] / mb:.0f} -> {rss[1] / mb:.0f} MB "
                                                      f"(growth after warm-up {growth / mb:+.0f} MB, limit "
                                                      f"{limit / mb:.0f} MB)"),
        ("prefix cache budget / bytes / entries", f"{budget / mb:.0f} MB / "
                                                  f"{g.get('mlxllama_prefix_cache_bytes', 0) / mb:.1f} MB / "
                                                  f"{g.get('mlxllama_prefix_cache_entries', 0):.0f}"),
        ("KV of running sequences at the end", f"{g.get(RUNNING_KV, 0) / mb:.1f} MB"),
        ("greedy answer before / after", f"{answers[0]!r} / {answers[1]!r}"),
        ("SIGTERM with 4 in flight", f"{term['finished']}/4 finished, exit {term['exit']}, "
                                     f"{term['seconds']:.1f} s, traceback: {'yes' if term['traceback'] else 'no'}"),
    ]
    print("\n| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print()
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    for f in tally.failures[:10]:
        print("  failure:", f)
    return all(checks.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seconds", type=int, default=180)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the first RSS reading (default: "
                                                               "a fifth of --seconds, at most 120)")
    ap.add_argument("--prefix-cache-mib", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--unbounded", type=float, default=0.05, help="share of good requests without max_tokens")
    ap.add_argument("--request-model", default=None, help="the model name requests give (default: --model)")
    ap.add_argument("serve_args", nargs="*", help="more `mlxllama serve` options (after --)")
    args = ap.parse_args()
    UNBOUNDED["share"] = args.unbounded
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        print(proc.log[0].rstrip() if proc.log else "", flush=True)
        model = args.request_model or args.model
        before = greedy(base, model)
        rss_start = rss_bytes(proc.pid)
        tally, shape_bad, scraper = Tally(), Counter(), Scraper(base)
        scraper.start()
        until = time.monotonic() + args.seconds
        warm = min(args.warmup if args.warmup is not None else args.seconds / 5, args.seconds)
        with ThreadPoolExecutor(args.threads) as pool:
            for i in range(args.threads):
                pool.submit(client_thread, i, base, model, until, tally, shape_bad)
            time.sleep(warm)
            rss_warm = rss_bytes(proc.pid)
        settle = time.monotonic() + 30  # every client has gone: the server frees their KV and trims its heap
        while time.monotonic() < settle and scraper.last.get("mlxllama_running_sequences", 0):
            time.sleep(0.1)
        time.sleep(3.0)
        rss_end = rss_bytes(proc.pid)
        after = greedy(base, model)
        time.sleep(1.0)  # a few more scrapes: the gauges once every client has gone
        scraper.stop.set()
        scraper.join()
        term = sigterm_drain(proc, base, model)
    finally:
        if proc.poll() is None:
            proc.kill()
    return 0 if report(args, tally, shape_bad, scraper, (rss_warm, rss_end, rss_start), (before, after),
                         term) else 1


if __name__ == "__main__":
    sys.exit(main())
