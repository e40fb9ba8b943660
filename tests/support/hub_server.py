"""A small stand-in for the Hugging Face Hub, for tests of code that uses the real `huggingface_hub` client.

It speaks the parts of the Hub's HTTP protocol that `huggingface_hub` 2.x uses to find and download model files:

* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` (``?blobs=true`` adds sizes, blob ids and
  LFS sha256 to ``siblings``), as ``HfApi.model_info(files_metadata=True)`` calls it;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...`` with cursor pagination through a ``Link`` header, as
  ``HfApi.list_repo_tree`` calls it;
* ``GET /api/models/{repo}/auth-check``;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small (git) files are answered directly with ``ETag`` (git blob
  sha1), ``X-Repo-Commit`` and ``Content-Length``; LFS files get a ``302`` to a second "CDN" server (another port, so
  another origin: the client stops there on HEAD and drops its ``Authorization`` header for the GET, as with the real
  CDN) carrying ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit``;
* ``Range`` requests (``206`` + ``Content-Range``) on both servers, so interrupted transfers can resume;
* Hub-style errors: ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` / ``GatedRepo`` with
  ``401`` (no token) or ``403`` (a token without access) for gated repos.

Faults can be injected per file: drop the connection after N bytes, answer with an HTTP status, or serve bytes that do
not match the advertised sha256. Every request is recorded (method, server, repo, file, Range, status) so tests can
count how often a file was fetched. Tokens the server receives are kept in memory only.

Usage::

    with HubStandIn() as hub:
        hub.add_repo("meta-llama/tiny", {"config.json": b"{}", "model.safetensors": b"..."})
        os.environ["HF_ENDPOINT"] = hub.endpoint
        ...
        hub.get_count("meta-llama/tiny", "model.safetensors")
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".gguf", ".model", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores big files in LFS whatever their name
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: sha1 over ``b"blob <size>\\0"`` followed by the content."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that the git repository holds in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def make_safetensors(
    tensors: Mapping[str, tuple[str, list[int], bytes]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """A valid safetensors file from ``{name: (dtype, shape, raw_bytes)}`` (for fixtures; no numpy needed)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hdr = json.dumps(header, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    return len(hdr).to_bytes(8, "little") + hdr + b"".join(blobs)


@dataclass
class FakeFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """What git stores: the blob itself, or the LFS pointer for LFS files."""
        return git_blob_sha1(lfs_pointer(self.sha256, self.size) if self.lfs else self.data)

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {
                "oid": self.sha256,
                "size": self.size,
                "pointerSize": len(lfs_pointer(self.sha256, self.size)),
            }
        return entry

    def sibling(self, blobs: bool) -> dict:
        s: dict = {"rfilename": self.path}
        if blobs:
            s["size"] = self.size
            s["blobId"] = self.blob_id
            if self.lfs:
                s["lfs"] = {
                    "size": self.size,
                    "sha256": self.sha256,
                    "pointerSize": len(lfs_pointer(self.sha256, self.size)),
                }
        return s


@dataclass
class FakeRepo:
    repo_id: str
    commits: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    authorized_tokens: set[str] = field(default_factory=set)

    def add_revision(self, name: str, files: Mapping[str, bytes], lfs: Iterable[str] | None = None) -> str:
        """Add (or move) branch ``name`` to a new commit holding ``files``; returns the commit sha."""
        lfs_set = set(lfs) if lfs is not None else None
        entries = {}
        for path, data in files.items():
            is_lfs = (
                (path in lfs_set) if lfs_set is not None else (path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE)
            )
            entries[path] = FakeFile(path, bytes(data), is_lfs)
        digest = hashlib.sha1(self.repo_id.encode() + name.encode())
        for path in sorted(entries):
            digest.update(path.encode() + b"\0" + entries[path].blob_id.encode())
        sha = digest.hexdigest()
        self.commits[sha] = entries
        self.refs[name] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        return None


@dataclass
class RequestRecord:
    server: str  # "hub" or "cdn"
    method: str
    url: str
    repo_id: str | None
    path: str | None  # file path in the repo, for resolve / CDN requests
    range: str | None
    authorized: bool  # an Authorization header was sent
    status: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubStandIn/1.0"
    hub: "HubStandIn"  # set on the subclass
    kind: str  # "hub" or "cdn"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # ---- plumbing -------------------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth and auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def _dispatch(self, method: str):
        rec = RequestRecord(
            server=self.kind,
            method=method,
            url=self.path,
            repo_id=None,
            path=None,
            range=self.headers.get("Range"),
            authorized=self.headers.get("Authorization") is not None,
        )
        self._rec = rec
        self.hub._record(rec, self._token())
        try:
            if self.kind == "cdn":
                self._cdn(method)
            else:
                self._hub(method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None, method: str = "GET"):
        self._rec.status = status
        self.send_response(status)
        hdrs = dict(headers or {})
        hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: Mapping[str, str] | None = None, method: str = "GET"):
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        self._send(status, json.dumps(obj).encode(), hdrs, method)

    def _error(
        self, status: int, code: str | None, message: str, method: str = "GET", extra: Mapping[str, str] | None = None
    ):
        hdrs = {"X-Error-Message": message}
        if code:
            hdrs["X-Error-Code"] = code
        hdrs.update(extra or {})
        self._json({"error": message}, status, hdrs, method)

    # ---- the Hub --------------------------------------------------------------------------------------------

    def _hub(self, method: str):
        parts = urlsplit(self.path)
        segs = [unquote(s) for s in parts.path.split("/")[1:]]
        query = parse_qs(parts.query)
        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "models":
            if len(segs) < 4:
                return self._error(404, None, "Not Found", method)
            repo_id = f"{segs[2]}/{segs[3]}"
            self._rec.repo_id = repo_id
            rest = segs[4:]
            repo = self._repo_or_error(repo_id, method)
            if repo is None:
                return
            if not rest:
                return self._model_info(repo, "main", query, method)
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo, rest[1], query, method)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]), query, method)
            if rest == ["auth-check"]:
                if self._gate(repo, method):
                    self._json({"ok": True}, method=method)
                return
            return self._error(404, None, "Not Found", method)
        if len(segs) >= 5 and segs[2] == "resolve":
            repo_id = f"{segs[0]}/{segs[1]}"
            path = "/".join(segs[4:])
            self._rec.repo_id, self._rec.path = repo_id, path
            return self._resolve(repo_id, segs[3], path, method)
        return self._error(404, None, "Not Found", method)

    def _repo_or_error(self, repo_id: str, method: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            # like the Hub: 401 to anonymous callers (it might be private), 404 to authenticated ones
            status = 401 if self._token() is None else 404
            self._error(status, "RepoNotFound", "Repository not found", method)
        return repo

    def _gate(self, repo: FakeRepo, method: str) -> bool:
        """True when the caller may download from ``repo``; otherwise answers like the Hub does and returns False."""
        if not repo.gated:
            return True
        token = self._token()
        if token is not None and token in repo.authorized_tokens:
            return True
        if token is None:
            msg = (
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in."
            )
            self._error(401, "GatedRepo", msg, method)
        else:
            msg = (
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit https://huggingface.co/{repo.repo_id} to ask for access."
            )
            self._error(403, "GatedRepo", msg, method)
        return False

    def _commit_or_error(self, repo: FakeRepo, revision: str, method: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", method)
        return sha

    def _model_info(self, repo: FakeRepo, revision: str, query, method: str):
        sha = self._commit_or_error(repo, revision, method)
        if sha is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true" and not self.hub.info_without_blobs
        files = repo.commits[sha]
        self._json(
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": sha,
                "lastModified": "2025-04-05T00:00:00.000Z",
                "createdAt": "2025-04-05T00:00:00.000Z",
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["llama4", "safetensors"],
                "library_name": "transformers",
                "siblings": [files[p].sibling(blobs) for p in sorted(files)],
            },
            method=method,
        )

    def _tree(self, repo: FakeRepo, revision: str, prefix: str, query, method: str):
        sha = self._commit_or_error(repo, revision, method)
        if sha is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        files = repo.commits[sha]
        base = prefix.rstrip("/") + "/" if prefix else ""
        if prefix and prefix in files:
            return self._error(404, "EntryNotFound", f"{prefix} is a file", method)
        entries: dict[str, dict] = {}
        for p in sorted(files):
            if not p.startswith(base):
                continue
            rel = p[len(base) :]
            parts = rel.split("/")
            for i in range(1, len(parts)):  # folders on the way
                folder = base + "/".join(parts[:i])
                if recursive or i == 1:
                    entries.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0,
                            "path": folder,
                        },
                    )
            if recursive or len(parts) == 1:
                entries[p] = files[p].tree_entry()
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist", method)
        items = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0] or 0)
        page = items[start : start + self.hub.tree_page_size]
        headers = {}
        if start + self.hub.tree_page_size < len(items):
            q = f"recursive={'true' if recursive else 'false'}&expand=false&cursor={start + self.hub.tree_page_size}"
            url = f"{self.hub.endpoint}/api/models/{repo.repo_id}/tree/{quote(revision, safe='')}"
            if prefix:
                url += "/" + quote(prefix, safe="")
            headers["Link"] = f'<{url}?{q}>; rel="next"'
        self._json(page, headers=headers, method=method)

    def _resolve(self, repo_id: str, revision: str, path: str, method: str):
        repo = self._repo_or_error(repo_id, method)
        if repo is None:
            return
        if not self._gate(repo, method):
            return
        sha = self._commit_or_error(repo, revision, method)
        if sha is None:
            return
        f = repo.commits[sha].get(path)
        if f is None:
            return self._error(
                404, "EntryNotFound", f'{path} does not exist on "{revision}"', method, {"X-Repo-Commit": sha}
            )
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            location = f"{self.hub.cdn_endpoint}/lfs/{f.sha256}?repo={quote(repo_id, safe='')}&path={quote(path, safe='')}&X-Amz-Signature=fake"
            pointer = lfs_pointer(f.sha256, f.size)
            headers = dict(common)
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{f.blob_id}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "Content-Type": "text/plain; charset=utf-8",
                }
            )
            return self._send(302, pointer, headers, method)
        self._serve_file(repo_id, f, method, {**common, "ETag": f'"{f.blob_id}"'})

    # ---- file bodies (hub for git files, CDN for LFS) -------------------------------------------------------

    def _cdn(self, method: str):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        m = re.fullmatch(r"/lfs/([0-9a-f]{64})", parts.path)
        repo_id = query.get("repo", [None])[0]
        path = query.get("path", [None])[0]
        self._rec.repo_id, self._rec.path = repo_id, path
        f = None
        if m and repo_id in self.hub.repos:
            for files in self.hub.repos[repo_id].commits.values():
                cand = files.get(path)
                if cand is not None and cand.sha256 == m.group(1):
                    f = cand
                    break
        if f is None:
            return self._send(404, b"NoSuchKey", {"Content-Type": "text/plain"}, method)
        self._serve_file(repo_id, f, method, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

    def _serve_file(self, repo_id: str, f: FakeFile, method: str, headers: dict):
        data = f.data
        if (repo_id, f.path) in self.hub.corrupted:
            data = bytes([data[0] ^ 0xFF]) + data[1:] if data else data
        if method == "GET":
            fault = self.hub._next_fault(repo_id, f.path)
            if fault is not None:
                kind, arg = fault
                if kind == "status":
                    return self._error(arg, None, f"injected HTTP {arg}", method)
                if kind == "drop":
                    return self._drop(data, arg, headers)
                if kind == "stall":
                    return self._stall(data, arg, headers)
        start, end = 0, len(data) - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and data:
            m = _RANGE_RE.match(rng.strip())
            if m is None:
                return self._error(416, None, "Bad range", method)
            a, b = m.groups()
            if a == "":
                start = max(0, len(data) - int(b))
            else:
                start = int(a)
                if b != "":
                    end = min(int(b), len(data) - 1)
            if start >= len(data) or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, method)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        body = data[start : end + 1]
        headers = {**headers, "Content-Type": "application/octet-stream"}
        self._send(status, body, headers, method)
        if method == "GET":
            self.hub._count(repo_id, f.path, len(body))

    def _stall(self, data: bytes, after: int, headers: dict):
        """Send ``after`` bytes, set ``hub.stalled``, wait for ``hub.release`` (at most 30 s), then send the rest."""
        self._rec.status = 200
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:after])
        self.wfile.flush()
        self.hub.stalled.set()
        self.hub.release.wait(30)
        self.wfile.write(data[after:])

    def _drop(self, data: bytes, after: int, headers: dict):
        """Promise the whole file, send ``after`` bytes of it, then cut the connection."""
        self._rec.status = 200
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[: max(0, min(after, len(data) - 1))])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _TrapHandler(BaseHTTPRequestHandler):
    """Stands in as the HTTP(S) proxy for test subprocesses: anything that tries to leave 127.0.0.1 ends up here."""

    protocol_version = "HTTP/1.1"
    hub: "HubStandIn"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _refuse(self):
        with self.hub._lock:
            self.hub.escaped.append(f"{self.command} {self.path}")
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_CONNECT = _refuse


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    errors: list  # set per instance

    def handle_error(self, request, client_address):  # a client hanging up mid-request is part of the tests
        import sys

        self.errors.append(repr(sys.exc_info()[1]))


class HubStandIn:
    """Threaded HTTP servers on 127.0.0.1, ephemeral ports, background threads: the Hub, its LFS "CDN", a proxy trap."""

    def __init__(self, tree_page_size: int = 1000):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RequestRecord] = []
        self.tokens_seen: list[str] = []
        self.corrupted: set[tuple[str, str]] = set()
        self.tree_page_size = tree_page_size
        self.info_without_blobs = False  # True: model_info ignores ?blobs=true (clients must fall back to the tree API)
        self._faults: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
        self._gets: dict[tuple[str, str], int] = defaultdict(int)
        self._bytes: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        self.stalled = threading.Event()  # a "stall" fault has sent its first part
        self.release = threading.Event()  # lets stalled transfers finish
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.server_errors: list[str] = []  # exceptions in request handlers (e.g. clients that hung up)
        self.escaped: list[str] = []  # requests that tried to go anywhere but 127.0.0.1 (through the trap proxy)
        self.endpoint = ""
        self.cdn_endpoint = ""
        self.trap_endpoint = ""

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "HubStandIn":
        for kind in ("hub", "cdn", "trap"):
            if kind == "trap":
                handler = type("_BoundTrapHandler", (_TrapHandler,), {"hub": self})
            else:
                handler = type(f"_{kind.title()}Handler", (_Handler,), {"hub": self, "kind": kind})
            srv = _QuietServer(("127.0.0.1", 0), handler)
            srv.errors = self.server_errors
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
            url = f"http://127.0.0.1:{srv.server_address[1]}"
            setattr(self, {"hub": "endpoint", "cdn": "cdn_endpoint", "trap": "trap_endpoint"}[kind], url)
        return self

    def client_env(self, base: Mapping[str, str] | None = None, hf_home: str | None = None) -> dict[str, str]:
        """Environment for a subprocess that must talk to this stand-in and nothing else.

        ``HF_ENDPOINT`` points at the stand-in; every proxy variable points at a trap server that records (and
        refuses) any request for another host, so a stray call to huggingface.co shows up in ``escaped``; tokens and
        the cache are isolated when ``hf_home`` is given.
        """
        import os

        env = dict(os.environ if base is None else base)
        for k in list(env):
            if k.upper() in (
                "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN",
                "HF_HUB_OFFLINE",
                "HF_HUB_CACHE",
                "HF_TOKEN_PATH",
            ) or k.upper().endswith("_PROXY"):
                del env[k]
        env.update(
            HF_ENDPOINT=self.endpoint,
            HTTP_PROXY=self.trap_endpoint,
            HTTPS_PROXY=self.trap_endpoint,
            ALL_PROXY=self.trap_endpoint,
            NO_PROXY="127.0.0.1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
        )
        if hf_home is not None:
            env["HF_HOME"] = str(hf_home)
        return env

    def stop(self) -> None:
        self.release.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- content ------------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        lfs: Iterable[str] | None = None,
        gated: bool = False,
        authorized_tokens: Iterable[str] = (),
        branch: str = "main",
    ) -> FakeRepo:
        """Create ``repo_id`` with one commit on ``branch``. LFS files: ``lfs`` if given, else by suffix/size."""
        repo = FakeRepo(repo_id, gated=gated, authorized_tokens=set(authorized_tokens))
        repo.add_revision(branch, files, lfs)
        self.repos[repo_id] = repo
        return repo

    def file(self, repo_id: str, path: str, revision: str = "main") -> FakeFile:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)][path]

    # ---- fault injection ------------------------------------------------------------------------------------

    def drop_after(self, repo_id: str, path: str, nbytes: int) -> None:
        """The next GET of this file sends ``nbytes`` bytes, then the connection is cut."""
        with self._lock:
            self._faults[(repo_id, path)].append(("drop", nbytes))

    def stall_after(self, repo_id: str, path: str, nbytes: int) -> None:
        """The next GET of this file sends ``nbytes`` bytes, sets ``stalled``, and waits for ``release`` to finish."""
        with self._lock:
            self._faults[(repo_id, path)].append(("stall", nbytes))

    def fail_with(self, repo_id: str, path: str, status: int, times: int = 1) -> None:
        """The next ``times`` GETs of this file are answered with HTTP ``status``."""
        with self._lock:
            self._faults[(repo_id, path)].extend([("status", status)] * times)

    def corrupt(self, repo_id: str, path: str, on: bool = True) -> None:
        """Serve this file with its first byte flipped (same size, wrong sha256), until turned off."""
        with self._lock:
            (self.corrupted.add if on else self.corrupted.discard)((repo_id, path))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self.corrupted.clear()

    # ---- what happened --------------------------------------------------------------------------------------

    def get_count(self, repo_id: str, path: str) -> int:
        """GET requests for this file's content (including ones cut short or failed by injected faults)."""
        with self._lock:
            return self._gets[(repo_id, path)]

    def bytes_served(self, repo_id: str, path: str) -> int:
        with self._lock:
            return self._bytes[(repo_id, path)]

    def get_counts(self, repo_id: str) -> dict[str, int]:
        with self._lock:
            return {p: n for (r, p), n in self._gets.items() if r == repo_id}

    def requests_for(self, repo_id: str, path: str | None = None, method: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.repo_id == repo_id and (path is None or r.path == path) and (method is None or r.method == method)
            ]

    # ---- internals ------------------------------------------------------------------------------------------

    def _record(self, rec: RequestRecord, token: str | None) -> None:
        with self._lock:
            self.requests.append(rec)
            if token is not None:
                self.tokens_seen.append(token)

    def _next_fault(self, repo_id: str, path: str) -> tuple[str, int] | None:
        with self._lock:
            key = (repo_id, path)
            self._gets[key] += 1  # every content GET counts, faulty or not
            queue = self._faults.get(key)
            return queue.pop(0) if queue else None

    def _count(self, repo_id: str, path: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[(repo_id, path)] += nbytes


def sample_llama4_repo(big_shard_size: int = 0, seed: int = 0) -> dict[str, bytes]:
    """Files shaped like a Llama 4 repo (hf layout at the root, Meta's checkpoint under ``original/``), tiny.

    ``big_shard_size`` > 0 makes the second shard that many bytes (pass > 10 MiB to exercise huggingface_hub's
    resume-with-Range path, which only kicks in after its first 10 MiB chunk). The contents are placeholders, not a
    loadable model; use `llama4_quant.tiny.checkpoints` for real tensors.
    """
    import random

    rng = random.Random(seed)
    shard1 = make_safetensors(
        {"language_model.model.embed_tokens.weight": ("BF16", [64, 64], rng.randbytes(64 * 64 * 2))},
        {"format": "pt"},
    )
    n2 = max(1, (big_shard_size - 200) // 2) if big_shard_size else 32 * 64
    shard2 = make_safetensors(
        {"language_model.lm_head.weight": ("BF16", [n2], rng.randbytes(n2 * 2))}, {"format": "pt"}
    )
    index = {
        "metadata": {"total_size": 64 * 64 * 2 + n2 * 2},
        "weight_map": {
            "language_model.model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "language_model.lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {"model_type": "llama4_text", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 64},
    }
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pth filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# tiny Llama 4 stand-in\n",
        "LICENSE": b"LLAMA 4 COMMUNITY LICENSE AGREEMENT (placeholder)\n",
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}\n',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 8192}\n',
        "special_tokens_map.json": b'{"bos_token": "<|begin_of_text|>"}\n',
        "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
        "model-00001-of-00002.safetensors": shard1,
        "model-00002-of-00002.safetensors": shard2,
        "model.safetensors.index.json": json.dumps(index, indent=2).encode(),
        "original/params.json": b'{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 64}\n',
        "original/consolidated.00.pth": b"PK\x03\x04" + rng.randbytes(4096),
        "original/tokenizer.model": rng.randbytes(512),
        "assets/diagram.png": b"\x89PNG\r\n\x1a\n" + rng.randbytes(64),
    }


def point_client_at(hub: HubStandIn, monkeypatch, hf_home: str) -> None:
    """Point huggingface_hub *in this process* at ``hub`` (for CliRunner / direct calls), with pytest's monkeypatch.

    Sets the environment from `HubStandIn.client_env` (HF_ENDPOINT, trap proxies, a throw-away HF_HOME, no token)
    and patches the values huggingface_hub froze at import time (endpoint, resolve URL template, token file), then
    drops its shared HTTP session so the next one picks up the proxy settings. Everything is undone by monkeypatch;
    call ``huggingface_hub.utils.close_session()`` on teardown too.
    """
    import os

    import huggingface_hub.constants as C
    from huggingface_hub.utils import close_session

    env = hub.client_env(hf_home=hf_home)
    for k in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(C, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(C, "HF_TOKEN_PATH", os.path.join(hf_home, "token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", os.path.join(hf_home, "stored_tokens"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    close_session()
