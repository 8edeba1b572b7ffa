"""`mlxllama serve`: the OpenAI-compatible server (mlxllama/server/app.py). Options map one to one onto ServeConfig."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

from mlxllama.errors import UsageError
from mlxllama_cli.options import KV_DTYPE_HELP


def _check(positive: dict, ctx, prefix_cache_bytes: int, shutdown_timeout: float, sampling: dict) -> None:
    """Options a user can get wrong, as one UsageError line."""
    from mlxllama.sampling import SamplingParams

    for key, v in positive.items():
        name = "--" + key.replace("_", "-")
        if v < 1 or (key == "port" and v > 65535):
            raise UsageError(f"{name} must be a positive integer{' up to 65535' if key == 'port' else ''}")
    if ctx is not None and ctx < 2:
        raise UsageError("--ctx must be an integer >= 2")
    if prefix_cache_bytes < 0 or shutdown_timeout < 0:
        raise UsageError("--prefix-cache-bytes and --shutdown-timeout must be >= 0")
    SamplingParams(**{k: v for k, v in sampling.items() if v is not None}).validate()


SERVE_HELP = """Serve a model over an OpenAI-compatible HTTP API, batching concurrent requests.

Examples:

\b
  mlxllama serve -m default --port 8080 --max-batch 8
  mlxllama serve -m default --speculate lookup --num-draft 8
  mlxllama serve -m default --any-model --temp 0.7 --max-tokens 512

Before the KV caches are allocated, the memory for --max-batch sequences of --ctx tokens is checked; where it
does not fit, serve exits with one line that gives the numbers. The prefix cache (--prefix-cache-bytes) keeps
every cache kind as stored.

Requests that leave sampling out get the model's generation_config.json values, else llama.cpp's (temp 0.8,
top-k 40, top-p 0.95, min-p 0.05); --temp, --top-p, --top-k and --min-p set them. Start-up prints them, and
/v1/models lists them.
"""

NUMPY_WEIGHTS_HELP = ("numpy backend only: auto, fused (4/8-bit weights as stored, fastest decode; needs numba), "
                      "float32 or quantized; default: $MLXLLAMA_NUMPY_WEIGHTS or auto.")


def serve(
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Model: a folder, a .gguf file, an HF repo id or "
                                                                     "'default'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the "
                                                         "network (then set --api-key)."),
    port: int = typer.Option(8080, "--port"),
    max_batch: int = typer.Option(8, "--max-batch", help="Most sequences decoding at once."),
    max_queue: int = typer.Option(64, "--max-queue", help="Most requests waiting for a batch slot; more get 429."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' "
                                                                   "(default: $MLXLLAMA_API_KEY)."),
    prefix_cache_bytes: int = typer.Option(512 << 20, "--prefix-cache-bytes", help="Byte budget of the prefix "
                                                                                   "cache (KV of seen prompts); 0 "
                                                                                   "turns it off."),
    prefill_chunk: int = typer.Option(32, "--prefill-chunk", help="Most prompt tokens per step while other "
                                                                  "sequences decode (bounds their stall)."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Model name in /v1/models (default: the "
                                                                    "file's or folder's name). Requests may name "
                                                                    "it, or -m as given, or the file."),
    any_model: bool = typer.Option(False, "--any-model", help="Answer requests whatever model name they give (as "
                                                              "llama-server does), for apps with a name built in."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Default temperature for requests that give none."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Default top-p for requests that give none."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Default top-k for requests that give none."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Default min-p for requests that give none."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Most tokens generated for a request that gives no "
                                                              "max_tokens (capped by the context)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One line on stderr per request: "
                                                                               "status, seconds, tokens."),
    max_body_bytes: int = typer.Option(8 << 20, "--max-body-bytes", help="Largest request body accepted."),
    shutdown_timeout: float = typer.Option(30.0, "--shutdown-timeout", help="Seconds in-flight requests get to "
                                                                            "finish on SIGTERM."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Most tokens per sequence, prompt and reply (default: the "
                                                         "model's context); the fit check counts --max-batch of "
                                                         "them."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize each sequence's KV cache to 8 or 4 "
                                                                  "bits (the prefix cache keeps it as stored)."),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="Group size of --kv-bits: 32, 64 or 128."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="Keep at most N positions per sequence: "
                                                                         "the first 4 and the latest (a rotating "
                                                                         "window; combines with --kv-bits)."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_DTYPE_HELP),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="lookup (n-gram from each prompt and reply) "
                                            "or draft (--draft-model): each greedy or sampled stream verifies up "
                                            "to --num-draft tokens per forward pass, same output; batching stays "
                                            "on."),
    num_draft: int = typer.Option(8, "--num-draft", help="Most tokens drafted per forward pass (with --speculate)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model with the same vocabulary "
                                              "(--speculate draft)."),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy"),
    revision: Optional[str] = typer.Option(None, "--revision"),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help=NUMPY_WEIGHTS_HELP),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="Spread the model over mlx.launch's ranks: "
                                           "tensor or pipeline; rank 0 serves and batches over them (no prefix "
                                           "cache then). E.g. mlx.launch --hosts ip0,ip1 -- mlxllama serve -m M "
                                           "--parallel tensor"),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Run a few throwaway tokens before taking "
                                "requests, so that the first request does not wait for kernels to compile "
                                "(as llama-server's warm-up)."),
):
    """The server; its help is SERVE_HELP (the command's --help)."""
    from mlxllama.server.app import ServeConfig, run

    sampling = {"temperature": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    positive = dict(port=port, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    max_body_bytes=max_body_bytes, max_tokens=max_tokens)
    _check(positive, ctx, prefix_cache_bytes, shutdown_timeout, sampling)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    run(ServeConfig(model=model, host=host, port=port, backend=backend, revision=revision,
                    numpy_weights=numpy_weights, model_id=model_id, max_batch=max_batch, max_queue=max_queue,
                    prefill_chunk=prefill_chunk, prefix_cache_bytes=prefix_cache_bytes,
                    api_key=api_key or os.environ.get("MLXLLAMA_API_KEY") or None, max_body_bytes=max_body_bytes,
                    shutdown_timeout=shutdown_timeout, ctx=ctx, kv_bits=kv_bits, kv_group_size=kv_group_size,
                    max_kv_size=max_kv_size, kv_dtype=kv_dtype, speculate=speculate, num_draft=num_draft,
                    draft_model=draft_model, any_model=any_model, max_tokens=max_tokens, sampling=sampling,
                    access_log=access_log, parallel=parallel, warmup=warmup))
