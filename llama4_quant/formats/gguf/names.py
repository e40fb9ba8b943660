"""llama.cpp's tensor names for Llama 4 (`blk.N.ffn_down_exps.weight`) and our canonical names (model/tensors.py)."""

from __future__ import annotations

import re

_GLOBAL = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_LAYER = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "router": "ffn_gate_inp",
    "experts.gate": "ffn_gate_exps", "experts.up": "ffn_up_exps", "experts.down": "ffn_down_exps",
    "shared.gate": "ffn_gate_shexp", "shared.up": "ffn_up_shexp", "shared.down": "ffn_down_shexp",
    "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down",
}
_CANON = re.compile(r"^layers\.(\d+)\.(.+)$")
_GGUF = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
_REV_GLOBAL = {v + ".weight": k for k, v in _GLOBAL.items()}
_REV_LAYER = {v: k for k, v in _LAYER.items()}

ROPE_FREQS = "rope_freqs.weight"


def gguf_name(canonical: str) -> str:
    """`layers.3.experts.down` -> `blk.3.ffn_down_exps.weight` (llama.cpp's names)."""
    if canonical in _GLOBAL:
        return _GLOBAL[canonical] + ".weight"
    m = _CANON.match(canonical)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(canonical)
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight"


def canonical_name(gguf: str) -> str:
    """Inverse of :func:`gguf_name` (`blk.3.ffn_down_exps.weight` -> `layers.3.experts.down`)."""
    if gguf in _REV_GLOBAL:
        return _REV_GLOBAL[gguf]
    m = _GGUF.match(gguf)
    if not m or m.group(2) not in _REV_LAYER:
        raise KeyError(gguf)
    return f"layers.{m.group(1)}.{_REV_LAYER[m.group(2)]}"
