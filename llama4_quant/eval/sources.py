"""Open anything we read or produce as a WeightSource: a checkpoint (HF/Meta), a compressed-tensors
output directory, or a GGUF file (single or split)."""

from __future__ import annotations

import json
from pathlib import Path


def open_any(model: str | Path):
    path = Path(model)
    if path.suffix == ".gguf" or (path.is_file() and _magic(path) == b"GGUF"):
        from ..formats.gguf.reader import open_gguf

        return open_gguf(path)
    if is_compressed_tensors_dir(path):
        from ..formats.compressed_tensors.reader import QuantizedSource

        src = QuantizedSource(path)
        src.validate()
        return src
    from ..model.readers import open_checkpoint

    return open_checkpoint(path)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def is_compressed_tensors_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the config loader gives the readable error
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def check_artifact(path: str | Path, *, hashes: bool = True, require_manifest: bool = False) -> dict:
    """An artifact against its manifest (every file present, same size and sha256) and its structure against
    its config (every tensor the config implies, with its shape; readable headers). Raises on any mismatch."""
    from ..formats.manifest import check_files

    path = Path(path)
    if not path.exists():
        from ..errors import CheckpointError

        raise CheckpointError(f"{path}: no such file or directory")
    files = check_files(path, hashes=hashes, require=require_manifest)
    from ..formats.gguf.mmproj import describe_mmproj, is_mmproj

    if path.is_file() and is_mmproj(path):  # a vision projector (llama.cpp's clip layout), not a llama4 model
        d = describe_mmproj(path)
        return {"path": str(path), "format": "mmproj", **files, "structure": "ok",
                "layers": d["layers"], "experts": 0}
    src = open_any(path)
    try:
        cfg = src.config
        return {"path": str(path), "format": getattr(src, "layout", "?"), **files,
                "structure": "ok", "layers": cfg.num_layers, "experts": cfg.num_experts}
    finally:
        close = getattr(src, "close", None)
        if close:
            close()
