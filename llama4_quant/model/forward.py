"""The Llama 4 text decoder layer, written as plain functions over one layer's resident weights.

Semantics (see ../shared/llama4-facts.md): pre-norm blocks; GQA attention with interleaved-pair RoPE on
RoPE layers, L2 qk-norm after RoPE (RoPE layers only, when enabled), chunked causal attention on RoPE
layers, temperature tuning of queries on NoPE layers; MoE with sigmoid top-k routing that scales the
expert *inputs*, plus an always-on shared expert; dense SwiGLU MLP on non-MoE layers.

An optional ``observer(name, x)`` sees the input of every Linear (canonical names: ``wq``/``wk``/``wv``
share one input and are reported once as ``attn_in``; ``wo``; ``shared.gate``/``shared.up`` as
``shared.in``; ``shared.down``; ``mlp.in``; ``mlp.down``; ``experts.{e}.in`` and ``experts.{e}.down``
with only the tokens routed to expert e, already scaled by the router weight). Calibration uses it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import Llama4Config

Observer = Callable[[str, torch.Tensor], None]


class WeightSource(Protocol):
    """What a decoder layer needs: canonical tensors and single experts (a CheckpointReader fits)."""

    config: Llama4Config

    def read(self, name: str) -> torch.Tensor: ...

    def read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rope_angles(cfg: Llama4Config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim/2] for integer positions."""
    inv = cfg.inv_freq().to(positions.device)
    ang = positions.float()[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]); x is [B, T, heads, head_dim]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1)
    return out.flatten(-2).type_as(x)


def attention_mask(cfg: Llama4Config, layer: int, T: int, device) -> torch.Tensor:
    """Boolean [T, T] mask, True where query p may attend to key k."""
    p = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    mask = k <= p
    C = cfg.attention_chunk_size
    if cfg.uses_rope(layer) and C:
        mask &= (k // C) == (p // C)
    return mask


def temperature_scale(cfg: Llama4Config, positions: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.floor((positions.float() + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0


class LayerWeights:
    """One decoder layer's weights, on `device` in `dtype`, loaded on first use.

    Experts are read one at a time; with ``keep_experts=False`` they are dropped after use so peak memory
    is one expert (for layers larger than RAM, e.g. Maverick's 128 experts); `overrides` replace tensors
    (quantize-dequantized weights during conversion, or a candidate artifact's weights)."""

    def __init__(self, source: WeightSource, layer: int, device="cpu", dtype=torch.float32, keep_experts: bool = True):
        self.source, self.layer, self.device, self.dtype = source, layer, torch.device(device), dtype
        self.keep_experts = keep_experts
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def get(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            t = self._load(self.source.read(f"layers.{self.layer}.{name}"))
            self._cache[name] = t
        return t

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for kind in ("gate", "up", "down"):
            key = f"experts.{e}.{kind}"
            t = self._cache.get(key)
            if t is None:
                t = self._load(self.source.read_expert(self.layer, kind, e))
                if self.keep_experts:
                    self._cache[key] = t
            out.append(t)
        return out[0], out[1], out[2]

    def set(self, name: str, value: torch.Tensor) -> None:
        """Replace a tensor (`wq`, `experts.3.gate`, ...) for later forwards of this layer."""
        self._cache[name] = self._load(value)

    def free(self) -> None:
        self._cache.clear()


def attention_block(cfg: Llama4Config, layer: int, w: LayerWeights, x: torch.Tensor, observer: Observer | None = None):
    """Attention sub-block output (without residual) for normed input x [B, T, H]."""
    B, T, _ = x.shape
    hd = cfg.head_dim
    if observer:
        observer("attn_in", x)
    q = F.linear(x, w.get("wq")).view(B, T, cfg.num_heads, hd)
    k = F.linear(x, w.get("wk")).view(B, T, cfg.num_kv_heads, hd)
    v = F.linear(x, w.get("wv")).view(B, T, cfg.num_kv_heads, hd)
    positions = torch.arange(T, device=x.device)
    if cfg.uses_rope(layer):
        cos, sin = rope_angles(cfg, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.use_qk_norm:
            q, k = l2_norm(q, cfg.rms_norm_eps), l2_norm(k, cfg.rms_norm_eps)
    elif cfg.attn_temperature_tuning:
        q = (q * temperature_scale(cfg, positions)[None, :, None, None]).to(q.dtype)
    rep = cfg.num_heads // cfg.num_kv_heads
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    mask = attention_mask(cfg, layer, T, x.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)
    o = o.transpose(1, 2).reshape(B, T, cfg.num_heads * hd)
    if observer:
        observer("wo", o)
    return F.linear(o, w.get("wo"))


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, observe=None) -> torch.Tensor:
    h = F.silu(F.linear(x, gate)) * F.linear(x, up)
    if observe:
        observe(h)
    return F.linear(h, down)


def route(cfg: Llama4Config, w: LayerWeights, x2d: torch.Tensor,
          router: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices [N, k], input scales [N, k]) for flattened tokens x2d [N, H], with the layer's router (or
    `router` [E, H] in its place)."""
    logits = F.linear(x2d, w.get("router") if router is None else router)
    top, idx = torch.topk(logits, cfg.top_k, dim=-1)
    return idx, torch.sigmoid(top.float()).to(x2d.dtype)


def moe_block(
    cfg: Llama4Config,
    w: LayerWeights,
    x: torch.Tensor,
    observer: Observer | None = None,
    observe_all_experts: bool = False,
) -> torch.Tensor:
    """MoE FFN output for normed input x [B, T, H]. With `observe_all_experts`, every expert's
    statistics see every token (scaled by its own sigmoid router score); the output stays exact."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    idx, scale = route(cfg, w, x2)
    if observer:
        observer("shared.in", x2)
    out = swiglu(
        x2, w.get("shared.gate"), w.get("shared.up"), w.get("shared.down"),
        (lambda h: observer("shared.down", h)) if observer else None,
    )
    all_scores = None
    if observer and observe_all_experts:
        all_scores = torch.sigmoid(F.linear(x2, w.get("router")).float()).to(x2.dtype)
    for e in range(cfg.num_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if all_scores is not None:
            gate, up, down = w.expert(e)
            xin_all = x2 * all_scores[:, e : e + 1]
            observer(f"experts.{e}.in", xin_all)
            observer(f"experts.{e}.down", F.silu(F.linear(xin_all, gate)) * F.linear(xin_all, up))
            obs = None
        elif observer:
            obs = lambda h, e=e: observer(f"experts.{e}.down", h)  # noqa: E731
        else:
            obs = None
        if tok.numel() == 0:
            if observer and all_scores is None:
                observer(f"experts.{e}.in", x2[:0])
            continue
        xin = x2[tok] * scale[tok, slot][:, None]
        if observer and all_scores is None:
            observer(f"experts.{e}.in", xin)
        gate, up, down = w.expert(e)
        out.index_add_(0, tok, swiglu(xin, gate, up, down, obs))
    return out.view(shape)


def dense_block(w: LayerWeights, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
    if observer:
        observer("mlp.in", x)
    return swiglu(x, w.get("mlp.gate"), w.get("mlp.up"), w.get("mlp.down"), (lambda h: observer("mlp.down", h)) if observer else None)


def decoder_layer(
    cfg: Llama4Config,
    layer: int,
    w: LayerWeights,
    h: torch.Tensor,
    observer: Observer | None = None,
    observe_all_experts: bool = False,
) -> torch.Tensor:
    """One full decoder layer: h [B, T, H] -> h [B, T, H]."""
    h = h + attention_block(cfg, layer, w, rms_norm(h, w.get("attn_norm"), cfg.rms_norm_eps), observer)
    x = rms_norm(h, w.get("ffn_norm"), cfg.rms_norm_eps)
    if cfg.is_moe(layer):
        return h + moe_block(cfg, w, x, observer, observe_all_experts)
    return h + dense_block(w, x, observer)
