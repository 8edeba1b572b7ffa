"""Benchmark submissions through a Hugging Face dataset repo, for real over HTTP against tests/fakehub.py:
`bench --submit` -> `bench submit` (huggingface_hub's create_commit(create_pr=True)) -> `bench report hf:...`,
the one-line errors, and the privacy of what is sent. The CLI runs in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fakehub import fakehub  # noqa: F401  (fixture)
from mlxllama.bench import hardware, hub_submit, reference
from mlxllama.bench.submissions import read
from test_bench_submissions import sample_submission
from test_hub import one_error_line, run_cli

REPO = "bench/submissions"
TOKEN = "hf_alice_token"
LLAMA_BENCH = Path(__file__).parent / "data" / "llama-bench"


def seed(hub, with_reference: bool = True, **kwargs):
    """A dataset with a README, and (as a maintainer may seed it) copies of the #4167 reference rows."""
    files = {"README.md": b"# mlxllama benchmark submissions\n"}
    for p in sorted(reference.package_dir().glob("*.json")) if with_reference else []:
        files[f"reference/{p.name}"] = p.read_bytes()
    hub.tokens[TOKEN] = "alice"
    return hub.add_repo(REPO, files, kind="datasets", **kwargs)


def sample_files(tmp_path: Path, n: int = 1) -> list[Path]:
    out = []
    for i, chip in enumerate(["M2 Max", "M2 Ultra", "M1 Ultra"][:n]):
        p = tmp_path / f"sub{i}.json"
        p.write_text(json.dumps(sample_submission(chip)))
        out.append(p)
    return out


def cli(hub, home: Path, *args: str, token: str | None = TOKEN, **env: str):
    extra = {"HF_TOKEN": token} if token else {}
    return run_cli(list(args), hub.url, home, **extra, **env)


# --- the round trip ---

@pytest.mark.slow
def test_bench_submit_report_round_trip(fakehub, smollm2, tmp_path):
    seed(fakehub, with_reference=False)  # a fresh dataset: the #4167 rows come from the package
    home, results = tmp_path / "hf", tmp_path / "results"
    # 1. a run on this machine, with llama-bench's depth and pp+tg shapes
    p = cli(fakehub, home, "bench", "-m", str(smollm2), "-p", "16", "-n", "8", "-r", "1", "-d", "0,8", "-pg", "8,4",
            "--backend", "numpy", "--submit", str(results), timeout=300)
    assert p.returncode == 0, p.stderr
    ours = read(next(results.glob("*.json")))
    assert [t["name"] for t in ours["tests"]] == ["pp16", "tg8", "pp8+tg4", "pp16@d8", "tg8@d8", "pp8+tg4@d8"]
    assert ours["model"]["id"] == smollm2.name  # the file name, not its path
    # 2. the real llama-bench run, imported
    p = cli(fakehub, home, "bench", "import", str(LLAMA_BENCH / "smollm2-llama-bench.json"), "--format",
            "llama-bench", "--out", str(results), "--model", str(smollm2))
    assert p.returncode == 0, p.stderr
    files = sorted(results.glob("*.json"))
    assert len(files) == 2
    # 3. dry run: prints what would be sent, sends nothing
    p = cli(fakehub, home, "bench", "submit", *map(str, files), "--repo", REPO, "--dry-run", token=None)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"pull request on dataset {REPO}: Benchmark: ")
    paths = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("--- ")]
    assert len(paths) == 2 and all(x.startswith("submissions/") and x.endswith(".json") for x in paths)
    assert not fakehub.requests("POST")
    # 4. the pull request
    p = cli(fakehub, home, "bench", "submit", *map(str, files), "--repo", REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"opened {fakehub.url}/datasets/{REPO}/discussions/1 (2 submissions)"
    repo = fakehub.repos[REPO]
    assert sorted(repo.revisions) == ["main", "refs/pr/1"] and repo.pulls[0].author == "alice"
    added = sorted(set(repo.revisions["refs/pr/1"]) - set(repo.revisions["main"]))
    assert added == sorted(paths)
    for path in added:  # sorted by chip, then model
        assert path.split("/")[0] == "submissions" and len(path.split("/")) == 4
    sent = {json.loads(repo.revisions["refs/pr/1"][x])["backend"] for x in added}
    assert sent == {"numpy", "llama.cpp CPU"}
    commit = fakehub.requests("POST", "/commit/")[0]
    assert "create_pr=1" in commit.path and commit.headers["content-type"] == "application/x-ndjson"
    # 5. the report: main only, then with the open pull request beside the #4167 rows
    p = cli(fakehub, home, "bench", "report", f"hf:{REPO}", "--out", str(tmp_path / "r0"), token=None)
    assert "no valid submissions in" in one_error_line(p, 2)  # nothing merged yet
    p = cli(fakehub, home, "bench", "report", f"hf:{REPO}", "--with-reference", "--out", str(tmp_path / "r0"))
    assert p.returncode == 0, p.stderr
    assert "SmolLM2" not in p.stdout and "| M2 Ultra 76c |" in p.stdout
    out = tmp_path / "report"
    p = cli(fakehub, home, "bench", "report", f"hf:{REPO}", "--include-prs", "--with-reference", "--out", str(out),
            token=None)
    assert p.returncode == 0, p.stderr
    board = p.stdout.split("## All submissions")[0]
    rows = [line.strip("| ").split(" | ") for line in board.splitlines() if line.startswith("| ")][1:]
    by_backend = {r[3]: r for r in rows if r[0].startswith("SmolLM2")}
    assert set(by_backend) == {"numpy", "llama.cpp CPU"}  # one model file, one group: both runs side by side
    assert by_backend["llama.cpp CPU"][5:8] == ["pp512", "143.10", "tg128"]  # best of the imported samples
    assert any(r[1] == "M2 Ultra 76c" and r[0] == "LLaMA-2 7B · Q4_0" for r in rows)
    assert "tg8@d8" in p.stdout and "pp8+tg4" in p.stdout and "tg128@d256" in p.stdout and "pp256+tg64" in p.stdout
    assert (out / "bench-report.png").stat().st_size > 10_000 and (out / "bench-report.html").is_file()
    # 6. offline, from the cache
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):  # offline, or the hub unreachable
        p = run_cli(["bench", "report", f"hf:{REPO}", "--include-prs", "--with-reference", "--out",
                     str(tmp_path / "r2")], fakehub.url, home, **env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split("## All submissions")[0] == board
    # 7. the same files again (a second pull request), and the reference in the dataset too: each counted once
    assert cli(fakehub, home, "bench", "submit", *map(str, files), "--repo", REPO).returncode == 0
    for p in reference.package_dir().glob("*.json"):
        fakehub.repos[REPO].revisions["main"][f"reference/{p.name}"] = p.read_bytes()
    p = cli(fakehub, home, "bench", "report", f"hf:{REPO}", "--include-prs", "--with-reference", "--out",
            str(tmp_path / "r3"))
    assert p.returncode == 0 and "(60 submissions, 60 duplicates dropped)" in p.stderr, p.stderr
    assert p.stdout.split("## All submissions")[0] == board


LIBRARY_ROUND_TRIP = """
import json, sys
from mlxllama.bench import hub_submit
plan = hub_submit.plan(sys.argv[1:], hub_submit.default_repo())
url = hub_submit.submit(plan)
folders = hub_submit.fetch(plan.repo_id, include_prs=True)
print(json.dumps({"url": url, "repo": plan.repo_id, "files": plan.files, "folders": [str(f) for f in folders]}))
"""


def test_submit_and_fetch_through_the_library(fakehub, tmp_path):
    """hub_submit's own calls (huggingface_hub reads HF_ENDPOINT at import, hence the subprocess)."""
    import os
    import subprocess
    import sys

    seed(fakehub)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=fakehub.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN=TOKEN, NO_PROXY="*",
               HF_HUB_DISABLE_PROGRESS_BARS="1", **{hub_submit.REPO_ENV: REPO})
    p = subprocess.run([sys.executable, "-c", LIBRARY_ROUND_TRIP, *map(str, sample_files(tmp_path, 2))], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["repo"] == REPO and out["url"] == f"{fakehub.url}/datasets/{REPO}/discussions/1"
    pr = fakehub.repos[REPO].revisions["refs/pr/1"]
    assert len(out["files"]) == 2
    for path, content in out["files"]:
        assert pr[path] == content.encode()
    main, *pulled = map(Path, out["folders"])
    assert len(pulled) == 2  # only what the pull request adds
    assert sorted(f.read_text() for f in pulled) == sorted(content for _, content in out["files"])
    assert not (main / out["files"][0][0]).exists()  # main has not merged it
    assert len(list((main / "reference").glob("*.json"))) == 58


# --- errors: one line each ---

@pytest.mark.parametrize("case,code,expected", [
    ("no token", 4, "error: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"),
    ("bad token", 4, "error: the Hugging Face token was refused (401)"),
    ("denied", 4, f"error: access denied (403): the token's account may not open a pull request on dataset {REPO}"),
    ("missing repo", 4, "error: dataset repo nobody/nothing not found on"),
    ("offline", 4, "error: offline mode is on (HF_HUB_OFFLINE=1): cannot open a pull request on"),
    ("unreachable", 4, "error: cannot reach http://127.0.0.1:"),
    ("invalid file", 2, "invalid: tests[1]"),
    ("bad repo id", 2, "error: invalid repo id 'nope'"),
])
def test_submit_errors(fakehub, tmp_path, case, code, expected):
    repo = seed(fakehub)
    files = [str(f) for f in sample_files(tmp_path)]
    args, token, env, url = ["--repo", REPO], TOKEN, {}, fakehub.url
    if case == "no token":
        token = None
    elif case == "bad token":
        token = "hf_wrong"
    elif case == "denied":
        repo.writers = {"hf_someone_else"}
    elif case == "missing repo":
        args = ["--repo", "nobody/nothing"]
    elif case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    elif case == "unreachable":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    elif case == "invalid file":
        sub = sample_submission()
        sub["tests"][1]["samples_tps"] = [1e6]
        Path(files[0]).write_text(json.dumps(sub))
    elif case == "bad repo id":
        args = ["--repo", "nope"]
    extra = {"HF_TOKEN": token} if token else {}
    p = run_cli(["bench", "submit", *files, *args], url, tmp_path / "hf", **extra, **env)
    line = one_error_line(p, code)
    assert expected in line, line
    assert set(repo.revisions) == {"main"} and not repo.pulls


def test_report_errors(fakehub, tmp_path):
    seed(fakehub)
    p = run_cli(["bench", "report", "hf:nobody/nothing", "--out", str(tmp_path / "r")], fakehub.url, tmp_path / "hf")
    assert "not found on" in one_error_line(p, 4)
    p = run_cli(["bench", "report", f"hf:{REPO}", "--out", str(tmp_path / "r")], fakehub.url, tmp_path / "hf",
                HF_HUB_OFFLINE="1")
    assert "is not in the local cache and offline mode is on" in one_error_line(p, 4)


# --- privacy ---

def test_machine_block_carries_no_host_user_serial_or_path():
    import getpass

    block = hardware.detect().to_dict()
    text = json.dumps(block)
    host, user = socket.gethostname(), getpass.getuser()
    assert not (len(host) >= 3 and host in text) and f'"{user}"' not in text and str(Path.home()) not in text
    assert set(block) <= hub_submit.MACHINE_FIELDS
    sub = sample_submission()
    sub["machine"] = block
    assert hub_submit.privacy_problems(sub) == []


@pytest.mark.parametrize("path,value,expected", [
    ("machine.hostname", "studio", "machine.hostname: not a field a submission may carry"),
    ("machine.serial_number", "C02XK0AAJGH5", "machine.serial_number: not a field"),
    ("machine.cpu", "Apple M2 Max on alices-mac", "machine.cpu: contains this machine's host name"),
    ("model.id", "/Users/alice/models/llama.gguf", "model.id: contains"),
    ("model.id", "default (C:\\models\\x.gguf)", "model.id: contains a file path"),
    ("source", "measured by alice", "source: contains the user name 'alice'"),
])
def test_privacy_problems_are_found(path, value, expected):
    sub = sample_submission()
    *parents, last = path.split(".")
    target = sub
    for p in parents:
        target = target[p]
    target[last] = value
    problems = hub_submit.privacy_problems(sub, hostname="alices-mac.local", user="alice", home="/Users/alice")
    assert any(expected in p for p in problems), problems


def test_submit_refuses_a_private_detail(tmp_path):
    sub = sample_submission()
    sub["model"]["id"] = str(Path.home() / "models" / "x.gguf")
    f = tmp_path / "s.json"
    f.write_text(json.dumps(sub))
    with pytest.raises(Exception, match="would reveal private details: model.id"):
        hub_submit.plan([f], REPO)


def test_paths_sort_by_chip_then_model():
    a = hub_submit.path_in_repo(sample_submission("M2 Max"))
    b = hub_submit.path_in_repo(sample_submission("M2 Max", quant="F16"))
    c = hub_submit.path_in_repo(sample_submission("M1"))
    assert a.startswith("submissions/M2-Max-38c/LLaMA-2-7B_Q4_0/20250102T030405_mlx_")
    assert b.startswith("submissions/M2-Max-38c/LLaMA-2-7B_F16/") and c.startswith("submissions/M1-")
    assert sorted([a, b, c]) == [c, b, a]
