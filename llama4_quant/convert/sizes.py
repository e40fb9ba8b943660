"""The memory each export scheme needs: weights of the text tower under every safetensors and GGUF scheme, plus
the bf16 KV cache for a context (what `inspect` prints)."""

from __future__ import annotations

from ..formats.gguf.mix import SCHEMES as GGUF_SCHEMES, tensor_type, type_bytes
from ..model.config import Llama4Config
from ..model.params import ROLE_COMPONENT, _numel
from ..model.tensors import tensor_specs
from ..quant.scheme import SCHEMES as ST_SCHEMES, IntScheme

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


DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # --max-shard-size default of the safetensors exporter


def header_reserve(max_shard_bytes: int) -> int:
    """Bytes the safetensors exporter reserves for each shard's JSON header (convert/safetensors.py)."""
    return min(256 << 10, max(8 << 10, max_shard_bytes // 64)) // 8 * 8


def st_overhead_bytes(total_bytes: int, n_tensors: int, max_shard_bytes: int, max_entry: int = 300) -> int:
    """An upper bound on the bytes of a safetensors output's shards besides tensor data (8 + the header reserve per
    shard) for at most `total_bytes` of tensor data in `n_tensors` tensors whose header entries take at most
    `max_entry` bytes. The writer closes a shard when the next tensor would take it past `max_shard_bytes` (then it
    and the next shard together hold more than that: fewer than 2 * total / max such shards) or when the next entry
    does not fit its header (which then holds more than reserve - max_entry bytes); one more shard is the last."""
    reserve = header_reserve(max_shard_bytes)
    by_size = 2 * total_bytes // max_shard_bytes
    by_header = n_tensors * max_entry // max(1, reserve - max_entry)
    return (8 + reserve) * (by_size + by_header + 1)


# ---- exact bytes of one Linear as the safetensors exporter writes it (convert/fit.py plans with these) ---------
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "bfloat16": 2, "float16": 2, "float32": 4}


def st_scheme_applies(scheme: str, shape: tuple[int, ...], group_size: int | None) -> bool:
    """Whether the safetensors exporter can write a Linear of `shape` ([out, in]) in `scheme` (int groups must
    divide the input width)."""
    if scheme == "bf16" or not isinstance(ST_SCHEMES[scheme](group_size), IntScheme):
        return True
    return group_size is None or group_size == -1 or shape[-1] % group_size == 0


def st_linear_bytes(scheme: str, shape: tuple[int, ...], group_size: int | None, dtype_bytes: int = 2) -> int:
    """Tensor-data bytes of one [out, in] Linear in `scheme` as written (formats/compressed_tensors/tensors.py):
    int: weight_packed int32 [out, ceil(in*bits/32)] + weight_scale [out, groups] in the model dtype + weight_shape
    int64 [2] (+ packed zero points, asymmetric); fp8: weight e4m3 [out, in] + weight_scale ([out, 1] channel,
    [ceil(out/128), ceil(in/128)] block); "bf16": the weight kept as stored (`dtype_bytes` per element)."""
    out, cols = int(shape[-2]), int(shape[-1])
    if scheme == "bf16":
        return out * cols * dtype_bytes
    s = ST_SCHEMES[scheme](group_size)
    if isinstance(s, IntScheme):
        groups = 1 if s.per_channel else -(-cols // s.group_size)
        n = out * -(-cols * s.bits // 32) * 4 + out * groups * dtype_bytes + 2 * 8
        if not s.symmetric:
            n += -(-out * s.bits // 32) * groups * 4
        return n
    if s.strategy == "block":
        br, bc = s.block
        return out * cols + -(-out // br) * -(-cols // bc) * dtype_bytes
    return out * cols + (out if s.strategy == "channel" else 1) * dtype_bytes
