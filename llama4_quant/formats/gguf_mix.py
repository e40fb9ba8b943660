"""GGUF tensor names for Llama 4 and the per-tensor type rule of each GGUF scheme ("mix").

The rule is llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, the commit pinned in
testing/llamacpp.py) restricted to our schemes, so that sizes and quality compare like for like with
`llama-quantize` (docs/gguf.md explains each case):

- norms, `ffn_gate_inp` (router) and `rope_freqs`: F32, always (1-D tensors and routers are never
  quantized; llama.cpp's converter stores them F32).
- bf16 / f16: every other tensor in that type.
- `output` (lm_head): Q6_K in every quantized mix except q8_0, which keeps Q8_0.
  `token_embd` keeps the base type.
- q4_k_m / q5_k_m: `attn_v` and every `ffn_down` (`ffn_down_exps`, `ffn_down_shexp`, dense `ffn_down`)
  get Q6_K on "more bits" layers: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2 (n = block_count; the
  layer index comes from the tensor name for MoE models, so routed and shared `ffn_down` of a layer
  agree); the rest the base type (Q4_K / Q5_K).
- q4_k_s: `ffn_down*` get Q5_K in the first n/8 layers; `attn_v` gets Q5_K in layers 0-3.
- q4_0 with an importance matrix (`has_imatrix`): `ffn_down*` of the first n/8 layers get Q4_1.
- exactly 8 experts (Mixtral's rule, applies to any such model): `attn_v` and `attn_k` become Q8_0,
  and `attn_output` Q5_K in q4_k_s / q4_k_m.
- A tensor whose rows (GGUF ne0, our last dim) are not a multiple of its block size falls back as
  llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when even that block (32)
  does not divide the row; `output` goes straight to Q8_0 when its row is not a multiple of the
  base type's block.
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
_FLOAT = (T.F32, T.F16, T.BF16)

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


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits(i_layer, n_layers)`."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_more_bits = more_bits  # old private name


def tensor_type(scheme: str, canonical: str, n_layers: int, row_len: int, *, n_experts: int = 0,
                has_imatrix: bool = False) -> T:
    """GGML type of a canonical tensor under `scheme` (see module docstring).

    n_experts: the model's routed experts (only the value 8 changes anything);
    has_imatrix: whether the quantization is calibrated (llama-quantize --imatrix; our gptq/imatrix
    methods), which only matters for q4_0."""
    if scheme not in BASE:
        raise KeyError(f"unknown GGUF scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    rest = canonical.split(".", 2)[-1] if canonical.startswith("layers.") else canonical
    if rest in ("norm", "attn_norm", "ffn_norm", "router"):
        return T.F32
    base = BASE[scheme]
    if base in _FLOAT:
        return base
    layer = int(canonical.split(".")[1]) if canonical.startswith("layers.") else -1
    is_down = rest in ("experts.down", "shared.down", "mlp.down")
    t = base
    if canonical == "output":
        if row_len % GGML_QUANT_SIZES[base][0]:
            t = T.Q8_0
        elif base != T.Q8_0:
            t = T.Q6_K
    elif rest == "wv":
        if scheme in ("q4_k_m", "q5_k_m") and more_bits(layer, n_layers):
            t = T.Q6_K
        elif scheme == "q4_k_s" and layer < 4:
            t = T.Q5_K
        if n_experts == 8:
            t = T.Q8_0
    elif rest == "wk":
        if n_experts == 8:
            t = T.Q8_0
    elif is_down:
        if scheme in ("q4_k_m", "q5_k_m") and more_bits(layer, n_layers):
            t = T.Q6_K
        elif scheme == "q4_k_s" and layer < n_layers // 8:
            t = T.Q5_K
        elif scheme == "q4_0" and has_imatrix and layer < n_layers // 8:
            t = T.Q4_1
    elif rest == "wo":
        if n_experts == 8 and scheme in ("q4_k_s", "q4_k_m"):
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
