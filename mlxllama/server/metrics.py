"""GET /metrics through prometheus_client: the HTTP counter is its own (thread-safe); the engine's figures are read
at scrape time by a collector, from copies, so a scrape never iterates what the engine thread is changing."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """One server's registry: HTTP requests by path and status, the engine's collector and the process's own
    (resident memory, CPU seconds, open files)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.http = Counter("mlxllama_http_requests", "HTTP requests answered, by path and status.",
                            ["path", "status"], registry=self.registry)
        self.registry.register(EngineCollector(engine))
        ProcessCollector(registry=self.registry)

    def count(self, path: str, status: int) -> None:
        self.http.labels(path, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        st = e.stats
        requests = dict(st.requests)
        sizes = dict(st.batch_sizes)  # one C-level copy: the engine thread may insert a new size meanwhile
        yield _counter("requests", "Generation requests finished, by finish reason.", requests, "finish_reason")
        yield _counter("prompt_tokens", "Prompt tokens received.", st.prompt_tokens)
        yield _counter("completion_tokens", "Tokens generated.", st.completion_tokens)
        yield _counter("prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache.",
                       st.cached_tokens)
        yield _gauge("queue_depth", "Requests waiting for a batch slot.", st.waiting)
        yield _gauge("running_sequences", "Sequences in the running batch.", st.running)
        buckets, cumulative = [], 0
        for b in BATCH_BUCKETS:
            cumulative = sum(n for size, n in sizes.items() if size <= b)
            buckets.append((str(b), cumulative))
        buckets.append(("+Inf", sum(sizes.values())))
        h = HistogramMetricFamily("mlxllama_batch_size", "Sequences per engine step.")
        h.add_metric([], buckets, sum(s * n for s, n in sizes.items()))
        yield h
        yield _gauge("decode_tokens_per_second", "Decode tokens per second over the last steps.", st.decode_tps)
        yield _gauge("achieved_gbps", "Weights and KV read per decode step over its time (GB/s), last steps.",
                     st.achieved_gbps)
        pc = e.prefix_cache
        held = {"running": e.kv_bytes_running(), "prefix_cache": pc.nbytes if pc is not None else 0}
        yield _gauge("kv_cache_bytes", "Bytes of KV the engine holds: the running sequences' caches and the "
                     "prefix cache's entries.", held, "holder")
        if pc is not None:
            yield _gauge("prefix_cache_bytes", "Bytes of KV held by the prefix cache.", pc.nbytes)
            yield _gauge("prefix_cache_budget_bytes", "The prefix cache's byte budget.", pc.max_bytes)
            yield _gauge("prefix_cache_entries", "Sequences held by the prefix cache.", len(pc))
        if e.speculate is not None:
            sp = e.spec_stats
            yield _counter("speculative_drafted_tokens", "Draft tokens verified by the model.", sp.drafted)
            yield _counter("speculative_accepted_tokens", "Draft tokens kept.", sp.accepted)


def _counter(name: str, help_: str, value, label: str | None = None):
    m = CounterMetricFamily(f"mlxllama_{name}", help_, labels=[label] if label else None)
    _add(m, value)
    return m


def _gauge(name: str, help_: str, value, label: str | None = None):
    m = GaugeMetricFamily(f"mlxllama_{name}", help_, labels=[label] if label else None)
    _add(m, value)
    return m


def _add(m, value) -> None:
    if isinstance(value, dict):
        for k, v in sorted(value.items()):
            m.add_metric([str(k)], v)
    else:
        m.add_metric([], value)
