"""One rank of a distributed test run, started as mlx.launch starts ranks (MLX_RANK and MLX_HOSTFILE set).

    python dist_rank.py MODE MODEL N_TOKENS [FAULT]

Every rank prints {"rank", "resident"} (its weight bytes as the backend holds them); rank 0 then generates N_TOKENS
greedily from fixed prompt ids (prompt chunks of 3 tokens) and prints {"tokens", "tps"}. FAULT "die:R:K" makes
rank R exit abruptly at its K-th pass through its blocks, "hang:R:K" makes it stop answering there; "interleave"
runs two generations (PROMPT and PROMPT reversed) step by step in turn, each with its own cache, and prints
{"tokens", "tokens2"}; "batch" runs the same two in one engine, batched into one forward pass per step.
"""

import json
import os
import sys
import time

from mlxllama import distributed
from mlxllama.generate import generate_step

PROMPT = [1, 50, 60, 70, 80, 90, 100, 110, 120, 130]


def main() -> None:
    mode, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fault = sys.argv[4] if len(sys.argv) > 4 else ""
    group = distributed.init_group()
    rank = group.rank()
    dog = distributed.Watchdog(rank, distributed.timeout_seconds())
    shard = distributed.load_shard(model, mode, group)
    print(json.dumps({"rank": rank, "resident": shard.model.resident_nbytes}), flush=True)
    if fault and fault not in ("interleave", "batch"):
        kind, who, after = fault.split(":")
        if int(who) == rank:
            blocks, calls = shard.model.blocks, [0]

            def faulty(h, cache):
                calls[0] += 1
                if calls[0] >= int(after):
                    if kind == "die":
                        os._exit(9)
                    time.sleep(3600)
                return blocks(h, cache)

            shard.model.blocks = faulty
    if rank != 0:
        distributed.serve_rank0(shard, group, dog)
        return
    driver = distributed.Driver(shard, group, dog)
    ids = PROMPT if shard.args.vocab_size > 1000 else [t % shard.args.vocab_size for t in PROMPT]
    if fault == "interleave":
        pairs = list(zip(generate_step(driver, ids, n, prefill_step_size=3),
                         generate_step(driver, ids[::-1], n, prefill_step_size=3)))
        driver.close()
        print(json.dumps({"tokens": [a for a, _ in pairs], "tokens2": [b for _, b in pairs]}), flush=True)
        return
    if fault == "batch":
        from mlxllama.engine import Engine, RequestParams

        engine = Engine(driver, None, max_batch=2, prefill_chunk=3, prefill_step=3)
        handles = [engine.submit(p, RequestParams(max_tokens=n, ignore_eos=True)) for p in (ids, ids[::-1])]
        got = [[ev.token for ev in h if ev.token is not None] for h in handles]
        driver.close()
        print(json.dumps({"tokens": got[0], "tokens2": got[1], "batched": engine.stats.batch_sizes.get(2, 0)}),
              flush=True)
        return
    start = time.perf_counter()
    tokens = list(generate_step(driver, ids, n, prefill_step_size=3))
    tps = len(tokens) / (time.perf_counter() - start)
    driver.close()
    print(json.dumps({"tokens": tokens, "tps": tps}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
