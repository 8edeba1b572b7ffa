"""`mlxllama fit` (will a model fit in memory) and `mlxllama perplexity` (quality: perplexity and KL divergence)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlxllama.errors import UsageError
from mlxllama_cli.options import KV_DTYPE_HELP

MODEL_HELP = "Model: a local HF/MLX folder, a .gguf file, an HF repo id, or 'default'."


def memory_lines(args, weights, ops, ctx: int, batch: int, settings, chip=None) -> tuple[list[str], bool]:
    """The memory line(s) for a model's loader tensors (nothing laid out yet) on this device or on each memory
    size of `chip`; and whether it fits (on some size of the chip)."""
    from mlxllama import memory
    from mlxllama.bench.chips import memory_sizes_gb

    need = memory.backend_need(args, memory.weights_resident(weights, ops), ctx, batch, ops, settings)
    devices = memory.chip_memories(chip, memory_sizes_gb(chip)) if chip is not None else [memory.device_memory(ops)]
    if not devices:
        raise UsageError(f"the chip table has no memory sizes for {chip.name}")
    lines = [memory.fit_line(need, d, args) for d in devices]
    return lines, any(memory.fits(need, d) for d in devices)


def _ops_for(chip, backend: str = "auto", numpy_weights=None):
    """The backend whose layout the check assumes: with a chip, MLX in float16 as on that chip's GPU."""
    from mlxllama import backends

    if chip is not None and backend in ("auto", "mlx"):
        import mlx.core as mx
        from mlxllama.backends.mlx_ops import MLXOps

        return MLXOps(dtype=mx.float16)
    return backends.get_ops(backend, numpy_weights=numpy_weights)


def estimate_memory_lines(args, weights, ctx: int, chip=None) -> list[str]:
    from mlxllama.cache import CacheSettings

    return memory_lines(args, weights, _ops_for(chip), ctx, 1, CacheSettings(), chip)[0]


def fit(
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context to hold in the KV cache (default: the model's)."),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together (each with its own KV cache)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="8 or 4: a quantized KV cache."),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="Group size of --kv-bits."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="A rotating KV window of N positions."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_DTYPE_HELP),
    chip: Optional[str] = typer.Option(None, "--chip", help="Check against each memory size of a chip from the table "
                                                            "(e.g. 'M2 Max') instead of this machine."),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy: how the weights will be held."),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help="numpy: float32 or quantized."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Check whether a model, its KV cache and activations fit in memory, without allocating them; exit 2 if not.

    Examples:

      mlxllama fit -m default --ctx 8192

      mlxllama fit -m ./Llama-3-8B-4bit --ctx 32768 --kv-bits 4 --chip "M2 Max"
    """
    from mlxllama import api
    from mlxllama.bench.chips import lookup
    from mlxllama.cache import CacheSettings

    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    the_chip = lookup(chip) if chip else None
    ops = _ops_for(the_chip, backend, numpy_weights)
    args, weights, _ = api.load_weights(model)
    if ctx is None:
        ctx = args.max_position_embeddings
    if ctx < 1:
        raise UsageError(f"--ctx must be at least 1, got {ctx}")
    settings = CacheSettings(kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size,
                             kv_dtype=kv_dtype).validate(args.head_dim)
    lines, ok = memory_lines(args, weights, ops, ctx, batch, settings, the_chip)
    for line in lines:
        typer.echo(line)
    if not ok:
        raise typer.Exit(2)


def perplexity(
    file: Path = typer.Argument(..., help="A UTF-8 text file to score."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    ctx: int = typer.Option(512, "--ctx", help="Window length; the second half of each window is scored."),
    batch: int = typer.Option(1, "--batch", help="Windows run together in one forward pass."),
    kl_base: Optional[str] = typer.Option(None, "--kl-base", help="A base model, or a file written by "
                                                                  "--save-logits: also report KL divergence."),
    save_logits: Optional[Path] = typer.Option(None, "--save-logits", help="Write this model's log-probabilities "
                                                                           "here (for a later --kl-base)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="8 or 4: score with a quantized KV cache."),
    kv_group_size: int = typer.Option(64, "--kv-group-size"),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_DTYPE_HELP),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy"),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help="numpy: float32 or quantized."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Perplexity +- standard error over non-overlapping windows (llama-perplexity's scoring); with --kl-base, the
    KL divergence from a base model (mean, p99) and the top-1 agreement.

    Examples:

      mlxllama perplexity -m default benchmarks/data/alice-ch1-2.txt

      mlxllama perplexity -m ./f32-model text.txt --save-logits base.npz

      mlxllama perplexity -m default text.txt --kl-base base.npz --kv-bits 4
    """
    import mlxllama
    from mlxllama.cache import CacheSettings
    from mlxllama.perplexity import perplexity as run

    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{file}: cannot read it as UTF-8 text ({e})") from None
    if save_logits is not None and kl_base is not None and Path(kl_base) == save_logits:
        raise UsageError("--save-logits and --kl-base name the same file")
    m, tok = mlxllama.load(model, backend=backend, numpy_weights=numpy_weights, ctx=ctx, batch=batch)
    settings = CacheSettings(kv_bits=kv_bits, kv_group_size=kv_group_size, kv_dtype=kv_dtype).validate(
        m.args.head_dim)
    base = None
    if kl_base is not None:
        if kl_base.endswith(".npz") and Path(kl_base).is_file():
            base = Path(kl_base)
        else:
            base, base_tok = mlxllama.load(kl_base, backend=backend, numpy_weights=numpy_weights, ctx=ctx,
                                           batch=batch)
            if base.args.vocab_size != m.args.vocab_size:
                raise UsageError(f"--kl-base has a vocabulary of {base.args.vocab_size}, the model "
                                 f"{m.args.vocab_size}: KL needs the same tokenizer")
    bos = tok.bos_id if tok.add_bos else None
    result = run(m, tok.encode(text), ctx=ctx, batch=batch, bos_id=bos, cache_settings=settings, base=base,
                 save_logits=save_logits)
    typer.echo(result.line())


def register(app: typer.Typer) -> None:
    app.command()(fit)
    app.command()(perplexity)
