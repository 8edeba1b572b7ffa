"""One request, or a few, through the engine: stream_generate, generate, generate_step and batch_generate are thin
wrappers that tokenize, submit to an Engine (engine.py) stepped here (no thread), and shape its events."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from . import speculative as spec
from .cache import CacheSettings
from .engine import GenerationResponse, prompt_tokens  # noqa: F401  (re-exported)
from .engine import Engine, RequestParams, raise_for, responses
from .errors import UsageError
from .finish import StopStrings  # noqa: F401  (re-exported)
from .logits import LogitsProcessor, log_softmax, top_logprobs  # noqa: F401  (re-exported)
from .memory import check_model, kv_bytes, wired_limit
from .model import prefill  # noqa: F401  (re-exported)
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    seed: int | None = None, stop: list[str] | str | None = None, chat: bool | None = None,
                    system: str | None = None, prefill_step_size: int = 512,
                    sampling: SamplingParams | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                    sampler: Callable[[np.ndarray], int] | None = None, logprobs: bool | int = False,
                    prefill_progress: Callable[[int, int], None] | None = None, kv_bits: int | None = None,
                    kv_group_size: int = 64, max_kv_size: int | None = None, kv_dtype: str | None = None,
                    speculate: str | None = None,
                    num_draft: int = 8, draft_model=None, constraint=None, logit_bias: dict | None = None,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    engine: Engine | None = None, response_format: dict | None = None, json_schema=None,
                    grammar: str | None = None) -> Iterator[GenerationResponse]:
    """Generate from a prompt, one GenerationResponse per token, through the engine (a batch of one).

    Sampling: keyword arguments or `sampling=SamplingParams(...)` (one or the other). The logits pipeline
    (logits.py) applies, in order, the repetition penalty, frequency/presence penalties, logit_bias, the
    logits_processors (host callables (token ids so far, logits float64 [vocab]) -> logits), the constraint's mask
    (logits.Constraint, or a zero-argument factory of one); `sampler` then picks the token from the processed
    logits instead of the built-in sampler. logprobs: True for the chosen token's log-probability, an integer k for
    the k most likely tokens' too. prefill_progress(done, total) is called as the prompt is processed. kv_bits (8
    or 4) quantizes the KV cache; max_kv_size keeps a rotating window of that many positions (the first 4 and the
    latest); they combine. kv_dtype "float16" keeps a float cache as float16 (half the bytes). Before anything is allocated, the memory need is checked (memory.check_model).
    speculate: "lookup" (prompt n-gram lookup) or "draft" (draft_model: a Model or a reference with the same
    vocabulary) drafts up to num_draft tokens per forward pass; greedy output is the plain output exactly, and
    everything above composes with it (engine.py says what a seed guarantees). engine: an Engine kept across calls
    (its prefix cache, cache kind and speculation apply; the cache and speculation arguments must be left out).
    Structured output (constrain.py): response_format (OpenAI's: json_object or json_schema), json_schema (a dict or
    JSON text) or grammar (Lark, llguidance's dialect) becomes the constraint."""
    params, ids = _request(model, tokenizer, prompt, max_tokens, locals())
    if engine is not None:
        yield from responses(engine, ids, params)
        return
    speculation = spec.make_config(speculate, num_draft, draft_model, target_model=model, target_tokenizer=tokenizer)
    settings = CacheSettings(kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size,
                             kv_dtype=kv_dtype).validate(
        model.args.head_dim)
    length = min(model.args.max_position_embeddings, len(ids) + params.max_tokens)
    check_model(model, length, 1, settings)
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1, prefill_step=prefill_step_size,
                    make_cache=lambda n: model.make_cache(1, max_len=n, settings=settings), speculate=speculation)
    with wired_limit(model, kv_bytes(model.args, length, 1, model.ops, settings)):
        yield from responses(engine, ids, params)


def _request(model, tokenizer, prompt, max_tokens: int, a: dict) -> tuple[RequestParams, list[int]]:
    """stream_generate's arguments as checked RequestParams and prompt token ids."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max-tokens must be an integer >= 1, got {max_tokens!r}")
    if not isinstance(a["prefill_step_size"], int) or a["prefill_step_size"] < 1:
        raise UsageError("prefill_step_size must be a positive integer")
    loose = SamplingParams(temperature=a["temperature"], top_p=a["top_p"], top_k=a["top_k"], min_p=a["min_p"],
                           repetition_penalty=a["repetition_penalty"], seed=a["seed"])
    if a["sampling"] is not None and loose != SamplingParams():
        raise UsageError("pass sampling settings either as sampling=SamplingParams(...) or as keyword arguments, "
                         "not both")
    logprobs = a["logprobs"]
    if not isinstance(logprobs, bool) and not (isinstance(logprobs, int) and 0 <= logprobs <= 20):
        raise UsageError(f"logprobs must be true, false or an integer from 0 to 20, got {logprobs!r}")
    ids = prompt_tokens(tokenizer, prompt, chat=a["chat"], system=a["system"])
    if max(ids) >= model.args.vocab_size:
        raise UsageError(f"token id {max(ids)} is outside the model's vocabulary ({model.args.vocab_size} tokens); "
                         "the tokenizer does not match the weights")
    ctx = model.args.max_position_embeddings
    if len(ids) >= ctx:
        raise UsageError(f"the prompt has {len(ids)} tokens but the model's context is {ctx}; shorten it")
    stop = a["stop"]
    constraint = a["constraint"]
    if a["response_format"] is not None or a["json_schema"] is not None or a["grammar"] is not None:
        if constraint is not None:
            raise UsageError("pass either constraint= or response_format/json_schema/grammar, not both")
        from .constrain import constraint_factory

        constraint = constraint_factory(tokenizer, model.args.vocab_size, response_format=a["response_format"],
                                        json_schema=a["json_schema"], grammar=a["grammar"])
    params = RequestParams(
        max_tokens=max_tokens, sampling=(a["sampling"] or loose).validate(),
        stop=[stop] if isinstance(stop, str) else list(stop or []), logprobs=logprobs is not False,
        top_logprobs=0 if isinstance(logprobs, bool) else logprobs, logit_bias=a["logit_bias"],
        frequency_penalty=a["frequency_penalty"], presence_penalty=a["presence_penalty"],
        logits_processors=list(a["logits_processors"]), sampler=a["sampler"],
        constraint=constraint,  # an object or a factory: the engine makes one per request (Engine._setup)
        prefill_progress=a["prefill_progress"])
    return params.validate(), ids


def generate_step(model, ids: list[int], max_tokens: int, sampler: Sampler | None = None,
                  prefill_step_size: int = 512, prefill_progress=None,
                  cache_settings: CacheSettings | None = None, speculate: spec.SpeculativeConfig | None = None,
                  stats: spec.SpeculativeStats | None = None) -> Iterator[int]:
    """Prefill the prompt token ids, then yield max_tokens chosen token ids (no stop tokens, no text), through the
    engine. sampler: a Sampler whose random state carries on across calls (so a seeded one speculates too: its draws
    follow the plain distribution, not the plain draws). With `speculate`, its counts go to `stats`."""
    engine = Engine(model, None, max_batch=1, max_queue=1, prefill_step=prefill_step_size,
                    make_cache=lambda n: model.make_cache(1, max_len=n, settings=cache_settings), speculate=speculate)
    if stats is not None:
        engine.spec_stats = stats
    params = RequestParams(max_tokens=max_tokens, sampling=sampler if sampler is not None else SamplingParams(),
                           ignore_eos=True, prefill_progress=prefill_progress)
    for ev in engine.submit(list(ids), params):
        raise_for(ev)
        if ev.token is not None:
            yield ev.token


@dataclass
class BatchResponse:
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    generation_tokens: list[int]
    seconds: float

    @property
    def generation_tps(self) -> float:
        return sum(self.generation_tokens) / self.seconds if self.seconds > 0 else 0.0


def batch_generate(model, tokenizer, prompts: list, max_tokens: int = 256, *, sampling=None,
                   stop: list[str] | str | None = None, chat: bool | None = None, system: str | None = None,
                   max_batch: int = 16, prefill_chunk: int = 64, prefix_cache_bytes: int = 0,
                   constraint=None, logit_bias: dict | None = None) -> BatchResponse:
    """Generate for several prompts at once on one Engine: each prompt a str, a messages list or token ids.
    sampling: one SamplingParams for all, or one per prompt (each with its own seed). constraint: a zero-argument
    factory (one constraint per prompt) or a list of constraints. Returns texts in order."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UsageError("prompts must be a non-empty list")
    per = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per) != len(prompts):
        raise UsageError(f"{len(per)} sampling settings for {len(prompts)} prompts")
    cons = list(constraint) if isinstance(constraint, (list, tuple)) else [
        constraint() if constraint is not None else None for _ in prompts]
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=len(prompts), prefill_chunk=prefill_chunk,
                    prefix_cache=PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None)
    ids = [prompt_tokens(tokenizer, p, chat=chat, system=system) for p in prompts]
    start = time.perf_counter()
    handles = [engine.submit(i, RequestParams(max_tokens=max_tokens, sampling=sp or SamplingParams(), stop=stops,
                                              constraint=c, logit_bias=logit_bias))
               for i, sp, c in zip(ids, per, cons)]
    texts = [[] for _ in prompts]
    finish: list = [None] * len(prompts)
    gen = [0] * len(prompts)
    while True:
        more = engine.step()
        for j, h in enumerate(handles):
            for ev in h.poll():
                raise_for(ev, f"prompt {j}: ")
                texts[j].append(ev.text)
                gen[j] = ev.completion_tokens
                finish[j] = ev.finish_reason or finish[j]
        if not more:
            break
    return BatchResponse(["".join(t) for t in texts], finish, [len(i) for i in ids], gen,
                         time.perf_counter() - start)


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
