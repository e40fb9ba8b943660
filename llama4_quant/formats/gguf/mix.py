"""GGUF tensor names for Llama 4 and the per-tensor type rule of each GGUF scheme ("mix").

The rule is llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, the commit pinned in
tests/support/llamacpp.py) restricted to our schemes, so that sizes and quality compare like for like with
`llama-quantize` (docs/gguf.md explains each case):

- norms, `ffn_gate_inp` (router) and `rope_freqs`: F32, always (1-D tensors and routers are never
  quantized; llama.cpp's converter stores them F32).
- bf16 / f16: every other tensor in that type.
- `output` (lm_head): Q6_K in every quantized mix except q8_0, which keeps Q8_0, and mxfp4_moe (Q8_0);
  Q8_0 when its row is not a multiple of the base type's block. With tied embeddings (no `output`)
  `token_embd` takes this rule; otherwise it keeps the base type (Q8_0 in mxfp4_moe).
- mxfp4_moe: routed experts (3-D, more than one expert) MXFP4, every other quantized tensor Q8_0.
- `attn_v`: q4_k_m / q5_k_m Q6_K on "more bits" layers (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2;
  n = block_count); q4_k_s Q5_K in layers 0-3; q3_k_m Q5_K in layers 0-1, Q4_K elsewhere; q2_k Q4_K when
  n_head / n_head_kv >= 4, else Q3_K; iq4_xs / iq4_nl Q5_K when n_head / n_head_kv >= 4.
- every `ffn_down` (`ffn_down_exps`, `ffn_down_shexp`, dense `ffn_down`; the layer index comes from the
  tensor name for MoE models, so routed and shared `ffn_down` of a layer agree): q4_k_m / q5_k_m Q6_K on
  more-bits layers; q4_k_s Q5_K in the first n/8 layers; q3_k_m Q5_K in the first n/16 layers, Q4_K
  elsewhere; q2_k Q3_K; iq4_xs / iq4_nl Q5_K in the first n/8 layers unless calibrated (`has_imatrix`);
  q4_0 with an importance matrix Q4_1 in the first n/8 layers.
- `attn_output`: q3_k_m Q4_K, q2_k Q3_K.
- exactly 8 experts (Mixtral's rule, applies to any such model): `attn_v` and `attn_k` become Q8_0, and
  `attn_output` Q5_K in q2_k / q3_k_s / q3_k_m / iq4_nl / iq4_xs / q4_k_s / q4_k_m (instead of the rule above).
- A tensor whose rows (GGUF ne0, our last dim) are not a multiple of its block size falls back as
  llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K / Q2_K -> Q4_0, IQ4_XS -> IQ4_NL, and
  F16 when even that block (32) does not divide the row.
"""

from __future__ import annotations


from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from dataclasses import dataclass
from typing import Sequence

from ...model.config import Llama4Config
from ...model.tensors import tensor_specs
from .errors import GGUFWriteError
from .names import ROPE_FREQS, gguf_name

SCHEMES = ("bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0",
           "iq4_xs", "iq4_nl", "q3_k_m", "q3_k_s", "q2_k", "mxfp4_moe")

BASE = {
    "bf16": T.BF16, "f16": T.F16, "q8_0": T.Q8_0, "q6_k": T.Q6_K, "q5_k_m": T.Q5_K,
    "q4_k_m": T.Q4_K, "q4_k_s": T.Q4_K, "q4_0": T.Q4_0,
    "iq4_xs": T.IQ4_XS, "iq4_nl": T.IQ4_NL, "q3_k_m": T.Q3_K, "q3_k_s": T.Q3_K, "q2_k": T.Q2_K,
    "mxfp4_moe": T.MXFP4,
}

# llama.cpp's LLAMA_FTYPE values written to general.file_type
FILE_TYPE = {"bf16": 32, "f16": 1, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_k_s": 14, "q4_0": 2,
             "iq4_xs": 30, "iq4_nl": 25, "q3_k_m": 12, "q3_k_s": 11, "q2_k": 10, "mxfp4_moe": 38}

# llama.cpp's tensor_type_fallback: the type used when a row is not a multiple of the type's block
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.Q4_0, T.Q2_K: T.Q4_0, T.IQ4_XS: T.IQ4_NL}
_FLOAT = (T.F32, T.F16, T.BF16)
#: the n_head / n_head_kv of Meta's Llama 4 checkpoints (40 / 8), assumed when a caller does not say
LLAMA4_GQA = 5


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits(i_layer, n_layers)`."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_more_bits = more_bits  # old private name


def tensor_type(scheme: str, canonical: str, n_layers: int, row_len: int, *, n_experts: int = 0,
                has_imatrix: bool = False, n_gqa: int | None = None, tied_embeddings: bool = False) -> T:
    """GGML type of a canonical tensor under `scheme` (see module docstring).

    n_experts: the model's routed experts (the value 8 changes attention types; mxfp4_moe keeps a single
    expert, which llama.cpp stores 2-D, in Q8_0);
    has_imatrix: whether the quantization is calibrated (llama-quantize --imatrix; our gptq/imatrix
    methods), which matters for q4_0, iq4_xs and iq4_nl; n_gqa: attention heads per KV head (integer
    division, as llama.cpp's `n_gqa()`; None: Llama 4's 5), which matters for q2_k, iq4_xs and iq4_nl;
    tied_embeddings: the file has no `output`, so `tok_embeddings` gets the output's rule (llama.cpp
    treats the embedding as the output then)."""
    if scheme not in BASE:
        raise KeyError(f"unknown GGUF scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    rest = canonical.split(".", 2)[-1] if canonical.startswith("layers.") else canonical
    if rest in ("norm", "attn_norm", "ffn_norm", "router"):
        return T.F32
    base = BASE[scheme]
    if base in _FLOAT:
        return base
    gqa = LLAMA4_GQA if n_gqa is None else n_gqa
    layer = int(canonical.split(".")[1]) if canonical.startswith("layers.") else -1
    is_down = rest in ("experts.down", "shared.down", "mlp.down")
    t = base
    if canonical == "output" or (tied_embeddings and canonical == "tok_embeddings"):
        if scheme == "mxfp4_moe" or row_len % GGML_QUANT_SIZES[base][0]:
            t = T.Q8_0
        elif base != T.Q8_0:
            t = T.Q6_K
    elif scheme == "mxfp4_moe":
        t = T.MXFP4 if rest.startswith("experts.") and n_experts != 1 else T.Q8_0  # 0: not said, stacked
    elif canonical == "tok_embeddings":
        pass
    elif rest == "wv":
        if scheme == "q2_k":
            t = T.Q4_K if gqa >= 4 else T.Q3_K
        elif scheme == "q3_k_m":
            t = T.Q5_K if layer < 2 else T.Q4_K
        elif scheme in ("iq4_nl", "iq4_xs") and gqa >= 4:
            t = T.Q5_K
        elif scheme in ("q4_k_m", "q5_k_m") and more_bits(layer, n_layers):
            t = T.Q6_K
        elif scheme == "q4_k_s" and layer < 4:
            t = T.Q5_K
        if n_experts == 8:
            t = T.Q8_0
    elif rest == "wk":
        if n_experts == 8:
            t = T.Q8_0
    elif is_down:
        if scheme == "q2_k":
            t = T.Q3_K
        elif scheme == "q3_k_m":
            t = T.Q5_K if layer < n_layers // 16 else T.Q4_K
        elif scheme in ("q4_k_m", "q5_k_m") and more_bits(layer, n_layers):
            t = T.Q6_K
        elif scheme in ("iq4_nl", "iq4_xs") and layer < n_layers // 8 and not has_imatrix:
            t = T.Q5_K
        elif scheme == "q4_k_s" and layer < n_layers // 8:
            t = T.Q5_K
        elif scheme == "q4_0" and has_imatrix and layer < n_layers // 8:
            t = T.Q4_1
    elif rest == "wo":
        if n_experts == 8:
            if scheme in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs"):
                t = T.Q5_K
        elif scheme == "q2_k":
            t = T.Q3_K
        elif scheme == "q3_k_m":
            t = T.Q4_K
    return fit_type(t, row_len)


def fit_type(t: T, row_len: int) -> T:
    """llama.cpp's `tensor_type_fallback`: `t` if `row_len` is a multiple of its block, else its fallback
    (a 32-block type keeps itself), else F16."""
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


# ---- the tensor plan of a file ------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    canonical: str | None  # our canonical name (None for rope_freqs)
    shape: tuple[int, ...]  # numpy order: outermost first (GGUF ne reversed)
    qtype: T
    n_experts: int = 0  # > 0: a 3-D routed-expert tensor written one [rows, cols] slab per expert

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.qtype, self.shape)

    @property
    def slab_bytes(self) -> int:
        return self.nbytes // self.n_experts if self.n_experts else self.nbytes


def tensor_nbytes(qtype: T, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    block = GGML_QUANT_SIZES[qtype][0]
    if int(shape[-1]) % block:
        raise GGUFWriteError(f"{qtype.name} needs rows that are a multiple of {block}, got {shape[-1]}")
    return type_bytes(qtype, n)


def plan_tensors(cfg: Llama4Config, scheme: str, has_imatrix: bool = False) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in file order: rope_freqs (llama3 scaling only), then ours."""
    plan: list[PlannedTensor] = []
    if cfg.rope_scaling is not None or getattr(cfg, "rope_freq_factors", None) is not None:
        plan.append(PlannedTensor(ROPE_FREQS, None, (cfg.head_dim // 2,), T.F32))
    gqa = cfg.num_heads // cfg.num_kv_heads if cfg.num_kv_heads else 0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for spec in tensor_specs(cfg):
        name, shape, E = spec.name, spec.full_shape, spec.num_experts
        qt = tensor_type(scheme, name, cfg.num_layers, shape[-1], n_experts=cfg.num_experts, has_imatrix=has_imatrix,
                         n_gqa=gqa, tied_embeddings=tied)
        plan.append(PlannedTensor(gguf_name(name), name, shape, qt, E))
    return plan
