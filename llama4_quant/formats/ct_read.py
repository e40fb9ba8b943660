"""Read a compressed-tensors safetensors checkpoint back as a WeightSource (dequantized on read).

Each Linear is decoded as the runtime decodes it: (code - zero_point) * scale in the scale dtype, for
`pack-quantized` int weights, and fp8 * scale for `float-quantized`. Unquantized tensors pass through.
Experts may be fused (bf16 `gate_up_proj`) or unfused per index (quantized `experts.{e}.gate_proj.*`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.checkpoint import CheckpointReader
from ..model.config import load_config
from ..model.hf_reader import HFReader, to_hf_name
from ..quant.scheme import FP8Scheme, IntScheme
from .compressed_tensors import read_linear_tensors

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _scheme_from_args(args: dict):
    if args.get("type") == "float":
        strategy = args.get("strategy") or "channel"
        block = tuple(args.get("block_structure") or (128, 128))
        return FP8Scheme(strategy=strategy, block=block)
    group = args.get("group_size") if args.get("strategy") == "group" else None
    return IntScheme(bits=int(args.get("num_bits", 4)), symmetric=bool(args.get("symmetric", True)), group_size=group)


class CompressedTensorsSource(CheckpointReader):
    layout = "compressed-tensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = json.loads((self.path / "config.json").read_text())
        qc = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
        if not qc or qc.get("quant_method") != "compressed-tensors":
            raise CheckpointError(f"{self.path}: config.json has no compressed-tensors quantization_config")
        self.qconfig = qc
        self.config = load_config(self.path)
        self.hf = HFReader(self.path, self.config)
        self.prefix, self.head = self.hf.model_prefix, self.hf.head_name
        self.groups = []
        for g in qc.get("config_groups", {}).values():
            self.groups.append((list(g.get("targets", [])), _scheme_from_args(g.get("weights") or {})))

    def _scheme_for(self, module: str):
        fallback = None
        for targets, scheme in self.groups:
            for t in targets:
                if t.startswith("re:") and re.match(t[3:], module):
                    return scheme
                if t == "Linear":
                    fallback = scheme
        if fallback is None:
            raise CheckpointError(f"{self.path}: no quantization_config group covers {module}")
        return fallback

    def _module_tensor(self, module: str) -> torch.Tensor:
        wm = self.hf.weight_map
        if f"{module}.weight" in wm and f"{module}.weight_scale" not in wm:
            return self.hf.read_raw(f"{module}.weight")
        keys = [k for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight") if f"{module}.{k}" in wm]
        if "weight_scale" not in keys:
            raise CheckpointError(f"{self.path}: missing tensor {module}.weight (or its quantized form)")
        tensors = {k: self.hf.read_raw(f"{module}.{k}") for k in keys}
        q = read_linear_tensors(tensors, self._scheme_for(module))
        return q.dequantize(torch.float32)

    def _module(self, name: str) -> str:
        return to_hf_name(name, self.prefix, self.head)[: -len(".weight")]

    def _has(self, name: str) -> bool:
        try:
            self._shape(name)
            return True
        except (KeyError, CheckpointError):
            return False

    def _shape(self, name: str) -> tuple[int, ...]:
        m = _LAYER.match(name)
        if m and m.group(2).startswith("experts."):
            e0 = self._expert_module(int(m.group(1)), m.group(2).split(".")[1], 0)
            if e0 is None:
                return self.hf._shape(name)
            return (self.config.num_experts, *self._module_shape(e0))
        return self._module_shape(self._module(name)) if name not in ("norm",) and not name.endswith("norm") else self.hf._shape(name)

    def _module_shape(self, module: str) -> tuple[int, ...]:
        wm = self.hf.weight_map
        if f"{module}.weight_shape" in wm:
            return tuple(int(v) for v in self.hf.read_raw(f"{module}.weight_shape").tolist())
        if f"{module}.weight" in wm:
            return self.hf._raw_shape(f"{module}.weight")
        raise KeyError(module)

    def _expert_module(self, layer: int, kind: str, e: int) -> str | None:
        module = f"{self.prefix}layers.{layer}.feed_forward.experts.{e}.{kind}_proj"
        wm = self.hf.weight_map
        return module if any(f"{module}.{s}" in wm for s in ("weight", "weight_packed", "weight_scale")) else None

    def _read(self, name: str) -> torch.Tensor:
        m = _LAYER.match(name)
        if m and m.group(2).startswith("experts."):
            kind = m.group(2).split(".")[1]
            return torch.stack([self._read_expert(int(m.group(1)), kind, e) for e in range(self.config.num_experts)])
        if name in ("norm",) or name.endswith("norm"):
            return self.hf._read(name)
        return self._module_tensor(self._module(name))

    def _read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        module = self._expert_module(layer, kind, e)
        if module is None:  # fused bf16 experts left unquantized
            return self.hf._read_expert(layer, kind, e)
        return self._module_tensor(module)

    def vision_tensors(self):
        return self.hf.vision_tensors()

    def close(self) -> None:
        self.hf.close()

    def release(self) -> None:
        self.hf.release()


def is_compressed_tensors_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    qc = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"
