"""Decode speed over several machines: tensor or pipeline parallel, from each node's memory bandwidth and the link's.

Batch-1 decoding, N nodes, W the bytes one token reads (weights and KV cache), M = hidden x activation bytes:
    tensor    t = W / (N bw) + C * allreduce(M) + allgather(logits)       every node reads 1/N of every layer
    pipeline  t = W / bw + N * (a + M / b)                               the stages run one after the other
ring all-reduce over N nodes: 2 (N-1) messages of M / N bytes: 2 (N-1) a + 2 (N-1) / N * M / b;
ring all-gather of R bytes per node: (N-1) (a + R / b); a the link's latency per message, b its bandwidth.
C counts the all-reduces of one step: 2 per layer (after o and after down), and the 3 mlxllama adds per step
(the step's announcement, the token ids, the vocabulary-sharded embedding). Pipeline parallelism adds memory, not
bandwidth: at batch 1 it is never faster than one node that holds the model; tensor parallelism wins where the
link's latency times C is small against W / bw.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Link:
    name: str
    backend: str  # the mx.distributed backend that runs over it
    gbps: float  # GB/s (1e9 bytes/s) one way, as an application sees it
    latency_us: float  # one message, one way, through the backend's stack
    source: str


_TCP_LATENCY = ("~300 us per message over TCP between Macs (the figure Apple's TN3205 coverage and the NetworkChuck "
                "Mac Studio cluster measurements give for the stack before RDMA: adwaitx.com/?p=10695, brainfeed.ai "
                "summary of NetworkChuck's 'Ethernet is dead' video)")
LINKS = {link.name: link for link in (
    Link("tb4", "ring", 16.4 / 8, 300.0,
         "Thunderbolt 4 bridge, TCP: 16.4 Gb/s iperf3 Mac -> PC over a 40 Gb/s USB4/TB4 cable (jiribrejcha.net, "
         "'Direct 20 Gbps connection between Mac and Windows 11'); latency: " + _TCP_LATENCY),
    Link("tb5-ring", "ring", 80 * 16.4 / 40 / 8, 300.0,
         "Thunderbolt 5 bridge, TCP: the TB4 TCP efficiency (16.4 of 40 Gb/s) applied to TB5's 80 Gb/s (derived, "
         "not measured); latency: " + _TCP_LATENCY),
    Link("tb5", "jaccl", 55 / 8, 5.0,
         "Thunderbolt 5, RDMA (jaccl, macOS 26.2+): 50-60 Gb/s and single-digit microseconds (wpnews.pro, 'MLX + "
         "JACCL: distributed AI training over Thunderbolt 5'); users report 5-9 us (techboards.net, 'macOS 26.2 adds "
         "Infiniband over Thunderbolt support')"),
    Link("10gbe", "ring", 9.4 / 8, 300.0,
         "10 Gb Ethernet, TCP: 9.4 Gb/s goodput (1500-byte frames: 94% of the line rate after Ethernet/IP/TCP "
         "headers); latency: " + _TCP_LATENCY),
    Link("1gbe", "ring", 0.94 / 8, 300.0, "1 Gb Ethernet, TCP: 0.94 Gb/s goodput; latency: " + _TCP_LATENCY),
)}
MODES = ("tensor", "pipeline")
EXTRA_ALLREDUCES = 3  # per tensor-parallel step: announcement, token ids, embedding (distributed.py)

# Shapes for the parametric path (--params): the LLaMA-2/3 model nearest in size (layers, hidden, vocab).
LLAMA_SHAPES = ((7e9, 32, 4096, 32000), (13e9, 40, 5120, 32000), (70e9, 80, 8192, 128256), (405e9, 126, 16384, 128256))


def link(name: str) -> Link:
    try:
        return LINKS[name.lower()]
    except KeyError:
        raise UsageError(f"--link must be one of {', '.join(LINKS)}, got {name!r}") from None


def nearest_shape(params: float) -> tuple[int, int, int]:
    """(layers, hidden, vocab) of the LLaMA model nearest in parameter count."""
    return min(LLAMA_SHAPES, key=lambda s: abs(s[0] - params))[1:]


def allreduce_seconds(nbytes: float, nodes: int, ln: Link) -> float:
    if nodes < 2:
        return 0.0
    steps = 2 * (nodes - 1)
    return steps * (ln.latency_us * 1e-6 + nbytes / nodes / (ln.gbps * 1e9))


def allgather_seconds(nbytes_per_node: float, nodes: int, ln: Link) -> float:
    if nodes < 2:
        return 0.0
    return (nodes - 1) * (ln.latency_us * 1e-6 + nbytes_per_node / (ln.gbps * 1e9))


@dataclass(frozen=True)
class ClusterEstimate:
    mode: str
    nodes: int
    link: Link
    read_s: float  # reading the weights and KV cache
    link_s: float  # waiting for the link
    messages: int  # collectives (tensor) or hops (pipeline) per token
    memory_bytes: float  # weights per node

    @property
    def tps(self) -> float:
        return 1.0 / (self.read_s + self.link_s)


def estimate(*, bytes_per_token: float, weight_bytes: float, layers: int, hidden: int, vocab: int,
             bandwidth_gbps: float, nodes: int, ln: Link, mode: str, act_bytes: int = 2) -> ClusterEstimate:
    if mode not in MODES:
        raise UsageError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {nodes}")
    m = hidden * act_bytes
    if mode == "tensor":
        count = 2 * layers + EXTRA_ALLREDUCES
        wait = count * allreduce_seconds(m, nodes, ln) + allgather_seconds(vocab / nodes * act_bytes, nodes, ln)
        return ClusterEstimate(mode, nodes, ln, bytes_per_token / nodes / (bandwidth_gbps * 1e9), wait,
                               count + (nodes > 1), weight_bytes / nodes)
    hops = nodes if nodes > 1 else 0  # 0 -> 1 -> ... -> N-1 -> 0
    wait = hops * (ln.latency_us * 1e-6 + m / (ln.gbps * 1e9))
    return ClusterEstimate(mode, nodes, ln, bytes_per_token / (bandwidth_gbps * 1e9), wait, hops,
                           weight_bytes / nodes)


def format_cluster(single_tps: float, ests: list[ClusterEstimate], layers: int) -> list[str]:
    ln = ests[0].link
    lines = [f"link        {ln.name} ({ln.backend} backend): {ln.gbps:.3g} GB/s, {ln.latency_us:g} us per message"]
    for e in ests:
        detail = (f"{e.messages} collectives a token (2 per layer x {layers} + {EXTRA_ALLREDUCES} + the logits "
                  "all_gather)" if e.mode == "tensor" else f"{e.messages} hops a token")
        lines.append(f"{e.mode:<12}{e.tps:.1f} t/s over {e.nodes} nodes ({e.read_s * 1e3:.2f} ms reading + "
                     f"{e.link_s * 1e3:.2f} ms on the link; {detail}); {_size(e.memory_bytes)} of weights a node; "
                     f"{e.tps / single_tps:.3g}x one node")
    best = max(ests, key=lambda e: e.tps)
    lines.append(f"wins        {best.mode}" + ("" if len(ests) < 2 else
                                               f" ({best.tps / min(e.tps for e in ests):.2f}x the other)"))
    lines.append(f"source      {ln.source}")
    return lines


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
