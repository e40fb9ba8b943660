"""Open a local checkpoint directory with the reader for its layout (HF safetensors or Meta consolidated.NN.pth)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointReader


def open_checkpoint(path: str | Path, validate: bool = True) -> CheckpointReader:
    """Open a local checkpoint directory in HF (sharded safetensors) or Meta (consolidated.NN.pth) layout."""
    from .config import load_config

    path = Path(path)
    cfg = load_config(path)
    if cfg.source_format == "meta":
        from .meta_reader import MetaReader

        root = path if (path / "params.json").exists() else path / "original"
        reader: CheckpointReader = MetaReader(root, cfg)
    else:
        from .hf_reader import HFReader

        reader = HFReader(path, cfg)
    if validate:
        reader.validate()
    return reader
