"""The CLI as a user meets it, in subprocesses (so that main()'s error mapping runs): every bad argument and
broken model gives exactly one line on stderr, `error: ...`, and its class's exit code (usage 2, model file 3,
network 4, interrupted 130), never a traceback; Ctrl-C and kills during convert leave no DST folder; a full disk
gives a clear error; Ctrl-C during generate and chat stops cleanly and keeps what was generated."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_hf_folder

CLI = [sys.executable, "-m", "mlxllama_cli.app"]
USAGE, MODEL_FILE, INTERRUPTED = 2, 3, 130
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def default_sigint() -> None:
    """preexec_fn of the children that get Ctrl-C: a shell starts a background job (`cmd &`, nohup) with SIGINT
    ignored, and a child inherits that, so Python would install no KeyboardInterrupt handler. Reset it first."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, stdin: bytes = b"", timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], input=stdin, capture_output=True, timeout=timeout, **kw)


def one_error_line(r: subprocess.CompletedProcess, code: int, match: str) -> str:
    err = r.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert r.returncode == code, (r.returncode, err)
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, sp_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    tiny = make_hf_folder(root / "tiny", tokenizer_dir=sp_dir)
    pickles = shutil.copytree(tiny, root / "pickles")
    (pickles / "model.safetensors").unlink()
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle; it must never be opened as one
    gelu = shutil.copytree(tiny, root / "gelu")
    cfg = json.loads((gelu / "config.json").read_text())
    (gelu / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    corrupt = root / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)
    not_gguf = root / "model.bin"
    not_gguf.write_bytes(b"\x80\x04K\x01.")
    return {"tiny": tiny, "pickles": pickles, "gelu": gelu, "corrupt": corrupt, "bin": not_gguf, "root": root}


# ---------------------------------------------------------------------------------------------- arguments

ARGUMENT_CASES = [
    # (id, extra args, stdin, exit code, message fragment)
    ("negative temperature", ["hi", "--temp", "-1"], b"", USAGE, "temperature must be >= 0"),
    ("nan temperature", ["hi", "--temp", "nan"], b"", USAGE, "temperature must be a finite number"),
    ("top-p zero", ["hi", "--top-p", "0"], b"", USAGE, "top-p must be in (0, 1]"),
    ("top-p above one", ["hi", "--top-p", "1.5"], b"", USAGE, "top-p must be in (0, 1]"),
    ("negative top-k", ["hi", "--top-k", "-1"], b"", USAGE, "top-k must be an integer >= 0"),
    ("min-p one", ["hi", "--min-p", "1"], b"", USAGE, "min-p must be in [0, 1)"),
    ("negative min-p", ["hi", "--min-p", "-0.1"], b"", USAGE, "min-p must be in [0, 1)"),
    ("zero repetition penalty", ["hi", "--repetition-penalty", "0"], b"", USAGE, "repetition-penalty must be > 0"),
    ("negative seed", ["hi", "--seed", "-1"], b"", USAGE, "seed must be a non-negative integer"),
    ("max-tokens zero", ["hi", "--max-tokens", "0"], b"", USAGE, "max-tokens must be an integer >= 1"),
    ("max-tokens negative", ["hi", "--max-tokens", "-5"], b"", USAGE, "max-tokens must be an integer >= 1"),
    ("empty prompt", [""], b"", USAGE, "the prompt is empty"),
    ("blank prompt", ["   \n"], b"", USAGE, "the prompt is empty"),
    ("no prompt", [], b"", USAGE, "no prompt given"),
    ("empty stdin", ["-"], b"", USAGE, "the prompt is empty"),
    ("non-UTF-8 stdin", ["-"], b"caf\xe9 \xff\xfe", USAGE, "stdin is not valid UTF-8"),
    ("prompt longer than the context", ["-", "--no-chat"], b"hello world " * 300, USAGE,
     "but the model's context is 256"),
    ("chat without a template", ["hi", "--chat"], b"", USAGE, "no chat template"),
    ("unknown backend", ["hi", "--backend", "tpu"], b"", USAGE, "unknown backend 'tpu'"),
]


@pytest.mark.parametrize("args, stdin, code, match", [c[1:] for c in ARGUMENT_CASES],
                         ids=[c[0] for c in ARGUMENT_CASES])
def test_generate_arguments(models, args, stdin, code, match):
    backend = [] if "--backend" in args else ["--backend", "numpy"]
    r = cli("generate", *args, "-m", models["tiny"], *backend, stdin=stdin)
    one_error_line(r, code, match)


MODEL_CASES = [
    ("missing path", "/nonexistent/model", MODEL_FILE, "no such file or folder: /nonexistent/model"),
    ("pickle-only folder", "pickles", MODEL_FILE, "only pickle weights (pytorch_model.bin) found; mlxllama never "
                                                  "unpickles. Use a safetensors or GGUF copy"),
    ("pickle file", "bin", MODEL_FILE, "model.bin"),
    ("corrupt GGUF", "corrupt", MODEL_FILE, "corrupt.gguf: "),
    ("unsupported config", "gelu", MODEL_FILE, "hidden_act 'gelu' is not supported"),
    ("empty model reference", "", USAGE, "empty model reference"),
]


@pytest.mark.parametrize("model, code, match", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_models(models, model, code, match):
    ref = models.get(model, model)
    one_error_line(cli("generate", "hi", "-m", ref, "--backend", "numpy"), code, match)


def test_convert_arguments(models, tmp_path):
    tiny = models["tiny"]
    one_error_line(cli("convert", tiny, tmp_path / "a", "-q", "--bits", "7"), USAGE, "--bits must be one of 2, 3, 4, 5, 6, 8")
    one_error_line(cli("convert", tiny, tmp_path / "a", "-q", "--group-size", "7"), USAGE, "--group-size must be")
    one_error_line(cli("convert", tiny, tmp_path / "a", "--dtype", "int8"), USAGE, "--dtype must be one of")
    one_error_line(cli("convert", tmp_path / "nope", tmp_path / "a"), MODEL_FILE, "no such file or folder")
    one_error_line(cli("convert", models["pickles"], tmp_path / "a"), MODEL_FILE, "only pickle weights")
    (tmp_path / "exists").mkdir()
    one_error_line(cli("convert", tiny, tmp_path / "exists"), MODEL_FILE, "already exists; pass --force")
    (tmp_path / "file").write_text("x")
    one_error_line(cli("convert", tiny, tmp_path / "file" / "sub"), MODEL_FILE, "file is a file, not a folder")
    assert not (tmp_path / "a").exists()


def test_chat_arguments(models):
    one_error_line(cli("chat", "-m", models["tiny"], "--top-p", "2"), USAGE, "top-p must be in (0, 1]")
    one_error_line(cli("chat", "-m", models["tiny"], "--backend", "numpy"), USAGE, "no chat template")


def test_verbose_shows_the_traceback(models):
    r = cli("generate", "hi", "-m", models["pickles"], "--backend", "numpy", "--verbose")
    err = r.stderr.decode()
    assert r.returncode == MODEL_FILE and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("args", [["generate", "hi", "--temp", "abc"], ["generate", "hi", "--bogus"], ["bogus"]],
                         ids=["not a number", "unknown option", "unknown command"])
def test_click_usage_errors(args):
    r = cli(*args)
    assert r.returncode == USAGE
    line = one_error_line(r, USAGE, "")
    assert line.endswith(f"(see mlxllama {'generate ' if args[0] == 'generate' else ''}--help)"), line  # its help


# ---------------------------------------------------------------------------------------------- interruptions

SLOW_WRITER = r"""
import os, sys, time
import safetensors.numpy

real = safetensors.numpy.save_file

def half_then_stall(tensors, filename, metadata=None):
    # A slow disk: half of model.safetensors is on disk when the signal comes.
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    sys.stderr.write("WRITING\n")
    sys.stderr.flush()
    time.sleep(120)

safetensors.numpy.save_file = half_then_stall
from mlxllama_cli.app import main
sys.argv = ["mlxllama", *sys.argv[1:]]
main()
"""


def _convert_until_writing(src: Path, dst: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "convert", str(src), str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    line = p.stderr.readline()
    assert line == b"WRITING\n", line + p.stderr.read()
    return p


def _leftovers(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}*"))


def test_convert_sigkill_mid_write_leaves_nothing_complete(models, tmp_path):
    dst = tmp_path / "out"
    p = _convert_until_writing(models["tiny"], dst)
    p.kill()
    p.wait(timeout=30)
    assert not dst.exists()
    [partial] = _leftovers(dst)  # hidden, named .out.partial-PID-*, and incomplete
    assert not (partial / "config.json").exists()
    r = cli("generate", "hi", "-m", partial, "--backend", "numpy")
    assert r.returncode == MODEL_FILE and b"Traceback" not in r.stderr
    # the next convert into the same place succeeds and clears the dead process's partial folder
    r = cli("convert", models["tiny"], dst)
    assert r.returncode == 0, r.stderr
    assert _leftovers(dst) == [] and (dst / "config.json").exists()
    r = cli("generate", "hi", "-m", dst, "--backend", "numpy", "--max-tokens", "2", "--no-chat")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def convert_sigint(models, tmp_path_factory):
    dst = tmp_path_factory.mktemp("sigint") / "out"
    p = _convert_until_writing(models["tiny"], dst)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return dst, p.returncode, err.decode()


def test_convert_sigint_mid_write_cleans_up(convert_sigint):
    dst, rc, err = convert_sigint
    assert not dst.exists() and _leftovers(dst) == []
    assert "Traceback" not in err


def test_convert_sigint_exit_code(convert_sigint):
    dst, rc, err = convert_sigint
    assert rc == INTERRUPTED and err.count("interrupted") == 1, err


SLOW_LOADER = """
import sys, time
import mlxllama.loaders

def stalled_load(path):
    sys.stderr.write("LOADING\\n")
    sys.stderr.flush()
    time.sleep(120)

mlxllama.loaders.load = stalled_load
from mlxllama_cli.app import main
sys.argv = ["mlxllama", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sigint_during_load_prints_one_line(models, command):
    args = [command, "-m", str(models["tiny"]), "--backend", "numpy"] + (["hi"] if command == "generate" else [])
    p = subprocess.Popen([sys.executable, "-c", SLOW_LOADER, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    assert p.stderr.readline() == b"LOADING\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == INTERRUPTED, err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted"], err


def test_convert_files_follow_the_umask(models, tmp_path):
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        dst = tmp_path / f"out-{umask:o}"
        r = cli("convert", models["tiny"], dst, preexec_fn=lambda u=umask: os.umask(u))
        assert r.returncode == 0, r.stderr
        modes = {p.name: p.stat().st_mode & 0o777 for p in dst.iterdir()}
        assert set(modes.values()) == {mode}, modes  # model.safetensors included


def test_racing_converts_to_one_new_folder_one_wins(models, tmp_path):
    dst = tmp_path / "raced"
    procs = [subprocess.Popen([*CLI, "convert", str(models["tiny"]), str(dst)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, preexec_fn=default_sigint) for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, MODEL_FILE, MODEL_FILE], results
    for code, err in results:
        if code:
            assert err.strip() == f"error: {dst} already exists; pass --force to replace it", err
    assert (dst / "config.json").exists() and _leftovers(dst) == []


def test_rename_onto_a_folder_that_appeared_meanwhile_is_refused(tmp_path):
    from mlxllama.errors import ModelFileError
    from mlxllama.loaders.mlx_folder import _rename_new

    (tmp_path / "tmp").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "config.json").write_text("{}")  # the other convert's finished folder
    with pytest.raises(ModelFileError, match="already exists"):
        _rename_new(tmp_path / "tmp", tmp_path / "dst")
    assert (tmp_path / "dst" / "config.json").read_text() == "{}"


def test_convert_q_on_a_quantized_model_warns_in_one_line(models, tmp_path):
    q4 = tmp_path / "q4"
    assert cli("convert", models["tiny"], q4, "-q", "--group-size", "32").returncode == 0
    r = cli("convert", q4, tmp_path / "again", "-q", "--bits", "8", "--group-size", "32")  # dequantized, requantized
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "already quantized (q4 g32)" in lines[0]
    assert "loses quality" in lines[0] and "without -q" in lines[0]
    r = cli("convert", q4, tmp_path / "same", "-q", "--group-size", "32")  # same format: passes through exactly
    assert r.returncode == 0 and r.stderr == b""
    r = cli("convert", q4, tmp_path / "repack")  # no -q: the exact repack, no warning
    assert r.returncode == 0 and r.stderr == b""


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


@pytest.mark.parametrize("how", ["tmpfs", "rlimit_fsize"])
def test_convert_full_disk(models, tmp_path, how):
    """A 64 KiB tmpfs (a real ENOSPC) where mounting is allowed; everywhere, RLIMIT_FSIZE (EFBIG)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if how == "tmpfs":
        if not _can_mount_tmpfs(disk):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        try:
            r = cli("convert", models["tiny"], disk / "out")
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        line = one_error_line(r, MODEL_FILE, f"cannot write {disk / 'out'}")
        assert "No space left on device" in line
    else:
        r = cli("convert", models["tiny"], disk / "out", preexec_fn=_file_size_limit)
        line = one_error_line(r, MODEL_FILE, f"cannot write {disk / 'out'}")
        assert "File too large" in line
    assert list(disk.iterdir()) == []


@pytest.fixture(scope="module")
def long_model(models, tmp_path_factory, sp_dir) -> Path:
    folder = make_hf_folder(tmp_path_factory.mktemp("long") / "m", tokenizer_dir=sp_dir,
                            max_position_embeddings=16384)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def generate_sigint(long_model):
    """Ctrl-C once tokens are streaming: 16000 tokens would take far longer than the wait."""
    p = subprocess.Popen([*CLI, "generate", "hello", "-m", str(long_model), "--backend", "numpy", "--no-chat",
                          "--max-tokens", "16000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=default_sigint)
    first = p.stdout.read(16)  # tokens are streaming: the signal comes mid-generation
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return first + out, err.decode(), p.returncode


def test_generate_sigint_stops_cleanly(generate_sigint):
    out, err, rc = generate_sigint
    assert "Traceback" not in err, err
    assert "[interrupted]" in err and "Generation:" in err, err
    generated = int(err.split("Generation:")[1].split("tokens")[0])
    assert 0 < generated < 16000
    assert len(out.strip()) > 0  # what was generated before Ctrl-C is on stdout


def test_generate_sigint_exit_code(generate_sigint):
    assert generate_sigint[2] == INTERRUPTED
    assert generate_sigint[1].count("interrupted") == 1, generate_sigint[1]  # "[interrupted]", once


def test_chat_sigint_interrupts_the_reply_not_the_session(long_model):
    p = subprocess.Popen([*CLI, "chat", "-m", str(long_model), "--backend", "numpy", "--max-tokens", "16000",
                          "--temp", "0"],  # greedy: this random model then never samples its EOS
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=default_sigint)
    p.stdin.write(b"hello\n")
    p.stdin.flush()
    assert p.stdout.read(3) == b">> "
    p.stdout.read(16)  # the reply is streaming
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(b"/exit\n", timeout=60)
    err = err.decode()
    assert "Traceback" not in err and "[interrupted]" in err, err
    assert b">> " in out  # the REPL asked for the next message after the interrupted reply
    assert p.returncode == 0
