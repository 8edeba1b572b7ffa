"""A local stand-in for the Hugging Face hub: a real HTTP server on 127.0.0.1 that answers the requests
huggingface_hub 2.x makes for model and dataset downloads, and for commits and pull requests on dataset repos.
{kind} is "models" or "datasets" (a repo answers only under its own kind); dataset files resolve under
/datasets/{repo}.

    GET  /api/{kind}/{repo}[/revision/{rev}]         repo info: id, sha, siblings, gated
    GET  /api/{kind}/{repo}/tree/{rev}[/{path}]      file list: type, path, size, oid (+ lfs for weight files)
    HEAD /[datasets/]{repo}/resolve/{rev}/{file}     metadata: X-Repo-Commit, ETag, Content-Length; weight files
                                                     ("LFS") answer 302 to a CDN address with X-Linked-Etag/-Size
    GET  /[datasets/]{repo}/resolve/{rev}/{file}, /cdn/{sha256}   the bytes, with Range -> 206
    POST /api/{kind}/{repo}/preupload/{rev}          every file "regular" (no LFS upload step)
    POST /api/{kind}/{repo}/commit/{rev}[?create_pr=1]   NDJSON: a header line, then "file" lines (base64) and
                                                     "deletedFile" lines; with create_pr the commit goes to a new
                                                     revision refs/pr/N (a copy of rev plus the changes) and an open
                                                     pull request N is listed
    GET  /api/{kind}/{repo}/discussions              pull requests (and their status), one page

A revision is a branch name, a PR ref ("refs/pr/1", URL-quoted as one path segment) or a commit sha. Writes need
a token from `tokens` (401 without or with an unknown one); a repo with `writers` set accepts only those (403).

Errors carry the X-Error-Code header huggingface_hub dispatches on: RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo (401 without a token, 403 with one).

Knobs: `cut_after[name] = n` drops the connection after n body bytes of the next GET of that file (once);
`broken[name] = status` answers GETs of that file's bytes with that error status (after any pending cut);
`throttle` limits file bodies to that many bytes per second; `log` records every request (method, path, headers,
status, body bytes sent so far) so tests can check what the client asked for.

The CDN address uses "localhost" while the hub is "127.0.0.1": a different origin, as on the real hub, so
huggingface_hub takes the metadata from the 302 itself and fetches the bytes from the redirect target.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".pkl")


@dataclass
class PullRequest:
    num: int
    title: str
    description: str
    author: str
    status: str = "open"


@dataclass
class FakeRepo:
    revisions: dict[str, dict[str, bytes]]  # branch name or refs/pr/N -> {path in repo: content}
    gated: bool = False
    kind: str = "models"  # or "datasets"
    writers: set[str] | None = None  # tokens allowed to commit (None: every known token)
    pulls: list[PullRequest] = field(default_factory=list)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes written so far
    aborted: bool = False


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    broken: dict[str, int] = field(default_factory=dict)  # file name -> HTTP status for GETs of its bytes
    throttle: float | None = None  # bytes per second for file bodies
    log: list[Request] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> user name
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None,
                 revisions: dict[str, dict[str, bytes]] | None = None, gated: bool = False,
                 kind: str = "models") -> FakeRepo:
        repo = FakeRepo(revisions=dict(revisions or {}), gated=gated, kind=kind)
        if files is not None:
            repo.revisions["main"] = files
        self.repos[repo_id] = repo
        return repo

    def sha(self, repo_id: str, branch: str = "main") -> str:
        files = self.repos[repo_id].revisions[branch]
        h = hashlib.sha1(f"{repo_id}@{branch}".encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
        return h.hexdigest()

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        return [r for r in list(self.log) if (method is None or r.method == method) and contains in r.path]

    # ---- lookups

    def _branch(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        if rev in repo.revisions:
            return rev
        return next((b for b in repo.revisions if self.sha(repo_id, b) == rev), None)

    def _by_sha256(self, digest: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for files in repo.revisions.values():
                for name, content in files.items():
                    if hashlib.sha256(content).hexdigest() == digest:
                        return name, content
        return None


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(name: str) -> bool:
    return name.lower().endswith(LFS_SUFFIXES)


class _Handler(BaseHTTPRequestHandler):
    """The hub's routes; make_handler gives each FakeHub its subclass (the class attribute hub)."""
    hub: FakeHub

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.route(body=False)

    def do_GET(self):
        self.route(body=True)

    def do_POST(self):
        self.route(body=True)

    # ---- plumbing

    def start(self, status: int, headers: dict[str, str]) -> None:
        self.entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def reply_json(self, data, body: bool) -> None:
        raw = json.dumps(data).encode()
        self.start(200, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
        if body:
            self.wfile.write(raw)

    def error(self, status: int, code: str, message: str, body: bool, extra: dict | None = None) -> None:
        raw = json.dumps({"error": message}).encode()
        self.start(status, {"Content-Type": "application/json", "Content-Length": str(len(raw)),
                            "X-Error-Code": code, "X-Error-Message": message, **(extra or {})})
        if body:
            self.wfile.write(raw)

    def route(self, body: bool) -> None:
        self.entry = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.hub.log.append(self.entry)
        raw_parts = urlsplit(self.path).path.strip("/").split("/")
        parts = [unquote(p) for p in raw_parts]
        if parts[:1] == ["cdn"] and len(parts) == 2:
            found = self.hub._by_sha256(parts[1])
            if found is None:
                return self.error(404, "EntryNotFound", "Entry not found", body)
            name, content = found
            return self.send_file(name, content, {"ETag": f'"{parts[1]}"'}, body)
        if self.command == "POST":
            if parts[:1] == ["api"] and len(parts) == 6 and parts[4] in ("preupload", "commit"):
                return self.write(parts[1], f"{parts[2]}/{parts[3]}", parts[4], parts[5])
            return self.error(404, "NotFound", "not found", body)
        if parts[:1] == ["api"] and parts[1:2] in (["models"], ["datasets"]) and len(parts) >= 4:
            return self.api(parts[1], f"{parts[2]}/{parts[3]}", parts[4:], body)
        kind = "models"
        if parts[:1] == ["datasets"]:
            kind, parts = "datasets", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body, kind)
        self.error(404, "NotFound", "not found", body)

    # ---- endpoints

    def find_repo(self, kind: str, repo_id: str, body: bool) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or repo.kind != kind:
            self.error(404, "RepoNotFound", "Repository not found", body)
            return None
        return repo

    def api(self, kind: str, repo_id: str, rest: list[str], body: bool) -> None:
        repo = self.find_repo(kind, repo_id, body)
        if repo is None:
            return
        if rest == ["discussions"]:
            pulls = [{"num": pr.num, "title": pr.title, "status": pr.status, "isPullRequest": True,
                      "author": {"name": pr.author}, "createdAt": "2025-01-01T00:00:00.000Z",
                      "repo": {"name": repo_id, "type": kind[:-1]}} for pr in reversed(repo.pulls)]
            query = parse_qs(urlsplit(self.path).query)
            if query.get("status", ["all"])[0] != "all":
                pulls = [p for p in pulls if p["status"] == query["status"][0]]
            return self.reply_json({"discussions": pulls, "count": len(pulls), "start": 0,
                                    "numClosedDiscussions": 0}, body)
        rev = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
        branch = self.hub._branch(repo_id, rev)
        if branch is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
        files = repo.revisions[branch]
        sha = self.hub.sha(repo_id, branch)
        if rest[:1] == ["tree"]:
            under = "/".join(rest[2:])
            if under:
                files = {n: c for n, c in files.items() if n.startswith(under + "/")}
            entries = []
            folders = sorted({"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)})
            folders = [f for f in folders if f != under and f.startswith(under)]
            for folder in folders:
                entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                "size": 0, "path": folder})
            for name in sorted(files):
                content = files[name]
                entry = {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": name}
                if is_lfs(name):
                    entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content),
                                    "pointerSize": 134}
                entries.append(entry)
            return self.reply_json(entries, body)
        info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "sha": sha, "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
                "lastModified": "2025-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": name} for name in sorted(files)]}
        self.reply_json(info, body)

    def write(self, kind: str, repo_id: str, action: str, rev: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        token = self.entry.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.hub.tokens:
            return self.error(401, "Unauthorized", "Invalid credentials in Authorization header", True)
        repo = self.find_repo(kind, repo_id, True)
        if repo is None:
            return
        if repo.writers is not None and token not in repo.writers:
            return self.error(403, "Forbidden", f"You don't have the rights to open a pull request on "
                              f"{repo_id}", True)
        branch = self.hub._branch(repo_id, rev)
        if branch is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", True)
        if action == "preupload":
            files = json.loads(raw)["files"]
            return self.reply_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                               "oid": None} for f in files]}, True)
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self.error(400, "BadRequest", "the first line must be the commit header", True)
        files = dict(repo.revisions[branch])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile" and value["path"] in files:
                del files[value["path"]]
            else:
                return self.error(400, "BadRequest", f"unsupported commit line {line['key']!r}", True)
        prefix = f"{self.hub.url}/{'datasets/' if kind == 'datasets' else ''}{repo_id}"
        pr_url = None
        if parse_qs(urlsplit(self.path).query).get("create_pr") == ["1"]:
            num = len(repo.pulls) + 1
            header = lines[0]["value"]
            repo.pulls.append(PullRequest(num, header.get("summary", ""), header.get("description", ""),
                                          self.hub.tokens[token]))
            branch = f"refs/pr/{num}"
            pr_url = f"{prefix}/discussions/{num}"
        repo.revisions[branch] = files
        sha = self.hub.sha(repo_id, branch)
        self.reply_json({"commitUrl": f"{prefix}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url},
                        True)

    def resolve(self, repo_id: str, rev: str, name: str, body: bool, kind: str = "models") -> None:
        repo = self.find_repo(kind, repo_id, body)
        if repo is None:
            return
        if repo.gated:
            if "authorization" not in self.entry.headers:
                return self.error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                  "access to it and be authenticated to access it. Please log in.", body)
            return self.error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                              "the authorized list.", body)
        branch = self.hub._branch(repo_id, rev)
        if branch is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
        sha = self.hub.sha(repo_id, branch)
        files = repo.revisions[branch]
        if name not in files:
            return self.error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"", body,
                              {"X-Repo-Commit": sha})
        content = files[name]
        if is_lfs(name):
            digest = hashlib.sha256(content).hexdigest()
            self.start(302, {"Location": f"http://localhost:{self.hub.port}/cdn/{digest}", "X-Repo-Commit": sha,
                             "ETag": f'"{git_blob_oid(content)}"', "X-Linked-Etag": f'"{digest}"',
                             "X-Linked-Size": str(len(content)), "Content-Length": "0"})
            return
        self.send_file(name, content, {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": sha}, body)

    def send_file(self, name: str, content: bytes, headers: dict[str, str], body: bool) -> None:
        if body and name in self.hub.broken and name not in self.hub.cut_after:
            return self.error(self.hub.broken[name], "ServerError", "the storage backend failed", body)
        start, size = 0, len(content)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        wanted = self.entry.headers.get("range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start, end = int(first), (int(last) if last else size - 1)
            if start >= size:
                return self.error(416, "RangeNotSatisfiable", "bad range", body)
            chunk = content[start:end + 1]
            self.start(206, {**headers, "Content-Length": str(len(chunk)),
                             "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{size}"})
        else:
            chunk = content
            self.start(200, {**headers, "Content-Length": str(size)})
        if not body:
            return
        limit = self.hub.cut_after.pop(name, None)
        if limit is not None:
            chunk = chunk[:limit]
        try:
            step = 8192
            for i in range(0, len(chunk), step):
                self.wfile.write(chunk[i:i + step])
                self.wfile.flush()
                self.entry.sent += len(chunk[i:i + step])
                if self.hub.throttle:
                    time.sleep(step / self.hub.throttle)
        except (BrokenPipeError, ConnectionResetError):
            self.entry.aborted = True
            self.close_connection = True
            return
        if limit is not None:
            self.entry.aborted = True
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def make_handler(hub: FakeHub):
    return type("Handler", (_Handler,), {"hub": hub})


def start_hub() -> tuple[FakeHub, ThreadingHTTPServer]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    server.daemon_threads = True
    hub.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server


@pytest.fixture
def fakehub():
    hub, server = start_hub()
    yield hub
    server.shutdown()
    server.server_close()
