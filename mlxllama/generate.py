"""Prefill and decode: tokenize, run the model, sample, stop, detokenize, time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .cache import CacheSettings
from . import speculative as spec
from .errors import UsageError
from .memory import check_model, kv_bytes, wired_limit
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationResponse:
    text: str  # the text added by this step (may be empty while a UTF-8 character or stop string is pending)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None  # None while generating, then "stop", "length" (max_tokens) or "context" (full)
    prompt_time: float = 0.0  # seconds from the start until the first token was sampled
    # With logprobs=: the chosen token's log-probability under the model (raw logits, before temperature,
    # penalties and processors, as OpenAI's API reports it), and the top ones as (token, logprob), most likely first.
    logprobs: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache (Engine.stream_generate)

LogitsProcessor = Callable[[list, np.ndarray], np.ndarray]  # (token ids so far, logits [vocab]) -> logits


def prompt_tokens(tokenizer, prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
    """A str (optionally wrapped in the chat template), a messages list, or token ids used as given."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + messages
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))  # no double BOS
    if isinstance(prompt, (list, tuple, np.ndarray)):
        ids = [int(t) for t in prompt]
        if not ids:
            raise UsageError("the prompt is empty")
        if any(t < 0 or t >= tokenizer.vocab_size for t in ids):
            raise UsageError(f"prompt token ids must be in [0, {tokenizer.vocab_size})")
        return ids
    if not isinstance(prompt, str):
        raise UsageError(f"prompt must be a str, a list of token ids or a list of messages, not {type(prompt).__name__}")
    if prompt == "":
        raise UsageError("the prompt is empty")
    if chat:
        return prompt_tokens(tokenizer, [{"role": "user", "content": prompt}], system=system)
    return tokenizer.encode(prompt)


class _StopStrings:
    """Holds back text that could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    seed: int | None = None, stop: list[str] | str | None = None, chat: bool | None = None,
                    system: str | None = None, prefill_step_size: int = 512,
                    sampling: SamplingParams | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                    sampler: Callable[[np.ndarray], int] | None = None, logprobs: bool | int = False,
                    prefill_progress: Callable[[int, int], None] | None = None, kv_bits: int | None = None,
                    kv_group_size: int = 64, max_kv_size: int | None = None, speculate: str | None = None,
                    num_draft: int = 8, draft_model=None, response_format: dict | None = None, json_schema=None,
                    grammar: str | None = None) -> Iterator[GenerationResponse]:
    """Generate from a prompt, one GenerationResponse per token.

    Sampling: keyword arguments or `sampling=SamplingParams(...)` (one or the other). logits_processors run on the
    host, in order, on each step's logits (float64 [vocab]) with the token ids so far; `sampler` then picks the token
    from the processed logits instead of the built-in sampler. logprobs: True for the chosen token's log-probability,
    an integer k for the k most likely tokens' too. prefill_progress(done, total) is called as the prompt is
    processed (prompt tokens). kv_bits (8 or 4) quantizes the KV cache; max_kv_size keeps a rotating window of that
    many positions (the first 4 and the latest). Before anything is allocated, the memory need is checked
    (memory.check_model). speculate: "lookup" (prompt n-gram lookup) or "draft" (draft_model: a Model or a
    reference with the same vocabulary) drafts up to num_draft tokens per forward pass; the output follows plain
    decoding exactly (speculative.py). Structured output (constrain.py): response_format (OpenAI's: json_object or
    json_schema), json_schema (a dict or JSON text) or grammar (Lark, llguidance's dialect) constrains the output."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max-tokens must be an integer >= 1, got {max_tokens!r}")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise UsageError("prefill_step_size must be a positive integer")
    loose = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                           repetition_penalty=repetition_penalty, seed=seed)
    if sampling is not None and loose != SamplingParams():
        raise UsageError("pass sampling settings either as sampling=SamplingParams(...) or as keyword arguments, "
                         "not both")
    if isinstance(logprobs, bool):
        top_k_logprobs = 0
    elif isinstance(logprobs, int) and 0 <= logprobs <= 20:
        top_k_logprobs = logprobs
    else:
        raise UsageError(f"logprobs must be true, false or an integer from 0 to 20, got {logprobs!r}")
    chooser = Sampler(sampling or loose)
    if response_format is not None or json_schema is not None or grammar is not None:  # (#23)
        from .constrain import MaskProcessor, make_constraint

        c = make_constraint(tokenizer, model.args.vocab_size, response_format=response_format,
                            json_schema=json_schema, grammar=grammar)
        logits_processors = list(logits_processors) + ([MaskProcessor(c)] if c is not None else [])
    if speculate is not None and (logits_processors or sampler is not None or logprobs is not False):
        raise UsageError("speculative decoding does not combine with logits_processors, sampler or logprobs yet")
    speculation = spec.make_config(speculate, num_draft, draft_model, target_model=model, target_tokenizer=tokenizer)
    ids = prompt_tokens(tokenizer, prompt, chat=chat, system=system)
    if max(ids) >= model.args.vocab_size:
        raise UsageError(f"token id {max(ids)} is outside the model's vocabulary ({model.args.vocab_size} tokens); "
                         "the tokenizer does not match the weights")
    ctx = model.args.max_position_embeddings
    if len(ids) >= ctx:
        raise UsageError(f"the prompt has {len(ids)} tokens but the model's context is {ctx}; shorten it")
    at_limit = "length" if max_tokens <= ctx - len(ids) else "context"
    max_tokens = min(max_tokens, ctx - len(ids))
    settings = CacheSettings(kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size).validate(
        model.args.head_dim)
    check_model(model, len(ids) + max_tokens, 1, settings)
    stops = _StopStrings([stop] if isinstance(stop, str) else list(stop or []))
    eos = set(tokenizer.eos_ids) | set(model.args.eos_token_id)
    ops = model.ops
    start = time.perf_counter()
    steps = _steps(model, ids, max_tokens, chooser, prefill_step_size, logits_processors, sampler,
                   logprobs is not False, prefill_progress, settings, speculation)
    detok = tokenizer.detokenizer()
    prompt_time = gen_start = None
    finish = None
    for n, (token, row) in enumerate(steps, 1):
        now = time.perf_counter()
        if prompt_time is None:
            prompt_time, gen_start = now - start, now
        if token in eos:
            finish = "stop"
            text = detok.finalize()
        else:
            text = detok.add_token(token)
            if n >= max_tokens:
                finish = at_limit
                text += detok.finalize()
        text, hit = stops.feed(text)
        if hit:
            finish = "stop"
        elif finish:
            text += stops.flush()
        elapsed = time.perf_counter() - gen_start
        yield GenerationResponse(
            text=text, token=token, prompt_tokens=len(ids),
            prompt_tps=len(ids) / prompt_time if prompt_time > 0 else float("inf"),
            generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=ops.peak_memory() / 1e9, finish_reason=finish, prompt_time=prompt_time,
            logprobs=None if row is None else float(row[token]),
            top_logprobs=None if row is None or not top_k_logprobs else top_logprobs(row, top_k_logprobs))
        if finish:
            return


def log_softmax(row: np.ndarray) -> np.ndarray:
    """Log-probabilities of one step's logits [vocab], in float64."""
    row = np.asarray(row, dtype=np.float64)
    z = row - row.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens as (token, logprob), most likely first."""
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(t), float(logprobs[t])) for t in best]


def prefill(model, tokens, cache, step: int = 512, progress: Callable[[int, int], None] | None = None):
    """Run tokens [B, n] through the model in chunks of `step`, every position but the last only through the blocks
    (filling the cache), the last also through the output head. Returns the logits of the last position, [B, 1, V].
    Generation, bench and the benchmarks all prefill this way. progress(done, n) before and after each chunk."""
    n = tokens.shape[1]
    if progress is not None:
        progress(0, n)
    for s in range(0, n - 1, step):
        model.fill(tokens[:, s: min(s + step, n - 1)], cache)
        model.ops.eval(*cache.state())
        if progress is not None:
            progress(min(s + step, n - 1), n)
    return model(tokens[:, n - 1:], cache, last_only=True)


def generate_step(model, ids: list[int], max_tokens: int, sampler: Sampler | None = None,
                  prefill_step_size: int = 512, prefill_progress=None,
                  cache_settings: CacheSettings | None = None, speculate: spec.SpeculativeConfig | None = None,
                  stats: spec.SpeculativeStats | None = None) -> Iterator[int]:
    """Prefill the prompt token ids, then yield max_tokens sampled token ids (no stop tokens, no text).
    With `speculate`, decoding goes to speculative.decode (counts in `stats`)."""
    for token, _ in _steps(model, ids, max_tokens, sampler or Sampler(SamplingParams()), prefill_step_size,
                           prefill_progress=prefill_progress, cache_settings=cache_settings, speculate=speculate,
                           stats=stats):
        yield token


def _steps(model, ids: list[int], max_tokens: int, sampler: Sampler, prefill_step_size: int,
           processors: Sequence[LogitsProcessor] = (), custom: Callable | None = None,
           logprobs: bool = False, prefill_progress=None, cache_settings: CacheSettings | None = None,
           speculate=None, stats=None) -> Iterator[tuple[int, np.ndarray | None]]:
    """(token, log-probabilities [vocab] or None) per step.

    With greedy sampling and nothing else asking for the logits, the token is chosen on the device (argmax), and
    where the backend is lazy (MLX) the next step is queued (async_eval) before the current token is read back, so
    the host waits only for that one integer per token.
    """
    ops = model.ops
    argmax_on_device = not (sampler.p.needs_host_logits or processors or custom or logprobs)
    pipelined = argmax_on_device and ops.lazy
    history = list(ids)

    def pick(logits):
        last = logits[:, -1, :]
        if argmax_on_device:
            return ops.argmax(last), None
        row = ops.to_numpy(last)[0].astype(np.float64)
        lp = log_softmax(row) if logprobs else None
        for process in processors:
            row = np.asarray(process(history, row), dtype=np.float64)
        return int(custom(row) if custom else sampler(row, history)), lp

    length = min(model.args.max_position_embeddings, len(ids) + max_tokens)
    cache = model.make_cache(1, max_len=length, settings=cache_settings)
    with wired_limit(model, kv_bytes(model.args, length, 1, ops.kv_bytes, cache_settings)):
        if speculate is not None:
            first = prefill(model, np.asarray(ids, dtype=np.int64)[None, :], cache, prefill_step_size,
                            prefill_progress)
            for token in spec.decode(model, cache, first, ids, max_tokens, sampler, speculate,
                                     prefill=lambda m, t, c: prefill(m, t, c, prefill_step_size), stats=stats):
                yield token, None
            return
        yield from _decode(model, cache, ids, max_tokens, pick, pipelined, history, prefill_step_size,
                           prefill_progress)


def _decode(model, cache, ids, max_tokens, pick, pipelined, history, prefill_step_size, prefill_progress):
    ops = model.ops
    y, lp = pick(prefill(model, np.asarray(ids, dtype=np.int64)[None, :], cache, prefill_step_size,
                         prefill_progress))
    if pipelined:
        ops.async_eval(y)
    for n in range(max_tokens):
        nxt = None
        if pipelined and n + 1 < max_tokens:
            nxt, _ = pick(model(ops.asarray(y).reshape(1, 1), cache, last_only=True))
            ops.async_eval(nxt)
        token = y if isinstance(y, int) else int(ops.to_numpy(y).reshape(-1)[0])
        history.append(token)
        yield token, lp
        if n + 1 < max_tokens:
            if nxt is not None:
                y = nxt
            else:
                y, lp = pick(model(np.asarray([[token]], dtype=np.int64), cache, last_only=True))


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    text = []
    last = None
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text.append(r.text)
        last = r
        if verbose:
            print(r.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return "".join(text)


def format_stats(r: GenerationResponse) -> str:
    return (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {r.peak_memory:.3f} GB")
