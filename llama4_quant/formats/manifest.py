"""Our artifacts' manifests, and checking an artifact against its own.

- compressed-tensors directory: `DIR/llama4-quant.json`, whose `output.files` lists every file with its size and
  sha256 (the manifest itself excepted);
- GGUF: `OUT.gguf.llama4-quant.json` beside the (first) file, whose `sha256` maps each file name to its hash.

`check_files` is what `llama4-quant verify`, `eval` and `inspect` run: a file missing, resized, changed, or a
weight file the manifest does not know is one clear error. `ours` tells whether a path holds an artifact we
wrote (what `--force` may replace)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..fsutil import sha256_file

MANIFEST = "llama4-quant.json"
SIDECAR_SUFFIX = ".llama4-quant.json"
TOOL = "llama4-quant"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pth", ".pt")


def manifest_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    if p.is_dir():
        return p / MANIFEST
    from .gguf.reader import split_files

    first = split_files(p)[0] if p.exists() else p
    return first.with_name(first.name + SIDECAR_SUFFIX)


def load_manifest(artifact: str | Path) -> dict[str, Any] | None:
    """The artifact's manifest, None when it has none; an unreadable one is an error."""
    mp = manifest_path(artifact)
    if not mp.is_file():
        return None
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mp}: unreadable manifest ({e})") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{mp}: not a manifest (expected a JSON object)")
    return m


def _is_ours(m: dict[str, Any] | None) -> bool:
    if not m:
        return False
    tool = m.get("tool")
    return tool == TOOL or (isinstance(tool, dict) and tool.get("name") == TOOL)


def _expected(artifact: Path, m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """file name -> {"sha256": ..., "bytes": ... (when recorded)}"""
    if artifact.is_dir():
        files = (m.get("output") or {}).get("files")
        if not isinstance(files, dict) or not files:
            raise CheckpointError(f"{artifact / MANIFEST}: lists no output files")
        return {str(k): v for k, v in files.items() if isinstance(v, dict)}
    hashes = m.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise CheckpointError(f"{manifest_path(artifact)}: lists no files")
    return {str(k): {"sha256": v} for k, v in hashes.items()}


def check_files(artifact: str | Path, *, hashes: bool = True, require: bool = False) -> dict[str, Any]:
    """Every file of the artifact against its manifest: present, same size, same sha256 (with `hashes`).
    Returns {"manifest": path or None, "files": n, "checked": "sha256" | "size" | "none"}; raises
    CheckpointError on any mismatch, or when there is no manifest and `require`."""
    artifact = Path(artifact)
    m = load_manifest(artifact)
    mp = manifest_path(artifact)
    if m is None:
        if require:
            raise CheckpointError(f"{artifact}: no {mp.name} beside it, so there is nothing to verify it against "
                                  "(not written by llama4-quant, or incomplete)")
        return {"manifest": None, "files": 0, "checked": "none"}
    root = artifact if artifact.is_dir() else mp.parent
    expected = _expected(artifact, m)
    for name, want in expected.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{mp}: file name {name!r} is not a plain name inside the artifact")
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{artifact}: {name} is missing (listed in {mp.name})")
        size = want.get("bytes")
        if isinstance(size, int) and f.stat().st_size != size:
            raise CheckpointError(f"{artifact}: {name} is {f.stat().st_size} bytes, the manifest says {size} "
                                  "(truncated or replaced)")
        if hashes and want.get("sha256") and sha256_file(f) != want["sha256"]:
            raise CheckpointError(f"{artifact}: {name} does not match the sha256 in {mp.name} (changed or corrupt)")
    if artifact.is_dir():
        stray = sorted(p.name for p in artifact.iterdir()
                       if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and p.name not in expected)
        if stray:
            raise CheckpointError(f"{artifact}: {stray[0]} is not listed in {mp.name} (a file that is not ours)")
    return {"manifest": str(mp), "files": len(expected), "checked": "sha256" if hashes else "size"}


def ours(path: str | Path) -> tuple[bool, str]:
    """(whether `path` holds an artifact we wrote and nothing else, why not). What --force may replace."""
    p = Path(path)
    if p.is_dir():
        entries = [e.name for e in p.iterdir()]
        if not entries:
            return True, ""
        m = load_manifest(p) if (p / MANIFEST).is_file() else None
        if not _is_ours(m):
            return False, f"{p} is not an llama4-quant output (no {MANIFEST})"
        known = set(_expected(p, m)) | {MANIFEST}
        foreign = sorted(e for e in entries if e not in known)
        if foreign:
            return False, f"{p} holds {foreign[0]}, which llama4-quant did not write"
        return True, ""
    if p.is_file():
        if _is_ours(load_manifest(p)):
            return True, ""
        try:
            from gguf import GGUFReader

            fields = GGUFReader(str(p), "r").fields
        except Exception:  # not a GGUF at all
            return False, f"{p} is not a GGUF written by llama4-quant"
        if "llama4_quant.scheme" in fields:
            return True, ""
        return False, f"{p} is not a GGUF written by llama4-quant (no llama4_quant.* metadata)"
    return True, ""
