"""Calibration data from a Hugging Face Hub *dataset* repo, with the ordinary huggingface_hub client.

Spec: ``org/name``, ``org/name@revision``, ``org/name:path/in/repo`` or ``org/name@revision:path`` (a file or a
folder). Files are resolved at one commit (recorded in the manifest) and kept in the usual HF cache, so a second
run works offline. Without a path, the repo's .txt/.jsonl/.json files are used (parquet too when pyarrow is
importable), preferring files whose path says "train"; more than `MAX_FILES` of them is refused (name one).
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import sha256_file
from ..hub.errors import classify, http_status
from .documents import CalibrationError, pyarrow_available

MAX_FILES = 8
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+?))?(?::(?P<path>.+))?$")
_SKIP = re.compile(r"(^|/)(\.|README|LICENSE|dataset_infos?\.json$|dataset_dict\.json$|state\.json$)", re.IGNORECASE)


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str = "main"
    path: str | None = None
    repo_type: str = "dataset"

    def __str__(self) -> str:
        s = self.repo_id + (f"@{self.revision}" if self.revision != "main" else "")
        return s + (f":{self.path}" if self.path else "")


def parse_hub_spec(spec: str) -> HubSpec | None:
    m = _SPEC.match(spec.strip())
    if not m:
        return None
    return HubSpec(m.group("repo"), m.group("rev") or "main", m.group("path"))


@dataclass
class FetchedDataset:
    spec: HubSpec
    commit: str | None
    files: list[tuple[str, Path]] = field(default_factory=list)  # (path in repo, local file)
    offline: bool = False  # listing came from the local cache


def _suffixes() -> tuple[str, ...]:
    return (".txt", ".jsonl", ".json") + ((".parquet",) if pyarrow_available() else ())


def choose_files(names: list[str], path: str | None) -> list[str]:
    """Data files of a repo listing that a spec selects (see module docstring)."""
    sfx = _suffixes()
    if path:
        path = path.strip("/")
        if path in names:
            return [path]
        names = [n for n in names if n.startswith(path + "/")]
        if not names:
            raise CalibrationError(f"no file or folder {path!r} in the dataset")
    cands = sorted(n for n in names if n.lower().endswith(sfx) and not _SKIP.search(n))
    if not cands:
        parquet = [n for n in names if n.endswith(".parquet")]
        hint = " (it has parquet files: pip install pyarrow)" if parquet else ""
        raise CalibrationError(f"the dataset has no .txt/.jsonl/.json data files{hint}")
    if any(not n.lower().endswith(".json") for n in cands):  # plain .json is often metadata: use it only alone
        cands = [n for n in cands if not n.lower().endswith(".json")]
    train = [n for n in cands if re.search(r"train", n, re.IGNORECASE)]
    cands = train or cands
    if len(cands) > MAX_FILES:
        raise CalibrationError(
            f"the dataset has {len(cands)} data files (e.g. {cands[0]}); pick one with REPO:PATH, e.g. --calib REPO:{cands[0]}"
        )
    return cands


def _offline_message(spec: HubSpec, why: str) -> str:
    return (
        f"calibration dataset {spec} could not be fetched ({why}) and is not in the local Hugging Face cache; "
        "pass --calib FILE (a .txt or .jsonl file) or run once online"
    )


def _hub_error(spec: HubSpec, exc: BaseException) -> tuple[CalibrationError, bool] | None:
    """(one-line error, whether a cached copy may stand in) for huggingface_hub / network exceptions;
    None when `exc` is none of those."""
    kind = classify(exc)
    if kind == "gated":
        msg = f"calibration dataset {spec.repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`)"
        return CalibrationError(msg), False
    if kind == "revision":
        return CalibrationError(f"calibration dataset {spec.repo_id} has no revision {spec.revision!r}"), False
    if kind == "entry":
        return CalibrationError(f"calibration dataset {spec}: file not found on the Hub"), False
    if kind in ("repo", "disabled"):
        msg = f"calibration dataset {spec.repo_id} not found on the Hub (private? log in with `hf auth login`)"
        return CalibrationError(msg), False
    if kind == "invalid":
        return CalibrationError(f"{spec.repo_id!r} is neither a local file nor a Hub dataset id (org/name)"), False
    if kind == "offline":
        return CalibrationError(_offline_message(spec, "HF_HUB_OFFLINE is set")), True
    if kind == "http":
        status = http_status(exc) or "?"
        return CalibrationError(f"the Hub answered HTTP {status} for calibration dataset {spec}"), status in (500, 502, 503, 504)
    if kind == "network":
        why = "the Hub is unreachable" + ("" if type(exc).__name__ == "LocalEntryNotFoundError" else f": {type(exc).__name__}")
        return CalibrationError(_offline_message(spec, why)), True
    return None


def fetch_dataset(spec: HubSpec, expected_sha256: dict[str, str] | None = None) -> FetchedDataset:
    """Resolve the spec at one commit and download its data files (or reuse the cached ones offline)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().repo_info(spec.repo_id, repo_type=spec.repo_type, revision=spec.revision)
    except Exception as exc:
        got = _hub_error(spec, exc)
        if got is None:
            raise
        err, may_use_cache = got
        if not may_use_cache:
            raise err from None
        return _from_cache(spec, err, snapshot_download, expected_sha256)
    names = [s.rfilename for s in (info.siblings or [])]
    chosen = choose_files(names, spec.path)
    try:  # snapshot_download also records refs/<revision>, so the same spec resolves offline later
        root = Path(snapshot_download(spec.repo_id, repo_type=spec.repo_type, revision=info.sha or spec.revision,
                                      allow_patterns=[glob.escape(n) for n in chosen]))
        if info.sha and spec.revision != info.sha:
            _record_ref(root, spec.revision, info.sha)
    except Exception as exc:
        got = _hub_error(spec, exc)
        if got is None:
            raise
        raise got[0] from None
    fetched = FetchedDataset(spec, info.sha, [(n, root / n) for n in chosen])
    _verify(fetched, expected_sha256)
    return fetched


def _from_cache(spec: HubSpec, err: CalibrationError, snapshot_download, expected_sha256) -> FetchedDataset:
    from huggingface_hub import errors as E

    patterns = [spec.path.strip("/"), spec.path.strip("/") + "/*"] if spec.path else [f"*{s}" for s in _suffixes()]
    try:
        root = Path(snapshot_download(spec.repo_id, repo_type=spec.repo_type, revision=spec.revision,
                                      local_files_only=True, allow_patterns=patterns))
    except (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled, FileNotFoundError, ValueError):
        raise err from None
    except Exception as exc:
        if _hub_error(spec, exc) is None:
            raise
        raise err from None
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    if not names:
        raise err
    fetched = FetchedDataset(spec, root.name if len(root.name) == 40 else None, offline=True)
    for name in choose_files(names, spec.path):
        fetched.files.append((name, root / name))
    _verify(fetched, expected_sha256)
    return fetched


def _record_ref(snapshot: Path, revision: str, commit: str) -> None:
    """Point refs/<revision> at the commit in the HF cache (what a download by branch name writes), so an
    offline run resolves the same revision to the files fetched now."""
    if snapshot.parent.name != "snapshots" or snapshot.name != commit:
        return
    ref = snapshot.parent.parent / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    except OSError:
        pass




def _verify(fetched: FetchedDataset, expected: dict[str, str] | None) -> None:
    for name, local in fetched.files:
        want = (expected or {}).get(name)
        if want and sha256_file(local) != want:
            raise CalibrationError(
                f"calibration file {fetched.spec.repo_id}/{name} does not match the recipe's sha256 {want[:12]}…"
                " (the dataset changed upstream, or a corrupt download: delete it from the HF cache)"
            )
