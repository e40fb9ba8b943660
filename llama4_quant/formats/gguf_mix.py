"""GGUF tensor names for Llama 4 and the per-tensor type rule of each GGUF scheme ("mix").

Our rule follows llama.cpp's `llama-quantize` mixes so sizes and quality compare like for like:

- norms, `ffn_gate_inp` (router) and `rope_freqs`: F32, always.
- `output` (lm_head): Q6_K in every k-quant and Q4_0 mix; Q8_0 / BF16 / F16 mixes keep their own type.
- `*_m` mixes (q4_k_m, q5_k_m): `attn_v` and `ffn_down` / `ffn_down_exps` / `ffn_down_shexp` get Q6_K on
  "more bits" layers: the first and last eighth of the layers and every third layer in between
  (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2), the rest the base type (Q4_K / Q5_K).
- q4_k_s: `ffn_down*` get Q5_K in the first eighth of the layers; `attn_v` gets Q5_K in layers 0-3.
- A tensor whose rows are not a multiple of the block size falls back as llama.cpp does
  (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; 32-blocks -> F16 when rows are not a multiple of 32).
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

SCHEMES = ("bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0")

BASE = {
    "bf16": T.BF16, "f16": T.F16, "q8_0": T.Q8_0, "q6_k": T.Q6_K, "q5_k_m": T.Q5_K,
    "q4_k_m": T.Q4_K, "q4_k_s": T.Q4_K, "q4_0": T.Q4_0,
}

# llama.cpp's LLAMA_FTYPE values written to general.file_type
FILE_TYPE = {"bf16": 32, "f16": 1, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_k_s": 14, "q4_0": 2}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

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


def gguf_name(canonical: str) -> str:
    """`layers.3.experts.down` -> `blk.3.ffn_down_exps.weight` (llama.cpp's names)."""
    if canonical in _GLOBAL:
        return _GLOBAL[canonical] + ".weight"
    m = _CANON.match(canonical)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(canonical)
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(scheme: str, canonical: str, n_layers: int, row_len: int) -> T:
    """GGML type of a canonical tensor under `scheme` (see module docstring)."""
    if scheme not in BASE:
        raise KeyError(f"unknown GGUF scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    rest = canonical.split(".", 2)[-1] if canonical.startswith("layers.") else canonical
    if rest in ("norm", "attn_norm", "ffn_norm", "router"):
        return T.F32
    base = BASE[scheme]
    t = base
    layer = int(canonical.split(".")[1]) if canonical.startswith("layers.") else -1
    is_down = rest in ("experts.down", "shared.down", "mlp.down")
    if canonical == "output" and base not in (T.Q8_0, T.BF16, T.F16):
        t = T.Q6_K
    elif scheme in ("q4_k_m", "q5_k_m") and (rest == "wv" or is_down) and _more_bits(layer, n_layers):
        t = T.Q6_K
    elif scheme == "q4_k_s" and is_down and layer < n_layers // 8:
        t = T.Q5_K
    elif scheme == "q4_k_s" and rest == "wv" and layer < 4:
        t = T.Q5_K
    return fit_type(t, row_len)


def fit_type(t: T, row_len: int) -> T:
    block = GGML_QUANT_SIZES[t][0]
    if row_len % block == 0:
        return t
    t = _FALLBACK.get(t, t)
    if row_len % GGML_QUANT_SIZES[t][0] == 0:
        return t
    return T.F16


def type_bytes(t: T, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return n_elements // block * size
