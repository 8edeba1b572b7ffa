"""`mlxllama chat`: sampling defaults, the /commands, plain lines from a pipe, and the line editor on a real
pseudo-terminal (keys as a user types them: Enter, a trailing backslash, the arrow keys, Ctrl-C)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_hf_folder
from mlxllama.errors import ConfigError
from mlxllama_cli import chat

CLI = [sys.executable, "-m", "mlxllama_cli.app"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, sp_dir) -> Path:
    folder = make_hf_folder(tmp_path_factory.mktemp("chat") / "m", tokenizer_dir=sp_dir)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return folder


def test_defaults_are_llama_cpps_without_a_generation_config(tmp_path):
    values, source = chat.generation_defaults(tmp_path)
    assert values == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}
    assert source == "llama.cpp defaults"
    assert chat.generation_defaults(tmp_path / "model.gguf")[1] == "llama.cpp defaults"  # a file, not a folder


def test_defaults_follow_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                                 "top_p": 0.9, "eos_token_id": 2}))
    values, source = chat.generation_defaults(tmp_path)
    assert values == {"temperature": 0.6, "top_k": 50, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0}
    assert "generation_config.json" in source
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert chat.generation_defaults(tmp_path)[0]["temperature"] == 0.0  # do_sample false: greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert chat.generation_defaults(tmp_path)[1] == "llama.cpp defaults"  # no sampling keys at all


@pytest.mark.parametrize("bad", [{"temperature": "hot"}, {"top_k": 4.5}, {"top_p": True}, {"min_p": float("nan")}])
def test_bad_generation_config_is_one_line_error(tmp_path, bad):
    (tmp_path / "generation_config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="generation_config.json: .* must be a number"):
        chat.generation_defaults(tmp_path)


def test_session_commands(capsys):
    s = chat.Session(system=None, show_stats=False, history=[{"role": "user", "content": "x"}])
    assert s.command("/reset") and s.history == []
    assert s.command("/system Be brief.") and s.system == "Be brief."
    assert s.command("/system -") and s.system is None
    assert s.command("/stats") and s.show_stats
    assert s.command("/nope")
    assert s.command("/help")
    assert not s.command("/exit") and not s.command("/quit")
    err = capsys.readouterr().err
    assert "[history cleared]" in err and "unknown command /nope" in err and "/reset" in err


def run_chat(model: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "chat", "-m", str(model), "--backend", "numpy", "-n", "4", "--seed", "0", *args],
                          input=script.encode(), capture_output=True, timeout=120)


def test_pipe_commands_never_reach_the_model(chat_model):
    script = "hello\n/system Be brief.\n/system\n/bogus\n/help\n//slash is text\nsecond \\\nline\n/exit\n"
    r = run_chat(chat_model, script, "--stats")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert "llama.cpp defaults" in err  # the banner states the sampling settings
    # three messages went to the model (hello, "/slash is text", the two-line one): three stats lines
    assert err.count(" t/s; prompt ") == 3, err
    assert "[system message: 'Be brief.']" in err and "unknown command /bogus" in err


def test_flags_override_the_defaults_in_the_banner(chat_model):
    r = run_chat(chat_model, "/exit\n", "--temp", "0", "--top-k", "5")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "temp 0, top-k 5, top-p 0.95" in err and "--temp, --top-k given" in err


def test_pipe_eof_leaves_with_zero(chat_model):
    r = run_chat(chat_model, "")
    assert r.returncode == 0, r.stderr.decode()


class Terminal:
    """The chat on a pseudo-terminal: what a user's keys send, what the screen receives (bounded waits)."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", HF_HUB_OFFLINE="1", COLUMNS="120",
                   LINES="40")
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.screen = b""
        self.seen = 0  # expect() looks for its marker after the previous match

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, marker: bytes, timeout: float = 60.0) -> bytes:
        start = self.seen
        deadline = time.monotonic() + timeout
        while marker not in self.screen[start:]:
            left = deadline - time.monotonic()
            ready = select.select([self.master], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout} s; screen ends {self.screen[-400:]!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the program has exited
                chunk = b""
            if not chunk:
                raise AssertionError(f"exited before {marker!r}; screen ends {self.screen[-400:]!r}")
            self.screen += chunk
        self.seen = self.screen.index(marker, start) + len(marker)
        return self.screen[start:self.seen]

    def close(self, timeout: float = 30.0) -> int | None:
        """The exit code, or None if it had to be killed (never raises, so a failed expect() stays the error)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:  # keep reading: a full pty blocks it
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:
                    pass
        code = self.proc.poll()
        if code is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        return code


def test_line_editor_on_a_terminal(chat_model):
    # prompt_toolkit draws ">>" and moves the cursor rather than printing the space: match the markers without it
    t = Terminal([*CLI, "chat", "-m", str(chat_model), "--backend", "numpy", "-n", "3", "--seed", "0", "--stats"])
    try:
        t.expect(b">>")
        t.send(b"first line \\\r")  # a trailing backslash continues the message
        t.expect(b"..")
        t.send(b"second line\r")
        t.expect(b" t/s; prompt ")  # one reply for the two lines
        t.expect(b">>")
        t.send(b"/stats\r")
        t.expect(b"per-reply stats off")
        t.expect(b">>")
        t.send(b"\x1b[A")  # Up: the history gives back "/stats"
        t.expect(b"/stats")
        t.send(b"\x03")  # Ctrl-C on a non-empty line clears it; the session goes on
        t.send(b"\x03")  # Ctrl-C at an empty prompt leaves
        t.expect(b"interrupted")
    finally:
        code = t.close()
    assert code == 130
    assert b"Traceback" not in t.screen and b"^[[A" not in t.screen
    assert t.screen.count(b" t/s; prompt ") == 1


def test_second_turn_reuses_the_first_turns_kv(chat_model):
    """The chat keeps one engine: the second turn's prompt starts with the first turn's, whose KV (prompt and
    reply) the prefix cache holds; /stats says how many prompt tokens came from it."""
    r = run_chat(chat_model, "hello there\nand then?\n/exit\n", "--stats", "--temp", "0")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    lines = [line for line in err.splitlines() if " t/s; prompt " in line]
    assert len(lines) == 2 and "cached" not in lines[0], err
    cached = int(lines[1].split("tokens (")[1].split(" cached")[0])
    assert cached >= 5, lines[1]


def test_replies_through_the_engine_equal_plain_generation(chat_model):
    import mlxllama
    from mlxllama.generate import stream_generate
    from mlxllama.sampling import SamplingParams

    m, tok = mlxllama.load(chat_model, backend="numpy")
    greedy = SamplingParams()
    replies = chat.Replies(m, tok, greedy, 6, None)
    history = [{"role": "user", "content": "hello there"}]
    first = list(replies.stream(history, "Be brief."))
    assert "".join(r.text for r in first) == mlxllama.generate(m, tok, history, max_tokens=6, system="Be brief.")
    history += [{"role": "assistant", "content": "".join(r.text for r in first)},
                {"role": "user", "content": "and then?"}]
    hits = replies.engine.prefix_cache.hits
    second = list(replies.stream(history, "Be brief."))
    assert replies.engine.prefix_cache.hits == hits + 1 and second[-1].cached_tokens >= first[-1].prompt_tokens - 1
    assert "".join(r.text for r in second) == mlxllama.generate(m, tok, history, max_tokens=6, system="Be brief.")
    # a rotating cache keeps its prefix too (until the window wraps), and reply as plain generation
    small = chat.Replies(m, tok, greedy, 6, {"kv_bits": None, "kv_group_size": 64, "max_kv_size": 200})
    want = [r.text for r in stream_generate(m, tok, history[:1], max_tokens=6, system="Be brief.", max_kv_size=200)]
    assert [r.text for r in small.stream(history[:1], "Be brief.")] == want
    want = [r.text for r in stream_generate(m, tok, history, max_tokens=6, system="Be brief.", max_kv_size=200)]
    assert [r.text for r in small.stream(history, "Be brief.")] == want
    assert small.engine.prefix_cache.hits == 1
