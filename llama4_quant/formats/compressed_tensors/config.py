"""compressed-tensors `quantization_config` (config.json) for our schemes: config groups, weight and input
args, ignore entries, format names (checked against compressed-tensors 0.20)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ...quant.scheme import FP8Scheme, IntScheme, Scheme

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
MIXED_PRECISION = "mixed-precision"
# The compressed-tensors release this layout and config were verified against (the `version` key).
COMPRESSED_TENSORS_VERSION = "0.20.0"


# ---- quantization_config -----------------------------------------------------------------------
def scheme_format(scheme: Scheme) -> str:
    return PACK_QUANTIZED if isinstance(scheme, IntScheme) else FLOAT_QUANTIZED


def _args(**kw: Any) -> dict[str, Any]:
    base = {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": None,
        "block_structure": None, "dynamic": False, "actorder": None, "observer": None,
        "observer_kwargs": {},
    }
    base.update(kw)
    return base


def weight_args(scheme: Scheme, observer: str = "minmax", actorder: bool = False) -> dict[str, Any]:
    """QuantizationArgs (as JSON) for the weights of a scheme.

    actorder True writes "weight" (columns were visited in activation order while the groups stayed
    static and contiguous: nothing to undo at load time, no g_idx).
    """
    order = "weight" if actorder else None
    if isinstance(scheme, IntScheme):
        return _args(
            num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
            group_size=None if scheme.per_channel else scheme.group_size,
            strategy=scheme.strategy, actorder=order, observer=observer,
        )
    return _args(
        num_bits=8, type="float", symmetric=True, strategy=scheme.strategy,
        block_structure=list(scheme.block) if scheme.strategy == "block" else None,
        actorder=order, observer=observer,
    )


def input_args(scheme: Scheme) -> dict[str, Any] | None:
    """Dynamic fp8 activations (per token; per 128-group for block weights) or None (16-bit)."""
    if not isinstance(scheme, FP8Scheme) or not scheme.dynamic_activations:
        return None
    if scheme.strategy == "block":
        return _args(type="float", strategy="group", group_size=scheme.block[1], dynamic=True)
    return _args(type="float", strategy="token", dynamic=True)


@dataclass
class ConfigGroup:
    """Modules (`targets`: class names like "Linear", exact names, or "re:<regex>") sharing a scheme."""

    targets: list[str]
    scheme: Scheme
    observer: str = "minmax"  # informational: "minmax", "mse", ...
    actorder: bool = False


def quantization_config(
    groups: Sequence[ConfigGroup],
    ignore: Sequence[str] = (),
    version: str = COMPRESSED_TENSORS_VERSION,
) -> dict[str, Any]:
    """The `quantization_config` entry of config.json, status "compressed".

    The global format is the groups' common format, or "mixed-precision" with each group carrying
    its own `format` when int and fp8 groups are mixed.
    """
    if not groups:
        raise ValueError("need at least one config group")
    formats = {scheme_format(g.scheme) for g in groups}
    mixed = len(formats) > 1
    config_groups: dict[str, Any] = {}
    for i, g in enumerate(groups):
        entry: dict[str, Any] = {
            "targets": list(g.targets),
            "weights": weight_args(g.scheme, g.observer, g.actorder),
            "input_activations": input_args(g.scheme),
            "output_activations": None,
        }
        if mixed:
            entry["format"] = scheme_format(g.scheme)
        config_groups[f"group_{i}"] = entry
    return {
        "quant_method": QUANT_METHOD,
        "format": MIXED_PRECISION if mixed else formats.pop(),
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": version,
    }


def validate_quantization_config(config: Mapping[str, Any]) -> bool:
    """Parse `config` with the installed compressed-tensors (raises if it is rejected).

    Returns False when compressed-tensors is not installed (nothing checked), True when it parsed.
    """
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return False
    QuantizationConfig.model_validate(dict(config))
    return True
