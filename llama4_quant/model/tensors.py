"""The one table of a Llama 4 text model's tensors: canonical names, shapes and roles.

Readers check checkpoints against it, the convert pipeline walks it in order, exporters name and plan
their files from it, and `inspect` counts parameters with it. Canonical names (matrices are
Linear-style [out, in]):

    tok_embeddings [V, H]      norm [H]      output [V, H] (absent with tied embeddings)
    layers.N.attn_norm [H]     layers.N.ffn_norm [H]
    layers.N.wq [nh*hd, H]     layers.N.wk / wv [nkv*hd, H]     layers.N.wo [H, nh*hd]
    MoE layers:   layers.N.router [E, H]
                  layers.N.experts.gate / experts.up [E, I, H]   layers.N.experts.down [E, H, I]
                  layers.N.shared.gate / shared.up [I, H]        layers.N.shared.down [H, I]
    dense layers: layers.N.mlp.gate / mlp.up [Imlp, H]           layers.N.mlp.down [H, Imlp]

Roles: embed, norm, attn, router, shared, mlp, experts, head.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Llama4Config

ROLES = ("embed", "norm", "attn", "router", "shared", "mlp", "experts", "head")
EXPERT_KINDS = ("gate", "up", "down")
ATTN = ("wq", "wk", "wv", "wo")


@dataclass(frozen=True)
class TensorSpec:
    """One canonical tensor.

    shape: [out, in] for Linears; for routed experts (`num_experts` > 0) the shape of *one* expert's matrix
    (`full_shape` is the stacked [E, out, in])."""

    name: str
    role: str
    shape: tuple[int, ...]
    layer: int | None = None
    num_experts: int = 0

    @property
    def full_shape(self) -> tuple[int, ...]:
        return (self.num_experts, *self.shape) if self.num_experts else self.shape

    @property
    def local(self) -> str:
        """Name inside the layer (`wq`, `experts.gate`, ...), or the global name."""
        return self.name.split(".", 2)[2] if self.layer is not None else self.name

    @property
    def is_linear(self) -> bool:
        return self.role in ("attn", "router", "shared", "mlp", "experts", "head")

    def expert_name(self, e: int) -> str:
        return f"layers.{self.layer}.experts.{e}.{self.local.split('.')[1]}"


def role_of(local: str) -> str:
    """Role of a layer-local name (`wq` -> attn, `experts.up` -> experts, `ffn_norm` -> norm)."""
    if local in ("attn_norm", "ffn_norm"):
        return "norm"
    if local in ATTN:
        return "attn"
    return local.split(".")[0]


def layer_specs(cfg: Llama4Config, i: int) -> list[TensorSpec]:
    H, I, Im, E = cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_experts
    local: list[tuple[str, tuple[int, ...], int]] = [
        ("attn_norm", (H,), 0), ("wq", (cfg.q_dim, H), 0), ("wk", (cfg.kv_dim, H), 0),
        ("wv", (cfg.kv_dim, H), 0), ("wo", (H, cfg.q_dim), 0), ("ffn_norm", (H,), 0)]
    if cfg.is_moe(i):
        local += [("router", (E, H), 0), ("shared.gate", (I, H), 0), ("shared.up", (I, H), 0),
                  ("shared.down", (H, I), 0), ("experts.gate", (I, H), E), ("experts.up", (I, H), E),
                  ("experts.down", (H, I), E)]
    else:
        local += [("mlp.gate", (Im, H), 0), ("mlp.up", (Im, H), 0), ("mlp.down", (H, Im), 0)]
    return [TensorSpec(f"layers.{i}.{n}", role_of(n), s, i, e) for n, s, e in local]


def tensor_specs(cfg: Llama4Config) -> list[TensorSpec]:
    """Every canonical text tensor, in file order: embeddings, layer by layer, final norm, head."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = [TensorSpec("tok_embeddings", "embed", (V, H))]
    for i in range(cfg.num_layers):
        out += layer_specs(cfg, i)
    out.append(TensorSpec("norm", "norm", (H,)))
    if not cfg.tie_word_embeddings:
        out.append(TensorSpec("output", "head", (V, H)))
    return out


def expected_shapes(cfg: Llama4Config) -> dict[str, tuple[int, ...]]:
    """canonical name -> full shape (routed experts stacked), for every text tensor."""
    return {s.name: s.full_shape for s in tensor_specs(cfg)}


