"""Speculative decoding measured in roofline terms: acceptance rate, tokens per target forward pass, tok/s and the
effective bandwidth score (tok/s x bytes a plain decode step reads / bandwidth), which can exceed 1.0, since one
read of the weights serves several tokens. The task prompts are real shapes: quoting, a code rewrite, a summary
(strong for prompt lookup) and a free-form question (the hard case)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import loaders
from ..api import resolve
from ..generate import generate_step, prompt_tokens
from ..model import Model
from ..sampling import Sampler, SamplingParams
from ..speculative import SpeculativeConfig, SpeculativeStats, check_vocabulary
from . import hardware, probe, roofline
from .run import resident_weights

PASSAGE = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great civil "
    "war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We are met on "
    "a great battle-field of that war. We have come to dedicate a portion of that field, as a final resting place "
    "for those who here gave their lives that that nation might live. It is altogether fitting and proper that we "
    "should do this.")

FUNCTION = '''def moving_average(values, window):
    """Return the moving averages of values over a sliding window of the given size."""
    if window <= 0:
        raise ValueError("window must be positive")
    if len(values) < window:
        return []
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''

TEXT = (
    "Large language models generate text one token at a time. For every token, the processor must read all of the "
    "model's weights from memory, so at batch size one the speed is set by memory bandwidth rather than by "
    "arithmetic: a model of four gigabytes on a machine with one hundred gigabytes per second of bandwidth cannot "
    "produce more than about twenty-five tokens per second. Processing a prompt is different, because many tokens "
    "share each read of the weights, and the work becomes limited by compute instead. Speculative decoding uses "
    "the same trick during generation: a cheap guess proposes several tokens, and the model checks all of them in "
    "one pass, keeping the ones it agrees with.")

TASKS: dict[str, str] = {
    "quote": "Continue the quotation from the passage below, word for word.\n\nPassage: " + PASSAGE +
             "\n\nQuotation: \"Four score and seven years ago our fathers brought forth",
    "code": "Rewrite this function so that it raises TypeError instead of ValueError. Keep everything else "
            "exactly the same.\n\n```python\n" + FUNCTION + "```",
    "summary": "Summarize the following text in a few sentences, using its own words:\n\n" + TEXT,
    "free": "Why is the sky blue? Explain it to a curious ten-year-old.",
}


@dataclass
class SpecRun:
    task: str
    mode: str  # "plain", "lookup", "draft"
    tokens: list
    tps: float  # generated tokens per second after the first (prefill excluded), as generation_tps
    stats: SpeculativeStats

    def row(self, bytes_per_token: float, bandwidth_gbps: float | None) -> dict:
        s = self.stats
        return dict(task=self.task, mode=self.mode, n_gen=len(self.tokens), tps=self.tps,
                    acceptance=s.acceptance_rate if self.mode != "plain" and s.drafted else None,
                    tokens_per_forward=s.tokens_per_forward if s.forwards else 1.0,
                    score=roofline.bandwidth_score(bytes_per_token, self.tps, bandwidth_gbps) if bandwidth_gbps
                    else None)


def task_ids(tokenizer, task: str) -> list[int]:
    return prompt_tokens(tokenizer, TASKS[task], chat=tokenizer.chat_template is not None)


def timed_generation(model, ids: list[int], n_gen: int, eos: set, config: SpeculativeConfig | None,
                     task: str = "", mode: str = "plain") -> SpecRun:
    """Greedy generation of at most n_gen tokens, stopping at an end token; timed from the first token on."""
    stats = SpeculativeStats()
    out, t_first = [], None
    for t in generate_step(model, ids, n_gen, sampler=Sampler(SamplingParams()), speculate=config, stats=stats):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(t)
        if t in eos:
            break
    elapsed = time.perf_counter() - t_first
    if config is None:
        stats.forwards = stats.tokens = len(out) - 1
    return SpecRun(task, mode, out, (len(out) - 1) / elapsed if elapsed > 0 and len(out) > 1 else 0.0, stats)


def verification_costs(model, ids: list[int], rows=(1, 2, 3, 4, 5, 9, 13, 17), reps: int = 5) -> dict[int, float]:
    """Seconds of one target forward pass scoring r positions (all r through the output head, as the verifier
    does; r = 1 is a plain decode step) after the prompt ids, the best of `reps`, the row counts interleaved."""
    from ..generate import prefill

    ops = model.ops
    cache = model.make_cache(1, max_len=len(ids) + max(rows))
    prefill(model, np.asarray([ids], dtype=np.int64), cache)
    best = {r: float("inf") for r in rows}
    for _ in range(reps + 1):  # the first round warms up
        for r in rows:
            t0 = time.perf_counter()
            out = model(np.asarray([ids[-r:]], dtype=np.int64), cache, last_only=r == 1)
            ops.to_numpy(ops.argmax(out[0]))
            best[r] = min(best[r], time.perf_counter() - t0)
            cache.trim(r)
    return best


def format_costs(costs: dict[int, float]) -> str:
    base = costs[1]
    return "\n".join(["| rows scored | ms | x one decode step |", "|---|---|---|"] +
                     [f"| {r} | {t * 1e3:.1f} | {t / base:.2f} |" for r, t in costs.items()])


def load_for_bench(ref, ops):
    """(Model, tokenizer, the roofline accounting of what the backend reads per token)."""
    path = resolve(ref)
    args, weights, tokenizer = loaders.load(path)
    acc = roofline.account_weights(args, resident_weights(weights, ops), kv_bytes=ops.kv_bytes)
    return Model(args, weights, ops, release=True), tokenizer, acc


def bandwidth_for(ops, bandwidth_gbps: float | None = None, chip=None) -> tuple[float, str]:
    """The bandwidth scores are against: given, the chip's rating, else this machine's measured read bandwidth."""
    if bandwidth_gbps:
        return bandwidth_gbps, "given"
    chip = chip or hardware.chip_for_device(hardware.detect(), "gpu" if ops.on_gpu else "cpu")
    if chip is not None and chip.bandwidth_gbps:
        return chip.bandwidth_gbps, f"rated, {chip.name}"
    return probe.probe(ops.name).read_gbps, "measured read"


def run(*, model: str | None, backend: str, modes: list[str], n_gen: int, num_draft: int = 8,
        draft_model: str | None = None, tasks: list[str] | None = None, bandwidth_gbps: float | None = None,
        chip=None, repetitions: int = 1) -> tuple[list[dict], str]:
    """Plain and speculative greedy decoding of each task; rows with tok/s, acceptance, tokens per forward and
    the effective score (the median of `repetitions` runs each). Returns (rows, what the bandwidth is, the
    verification costs per row count)."""
    from .. import backends
    from ..errors import UsageError

    if "draft" in modes and not draft_model:
        raise UsageError("--speculate draft needs --draft-model")
    ops = backends.get_ops(backend)
    target, tok, acc = load_for_bench(model or "default", ops)
    draft = None
    if "draft" in modes:
        draft, draft_tok, _ = load_for_bench(draft_model, ops)
        check_vocabulary(tok, draft_tok, target.args, draft.args, name=f"draft model {draft_model}")
    bw, bw_what = bandwidth_for(ops, bandwidth_gbps, chip)
    eos = set(tok.eos_ids) | set(target.args.eos_token_id)
    rows = []
    for task in tasks or list(TASKS):
        ids = task_ids(tok, task)
        if len(ids) + n_gen > target.args.max_position_embeddings:
            raise UsageError(f"the {task} prompt has {len(ids)} tokens: with {n_gen} more it outgrows the model's "
                             f"context ({target.args.max_position_embeddings})")
        for mode in ["plain"] + [m for m in modes if m != "plain"]:
            config = None if mode == "plain" else SpeculativeConfig(mode, num_draft, draft_model=draft
                                                                    if mode == "draft" else None)
            timed_generation(target, ids, min(n_gen, 8), eos, config, task, mode)  # warm-up: first shapes, threads
            runs = [timed_generation(target, ids, n_gen, eos, config, task, mode) for _ in range(repetitions)]
            mid = sorted(runs, key=lambda r: r.tps)[len(runs) // 2]
            ctx = len(ids) + len(mid.tokens) / 2
            rows.append(mid.row(acc.bytes_per_token(ctx), bw))
    costs = verification_costs(target, task_ids(tok, (tasks or list(TASKS))[0]), reps=max(2, repetitions))
    return rows, f"{bw:.1f} GB/s ({bw_what})", costs


def run_cli(*, models: list[str], backend: str, speculate: str, n_gen: int, num_draft: int,
            draft_model: str | None, repetitions: int, bandwidth_gbps: float | None, chip) -> str:
    """`mlxllama bench --speculate`: the table and the bandwidth it is scored against."""
    from ..errors import UsageError
    from ..speculative import check_options

    check_options(speculate, num_draft, draft_model is not None)
    if len(models) > 1:
        raise UsageError("--speculate measures one model at a time")
    rows, bw, costs = run(model=models[0] if models else None, backend=backend, modes=[speculate], n_gen=n_gen,
                   num_draft=num_draft, draft_model=draft_model, bandwidth_gbps=bandwidth_gbps, chip=chip,
                   repetitions=repetitions)
    return (format_rows(rows) + f"\n\neffective score: tok/s x bytes a plain decode step reads / {bw}; "
            "above 1.0 is past the batch-1 roofline\n\nverification cost (one forward pass):\n\n" + format_costs(costs))


def format_rows(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    """A markdown table; speed-up is each row's tok/s over its task's plain row."""
    plain = {r["task"]: r["tps"] for r in rows if r["mode"] == "plain"}
    cols = ("task", "mode", "tokens", "tok/s", "x plain", "accept", "tok/fwd", "eff. score") + extra
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        base = plain.get(r["task"])
        cells = [r["task"], r["mode"], str(r["n_gen"]), f"{r['tps']:.1f}",
                 f"{r['tps'] / base:.2f}" if base else "-",
                 "-" if r.get("acceptance") is None else f"{r['acceptance']:.2f}",
                 "-" if r.get("tokens_per_forward") is None else f"{r['tokens_per_forward']:.2f}",
                 "-" if r.get("score") is None else f"{r['score']:.2f}"] + [str(r.get(c, "")) for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

