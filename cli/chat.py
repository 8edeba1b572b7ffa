"""`mlxllama chat`: sampling defaults and the REPL.

On a terminal the input line is a prompt_toolkit editor (history on the arrow keys, Emacs keys, bracketed paste);
from a pipe it reads plain lines, so scripts and tests can drive it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import typer

from mlxllama.errors import MlxLlamaError, UsageError
from mlxllama.sampling_defaults import (  # noqa: F401  (moved to the library; cli/app.py and tests use these names)
    DEFAULTS_HELP,
    FLAGS,
    HF_DEFAULTS,
    LLAMA_CPP_DEFAULTS,
    SAMPLING_KEYS,
    describe,
    generation_defaults,
)

COMMANDS = """\
/help            this list
/reset           forget the conversation
/system          show the system message; /system TEXT sets it, /system - removes it
/stats           per-reply stats on or off
/exit, /quit     leave (also Ctrl-D, or Ctrl-C at an empty prompt)
//text           send a line that begins with '/'
Enter sends. End a line with \\ (or press Alt-Enter) to continue on the next line; pasted text is one message."""


def stats_line(r) -> str:
    cached = f" ({r.cached_tokens} cached)" if getattr(r, "cached_tokens", 0) else ""
    return (f"[{r.generation_tokens} tokens at {r.generation_tps:.1f} t/s; prompt {r.prompt_tokens} tokens{cached} "
            f"at {r.prompt_tps:.1f} t/s; peak memory {r.peak_memory:.2f} GB]")


def _editor():
    """A prompt_toolkit session: Enter sends, a trailing backslash or Alt-Enter adds a line, Ctrl-C clears the
    line (and at an empty prompt leaves), the arrow keys walk this session's history."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("enter")
    def _send(event):
        buf = event.current_buffer
        if buf.document.is_cursor_at_the_end and buf.text.endswith("\\"):
            buf.delete_before_cursor(1)
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    session = PromptSession(history=InMemoryHistory(), key_bindings=keys, multiline=True,
                            prompt_continuation=lambda width, line, wrap: ".. ".rjust(width))
    return lambda: session.prompt(">> ")


def _pipe_reader():
    """Lines from a pipe: one message each, joined while a line ends with a backslash. None at end of input."""
    def read():
        sys.stdout.write(">> ")
        sys.stdout.flush()
        parts = []
        while True:
            line = sys.stdin.readline()
            if not line:
                return "\n".join(parts) if parts else None
            line = line.rstrip("\r\n")
            if line.endswith("\\"):
                parts.append(line[:-1])
                continue
            parts.append(line)
            return "\n".join(parts)
    return read


@contextmanager
def no_echo(on: bool):
    """Keys typed during a reply are not echoed into it (they still wait for the next prompt); Ctrl-C still works."""
    try:
        import termios
    except ImportError:  # Windows
        on = False
    if not on:
        yield
        return
    fd = sys.stdin.fileno()
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


@dataclass
class Session:
    system: str | None
    show_stats: bool
    history: list

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            typer.echo(COMMANDS, err=True)
        elif name == "/reset":
            self.history.clear()
            typer.echo("[history cleared]", err=True)
        elif name == "/system":
            if not arg:
                typer.echo(f"[system message: {self.system!r}]" if self.system else "[no system message]",
                           err=True)
            elif arg == "-":
                self.system = None
                typer.echo("[system message removed]", err=True)
            else:
                self.system = arg
                typer.echo("[system message set; it applies from the next reply]", err=True)
        elif name == "/stats":
            self.show_stats = not self.show_stats
            typer.echo(f"[per-reply stats {'on' if self.show_stats else 'off'}]", err=True)
        else:
            typer.echo(f"[unknown command {name}; /help lists them, and //text sends a line beginning with /]",
                       err=True)
        return True


CHAT_PREFIX_CACHE_BYTES = 1 << 30  # at most this much KV kept between turns (one conversation's, in practice)


class Replies:
    """Each turn's reply stream, through one Engine kept across turns whose prefix cache holds the conversation's KV
    so far (any cache kind: float, quantized, a rotating window until it wraps): a turn prefills only what is new
    since the last one."""

    def __init__(self, model, tok, sampling, max_tokens: int, cache_kwargs: dict | None):
        from mlxllama.cache import CacheSettings
        from mlxllama.engine import Engine
        from mlxllama.memory import kv_bytes
        from mlxllama.prefix_cache import PrefixCache

        self.model, self.tok, self.sampling, self.max_tokens = model, tok, sampling, max_tokens
        self.settings = CacheSettings(**(cache_kwargs or {})).validate(model.args.head_dim)
        a = model.args
        budget = min(CHAT_PREFIX_CACHE_BYTES, kv_bytes(a, a.max_position_embeddings, 1, model.ops, self.settings))
        self.engine = Engine(model, tok, max_batch=1, max_queue=1, prefix_cache=PrefixCache(budget),
                             make_cache=lambda n: model.make_cache(1, max_len=n, settings=self.settings))

    def forget(self) -> None:
        self.engine.prefix_cache.clear()

    def stream(self, history: list, system: str | None):
        from mlxllama.generate import prompt_tokens, stream_generate
        from mlxllama.memory import check_model, kv_bytes, wired_limit

        ids = prompt_tokens(self.tok, history, system=system)
        length = min(self.engine.ctx, len(ids) + self.max_tokens)
        check_model(self.model, length, 1, self.settings)
        with wired_limit(self.model, kv_bytes(self.model.args, length, 1, self.model.ops, self.settings)):
            yield from stream_generate(self.model, self.tok, ids, max_tokens=self.max_tokens,
                                       sampling=self.sampling, engine=self.engine)


def run(model, tok, *, system: str | None, sampling, max_tokens: int, show_stats: bool, banner: str,
        cache_kwargs: dict | None = None) -> None:
    from contextlib import closing

    from mlxllama.context import trim_turns

    if tok.chat_template is None:
        raise UsageError("this model has no chat template; use `mlxllama generate` instead")
    replies = Replies(model, tok, sampling, max_tokens, cache_kwargs)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    read = _editor() if terminal else _pipe_reader()
    session = Session(system=system, show_stats=show_stats, history=[])
    typer.echo(f"[chat] {banner}\n[chat] /help lists the commands; Enter sends, a trailing \\ continues the line",
               err=True)
    while True:
        try:
            line = read()
        except EOFError:
            line = None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None  # main() prints "interrupted"
        if line is None:
            typer.echo("")
            return
        if line.startswith("/") and not line.startswith("//"):
            if not session.command(line):
                return
            if line.split()[0] == "/reset":
                replies.forget()
            continue
        if line.startswith("//"):
            line = line[1:]
        if not line.strip():
            continue
        session.history.append({"role": "user", "content": line})
        session.history[:], dropped = trim_turns(tok, session.history, model.args.max_position_embeddings,
                                                 max_tokens, session.system)
        if dropped:
            typer.echo(f"[context full: dropped the {dropped} oldest messages]", err=True)
        reply, last = [], None
        try:
            with no_echo(terminal), closing(replies.stream(session.history, session.system)) as stream:
                for r in stream:
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
                    reply.append(r.text)
                    last = r
        except KeyboardInterrupt:
            typer.echo("\n[interrupted]", err=True)
        except MlxLlamaError as e:
            session.history.pop()
            typer.echo(f"\nerror: {e}", err=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        session.history.append({"role": "assistant", "content": "".join(reply)})
        if last is not None and last.finish_reason == "length":
            typer.echo(f"[reply cut at {last.generation_tokens} tokens: --max-tokens]", err=True)
        if session.show_stats and last is not None:
            typer.echo(stats_line(last), err=True)
