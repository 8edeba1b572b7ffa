"""Prefill and decode: tokenize, run the model, sample, stop, detokenize, time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import speculative as spec
from .errors import UsageError
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
    finish_reason: str | None  # None while generating, then "stop", "length" or "interrupted"
    prompt_time: float = 0.0  # seconds from the start until the first token was sampled


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
                    sampling: SamplingParams | None = None, speculate: str | None = None, num_draft: int = 8,
                    draft_model=None) -> Iterator[GenerationResponse]:
    """speculate: "lookup" (prompt n-gram lookup) or "draft" (draft_model: a Model or a reference with the same
    vocabulary) drafts up to num_draft tokens per forward pass; the output follows plain decoding exactly
    (speculative.py)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max-tokens must be an integer >= 1, got {max_tokens!r}")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise UsageError("prefill_step_size must be a positive integer")
    loose = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                           repetition_penalty=repetition_penalty, seed=seed)
    if sampling is not None and loose != SamplingParams():
        raise UsageError("pass sampling settings either as sampling=SamplingParams(...) or as keyword arguments, "
                         "not both")
    sampler = Sampler(sampling or loose)
    speculation = spec.make_config(speculate, num_draft, draft_model, target_model=model, target_tokenizer=tokenizer)
    ids = prompt_tokens(tokenizer, prompt, chat=chat, system=system)
    if max(ids) >= model.args.vocab_size:
        raise UsageError(f"token id {max(ids)} is outside the model's vocabulary ({model.args.vocab_size} tokens); "
                         "the tokenizer does not match the weights")
    ctx = model.args.max_position_embeddings
    if len(ids) >= ctx:
        raise UsageError(f"the prompt has {len(ids)} tokens but the model's context is {ctx}; shorten it")
    max_tokens = min(max_tokens, ctx - len(ids))
    stops = _StopStrings([stop] if isinstance(stop, str) else list(stop or []))
    eos = set(tokenizer.eos_ids) | set(model.args.eos_token_id)
    ops = model.ops
    start = time.perf_counter()
    steps = generate_step(model, ids, max_tokens, sampler=sampler, prefill_step_size=prefill_step_size,
                          speculate=speculation)
    detok = tokenizer.detokenizer()
    prompt_time = gen_start = None
    finish = None
    for n, token in enumerate(steps, 1):
        now = time.perf_counter()
        if prompt_time is None:
            prompt_time, gen_start = now - start, now
        if token in eos:
            finish = "stop"
            text = detok.finalize()
        else:
            text = detok.add_token(token)
            if n >= max_tokens:
                finish = "length"
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
            peak_memory=ops.peak_memory() / 1e9, finish_reason=finish, prompt_time=prompt_time)
        if finish:
            return


def prefill(model, tokens, cache, step: int = 512):
    """Run tokens [B, n] through the model in chunks of `step`, every position but the last only through the blocks
    (filling the cache), the last also through the output head. Returns the logits of the last position, [B, 1, V].
    Generation, bench and the benchmarks all prefill this way."""
    n = tokens.shape[1]
    for s in range(0, n - 1, step):
        model.hidden(tokens[:, s: min(s + step, n - 1)], cache)
        model.ops.eval(*cache.state())
    return model(tokens[:, n - 1:], cache, last_only=True)


def generate_step(model, ids: list[int], max_tokens: int, sampler: Sampler | None = None,
                  prefill_step_size: int = 512, speculate: spec.SpeculativeConfig | None = None,
                  stats: spec.SpeculativeStats | None = None) -> Iterator[int]:
    """Prefill the prompt token ids, then yield max_tokens sampled token ids (no stop tokens, no text).
    With `speculate`, decoding goes to speculative.decode (counts in `stats`).

    With greedy sampling the token is chosen on the device (argmax), and where the backend is lazy (MLX) the next
    step is queued (async_eval) before the current token is read back, so the host waits only for that one integer
    per token.
    """
    sampler = sampler or Sampler(SamplingParams())
    ops = model.ops
    argmax_on_device = not sampler.p.needs_host_logits
    pipelined = argmax_on_device and ops.lazy
    history = list(ids)

    def pick(logits):
        last = logits[:, -1, :]
        if argmax_on_device:
            return ops.argmax(last)
        return int(sampler(ops.to_numpy(last)[0], history))

    cache = model.make_cache(1, max_len=min(model.args.max_position_embeddings, len(ids) + max_tokens))
    if speculate is not None:
        yield from spec.decode(model, cache, prefill(model, np.asarray(ids, dtype=np.int64)[None, :], cache,
                                                     prefill_step_size),
                               ids, max_tokens, sampler, speculate,
                               prefill=lambda m, t, c: prefill(m, t, c, prefill_step_size), stats=stats)
        return
    y = pick(prefill(model, np.asarray(ids, dtype=np.int64)[None, :], cache, prefill_step_size))
    if pipelined:
        ops.async_eval(y)
    for n in range(max_tokens):
        nxt = None
        if pipelined and n + 1 < max_tokens:
            nxt = pick(model(ops.asarray(y).reshape(1, 1), cache, last_only=True))
            ops.async_eval(nxt)
        token = y if isinstance(y, int) else int(ops.to_numpy(y).reshape(-1)[0])
        history.append(token)
        yield token
        if n + 1 < max_tokens:
            y = nxt if nxt is not None else pick(model(np.asarray([[token]], dtype=np.int64), cache, last_only=True))


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
