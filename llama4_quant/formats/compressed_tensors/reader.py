"""Read a compressed-tensors output of `convert` back as a WeightSource of dequantized canonical tensors.

Our own dequantization, (code - zero_point) * scale rounded to the model dtype, which is what compressed-tensors
decompresses to; lets the layer-wise runner (eval, tests) score the quantized model exactly as exported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


from ...errors import CheckpointError
from .tensors import INDEX, read_linear_tensors, torch_dtype
from ...model.tensors import expected_shapes
from ...model.config import load_config
from ...model.hf_reader import open_safetensors, to_hf_name
from ...quant.scheme import FP8Scheme, IntScheme, Scheme


def scheme_from_weight_args(w: dict) -> Scheme:
    """Our scheme for a compressed-tensors `weights` QuantizationArgs dict."""
    if w.get("type") == "float":
        strategy = w.get("strategy") or "tensor"
        block = tuple(w.get("block_structure") or (128, 128))
        return FP8Scheme(strategy, block)
    group = w.get("group_size") if w.get("strategy") == "group" else None
    return IntScheme(int(w["num_bits"]), bool(w.get("symmetric", True)), group)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


class QuantizedSource:
    """WeightSource (read / read_expert / config) over a converted model directory."""

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

    def validate(self) -> None:
        """Every Linear and norm the config implies is present (plain or quantized) with the right shape."""
        for name, shape in expected_shapes(self.config).items():
            m = re.match(r"^layers\.(\d+)\.experts\.(gate|up|down)$", name)
            modules = ([f"{self.prefix}layers.{m.group(1)}.feed_forward.experts.{e}.{m.group(2)}_proj"
                        for e in range(self.config.num_experts)] if m else [to_hf_name(name, self.prefix, self.head).removesuffix(".weight")])
            want = shape[1:] if m else shape
            for module in modules:
                got = self._module_shape(module)
                if got is None:
                    raise CheckpointError(f"{self.path}: missing tensor {module}.weight (or its quantized form)")
                if tuple(got) != tuple(want):
                    raise CheckpointError(f"{self.path}: {module} has shape {list(got)}, config implies {list(want)}")

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

    def read(self, name: str) -> torch.Tensor:
        if name == "output" and self.config.tie_word_embeddings:
            name = "tok_embeddings"
        m = re.match(r"^layers\.(\d+)\.experts\.(gate|up|down)$", name)
        if m:
            return torch.stack([self.read_expert(int(m.group(1)), m.group(2), e) for e in range(self.config.num_experts)])
        hf = to_hf_name(name, self.prefix, self.head)
        if hf.endswith(".weight"):
            return self.read_module(hf.removesuffix(".weight"))  # plain, or stored quantized
        return self._raw(hf)

    def read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        return self.read_module(f"{self.prefix}layers.{layer}.feed_forward.experts.{e}.{kind}_proj")
