"""What goes into a llama4 GGUF besides tensor data: every key llama.cpp reads, the rope_freqs tensor, sampling
defaults, and where a config differs from what llama.cpp hard-codes (docs/gguf.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter

from ...model.config import Llama4Config, rope_freq_factors
from .constants import LLAMACPP_ATTN_SCALE, LLAMACPP_CHUNK, LLAMACPP_FLOOR_SCALE, LLAMACPP_NOPE_INTERVAL
from .errors import GGUFWriteError
from .mix import FILE_TYPE
from .vocab import TokenizerData


def all_full_attention(cfg: Llama4Config) -> bool:
    """No chunking and RoPE on every layer: expressible as llama4.attention.sliding_window = 0."""
    return not cfg.attention_chunk_size and all(cfg.rope_layers)


def llamacpp_differences(cfg: Llama4Config) -> list[str]:
    """Config values llama.cpp ignores for arch llama4 (it runs its hard-coded ones instead)."""
    diffs: list[str] = []
    if all_full_attention(cfg):
        return _qk_norm_diff(cfg)
    nope = tuple((i + 1) % LLAMACPP_NOPE_INTERVAL == 0 for i in range(cfg.num_layers))
    if tuple(not r for r in cfg.rope_layers) != nope:
        diffs.append(f"NoPE layers {list(cfg.nope_layers)} (llama.cpp: every 4th layer, "
                     f"{[i for i, x in enumerate(nope) if x]})")
    if cfg.attention_chunk_size != LLAMACPP_CHUNK:
        diffs.append(f"attention_chunk_size {cfg.attention_chunk_size} (llama.cpp: {LLAMACPP_CHUNK})")
    if any(nope):  # temperature tuning only acts on NoPE layers
        if not cfg.attn_temperature_tuning:
            diffs.append("attn_temperature_tuning off (llama.cpp: on)")
        else:
            if cfg.floor_scale != LLAMACPP_FLOOR_SCALE:
                diffs.append(f"floor_scale {cfg.floor_scale:g} (llama.cpp: {LLAMACPP_FLOOR_SCALE:g})")
            if abs(cfg.attn_scale - LLAMACPP_ATTN_SCALE) > 1e-9:
                diffs.append(f"attn_scale {cfg.attn_scale:g} (llama.cpp: {LLAMACPP_ATTN_SCALE:g})")
    return diffs + _qk_norm_diff(cfg)


def _qk_norm_diff(cfg: Llama4Config) -> list[str]:
    want = cfg.num_experts != 128
    if cfg.use_qk_norm != want:
        return [f"use_qk_norm {cfg.use_qk_norm} (llama.cpp: {want}, since the model has {cfg.num_experts} experts)"]
    return []


def compat_warning(cfg: Llama4Config) -> str | None:
    """One line for stderr, or None when llama.cpp runs the model as its config says."""
    d = llamacpp_differences(cfg)
    if not d:
        return None
    return ("llama.cpp hard-codes llama4 attention settings that differ from this checkpoint's config, so it will "
            "compute a different model: " + "; ".join(d))


def check_expressible(cfg: Llama4Config) -> None:
    """Refuse configs a llama4 GGUF cannot describe at all."""
    if cfg.num_experts <= 0:
        raise GGUFWriteError("llama.cpp's llama4 architecture needs routed experts (num_local_experts > 0)")
    step = cfg.interleave_moe_layer_step
    implied = tuple(i for i in range(cfg.num_layers) if step > 0 and (i + 1) % step == 0)
    if tuple(cfg.moe_layers) != implied:
        raise GGUFWriteError(
            f"MoE layers {list(cfg.moe_layers)} are not every {step}th layer ({list(implied)}): llama.cpp derives "
            "them from interleave_moe_layer_step and cannot load this model")
    if cfg.num_heads * cfg.head_dim != cfg.q_dim or cfg.head_dim % 2:
        raise GGUFWriteError(f"head_dim {cfg.head_dim} cannot be expressed in GGUF")


def rope_freqs_tensor(cfg: Llama4Config) -> np.ndarray:
    """llama3 rope scaling as llama.cpp takes it: the per-frequency divisors (model/config.py), float32."""
    import torch

    return rope_freq_factors(cfg, torch.float32).numpy()


def generation_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """Sampling defaults from generation_config.json, as general.sampling.* (llama.cpp uses them as defaults)."""
    p = Path(model_dir) / "generation_config.json"
    try:
        g = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    out: dict[str, float | int] = {}
    for src, key, kind in (("top_k", "top_k", int), ("top_p", "top_p", float), ("min_p", "min_p", float),
                           ("temperature", "temp", float), ("repetition_penalty", "penalty_repeat", float)):
        v = g.get(src)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = kind(v)
    return out


def add_model_metadata(w: GGUFWriter, cfg: Llama4Config, tok: TokenizerData, scheme: str, *,
                       name: str, sampling: dict[str, float | int] | None = None,
                       extra: dict[str, Any] | None = None, file_type: int | None = None) -> None:
    """Every key llama.cpp reads for llama4 (src/llama-model.cpp, src/models/llama4.cpp), the tokenizer
    (src/llama-vocab.cpp) and general.* (see docs/gguf.md for the list)."""
    from ... import __version__

    w.add_type("model")
    w.add_name(name)
    w.add_quantized_by(f"llama4-quant {__version__}")
    w.add_file_type(FILE_TYPE[scheme] if file_type is None else file_type)
    w.add_quantization_version(GGML_QUANT_VERSION)
    for k, v in (sampling or {}).items():
        getattr(w, f"add_sampling_{k}")(v)

    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size_mlp)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    if all_full_attention(cfg):
        w.add_sliding_window(0)  # llama.cpp: no chunking, RoPE on every layer

    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    if tok.merges:
        w.add_token_merges(tok.merges)
    for typ in ("bos", "eos", "unk", "pad"):
        if typ in tok.special_ids:
            getattr(w, f"add_{typ}_token_id")(tok.special_ids[typ])
    for typ in ("bos", "eos"):
        if typ in tok.add_special:
            getattr(w, f"add_add_{typ}_token")(tok.add_special[typ])
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    for k, v in (extra or {}).items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v) if v >= 0 else w.add_int32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif v is not None:
            w.add_string(k, str(v))
