"""A stand-in for the Hugging Face Hub on the loopback address, for tests without the internet.

It answers the few endpoints ``huggingface_hub`` uses to download a repo into the
cache (repo info, ``tree``, ``resolve``) and to commit to it (``preupload`` answering
``uploadMode: "regular"`` so that file contents travel inline in the NDJSON commit,
``validate-yaml`` for a README, ``commit``), keeps repos in memory, records every
request, and can be told to fail an endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("GET", "tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
    ("POST", "validate-yaml", re.compile(r"^/api/validate-yaml$")),
    ("HEAD", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("GET", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


@dataclass
class Request:
    method: str
    endpoint: str  # a name from _ROUTES, or "unknown"
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    repo: str
    revision: str
    create_pr: bool
    summary: str
    parent: str | None
    added: dict[str, bytes]
    deleted: list[str]
    oid: str


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str
    prs: list[dict[str, bytes]] = field(default_factory=list)  # the files of each pull request's head


def _sha(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


class FakeHub:
    """The Hub's API for model repos, in memory, on ``http://127.0.0.1:<random port>``.

    ``fail[endpoint] = status`` makes that endpoint answer ``status`` with an error body.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.commits: list[Commit] = []
        self.fail: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        sha = _sha(repo_id, sorted(files))
        self.repos[repo_id] = Repo(dict(files), sha)
        return sha

    def calls(self, endpoint: str) -> list[Request]:
        return [r for r in self.requests if r.endpoint == endpoint]

    # ----------------------------------------------------------------- handlers

    def _answer(self, endpoint: str, match: re.Match[str], request: Request) -> tuple[int, dict[str, str], bytes]:
        if endpoint in self.fail:
            body = json.dumps({"error": f"stand-in Hub: {endpoint} fails on purpose"}).encode()
            return self.fail[endpoint], {"Content-Type": "application/json"}, body
        if endpoint == "validate-yaml":
            return _json({"errors": [], "warnings": []})
        repo = self.repos.get(unquote(match["repo"]))
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if request.method == "POST" and not request.headers.get("authorization", "").startswith("Bearer "):
            return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}, b""
        if endpoint == "info":
            siblings = [{"rfilename": name} for name in sorted(repo.files)]
            return _json({"id": match["repo"], "sha": repo.sha, "siblings": siblings, "private": False})
        if endpoint == "tree":
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(repo.files.items())
            ]
            return _json(entries)
        if endpoint == "preupload":
            files = json.loads(request.body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return _json({"files": modes})
        if endpoint == "resolve":
            content = repo.files.get(unquote(match["path"]))
            if content is None:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, b""
            etag = hashlib.sha256(content).hexdigest()
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Content-Length": str(len(content))}
            return 200, headers, b"" if request.method == "HEAD" else content
        return self._commit(unquote(match["repo"]), unquote(match["rev"]), repo, request)

    def _commit(self, repo_id: str, revision: str, repo: Repo, request: Request) -> tuple[int, dict[str, str], bytes]:
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }
        deleted = [line["value"]["path"] for line in lines if line["key"] == "deletedFile"]
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.sha:
            return 412, {"X-Error-Message": "parent commit is not the head"}, b""
        missing = [path for path in deleted if path not in repo.files]
        if missing:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "A file with this name doesn't exist"}, b""
        create_pr = request.query.get("create_pr") == ["1"]
        files = {path: data for path, data in repo.files.items() if path not in deleted} | added
        oid = _sha(repo_id, repo.sha, sorted(files), len(self.commits))
        self.commits.append(Commit(repo_id, revision, create_pr, header["summary"], parent, added, deleted, oid))
        url = f"{self.url}/{repo_id}/commit/{oid}"
        if create_pr:
            repo.prs.append(files)
            pr_url = f"{self.url}/{repo_id}/discussions/{len(repo.prs)}"
            return _json({"commitUrl": url, "commitOid": oid, "pullRequestUrl": pr_url})
        repo.files, repo.sha = files, oid
        return _json({"commitUrl": url, "commitOid": oid})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                endpoint, match = "unknown", None
                for method, name, pattern in _ROUTES:
                    found = pattern.match(split.path)
                    if method == self.command and found:
                        endpoint, match = name, found
                        break
                request = Request(
                    self.command,
                    endpoint,
                    split.path,
                    parse_qs(split.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with hub._lock:
                    hub.requests.append(request)
                    if match is None:
                        status, headers, payload = 404, {"X-Error-Message": "no such endpoint"}, b""
                    else:
                        status, headers, payload = hub._answer(endpoint, match, request)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = _serve

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler


def _json(data: object) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()
