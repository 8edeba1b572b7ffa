"""Benchmark submissions through a Hugging Face dataset repo: `submit` opens one pull request adding one JSON file
per submission; `fetch` downloads the repo's files (and, on request, those of its open pull requests) for a report.

Files go under submissions/<chip>/<model>_<quant>/<date>_<backend>_<machine fingerprint>.json, so a listing sorts
by chip, then model. Everything goes through huggingface_hub: create_commit(create_pr=True) for the pull request,
snapshot_download for the data (HF cache; offline, with HF_HUB_OFFLINE=1 or the hub out of reach, the cached copy
is used, and --include-prs previews the pull requests cached at the last online run).

Privacy: a submission carries no host name, user name, serial number or path; `privacy_problems` finds any, and
`submit` refuses to send a file that has one.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MlxLlamaError, NetworkError, UsageError
from .submissions import _slug, dumps, machine_fingerprint, read, validate

DEFAULT_REPO = "mlxllama/bench-submissions"
REPO_ENV = "MLXLLAMA_BENCH_REPO"
FOLDER = "submissions"
MACHINE_FIELDS = {"system", "os", "cpu", "cpu_cores", "memory_bytes", "model", "gpu_cores", "gpus"}
GPU_FIELDS = {"name", "memory_mb"}
_IDENTIFYING_KEY = re.compile(r"serial|uuid|udid|host|user|login|mac_?addr|ip_?addr|path|dir$", re.IGNORECASE)
_PATH = re.compile(r"(^|[\s(\"'=])(/|~/|[A-Za-z]:[\\/]|\\\\)[^\s]*[/\\]")


def default_repo() -> str:
    return os.environ.get(REPO_ENV) or DEFAULT_REPO


def path_in_repo(sub: dict) -> str:
    from .report import chip_label

    model = sub["model"]
    stamp = re.sub(r"[^0-9T]", "", str(sub["date"]))[:15]
    return (f"{FOLDER}/{_slug(chip_label(sub))}/{_slug(model['id'].rsplit('/', 1)[-1])}_{_slug(model['quant'])}/"
            f"{stamp}_{_slug(sub['backend'])}_{machine_fingerprint(sub)[:8]}.json")


# --- privacy ---

def _strings(obj, where: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{where}.{k}" if where else str(k), str(k), None
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        yield where, None, obj


def _word(needle: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(needle)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def privacy_problems(sub: dict, hostname: str | None = None, user: str | None = None,
                     home: str | None = None) -> list[str]:
    """Every place the submission would reveal who or where it came from (this machine's host name, user name,
    home folder, any file path, a serial-like field); empty when it is safe to publish."""
    hostname = socket.gethostname() if hostname is None else hostname
    user = getpass.getuser() if user is None else user
    home = str(Path.home()) if home is None else home
    names = {n for n in (hostname, hostname.split(".")[0]) if len(n) >= 3}
    problems = []
    machine = sub.get("machine") if isinstance(sub.get("machine"), dict) else {}
    for key in machine:
        if key not in MACHINE_FIELDS:
            problems.append(f"machine.{key}: not a field a submission may carry")
    for i, gpu in enumerate(machine.get("gpus") or []):
        for key in gpu if isinstance(gpu, dict) else ():
            if key not in GPU_FIELDS:
                problems.append(f"machine.gpus[{i}].{key}: not a field a submission may carry")
    for where, key, text in _strings(sub):
        if key is not None:
            if _IDENTIFYING_KEY.search(key):
                problems.append(f"{where}: a field that identifies a machine or a person")
            continue
        if any(_word(n, text) for n in names):
            problems.append(f"{where}: contains this machine's host name")
        elif len(user) >= 3 and _word(user, text):
            problems.append(f"{where}: contains the user name {user!r}")
        elif (len(home) > 1 and home in text) or _PATH.search(text):
            problems.append(f"{where}: contains a file path")
    return problems


# --- submit ---

@dataclass
class Plan:
    repo_id: str
    title: str
    description: str
    files: list[tuple[str, str]] = field(default_factory=list)  # (path in repo, content)

    def describe(self) -> str:
        lines = [f"pull request on dataset {self.repo_id}: {self.title}", "", self.description, ""]
        for path, content in self.files:
            lines += [f"--- {path} ({len(content.encode())} bytes)", content.rstrip("\n")]
        return "\n".join(lines)


def plan(files: list[str | Path], repo_id: str) -> Plan:
    """Read, validate and privacy-check every file; UsageError on the first that fails (nothing is sent)."""
    from ..hub import check_repo_id
    from .report import chip_label

    check_repo_id(repo_id)
    if not files:
        raise UsageError("no submission files given")
    out: list[tuple[str, str]] = []
    chips = []
    for f in files:
        sub = read(f)
        reasons = validate(sub)
        if reasons:
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise UsageError(f"{f}: not submitted, invalid: {reasons[0]}{more}")
        problems = privacy_problems(sub)
        if problems:
            raise UsageError(f"{f}: not submitted, it would reveal private details: {problems[0]}")
        path = path_in_repo(sub)
        taken = {p for p, _ in out}
        n = 2
        while path in taken:
            path = re.sub(r"(-\d+)?\.json$", f"-{n}.json", path)
            n += 1
        out.append((path, dumps(sub)))
        chips.append(f"{chip_label(sub)}, {sub['model']['id']} {sub['model']['quant']}, {sub['backend']}")
    title = f"Benchmark: {chips[0]}" + (f" and {len(chips) - 1} more" if len(chips) > 1 else "")
    description = "Submitted with `mlxllama bench submit`:\n\n" + "\n".join(f"- {c}" for c in chips)
    return Plan(repo_id, title, description, out)


def submit(p: Plan) -> str:
    """Open the pull request; return its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    if constants.is_offline_mode():
        raise NetworkError(f"offline mode is on (HF_HUB_OFFLINE=1): cannot open a pull request on {p.repo_id}; "
                           "unset it to submit, or use --dry-run")
    if not get_token():
        raise NetworkError(f"no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a pull request on "
                           f"{p.repo_id} needs an account)")
    operations = [CommitOperationAdd(path, content.encode()) for path, content in p.files]
    try:
        api = HfApi()
        api.dataset_info(p.repo_id)  # one plain request first: a missing repo or no network fails fast, unretried
        info = api.create_commit(p.repo_id, operations, commit_message=p.title, commit_description=p.description,
                                 repo_type="dataset", create_pr=True)
    except MlxLlamaError:
        raise
    except Exception as e:
        raise explain(e, p.repo_id, "open a pull request on") from e
    return info.pr_url


# --- fetch ---

def _cache_refs(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset") / "refs"


def _cached_pr_refs(repo_id: str) -> list[str]:
    refs = _cache_refs(repo_id) / "refs" / "pr"
    nums = sorted(int(p.name) for p in refs.glob("*") if p.name.isdigit()) if refs.is_dir() else []
    return [f"refs/pr/{n}" for n in nums]


def _main(repo_id: str) -> Path | None:
    """The main branch's JSON files; None when it has none (no snapshot folder is made for an empty selection)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        main = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.json"]))
    except LocalEntryNotFoundError:
        if not (_cache_refs(repo_id) / "main").is_file():  # never fetched
            raise
        return None  # fetched before, and it had no JSON files
    return main if main.is_dir() else None


def fetch(repo_id: str, include_prs: bool = False) -> list[Path]:
    """Local copies of the repo's JSON files: the main branch's folder, then each open pull request's files that
    main lacks (a pull request's snapshot also holds everything on main)."""
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download

    from ..hub import check_repo_id

    check_repo_id(repo_id)
    offline = constants.is_offline_mode()
    revision = "main"
    quiet = logging.getLogger("huggingface_hub._snapshot_download")  # "No files matched": an empty dataset is fine
    level, quiet.level = quiet.level, logging.ERROR
    try:
        main = _main(repo_id)
        folders = [main] if main else []
        if include_prs:
            refs = _cached_pr_refs(repo_id)
            if not offline:
                try:
                    refs = [d.git_reference for d in HfApi().get_repo_discussions(
                        repo_id, repo_type="dataset", discussion_type="pull_request", discussion_status="open")]
                except httpx2.TransportError:  # unreachable: main came from the cache, and so do the PRs
                    pass
            for revision in refs:
                pull = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                              allow_patterns=["*.json"]))
                for f in sorted(pull.rglob("*.json")):
                    on_main = main / f.relative_to(pull) if main else None
                    if not (on_main and on_main.is_file() and on_main.read_bytes() == f.read_bytes()):
                        folders.append(f)
    except MlxLlamaError:
        raise
    except Exception as e:
        raise explain(e, repo_id, "download", revision, offline) from e
    finally:
        quiet.level = level
    return folders


def explain(error: Exception, repo_id: str, action: str, revision: str = "main",
            offline: bool = False) -> Exception:
    """One line for a huggingface_hub / HTTP failure; anything unrecognised is returned as is (a bug to report)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from ..hub import _chain

    endpoint = constants.ENDPOINT
    chain = _chain(error)

    def find(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    if e := find(RepositoryNotFoundError):
        status = e.response.status_code if e.response is not None else None
        if status == 401 and action != "download":
            return NetworkError(f"the Hugging Face token was refused (401) by {endpoint}: log in again with "
                                "`hf auth login` or set HF_TOKEN")
        return NetworkError(f"dataset repo {repo_id} not found on {endpoint} (pass --repo OWNER/NAME or set "
                            f"{REPO_ENV})")
    if find(RevisionNotFoundError):
        return NetworkError(f"revision '{revision}' not found in dataset {repo_id} on {endpoint}")
    if e := find(HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        if status == 401:
            return NetworkError(f"the Hugging Face token was refused (401) by {endpoint}: log in again with "
                                "`hf auth login` or set HF_TOKEN")
        if status == 403:
            return NetworkError(f"access denied (403): the token's account may not {action} dataset {repo_id}")
        return NetworkError(f"{endpoint} answered {status} when trying to {action} {repo_id}: "
                            f"{str(e).splitlines()[0]}")
    if offline or find(OfflineModeIsEnabled):
        return NetworkError(f"dataset {repo_id} (revision {revision}) is not in the local cache and offline mode "
                            "is on (HF_HUB_OFFLINE=1); run the report online once first")
    if e := find(httpx2.TransportError, ConnectionError, TimeoutError):
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return NetworkError(f"cannot reach {endpoint} to {action} {repo_id}: {reason}")
    if isinstance(error, LocalEntryNotFoundError):
        return NetworkError(f"cannot {action} dataset {repo_id} from {endpoint} and it is not in the local cache")
    return error
