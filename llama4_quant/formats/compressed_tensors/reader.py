"""Read a compressed-tensors output of `convert` back as a CheckpointReader of dequantized canonical tensors.

Our own dequantization, (code - zero_point) * scale rounded to the model dtype, which is what compressed-tensors
decompresses to; lets the layer-wise runner (eval, tests) score the quantized model exactly as exported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...errors import CheckpointError
from ...model.checkpoint import CheckpointReader
from ...model.config import load_config
from ...model.hf_reader import open_safetensors, to_hf_name
from ...quant.scheme import FP8Scheme, IntScheme, Scheme
from .tensors import INDEX, read_linear_tensors, torch_dtype


def scheme_from_weight_args(w: dict) -> Scheme:
    """Our scheme for a compressed-tensors `weights` QuantizationArgs dict."""
    if w.get("type") == "float":
        strategy = w.get("strategy") or "tensor"
        block = tuple(w.get("block_structure") or (128, 128))
        return FP8Scheme(strategy, block)
    group = w.get("group_size") if w.get("strategy") == "group" else None
    return IntScheme(int(w["num_bits"]), bool(w.get("symmetric", True)), group)


_EXPERTS = re.compile(r"^layers\.(\d+)\.experts\.(gate|up|down)$")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


class QuantizedSource(CheckpointReader):
    """A converted model directory as a CheckpointReader: the shared validate (every tensor the config implies,
    with its shape) and NaN/inf checks apply; quantized Linears read back dequantized."""

    layout = "compressed-tensors"

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None):
        """dtype: what quantized weights dequantize to (default: the model dtype, as compressed-tensors does)."""
        self.path = Path(path)
        self.config = load_config(self.path)
        raw = json.loads((self.path / "config.json").read_text())
        qc = raw.get("quantization_config")
        if not qc or qc.get("quant_method") != "compressed-tensors":
            raise CheckpointError(f"{self.path}: config.json has no compressed-tensors quantization_config")
        self.groups = [(g["targets"], scheme_from_weight_args(g["weights"])) for g in qc["config_groups"].values()]
        self.ignore = qc.get("ignore", [])
        self.dtype = dtype or torch_dtype(self.config.torch_dtype)
        if not (self.path / INDEX).exists():
            raise CheckpointError(f"{self.path}: no {INDEX} (incomplete output?)")
        self.weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).exists()})
        if missing:
            raise CheckpointError(f"{self.path}: missing shard {missing[0]} listed in {INDEX}")
        multimodal = any(k.startswith("language_model.") for k in self.weight_map)
        self.prefix = "language_model.model." if multimodal else "model."
        self.head = "language_model.lm_head.weight" if multimodal else "lm_head.weight"
        self._files: dict[str, object] = {}

    def _raw(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def _handle(self, f: str):
        h = self._files.get(f)
        if h is None:
            h = self._files[f] = open_safetensors(self.path / f)
        return h

    def release(self) -> None:
        """Drop the memory maps of the shards read so far (reopened lazily)."""
        self._files.clear()

    def _module_shape(self, module: str) -> tuple[int, ...] | None:
        if module + ".weight_shape" in self.weight_map:
            return tuple(int(v) for v in self._raw(module + ".weight_shape").tolist())
        for key in (module + ".weight", module):
            if key in self.weight_map:
                return tuple(self._handle(self.weight_map[key]).get_slice(key).get_shape())
        return None

    def scheme_of(self, module: str) -> Scheme | None:
        if any(_matches(module, p) for p in self.ignore):
            return None
        for targets, scheme in self.groups:
            if "Linear" in targets or any(_matches(module, t) for t in targets):
                return scheme
        return None

    def read_module(self, module: str) -> torch.Tensor:
        """One Linear's weight [out, in], dequantized to the model dtype if it is stored quantized."""
        if module + ".weight" in self.weight_map and module + ".weight_scale" not in self.weight_map:
            return self._raw(module + ".weight")
        scheme = self.scheme_of(module)
        if scheme is None:
            raise CheckpointError(f"{self.path}: {module} is stored quantized but the config does not say how")
        keys = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight")
        tensors = {k: self._raw(f"{module}.{k}") for k in keys if f"{module}.{k}" in self.weight_map}
        return read_linear_tensors(tensors, scheme).dequantize(self.dtype)

    # -- CheckpointReader ------------------------------------------------------------------------------------------
    def _expert_modules(self, name: str) -> list[str] | None:
        m = _EXPERTS.match(name)
        if not m:
            return None
        return [self._expert_module(int(m.group(1)), m.group(2), e) for e in range(self.config.num_experts)]

    def _expert_module(self, layer: int, kind: str, e: int) -> str:
        return f"{self.prefix}layers.{layer}.feed_forward.experts.{e}.{kind}_proj"

    def describe(self, name: str) -> str:
        mods = self._expert_modules(name)
        return f"{mods[0]} (and the other experts)" if mods else to_hf_name(name, self.prefix, self.head)

    def _has(self, name: str) -> bool:
        mods = self._expert_modules(name)
        if mods:
            return all(self._module_shape(m) is not None for m in mods)
        hf = to_hf_name(name, self.prefix, self.head)
        return hf in self.weight_map or self._module_shape(hf.removesuffix(".weight")) is not None

    def _shape(self, name: str) -> tuple[int, ...]:
        mods = self._expert_modules(name)
        if mods:
            shapes = {self._module_shape(m) for m in mods}
            if len(shapes) != 1:
                raise CheckpointError(f"{self.path}: the experts of {mods[0]} differ in shape: {sorted(shapes)}")
            return (len(mods), *shapes.pop())
        hf = to_hf_name(name, self.prefix, self.head)
        got = self._module_shape(hf.removesuffix(".weight")) if hf.endswith(".weight") else None
        return got if got is not None else tuple(self._handle(self.weight_map[hf]).get_slice(hf).get_shape())

    def _read(self, name: str) -> torch.Tensor:
        m = _EXPERTS.match(name)
        if m:
            return torch.stack([self._read_expert(int(m.group(1)), m.group(2), e) for e in range(self.config.num_experts)])
        hf = to_hf_name(name, self.prefix, self.head)
        if hf.endswith(".weight"):
            return self.read_module(hf.removesuffix(".weight"))  # plain, or stored quantized
        return self._raw(hf)

    def _read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        return self.read_module(self._expert_module(layer, kind, e))
