"""GET /metrics: the engine's counters in Prometheus's text exposition format (version 0.0.4)."""

from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(engine, http_requests: dict[tuple[str, int], int]) -> str:
    st = engine.stats
    pc = engine.prefix_cache
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        out.append(f"# HELP mlxllama_{name} {help_}")
        out.append(f"# TYPE mlxllama_{name} {kind}")
        for labels, value in samples:
            out.append(f"mlxllama_{name}{labels} {_num(value)}")

    metric("http_requests_total", "counter", "HTTP requests answered, by path and status.",
           [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(http_requests.items())])
    metric("requests_total", "counter", "Generation requests finished, by finish reason.",
           [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(st.requests.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens received.", [("", st.prompt_tokens)])
    metric("completion_tokens_total", "counter", "Tokens generated.", [("", st.completion_tokens)])
    metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose KV came from the prefix cache.",
           [("", st.cached_tokens)])
    metric("queue_depth", "gauge", "Requests waiting for a batch slot.", [("", st.waiting)])
    metric("running_sequences", "gauge", "Sequences in the running batch.", [("", st.running)])
    cumulative, samples = 0, []
    for b in BATCH_BUCKETS:
        cumulative = sum(n for size, n in st.batch_sizes.items() if size <= b)
        samples.append((f'_bucket{{le="{b}"}}', cumulative))
    total = sum(st.batch_sizes.values())
    samples += [('_bucket{le="+Inf"}', total), ("_sum", sum(s * n for s, n in st.batch_sizes.items())),
                ("_count", total)]
    metric("batch_size", "histogram", "Sequences per engine step.", samples)
    metric("decode_tokens_per_second", "gauge", "Decode tokens per second over the last steps.",
           [("", st.decode_tps)])
    metric("achieved_gbps", "gauge", "Weights and KV read per decode step over its time (GB/s), last steps.",
           [("", st.achieved_gbps)])
    if pc is not None:
        metric("prefix_cache_bytes", "gauge", "Bytes of KV held by the prefix cache.", [("", pc.nbytes)])
        metric("prefix_cache_entries", "gauge", "Sequences held by the prefix cache.", [("", len(pc))])
    if engine.speculate is not None:
        sp = engine.spec_stats
        metric("speculative_drafted_tokens_total", "counter", "Draft tokens verified by the model.",
               [("", sp.drafted)])
        metric("speculative_accepted_tokens_total", "counter", "Draft tokens kept.", [("", sp.accepted)])
    return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
