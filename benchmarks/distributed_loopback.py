"""Tensor and pipeline parallel against one process, on one machine over the ring backend on 127.0.0.1.

Starts the ranks as mlx.launch does (MLX_RANK and a hostfile in the environment) and prints, per configuration, each
rank's resident weight bytes as a share of one process's, and decode tok/s as a ratio to one process measured in
the same run. On loopback the link is a memory copy and the ranks share the machine's cores and memory bandwidth:
only the ratios mean anything, and they say nothing of a real cluster (see `mlxllama estimate --nodes`).

    python benchmarks/distributed_loopback.py                  # SmolLM2 (default): pipeline x2, tensor x3
    python benchmarks/distributed_loopback.py -m PATH --tensor 2 --pipeline 2 -n 64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

PROMPT = "The capital of France is"


def rank_main(mode: str, model: str, n: int) -> None:
    """One rank (MLX_RANK is set): load the shard, rank 0 decodes n tokens greedily; print JSON."""
    from mlxllama import distributed
    from mlxllama.generate import generate_step

    group = distributed.init_group()
    dog = distributed.Watchdog(group.rank(), distributed.timeout_seconds())
    shard = distributed.load_shard(model, mode, group)
    print(json.dumps({"rank": group.rank(), "resident": shard.model.resident_nbytes}), flush=True)
    if group.rank():
        distributed.serve_rank0(shard, group, dog)
        return
    driver = distributed.Driver(shard, group, dog)
    print(json.dumps({"tps": _decode_tps(driver, shard.tokenizer.encode(PROMPT), n, generate_step)}), flush=True)
    driver.close()


def _decode_tps(model, ids, n, generate_step) -> float:
    steps = generate_step(model, ids, n)
    next(steps)  # prefill and the first token are not timed
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


def single(model: str, n: int) -> tuple[float, int]:
    import mlxllama
    from mlxllama.generate import generate_step

    m, tok = mlxllama.load(model, backend="mlx")
    return _decode_tps(m, tok.encode(PROMPT), n, generate_step), m.resident_nbytes


def launch(mode: str, ranks: int, model: str, n: int, timeout: float) -> list[dict]:
    socks = [socket.socket() for _ in range(ranks)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    hosts = [[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]
    for s in socks:
        s.close()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(hosts, f)
    try:
        env = dict(os.environ, MLX_HOSTFILE=f.name)
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", mode, model, str(n)], stdout=subprocess.PIPE,
                                  text=True, env=dict(env, MLX_RANK=str(r))) for r in range(ranks)]
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            if p.returncode:
                raise SystemExit(f"{mode} x{ranks}: a rank exited with {p.returncode}")
            outs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
        return [dict(o[0], **(o[1] if len(o) > 1 else {})) for o in outs]
    finally:
        os.unlink(f.name)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("-n", "--tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--tensor", type=int, default=3, help="ranks for tensor parallel (KV heads must divide); 0: skip")
    ap.add_argument("--pipeline", type=int, default=2, help="ranks for pipeline parallel; 0: skip")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    tps1, bytes1 = single(a.model, a.tokens)
    print(f"one process: {tps1:.1f} t/s, {bytes1 / 1e6:.1f} MB of weights")
    print(f"{'config':<12} {'t/s':>8} {'x one':>7}  weights per rank (share of one process)")
    for mode, ranks in (("tensor", a.tensor), ("pipeline", a.pipeline)):
        if ranks:
            rows = launch(mode, ranks, a.model, a.tokens, a.timeout)
            tps = rows[0]["tps"]
            shares = "  ".join(f"r{r['rank']} {r['resident'] / 1e6:.1f} MB ({r['resident'] / bytes1:.2f})"
                               for r in rows)
            print(f"{mode + ' x' + str(ranks):<12} {tps:>8.1f} {tps / tps1:>7.2f}  {shares}")


if __name__ == "__main__":
    main()
