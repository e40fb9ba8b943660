"""Tests call the conversion through the same `run_convert(ConvertOptions)` the CLI uses."""

from __future__ import annotations

import json
from pathlib import Path

from llama4_quant.convert.run import ConvertOptions, run_convert
from llama4_quant.formats.manifest import MANIFEST

_TUPLES = ("targets", "ignore")


def convert(model, out, to: str = "safetensors", source=None, **kw) -> dict:
    """run_convert on keyword options; returns the summary."""
    for k in _TUPLES:
        if k in kw and kw[k] is not None:
            kw[k] = tuple(kw[k])
    for k in ("calib", "tokenizer", "imatrix_file"):
        if kw.get(k) is not None:
            kw[k] = str(kw[k])
    return run_convert(ConvertOptions(model=str(model), out=str(out), to=to, **kw), source=source)


def gguf(model, out, **kw) -> dict:
    return convert(model, out, to="gguf", **kw)


def safetensors(model, out, **kw) -> tuple[dict, dict]:
    """(the manifest the export wrote, the summary)."""
    summary = convert(model, out, to="safetensors", **kw)
    return json.loads((Path(out) / MANIFEST).read_text()), summary


def stored_tensors(out) -> dict:
    """Every tensor of a safetensors export (all shards of its index), as stored."""
    from safetensors import safe_open

    index = json.loads((Path(out) / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for f in sorted(set(index.values())):
        with safe_open(str(Path(out) / f), framework="pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    assert set(tensors) == set(index)
    return tensors
