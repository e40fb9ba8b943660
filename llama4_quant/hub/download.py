"""Download a Llama 4 checkpoint from the Hugging Face Hub: resumable, checked for disk space, verified by hash.

The transfers themselves are `huggingface_hub`'s (``hf_hub_download``, one call per file, in a thread pool): it
resolves the files, follows the CDN redirects, retries a dropped transfer with a ``Range`` request, writes to a
temporary file and moves it into place, and skips files that an earlier run already finished. Around it this module
adds what a 200 GB checkpoint needs:

* the file list, sizes and hashes from the Hub's metadata (``HfApi.model_info(files_metadata=True)``, falling back to
  ``list_repo_tree``), pinned to one commit so every file comes from the same revision;
* a free-space check before anything is fetched;
* verification of every file after download: sha256 for LFS files, the git blob sha1 for small git files. A file that
  does not match is deleted (so the next run fetches it again) and reported by name;
* a manifest of verified files (keyed by size and mtime) so that a rerun, or `resolve_model` from another command,
  does not hash hundreds of gigabytes again, and so a complete download can be reused when the Hub is unreachable.

Files go to ``local_dir`` when given (huggingface_hub's local-dir mode, metadata under ``local_dir/.cache/``), else
into the Hugging Face cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), and the result's ``local_dir`` is the snapshot
folder there. The token is handed to huggingface_hub only; it is never printed, logged or written by this module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import (
    DiskSpaceError,
    GatedRepoAccessError,
    HashMismatchError,
    HubError,
    HubNetworkError,
    RepoNotFoundError,
    classify,
    http_status,
)
from .layout import LAYOUTS, select_files

HUB_URL = "https://huggingface.co"
MANIFEST_NAME = "download.json"
_HASH_CHUNK = 8 * 1024 * 1024
_MANIFEST_FORMAT = 1

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the pinned commit, as the Hub describes it."""

    path: str
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # the git blob id (for LFS files: of the pointer, so unused)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def algo(self) -> str:
        return "sha256" if self.is_lfs else "git_sha1"

    @property
    def digest(self) -> str | None:
        return self.sha256 if self.is_lfs else self.git_sha1

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "git_sha1": self.git_sha1}

    @classmethod
    def from_json(cls, d: dict) -> "RemoteFile":
        return cls(d["path"], int(d["size"]), d.get("sha256"), d.get("git_sha1"))


@dataclass
class FileResult:
    path: str
    size: int
    algo: str  # "sha256" or "git_sha1"
    digest: str
    verified: bool
    downloaded: bool = False  # bytes were transferred for it in this run
    transferred: int = 0

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "size": self.size,
            self.algo: self.digest,
            "verified": self.verified,
            "downloaded": self.downloaded,
        }


@dataclass
class DownloadResult:
    repo_id: str
    revision: str
    commit: str
    local_dir: Path
    layout: str
    files: list[FileResult]
    seconds: float
    offline: bool = False  # the Hub was unreachable and a complete verified copy was reused

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def downloaded_bytes(self) -> int:
        return sum(f.transferred for f in self.files)

    @property
    def downloaded_files(self) -> int:
        return sum(1 for f in self.files if f.downloaded)

    def to_json(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "local_dir": str(self.local_dir),
            "layout": self.layout,
            "files": [f.to_json() for f in self.files],
            "total_bytes": self.total_bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "seconds": round(self.seconds, 3),
            "offline": self.offline,
        }


# ---------------------------------------------------------------------------------------------------------------------
# small helpers


FREE_BYTES_ENV = "LLAMA4_QUANT_TEST_FREE_BYTES"


def disk_free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent).

    Tests pretend the disk is full by monkeypatching this function or, for a subprocess, by setting
    ``$LLAMA4_QUANT_TEST_FREE_BYTES``.
    """
    fake = os.environ.get(FREE_BYTES_ENV)
    if fake:
        return int(fake)
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return shutil.disk_usage(Path.cwd()).free


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def default_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its constants are frozen at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL: ``endpoint``, else ``$HF_ENDPOINT`` as it is now, else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def file_digest(path: str | os.PathLike, algo: str, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of the file, or its git blob sha1 (sha1 over ``b"blob <size>\\0" + content``)."""
    if algo == "sha256":
        h = hashlib.sha256()
    elif algo == "git_sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % os.stat(path).st_size)
    else:
        raise ValueError(f"unknown hash {algo!r}")
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------------
# where files go


class _Target:
    """local-dir mode (files at ``local_dir/<path>``) or cache mode (``<cache>/models--org--name/snapshots/<commit>``)."""

    def __init__(self, repo_id: str, local_dir: Path | None, cache_dir: Path):
        self.repo_id = repo_id
        self.local_dir = local_dir
        self.cache_dir = cache_dir
        self.storage = cache_dir / ("models--" + repo_id.replace("/", "--"))

    @property
    def base(self) -> Path:
        """The folder whose filesystem receives the bytes."""
        return self.local_dir if self.local_dir is not None else self.cache_dir

    def root(self, commit: str) -> Path:
        return self.local_dir if self.local_dir is not None else self.storage / "snapshots" / commit

    def file_path(self, commit: str, path: str) -> Path:
        return self.root(commit).joinpath(*path.split("/"))

    @property
    def manifest_path(self) -> Path:
        if self.local_dir is not None:
            return self.local_dir / ".cache" / "llama4_quant" / MANIFEST_NAME
        return self.storage / ".llama4_quant" / MANIFEST_NAME

    def hf_kwargs(self) -> dict:
        if self.local_dir is not None:
            return {"local_dir": str(self.local_dir), "cache_dir": str(self.cache_dir)}
        return {"cache_dir": str(self.cache_dir)}

    def present(self, commit: str, rf: RemoteFile) -> bool:
        """A file of the right size is already where it goes (or, in the cache, its blob is): nothing to fetch."""
        candidates = [self.file_path(commit, rf.path)]
        if self.local_dir is None and rf.digest:
            candidates.append(self.storage / "blobs" / rf.digest)
        for c in candidates:
            try:
                if c.stat().st_size == rf.size:
                    return True
            except OSError:
                continue
        return False

    def remove(self, commit: str, path: str) -> None:
        """Delete a (corrupt) file so the next run downloads it again; in the cache, its blob too."""
        p = self.file_path(commit, path)
        if self.local_dir is None and p.is_symlink():
            blob = p.resolve()
            blob.unlink(missing_ok=True)
        p.unlink(missing_ok=True)

    def record_ref(self, revision: str, commit: str) -> None:
        """In cache mode, point ``refs/<revision>`` at the commit, as snapshot_download does (for offline use)."""
        if self.local_dir is not None or revision == commit:
            return
        ref = self.storage / "refs" / revision
        try:
            if ref.is_file() and ref.read_text() == commit:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------------------
# manifest of verified files


class _Manifest:
    """What this tool verified earlier: ``{path: {algo, digest, size, mtime_ns}}`` plus the last file listing."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("format") == _MANIFEST_FORMAT:
                self.data = data
        except (OSError, ValueError):
            pass
        self.data.setdefault("format", _MANIFEST_FORMAT)
        self.data.setdefault("verified", {})
        self._lock = threading.Lock()

    def is_verified(self, rf: RemoteFile, file_path: Path) -> bool:
        entry = self.data["verified"].get(rf.path)
        if not entry or entry.get("algo") != rf.algo or entry.get("digest") != rf.digest:
            return False
        try:
            st = file_path.stat()
        except OSError:
            return False
        return st.st_size == rf.size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns")

    def mark_verified(self, rf: RemoteFile, file_path: Path) -> None:
        st = file_path.stat()
        with self._lock:
            self.data["verified"][rf.path] = {
                "algo": rf.algo,
                "digest": rf.digest,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }

    def forget(self, path: str) -> None:
        with self._lock:
            self.data["verified"].pop(path, None)

    def set_listing(self, repo_id: str, revision: str, commit: str, files: dict[str, RemoteFile]) -> None:
        with self._lock:
            self.data.update(
                repo_id=repo_id,
                revision=revision,
                commit=commit,
                repo_files=[files[p].to_json() for p in sorted(files)],
            )

    def listing_for(self, repo_id: str, revision: str) -> tuple[str, dict[str, RemoteFile]] | None:
        d = self.data
        if d.get("repo_id") != repo_id or revision not in (d.get("revision"), d.get("commit")):
            return None
        try:
            files = {f["path"]: RemoteFile.from_json(f) for f in d.get("repo_files", [])}
        except (KeyError, TypeError, ValueError):
            return None
        return d["commit"], files

    def save(self) -> None:
        with self._lock:
            snapshot = json.loads(json.dumps(self.data))
        try:
            _atomic_write_json(self.path, snapshot)
        except OSError:
            pass  # the manifest only saves work next time; never fail a download over it


# ---------------------------------------------------------------------------------------------------------------------
# progress: a tqdm stand-in for huggingface_hub that feeds one rich bar


class _Cancelled(Exception):
    """Raised inside a worker's progress callback to abort its transfer (Ctrl-C, or a fatal error elsewhere)."""


class _Progress:
    def __init__(self, enabled: bool, label: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._label = label
        self._dl = None
        self._verify = None

    def __enter__(self) -> "_Progress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, download_total: int, verify_total: int) -> None:
        if download_total:
            self._dl = self._progress.add_task(f"download {self._label}", total=download_total)
        if verify_total:
            self._verify = self._progress.add_task("verify", total=verify_total)

    def downloaded(self, n: int) -> None:
        if self.cancelled.is_set():
            raise _Cancelled()
        if self._dl is not None and n:
            with self._lock:
                self._progress.advance(self._dl, n)

    def verified(self, n: int) -> None:
        if self.cancelled.is_set():
            raise _Cancelled()
        if self._verify is not None and n:
            with self._lock:
                self._progress.advance(self._verify, n)

    def bar_class(self, counter: dict):
        """A class huggingface_hub can use as ``tqdm_class`` for one file; counts its bytes into ``counter``."""
        progress = self

        class _FileBar:
            def __init__(self, *args, total=None, initial=0, **kwargs):
                self.total = total
                self.n = initial or 0
                self.format_dict: dict = {}

            def update(self, n=1):
                n = int(n or 0)
                self.n += n
                counter["bytes"] = counter.get("bytes", 0) + n
                progress.downloaded(n)

            def update_transfer(self, n=1):  # xet: network bytes; disk bytes come through update()
                if progress.cancelled.is_set():
                    raise _Cancelled()

            def set_postfix_str(self, *args, **kwargs):
                pass

            def set_transfer_postfix_str(self, *args, **kwargs):
                pass

            def set_description(self, *args, **kwargs):
                pass

            def set_description_str(self, *args, **kwargs):
                pass

            def refresh(self, *args, **kwargs):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return _FileBar


# ---------------------------------------------------------------------------------------------------------------------
# turning huggingface_hub / network errors into one line


def _gated_message(repo_id: str, status: int | None) -> str:
    why = (
        "no valid token was sent"
        if status == 401
        else "the token has not been granted access"
        if status == 403
        else "access was refused"
    )
    code = f" (HTTP {status})" if status else ""
    return (
        f"{repo_id} is a gated repo and {why}{code}: accept the licence on {HUB_URL}/{repo_id} and pass a token "
        "with access via --token TOKEN, the HF_TOKEN environment variable, or `hf auth login`"
    )


def translate_hub_error(
    exc: BaseException, repo_id: str, revision: str, endpoint: str, path: str | None = None
) -> HubError | None:
    """The one-line error for an exception from huggingface_hub / httpx, or None if it is not a Hub problem."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    what = f" ({path})" if path else ""
    status = http_status(exc)
    kind = classify(exc)
    if kind == "gated":
        return GatedRepoAccessError(_gated_message(repo_id, status))
    if kind == "revision":
        return RepoNotFoundError(f"revision {revision!r} not found in {repo_id} (expected a branch, tag or commit)")
    if kind == "entry":
        return RepoNotFoundError(f"file {path or '?'} not found in {repo_id} at revision {revision!r}")
    if kind == "disabled":
        return RepoNotFoundError(f"{repo_id} has been disabled on the Hub")
    if kind == "repo":
        return RepoNotFoundError(
            f"repository {repo_id} not found on {endpoint} (HTTP {status}); check the name, and if it is private "
            "pass a token via --token, HF_TOKEN or `hf auth login`"
        )
    if kind == "invalid":
        return RepoNotFoundError(f"{repo_id!r} is not a valid Hub repo id (expected org/name): {_one_line(exc, 120)}")
    if kind == "http":
        if status == 401:
            return GatedRepoAccessError(
                f"the Hub refused the token for {repo_id} (HTTP 401); pass a valid token via --token, HF_TOKEN or "
                "`hf auth login`"
            )
        if status == 403:
            return GatedRepoAccessError(_gated_message(repo_id, 403))
        return HubNetworkError(
            f"the Hub answered HTTP {status} for {repo_id}{what}; finished files are kept, rerun the same command "
            "to resume"
        )
    if kind == "offline":
        return HubNetworkError(f"HF_HUB_OFFLINE is set and {repo_id} is not fully downloaded yet{what}")
    if kind == "network":
        cause = exc
        while isinstance(cause, LocalEntryNotFoundError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, HfHubHTTPError):
            inner = translate_hub_error(cause, repo_id, revision, endpoint, path)
            if inner is not None:
                return inner
        reason = type(cause).__name__
        detail = _one_line(cause, 120)
        return HubNetworkError(
            f"network failure talking to {endpoint}{what}: {reason}: {detail}; finished files are kept, rerun the "
            "same command to resume"
        )
    if kind == "disk":
        return DiskSpaceError(f"no space left on device while writing {path or 'the download'}")
    from huggingface_hub.errors import FileMetadataError

    if isinstance(exc, FileMetadataError):
        return HubNetworkError(f"{endpoint} did not answer like the Hugging Face Hub{what}: {_one_line(exc, 160)}")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return HubError(f"downloading {path or repo_id} failed:{where} {exc.strerror or _one_line(exc, 160)}")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the download


def _fetch_listing(api, repo_id: str, revision: str) -> tuple[str, object, dict[str, RemoteFile]]:
    """(commit, gated, {path: RemoteFile}) for the revision, from model_info(files_metadata) or the tree API."""
    from huggingface_hub.hf_api import RepoFile

    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    commit = info.sha
    if not commit:
        raise HubError(f"the Hub did not return a commit for {repo_id}@{revision}")
    files: dict[str, RemoteFile] = {}
    complete = info.siblings is not None
    for s in info.siblings or []:
        if s.size is None or (s.lfs is None and not s.blob_id):
            complete = False
            break
        if s.lfs is not None:
            files[s.rfilename] = RemoteFile(s.rfilename, int(s.lfs.size), s.lfs.sha256, s.blob_id)
        else:
            files[s.rfilename] = RemoteFile(s.rfilename, int(s.size), None, s.blob_id)
    if not complete:
        files = {}
        for f in api.list_repo_tree(repo_id, recursive=True, revision=commit):
            if isinstance(f, RepoFile):
                if f.lfs is not None:
                    files[f.path] = RemoteFile(f.path, int(f.lfs.size), f.lfs.sha256, f.blob_id)
                else:
                    files[f.path] = RemoteFile(f.path, int(f.size), None, f.blob_id)
    return commit, getattr(info, "gated", None), files


def _validate_args(repo_id: str, layout: str, max_workers: int) -> None:
    if layout not in LAYOUTS:
        raise HubError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if max_workers < 1:
        raise HubError("--max-workers must be at least 1")
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise RepoNotFoundError(f"{repo_id!r} is not a Hub repo id (expected org/name)")


def _offline_result(
    target: _Target, manifest: _Manifest, repo_id: str, revision: str, layout: str, include, t0: float
) -> DownloadResult | None:
    """A complete, verified copy from an earlier run, for when the Hub cannot be reached."""
    found = manifest.listing_for(repo_id, revision)
    if found is None:
        return None
    commit, files = found
    selected = select_files(files, layout, include)
    if not selected:
        return None
    results = []
    for p in selected:
        rf = files[p]
        if rf.digest is None or not manifest.is_verified(rf, target.file_path(commit, p)):
            return None
        results.append(FileResult(p, rf.size, rf.algo, rf.digest, verified=True))
    return DownloadResult(
        repo_id, revision, commit, target.root(commit), layout, results, time.monotonic() - t0, offline=True
    )


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    layout: str = "hf",
    include: Sequence[str] | None = None,
    token: str | None = None,
    max_workers: int = 8,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    progress: bool | None = None,
    log: Log | None = None,
) -> DownloadResult:
    """Download ``layout`` files of ``repo_id`` at ``revision``, verify them all, and return what is on disk.

    Args:
        repo_id: ``org/name`` on the Hub.
        revision: branch, tag or commit (default ``main``); resolved once to a commit that every file comes from.
        local_dir: put the files here (huggingface_hub local-dir mode). Default: the Hugging Face cache, and the
            result's ``local_dir`` is the snapshot folder.
        layout: ``hf`` (configs, tokenizer, chat template, safetensors shards and index), ``original`` (Meta's
            ``original/`` folder: consolidated .pth, params.json, tokenizer.model) or ``both``.
        include: fnmatch globs; when given, only the layout's files that match one of them.
        token: Hub token; ``None`` lets huggingface_hub use ``$HF_TOKEN`` or the saved login.
        max_workers: files transferred (and hashed) in parallel.
        cache_dir: the Hugging Face cache (default ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` as set now).
        endpoint: the Hub URL (default ``$HF_ENDPOINT`` as set now, else https://huggingface.co).
        progress: rich progress bars on stderr; ``None`` means only when stderr is a terminal.
        log: receives a few one-line status messages (plan, offline reuse); ``None`` for silence.

    Returns:
        A `DownloadResult`; every file in it has ``verified=True``.

    Raises:
        GatedRepoAccessError, RepoNotFoundError, HashMismatchError (the corrupt files are deleted first),
        DiskSpaceError, HubNetworkError (finished files are kept; rerun to resume) - all `Llama4QuantError`s.
    """
    from huggingface_hub import HfApi, hf_hub_download

    from .. import __version__

    t0 = time.monotonic()
    revision = revision or "main"
    _validate_args(repo_id, layout, max_workers)
    say = log or (lambda _msg: None)
    endpoint = hub_endpoint(endpoint)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    ldir = Path(local_dir).expanduser().resolve() if local_dir is not None else None
    target = _Target(repo_id, ldir, cache.resolve())
    manifest = _Manifest(target.manifest_path)
    api = HfApi(endpoint=endpoint, token=token, library_name="llama4-quant", library_version=__version__)

    def translate(exc: BaseException, path: str | None = None) -> BaseException:
        return translate_hub_error(exc, repo_id, revision, endpoint, path) or exc

    # 1. what is there: one commit, its files, sizes and hashes
    try:
        commit, gated, files = _fetch_listing(api, repo_id, revision)
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one line below
        err = translate(exc)
        if isinstance(err, HubNetworkError):
            reused = _offline_result(target, manifest, repo_id, revision, layout, include, t0)
            if reused is not None:
                say(
                    f"the Hub is unreachable; using the verified copy of {repo_id}@{reused.commit[:10]} in {reused.local_dir}"
                )
                return reused
        raise err from exc

    selected = select_files(files, layout, include)
    if not selected:
        hint = f" matching {', '.join(include)}" if include else ""
        other = {"hf": "original", "original": "hf"}.get(layout)
        alt = f" (try --layout {other} or both)" if other and not include else ""
        raise RepoNotFoundError(f"no {layout}-layout files{hint} in {repo_id}@{revision}{alt}")
    missing_hash = [p for p in selected if files[p].digest is None]
    if missing_hash:
        raise HubError(f"the Hub metadata has no hash for {missing_hash[0]} in {repo_id}; cannot verify it")
    manifest.set_listing(repo_id, revision, commit, files)

    # 2. what is left to do
    done: dict[str, FileResult] = {}
    todo: list[RemoteFile] = []
    for p in selected:
        rf = files[p]
        if manifest.is_verified(rf, target.file_path(commit, p)):
            done[p] = FileResult(p, rf.size, rf.algo, rf.digest, verified=True)
        else:
            todo.append(rf)
    need = sum(rf.size for rf in todo if not target.present(commit, rf))
    to_hash = sum(rf.size for rf in todo)

    if todo and need and gated:
        try:
            api.auth_check(repo_id)
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    if need:
        free = disk_free_bytes(target.base)
        if free < need:
            raise DiskSpaceError(
                f"not enough disk space in {target.base}: {human_bytes(need)} still to download, "
                f"{human_bytes(free)} free"
            )
    total = sum(files[p].size for p in selected)
    if todo:
        say(
            f"{repo_id}@{revision} ({commit[:10]}): {len(selected)} files, {human_bytes(total)}; "
            f"{human_bytes(need)} to download into {target.root(commit)}"
        )

    # 3. fetch + verify, in parallel
    mismatches: list[tuple[RemoteFile, str]] = []
    errors: list[tuple[RemoteFile, BaseException]] = []
    lock = threading.Lock()
    enabled = progress if progress is not None else _stderr_is_tty()

    with _Progress(enabled, repo_id) as prog:
        prog.start(need, to_hash)

        def work(rf: RemoteFile) -> FileResult | None:
            counter: dict = {}
            try:
                local = hf_hub_download(
                    repo_id,
                    rf.path,
                    revision=commit,
                    endpoint=endpoint,
                    token=token,
                    library_name="llama4-quant",
                    library_version=__version__,
                    tqdm_class=prog.bar_class(counter),
                    **target.hf_kwargs(),
                )
            except ValueError as exc:  # huggingface_hub's own refusals (e.g. a file too big for plain HTTP)
                raise HubError(f"downloading {rf.path} failed: {_one_line(exc, 160)}") from exc
            transferred = max(0, counter.get("bytes", 0))
            local_path = Path(local)
            actual_size = local_path.stat().st_size
            if actual_size != rf.size:
                problem = f"has {actual_size} bytes instead of the Hub's {rf.size}"
            else:
                actual = file_digest(local_path, rf.algo, prog.verified)
                problem = (
                    None
                    if actual == rf.digest
                    else f"does not match the Hub's {rf.algo.replace('_', ' ')} (expected {rf.digest[:16]}…, "
                    f"got {actual[:16]}…)"
                )
            if problem is not None:
                target.remove(commit, rf.path)
                manifest.forget(rf.path)
                with lock:
                    mismatches.append((rf, problem))
                return None
            manifest.mark_verified(rf, target.file_path(commit, rf.path))
            return FileResult(rf.path, rf.size, rf.algo, rf.digest, True, transferred > 0, transferred)

        pool = ThreadPoolExecutor(max_workers=min(max_workers, max(1, len(todo))), thread_name_prefix="hub-dl")
        futures: dict[Future, RemoteFile] = {pool.submit(work, rf): rf for rf in todo}
        try:
            pending = set(futures)
            while pending:
                # a timeout, so that the main thread runs its signal handlers while every transfer is stalled: the
                # kernel may deliver Ctrl-C to a worker thread, and a main thread blocked until a file completes
                # would only see it once the stalled transfer had gone on (and perhaps finished)
                finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in finished:
                    rf = futures[fut]
                    exc = fut.exception()
                    if exc is None:
                        res = fut.result()
                        if res is not None:
                            done[rf.path] = res
                    elif not isinstance(exc, _Cancelled):
                        errors.append((rf, exc))
                        if _is_fatal(exc):
                            prog.cancelled.set()
                            for other in pending:
                                other.cancel()
        except BaseException:
            prog.cancelled.set()
            for fut in futures:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            manifest.save()

    # 4. report
    if errors:
        fatal = [(rf, e) for rf, e in errors if _is_fatal(e)]
        rf, exc = (fatal or errors)[0]
        err = translate(exc, rf.path)
        if isinstance(err, HubNetworkError) and len(errors) > 1:
            err = HubNetworkError(f"{err} ({len(errors)} files failed)")
        raise err from exc
    if mismatches:
        mismatches.sort(key=lambda m: m[0].path)
        rf, problem = mismatches[0]
        others = [m[0].path for m in mismatches[1:]]
        more = ""
        if others:
            more = f"; also corrupt: {', '.join(others[:3])}" + (
                f" and {len(others) - 3} more" if len(others) > 3 else ""
            )
        deleted = "the corrupt files were" if others else "the corrupt file was"
        raise HashMismatchError(f"{rf.path} {problem}{more}; {deleted} deleted, rerun the same command to fetch again")
    target.record_ref(revision, commit)
    results = [done[p] for p in selected]
    return DownloadResult(repo_id, revision, commit, target.root(commit), layout, results, time.monotonic() - t0)


def _is_fatal(exc: BaseException) -> bool:
    """Errors that will hit every file alike: stop the others instead of letting each one fail."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):  # incl. GatedRepoError
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 403) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)


def _stderr_is_tty() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


