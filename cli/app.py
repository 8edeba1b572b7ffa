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


@app.command()
def download(
    repo: str = typer.Argument(..., help="HF repo id, e.g. mlx-community/SmolLM2-135M-Instruct-4bit"),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Glob of files to fetch (repeatable). "
                                                "Default: config, tokenizer and weight files, never pickles."),
    file: Optional[str] = typer.Option(None, "--file", help="Fetch a single file, e.g. model.Q4_K_M.gguf."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="Write here instead of the HF cache."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local cache (also HF_HUB_OFFLINE=1)."),
):
    """Download a model from the Hugging Face hub into the HF cache (resumable).

    Examples:

      mlxllama download mlx-community/SmolLM2-135M-Instruct-4bit

      mlxllama download bartowski/Llama-3.2-1B-Instruct-GGUF --file Llama-3.2-1B-Instruct-Q4_0.gguf
    """
    from mlxllama import hub

    path = hub.download(repo, revision=revision, include=include, filename=file, local_dir=local_dir,
                        offline=offline or None)
    typer.echo(str(path))


def main() -> None:
    argv = sys.argv[1:]
    VERBOSE["on"] = "--verbose" in argv or "-v" in argv
    try:
        app(standalone_mode=False)
    except MlxLlamaError as e:
        if VERBOSE["on"]:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and anything unexpected
        import click

        if isinstance(e, click.exceptions.Abort):
            typer.echo("\ninterrupted", err=True)
            sys.exit(130)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if VERBOSE["on"]:
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
