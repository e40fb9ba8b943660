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
    from ..model.checkpoint import open_checkpoint

    return open_checkpoint(path)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def is_compressed_tensors_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    qc = raw.get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"
