"""The memory each export scheme needs: weights of the text tower under every safetensors and GGUF scheme, plus
the bf16 KV cache for a context (what `inspect` prints)."""

from __future__ import annotations

from ..formats.gguf.mix import SCHEMES as GGUF_SCHEMES, tensor_type, type_bytes
from ..model.config import Llama4Config
from ..model.params import ROLE_COMPONENT, _numel
from ..model.tensors import tensor_specs
from ..quant.scheme import SCHEMES as ST_SCHEMES

# safetensors schemes: bytes per quantized weight element (incl. scales) for the default targets
# (routed experts, shared experts, dense MLPs); everything else stays bf16.
_QUANT_TARGETS = ("routed_experts", "shared_experts", "dense_mlp")


def _st_bytes(scheme: str, shape: tuple[int, ...]) -> float:
    n = _numel(shape)
    out_rows = n // shape[-1]
    if scheme == "w4a16":
        return n / 2 + n / 128 * 2
    if scheme == "w4a16-asym":
        return n / 2 + n / 128 * 2 + n / 128 / 2
    if scheme in ("w8a16", "fp8-dynamic"):
        return n + out_rows * 2
    if scheme == "fp8-block":
        return n + n / (128 * 128) * 4
    raise KeyError(scheme)


def weights_bytes(cfg: Llama4Config, scheme: str) -> int:
    """Bytes of the text tower's weights under `scheme` (the vision tower is passed through in bf16 and
    reported separately by `inspect`)."""
    total = 0.0
    for spec in tensor_specs(cfg):
        name, shape = spec.name, spec.full_shape
        if scheme == "bf16":
            total += _numel(shape) * 2
        elif scheme in ST_SCHEMES:
            total += _st_bytes(scheme, shape) if ROLE_COMPONENT[spec.role] in _QUANT_TARGETS else _numel(shape) * 2
        else:
            total += type_bytes(tensor_type(scheme, name, cfg.num_layers, shape[-1]), _numel(shape))
    return int(total)


def kv_cache_bytes(cfg: Llama4Config, context: int, bytes_per_elem: int = 2) -> int:
    return 2 * cfg.num_kv_heads * cfg.head_dim * bytes_per_elem * cfg.num_layers * context


def memory_table(cfg: Llama4Config, context: int, gpu_mem: int | None) -> dict[str, dict]:
    kv = kv_cache_bytes(cfg, context)
    table = {}
    for scheme in ("bf16", *ST_SCHEMES, *[s for s in GGUF_SCHEMES if s not in ("bf16",)]):
        key = scheme if scheme in ("bf16", *ST_SCHEMES) else f"gguf-{scheme}"
        w = weights_bytes(cfg, scheme)
        row = {"weights_bytes": w, "kv_cache_bytes": kv, "total_bytes": w + kv}
        row["fits"] = None if gpu_mem is None else (w + kv) <= gpu_mem
        # devices of gpu_mem to serve it (weights split evenly, each device holding its share of the KV cache)
        row["gpus"] = None if not gpu_mem else max(1, -(-(w + kv) // gpu_mem))
        table[key] = row
    return table
