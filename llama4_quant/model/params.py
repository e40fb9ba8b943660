"""Parameter counts by component (the memory each export scheme needs is convert/sizes.py)."""

from __future__ import annotations

from .config import Llama4Config
from .tensors import tensor_specs

COMPONENTS = ("embeddings", "attention", "routed_experts", "shared_experts", "dense_mlp", "router", "norms")


# tensor role (model/tensors.py) -> the component it is counted under
ROLE_COMPONENT = {"embed": "embeddings", "head": "embeddings", "attn": "attention", "experts": "routed_experts",
                  "shared": "shared_experts", "mlp": "dense_mlp", "router": "router", "norm": "norms"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def param_counts(cfg: Llama4Config, vision: int = 0) -> dict[str, int]:
    counts = dict.fromkeys(COMPONENTS, 0)
    for spec in tensor_specs(cfg):
        counts[ROLE_COMPONENT[spec.role]] += _numel(spec.full_shape)
    counts["vision"] = vision
    counts["total"] = sum(v for k, v in counts.items() if k != "vision")  # text tower
    counts["total_with_vision"] = counts["total"] + vision
    counts["active_per_token"] = counts["total"] - counts["routed_experts"] * (cfg.num_experts - cfg.top_k) // max(cfg.num_experts, 1)
    return counts
