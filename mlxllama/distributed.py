"""Inference over several machines with mx.distributed (ring over TCP, jaccl over Thunderbolt 5 RDMA, MPI), launched
the way MLX programs are: `mlx.launch --hosts ip0,ip1 -- mlxllama generate ... --parallel tensor|pipeline`.

Two shard plans (Plan), each rank reading only its part of the model files (loaders.load's shard hook):
  tensor    every rank holds 1/N of every layer: q/k/v and gate/up by output rows (whole heads, the GQA groups kept
            together: KV heads divide by N), o and down by input columns, their partial products added by all_sum
            (two per layer); the embedding table and the head by vocabulary rows, the logits all_gathered.
  pipeline  every rank holds a contiguous range of layers; rank 0 also the embedding, the final norm and the head.
            Hidden states go 0 -> 1 -> ... -> N-1 -> 0 (send/recv), one [B, L, hidden] message per hop.

Rank 0 drives: it tokenizes, samples and prints, and its Driver looks like a Model to generate.py (and to a
server's engine). The other ranks run `serve_rank0` until rank 0 closes: before every forward pass rank 0 tells them
what comes (a header: new cache, or a step of B x L tokens at an offset), in tensor mode by an all_sum that every rank
joins, in pipeline mode passed along the ring, so that prompt chunks flow through the stages one behind the other.

A peer that dies closes its sockets and MLX raises on the others; a peer that vanishes without closing them (a
machine switched off) would leave a collective waiting forever, so every wait for the other ranks is bounded by a
watchdog (MLXLLAMA_DIST_TIMEOUT seconds, default 120), which ends the process with one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from . import loaders
from .accounting import kv_and_attention, quant_label
from .config import ModelArgs
from .errors import MlxLlamaError, ModelFileError, UsageError
from .model import Model
from .weights import LAYER_LINEARS, GGMLWeight, QuantizedWeight

MODES = ("tensor", "pipeline")
DEFAULT_TIMEOUT = 120.0
_CACHE, _RUN, _STOP, _FREE, _BATCH = 1, 2, 3, 4, 5  # header commands
_HEADER = 7  # cmd, batch, length, cache offset, what the step returns, max_len (new cache), cache id
_HEAD_NONE, _HEAD_ALL, _HEAD_LAST = 0, 1, 2  # what a step returns: nothing (prompt chunks), every position, the last


class DistributedError(MlxLlamaError):
    """Another rank died, hung or could not be reached."""


@dataclass(frozen=True)
class Plan:
    mode: str  # "tensor" | "pipeline"
    rank: int
    size: int

    def check(self, args: ModelArgs) -> None:
        """Refuse, in one line, a model whose sizes do not divide into this many ranks."""
        n = self.size
        if self.mode == "tensor":
            for what, count in (("num_key_value_heads", args.num_key_value_heads),
                                ("num_attention_heads", args.num_attention_heads),
                                ("intermediate_size", args.intermediate_size), ("vocab_size", args.vocab_size)):
                if count % n:
                    raise UsageError(f"--parallel tensor over {n} ranks: the model's {what} ({count}) does not "
                                     f"divide by {n}; use {_divisors(args, n)} ranks or --parallel pipeline")
        elif args.num_hidden_layers < n:
            raise UsageError(f"--parallel pipeline over {n} ranks: the model has only {args.num_hidden_layers} layers")

    def layers(self, args: ModelArgs) -> range:
        """The (global) layers this rank runs."""
        if self.mode == "tensor":
            return range(args.num_hidden_layers)
        counts = pipeline_layers(args, self.size)
        start = sum(counts[: self.rank])
        return range(start, start + counts[self.rank])

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The shape of this rank's part: its heads and MLP rows (tensor) or its number of layers (pipeline)."""
        if self.mode == "tensor":
            n = self.size
            return args.replace(num_attention_heads=args.num_attention_heads // n,
                                num_key_value_heads=args.num_key_value_heads // n,
                                intermediate_size=args.intermediate_size // n)
        return args.replace(num_hidden_layers=len(self.layers(args)))

    def vocab_start(self, args: ModelArgs) -> int | None:
        return self.rank * (args.vocab_size // self.size) if self.mode == "tensor" else None

    def shard(self, args: ModelArgs, name: str, shape: tuple) -> tuple[slice, slice] | None:
        """The loader's hook: the rows and columns of tensor `name` this rank keeps, or None."""
        self.check(args)
        whole = (slice(None), slice(None))
        if self.mode == "pipeline":
            if name.startswith("model.layers."):
                return whole if int(name.split(".")[2]) in self.layers(args) else None
            return whole if self.rank == 0 else None
        r, n, d = self.rank, self.size, args.head_dim

        def part(total: int) -> slice:
            return slice(r * total // n, (r + 1) * total // n)

        q = part(args.num_attention_heads * d)
        kv = part(args.num_key_value_heads * d)
        f = part(args.intermediate_size)
        cuts = {"self_attn.q_proj": (q, whole[1]), "self_attn.q_proj.bias": (q, whole[1]),
                "self_attn.k_proj": (kv, whole[1]), "self_attn.k_proj.bias": (kv, whole[1]),
                "self_attn.v_proj": (kv, whole[1]), "self_attn.v_proj.bias": (kv, whole[1]),
                "self_attn.o_proj": (whole[0], q),
                "mlp.gate_proj": (f, whole[1]), "mlp.up_proj": (f, whole[1]), "mlp.down_proj": (whole[0], f)}
        if name in ("model.embed_tokens", "lm_head"):
            return part(args.vocab_size), whole[1]
        if name.startswith("model.layers."):
            return cuts.get(name.split(".", 3)[3], whole)
        return whole

    def local_name(self, args: ModelArgs, name: str) -> str:
        """Pipeline ranks number their layers from 0."""
        if self.mode != "pipeline" or not name.startswith("model.layers."):
            return name
        _, _, i, rest = name.split(".", 3)
        return f"model.layers.{int(i) - self.layers(args).start}.{rest}"


def _divisors(args: ModelArgs, n: int) -> str:
    ok = [k for k in range(2, 9) if not (args.num_key_value_heads % k or args.num_attention_heads % k
                                         or args.intermediate_size % k or args.vocab_size % k)]
    return " or ".join(map(str, ok)) if ok else "no number of"


def pipeline_layers(args: ModelArgs, n: int) -> list[int]:
    """Layers per rank, contiguous, balancing parameter counts: rank 0 also holds the embedding table and head."""
    h, v = args.hidden_size, args.vocab_size
    layer = (2 * args.num_attention_heads + 2 * args.num_key_value_heads) * args.head_dim * h \
        + 3 * h * args.intermediate_size
    ends = v * h * (1 if args.tie_word_embeddings else 2)
    L = args.num_hidden_layers
    if n == 1:
        return [L]

    def split(first: int) -> list[int]:  # rank 0 takes `first` layers, the others the rest, evenly
        rest = L - first
        return [first] + [rest // (n - 1) + (k < rest % (n - 1)) for k in range(n - 1)]

    def heaviest(counts: list[int]) -> int:
        return max([counts[0] * layer + ends] + [c * layer for c in counts[1:]])

    return min((split(first) for first in range(1, L - n + 2)), key=heaviest)


# -- the group and the watchdog -------------------------------------------------------------------------------------

def init_group():
    """The group of this run's ranks (mx.distributed.init: the backend mlx.launch chose, via MLX_RANK and the
    hostfile); one rank when the program was not started by mlx.launch."""
    import mlx.core as mx

    try:
        return mx.distributed.init()
    except RuntimeError as e:
        raise DistributedError(f"cannot join the other ranks: {e}") from None


class Watchdog:
    """Ends the process with one line when a wait for the other ranks lasts more than `seconds`."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, daemon=True, name="mlxllama-watchdog").start()

    @contextlib.contextmanager
    def guard(self, what: str):
        outer = (self._what, self._deadline)
        self._what, self._deadline = what, time.monotonic() + self.seconds
        try:
            yield
        except RuntimeError as e:  # MLX's backends raise when a peer's connection drops
            raise DistributedError(f"rank {self.rank}: lost another rank while {what} ({e})") from None
        finally:
            self._what, self._deadline = outer

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            d = self._deadline
            if d is not None and time.monotonic() > d:
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for {self.seconds:g} s "
                                 f"while {self._what}; a rank died or the link is down\n")
                sys.stderr.flush()
                os._exit(1)


def timeout_seconds() -> float:
    raw = os.environ.get("MLXLLAMA_DIST_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise UsageError(f"MLXLLAMA_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not t > 0:
        raise UsageError(f"MLXLLAMA_DIST_TIMEOUT must be positive, got {raw!r}")
    return t


class _WatchedOps:
    """The backend as rank 0's callers see it: every wait on results is bounded by the watchdog."""

    def __init__(self, ops, watchdog: Watchdog):
        self._ops, self._dog = ops, watchdog

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def eval(self, *xs):
        with self._dog.guard("waiting for a forward pass"):
            self._ops.eval(*xs)

    def to_numpy(self, x):
        with self._dog.guard("waiting for a forward pass"):
            return self._ops.to_numpy(x)

    def synchronize(self):
        with self._dog.guard("waiting for a forward pass"):
            self._ops.synchronize()

    def async_eval(self, *xs):  # may wait for room in the stream's queue
        with self._dog.guard("queueing a forward pass"):
            self._ops.async_eval(*xs)


# -- loading --------------------------------------------------------------------------------------------------------

@dataclass
class Shard:
    """One rank's part of a model: its Model (local shapes), the plan, and the whole model's args."""

    model: Model
    plan: Plan
    args: ModelArgs
    tokenizer: object
    accounting: dict  # roofline.Accounting's fields for this rank's part (summed over ranks by setup)
    quant: str


def _accounting(args: ModelArgs, weights: dict, ops) -> dict:
    """accounting.account_weights for a part of a model (a pipeline stage may hold no embedding or head), with the
    weights as the backend holds them; the fields add up over the ranks (norms counted on every tensor rank)."""
    def nbytes(w):
        if isinstance(w, GGMLWeight):  # GGUF blocks: the layout depends on the type and the backend
            return ops.prepared_nbytes(w)
        return w.nbytes if isinstance(w, QuantizedWeight) else int(np.prod(w.shape)) * ops.float_bytes

    def elements(w):
        return int(np.prod(w.shape))

    total = sum(nbytes(w) for w in weights.values())
    embed, head = weights.get("model.embed_tokens"), weights.get("lm_head")
    per_token = total
    if embed is not None:
        per_token += -nbytes(embed) + -(-nbytes(embed) // embed.shape[0]) + (nbytes(embed) if head is None else 0)
    head = head if head is not None else embed
    linears = sum(elements(w) for k, w in weights.items() if k.startswith("model.layers.") and k.endswith(
        LAYER_LINEARS))
    kv, attn = kv_and_attention(args, ops.kv_bytes)
    return {"params": sum(elements(w) for w in weights.values()),
            "matmul_params": linears + (elements(head) if head is not None else 0), "weight_bytes": total,
            "weight_bytes_per_token": per_token, "kv_bytes_per_position": kv, "attn_flops_per_position": attn}


def _sum_over_ranks(values: dict, group) -> dict:
    """Exact sums of non-negative integers over the ranks (as 20-bit digits: MLX sums int32)."""
    import mlx.core as mx

    keys = list(values)
    digits = np.array([[values[k] >> 40, (values[k] >> 20) & 0xFFFFF, values[k] & 0xFFFFF] for k in keys], np.int32)
    total = np.array(mx.distributed.all_sum(mx.array(digits), group=group)).astype(np.int64)
    return {k: int((d[0] << 40) + (d[1] << 20) + d[2]) for k, d in zip(keys, total)}


def load_shard(ref, mode: str, group, backend: str = "mlx", revision: str | None = None) -> Shard:
    """Read this rank's part of the model `ref` (a folder, .gguf file or repo id) and lay it out."""
    from . import api, backends

    if mode not in MODES:
        raise UsageError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if backend not in ("auto", "mlx"):
        raise UsageError("--parallel runs on MLX (mx.distributed); drop --backend or pass --backend mlx")
    backends.pick("mlx")  # a clear error where MLX is not installed
    from .backends.mlx_ops import MLXOps

    plan = Plan(mode, group.rank(), group.size())
    args, weights, tokenizer = loaders.load(api.resolve(ref, revision), shard=plan.shard)
    weights = {plan.local_name(args, k): w for k, w in weights.items()}
    ops = MLXOps(group=group if mode == "tensor" and group.size() > 1 else None)
    local_args = plan.local_args(args)
    accounting, quant = _accounting(local_args, weights, ops), quant_label(weights)
    try:
        model = Model(local_args, weights, ops, release=True, vocab_start=plan.vocab_start(args))
    except KeyError as e:
        raise ModelFileError(f"rank {plan.rank}: tensor {e} is missing from its shard") from None
    return Shard(model, plan, args, tokenizer, accounting, quant)


def describe(shard: Shard) -> str:
    """One line: what this rank holds."""
    p, a = shard.plan, shard.args
    if p.mode == "tensor":
        what = (f"{a.num_attention_heads // p.size} of {a.num_attention_heads} heads, "
                f"{a.intermediate_size // p.size} of {a.intermediate_size} MLP rows in each of {a.num_hidden_layers} "
                "layers")
    else:
        r = p.layers(a)
        what = f"layers {r.start}-{r.stop - 1} of {a.num_hidden_layers}" + (", embedding and head" if p.rank == 0
                                                                            else "")
    return (f"[rank {p.rank} of {p.size}, {p.mode} parallel] {what}: "
            f"{shard.model.resident_nbytes / 1e6:.1f} MB of weights")


def setup(ref, mode: str, backend: str = "mlx", revision: str | None = None, quiet: bool = False):
    """For commands run under mlx.launch (generate, serve): on rank 0, (Driver, tokenizer) to use as a Model; on the
    other ranks, serve rank 0's forward passes until it closes, then (None, None): the caller just returns."""
    if mode not in MODES:
        raise UsageError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    group = init_group()
    if group.size() < 2:
        raise UsageError(f"--parallel {mode} needs 2 or more ranks: start it with mlx.launch, e.g. "
                         f"mlx.launch --hosts 127.0.0.1 -n 2 -- mlxllama generate ... --parallel {mode}")
    dog = Watchdog(group.rank(), timeout_seconds())
    shard = load_shard(ref, mode, group, backend, revision)
    if not quiet:
        sys.stderr.write(describe(shard) + "\n")
        sys.stderr.flush()
    with dog.guard("loading (waiting for every rank to load its shard)"):
        shard.accounting = _sum_over_ranks(shard.accounting, group)  # also: every rank has loaded
    if group.rank() == 0:
        return Driver(shard, group, dog), shard.tokenizer
    serve_rank0(shard, group, dog)
    return None, None


# -- rank 0 ---------------------------------------------------------------------------------------------------------

class Driver:
    """Rank 0's model: the Model interface generate.py uses (args, ops, make_cache, hidden, fill, __call__), each call
    first telling the other ranks what comes. `close()` releases them."""

    def __init__(self, shard: Shard, group, watchdog: Watchdog):
        import mlx.core as mx

        self._mx, self._shard, self._group, self._dog = mx, shard, group, watchdog
        self.local = shard.model
        self.args = shard.args  # the whole model's (vocabulary, context, stop tokens)
        self.plan = shard.plan
        self.ops = _WatchedOps(self.local.ops, watchdog)
        self.rank, self.size = group.rank(), group.size()
        self.accounting, self.quant = shard.accounting, shard.quant  # the whole model's, all ranks summed
        self.closed = False
        # Each cache of rank 0 has its counterpart on the other ranks, by id; a cache rank 0 drops is freed there
        # with the next message. One lock keeps each announcement next to its step when threads share the model.
        self._ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next_id, self._dropped = 1, []
        self._lock = threading.RLock()

    @property
    def resident_nbytes(self) -> int:
        return self.local.resident_nbytes

    @property
    def weights_nbytes(self) -> int:
        return self.local.weights_nbytes

    @property
    def device(self) -> str:
        return f"{self.local.device}, rank 0 of {self.size} ({self.plan.mode} parallel)"

    def _tell(self, *header: int):
        """Send the header to the other ranks; queued on the stream, before the step it announces."""
        mx = self._mx
        h = mx.array(np.asarray(header, dtype=np.int32))
        if self.plan.mode == "tensor":
            sent = mx.distributed.all_sum(h, group=self._group)
        else:
            sent = mx.distributed.send(h, 1, group=self._group)
        self.ops.async_eval(sent)

    def make_cache(self, batch_size: int = 1, max_len: int | None = None, settings=None):
        if settings is not None and not settings.default:
            raise UsageError("--kv-bits and --max-kv-size do not combine with --parallel yet")
        with self._lock:
            cid, self._next_id = self._next_id, self._next_id + 1
            self._tell(_CACHE, batch_size, 0, 0, 0, max_len or 0, cid)
            cache = self.local.make_cache(batch_size, max_len)
            self._ids[cache] = cid
            weakref.finalize(cache, self._dropped.append, cid)
            return cache

    def _step(self, tokens, cache, head: int):
        with self._lock:
            while self._dropped:
                self._tell(_FREE, 0, 0, 0, 0, 0, self._dropped.pop())
            if cache not in self._ids:
                raise UsageError("this cache was not made by this model's make_cache")
            return self._run(tokens, cache, head)

    def _run(self, tokens, cache, head: int):
        mx = self._mx
        tokens = self.local.ops.asarray(tokens).astype(mx.int32)
        B, L = tokens.shape
        self._tell(_RUN, B, L, cache.offset, head, 0, self._ids[cache])
        if self.plan.mode == "tensor":
            tokens = mx.distributed.all_sum(tokens, group=self._group)  # the others contribute zeros
            if head == _HEAD_NONE:
                out = self.local.hidden(tokens, cache)
            else:
                out = self.local(tokens, cache, last_only=head == _HEAD_LAST)
            self.ops.async_eval(out)  # all of it, as the other ranks do: the same collectives in the same order
            return out
        h = self.local.hidden(tokens, cache)
        sent = mx.distributed.send(h, 1, group=self._group)
        if head == _HEAD_NONE:
            self.ops.async_eval(sent)  # the next chunk starts here while the next rank works on this one
            return None
        back = mx.distributed.recv_like(h[:, -1:] if head == _HEAD_LAST else h, self.size - 1, group=self._group)
        return mx.depends(back, sent)

    def forward_batch(self, chunks: list, caches: list, rows: list[int] | None = None):
        """Model.forward_batch over the ranks (the engine's batched step): tensor parallel only, where every rank
        runs the same step over its share of heads and rows. The header says how many sequences and tokens; then
        each sequence's length, cache, cache offset and output rows, and the tokens, go to every rank."""
        if self.plan.mode != "tensor":
            raise UsageError("pipeline-parallel ranks run one sequence per step; batch with --parallel tensor")
        mx = self._mx
        rows = [1] * len(chunks) if rows is None else list(rows)
        with self._lock:
            while self._dropped:
                self._tell(_FREE, 0, 0, 0, 0, 0, self._dropped.pop())
            if any(c not in self._ids for c in caches):
                raise UsageError("this cache was not made by this model's make_cache")
            flat = np.concatenate([np.asarray(c, dtype=np.int32) for c in chunks])
            meta = [len(c) for c in chunks] + [self._ids[c] for c in caches] + [c.offset for c in caches] + rows
            self._tell(_BATCH, len(chunks), int(flat.shape[0]), 0, 0, 0, 0)
            self.ops.async_eval(mx.distributed.all_sum(mx.array(np.asarray(meta, dtype=np.int32)), group=self._group))
            tokens = mx.distributed.all_sum(mx.array(flat[None, :]), group=self._group)
            out = self.local.forward_batch(chunks, caches, rows, tokens=tokens)
            self.ops.async_eval(out if out is not None else [a for c in caches for a in c.state()])
            return out

    def hidden(self, tokens, cache):
        if self.plan.mode == "pipeline":
            return self._step(tokens, cache, _HEAD_ALL)  # the last stage's hidden states
        return self._step(tokens, cache, _HEAD_NONE)

    def fill(self, tokens, cache) -> None:
        self._step(tokens, cache, _HEAD_NONE)

    def head(self, h):
        if self.plan.mode == "tensor":  # every rank holds part of the head: only a whole step can reach them all
            raise UsageError("a tensor-parallel model computes logits in one step: call model(tokens, cache)")
        return self.local.head(h)

    def __call__(self, tokens, cache, last_only: bool = False):
        out = self._step(tokens, cache, _HEAD_LAST if last_only else _HEAD_ALL)
        return out if self.plan.mode == "tensor" else self.local.head(out)

    def close(self) -> None:
        """Release the other ranks (they return from serve_rank0); once, and safe after a failure."""
        if self.closed:
            return
        self.closed = True
        try:
            with self._dog.guard("closing"):
                self._tell(_STOP, 0, 0, 0, 0, 0, 0)
                self.ops.synchronize()
        except DistributedError:
            pass  # a rank is gone already: nothing to release


# -- the other ranks ------------------------------------------------------------------------------------------------

def serve_rank0(shard: Shard, group, watchdog: Watchdog) -> None:
    """Run the forward passes rank 0 announces until it sends stop. Waiting for an announcement is not bounded
    (rank 0 may be idle, e.g. a server between requests); a step, once announced, is."""
    import mlx.core as mx

    model, plan = shard.model, shard.plan
    rank, size = group.rank(), group.size()
    caches = {}
    zeros = mx.zeros((_HEADER,), dtype=mx.int32)
    while True:
        try:
            if plan.mode == "tensor":
                hdr = mx.distributed.all_sum(zeros, group=group)
            else:
                hdr = mx.distributed.recv_like(zeros, rank - 1, group=group)
            mx.eval(hdr)
        except RuntimeError as e:
            raise DistributedError(f"rank {rank}: lost another rank while waiting for rank 0 ({e})") from None
        cmd, B, L, offset, head, max_len, cid = (int(x) for x in np.array(hdr))
        with watchdog.guard(f"running a step for rank 0 (command {cmd})"):
            if plan.mode == "pipeline" and rank + 1 < size:
                mx.async_eval(mx.distributed.send(hdr, rank + 1, group=group))
            if cmd == _STOP:
                mx.synchronize()
                return
            if cmd == _CACHE:
                caches[cid] = model.make_cache(B, max_len or None)
                continue
            if cmd == _FREE:
                caches.pop(cid, None)
                continue
            if cmd == _BATCH:
                _serve_batch(model, group, caches, B, L)
                continue
            cache = caches.get(cid)
            if cmd != _RUN or cache is None:
                raise DistributedError(f"rank {rank}: unexpected message {cmd} (cache {cid}) from rank 0")
            if cache.offset > offset:  # rank 0 trimmed its cache (e.g. rejected draft tokens)
                cache.trim(cache.offset - offset)
            if plan.mode == "tensor":
                tokens = mx.distributed.all_sum(mx.zeros((B, L), dtype=mx.int32), group=group)
                if head == _HEAD_NONE:
                    out = model.hidden(tokens, cache)
                else:
                    out = model(tokens, cache, last_only=head == _HEAD_LAST)
                mx.eval(out)
                continue
            h = mx.distributed.recv((B, L, shard.args.hidden_size), model.ops.float_dtype, rank - 1, group=group)
            h = model.blocks(h, cache)
            if rank + 1 < size:
                mx.eval(mx.distributed.send(h, rank + 1, group=group))
            elif head != _HEAD_NONE:
                mx.eval(mx.distributed.send(h[:, -1:] if head == _HEAD_LAST else h, 0, group=group))
            else:
                mx.eval(*cache.state())


def _serve_batch(model, group, caches: dict, n: int, total: int) -> None:
    """A rank's side of Driver.forward_batch: the same batched step over its share of the model."""
    import mlx.core as mx

    meta = np.array(mx.distributed.all_sum(mx.zeros((4 * n,), dtype=mx.int32), group=group))
    lens, ids, offsets, rows = (meta[i * n:(i + 1) * n].tolist() for i in range(4))
    tokens = mx.distributed.all_sum(mx.zeros((1, total), dtype=mx.int32), group=group)
    cs = []
    for cid, offset in zip(ids, offsets):
        if cid not in caches:
            raise DistributedError(f"rank {group.rank()}: a batched step names cache {cid}, which it does not hold")
        cache = caches[cid]
        if cache.offset > offset:  # rank 0 trimmed it (rejected draft tokens)
            cache.trim(cache.offset - offset)
        cs.append(cache)
    chunks = [[0] * int(k) for k in lens]  # only the lengths are read: the tokens come as one array
    out = model.forward_batch(chunks, cs, rows, tokens=tokens)
    mx.eval(out if out is not None else [a for c in cs for a in c.state()])
