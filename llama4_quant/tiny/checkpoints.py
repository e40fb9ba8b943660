"""Tiny Llama 4 checkpoints written by our own code, deterministic, in every layout we read:

- HF multimodal (`Llama4ForConditionalGeneration`, with a tiny vision tower), HF text-only
  (`Llama4ForCausalLM`), and Meta's original layout (params.json + consolidated.NN.pth split N-way).

Weights come from a canonical-name generator (see llama4_quant/model/checkpoint.py) and are written one
tensor at a time into size-capped shards, so even a many-layer fixture is never whole in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from ..model.tensors import expected_shapes
from ..model.config import Llama4Config, from_hf_dict, from_params_dict
from ..model.hf_reader import to_hf_name

TensorFn = Callable[[str, tuple[int, ...]], torch.Tensor]

TINY_VISION = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vision_output_dim=32,
    image_size=28, patch_size=14, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5,
    model_type="llama4_vision_model", hidden_act="gelu", norm_eps=1e-5, num_channels=3,
    vision_feature_select_strategy="default", rope_theta=10000.0,
)


def text_config(variant: str = "scout", vocab_size: int = 320, **overrides) -> dict:
    """HF `text_config` dict of a tiny model. Variants:
    scout    all layers MoE, qk norm, llama3 rope scaling, NoPE every 4th layer
    maverick MoE every 2nd layer (dense layers between), 8 experts, no qk norm
    chunked  scout-like with attention_chunk_size 8 and floor_scale 4 (chunking and temperature act early)
    """
    base = dict(
        model_type="llama4_text", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
        intermediate_size_mlp=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        num_experts_per_tok=1, num_local_experts=4, interleave_moe_layer_step=1, use_qk_norm=True,
        no_rope_layer_interval=4, attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1, tie_word_embeddings=False, bos_token_id=vocab_size - 64, eos_token_id=vocab_size - 63,
        pad_token_id=vocab_size - 46, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    )
    if variant == "maverick":
        base.update(interleave_moe_layer_step=2, num_local_experts=8, use_qk_norm=False, rope_scaling=None)
    elif variant == "chunked":
        base.update(attention_chunk_size=8, floor_scale=4, attn_scale=0.5)
    elif variant != "scout":
        raise ValueError(f"unknown fixture variant {variant!r}")
    base.update(overrides)
    step = base["interleave_moe_layer_step"]
    n = base["num_hidden_layers"]
    base["moe_layers"] = list(range(step - 1, n, step))
    base["no_rope_layers"] = [int((i + 1) % base["no_rope_layer_interval"] != 0) for i in range(n)]
    if base["rope_scaling"] is None:
        base.pop("rope_scaling")
        base["rope_parameters"] = {"rope_type": "default", "rope_theta": base["rope_theta"]}
    else:
        base["rope_parameters"] = {**base["rope_scaling"], "rope_theta": base["rope_theta"]}
    return base


def hf_config(text_cfg: dict, layout: str = "multimodal") -> dict:
    if layout == "text":
        return {"architectures": ["Llama4ForCausalLM"], **text_cfg, "torch_dtype": "bfloat16"}
    return {
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "boi_token_index": text_cfg["vocab_size"] - 1, "eoi_token_index": text_cfg["vocab_size"] - 2,
        "image_token_index": text_cfg["vocab_size"] - 3, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": text_cfg, "vision_config": TINY_VISION,
    }


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor_fn(seed: int = 0) -> TensorFn:
    """Deterministic per-name random weights with activations that neither vanish nor explode."""

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(name, seed))
        if len(shape) == 1:  # norms
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        if name.endswith("router"):
            return torch.randn(shape, generator=g) * 0.5
        if name == "tok_embeddings":
            return torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5

    return make


def canonical_tensors(cfg: Llama4Config, fn: TensorFn) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in expected_shapes(cfg).items():
        yield name, fn(name, shape)


def vision_tensors(vc: dict, text_hidden: int, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    d, inter, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    npos = (vc["image_size"] // p) ** 2 + 1
    shapes = {
        "vision_model.class_embedding": (d,),
        "vision_model.positional_embedding_vlm": (npos, d),
        "vision_model.patch_embedding.linear.weight": (d, vc["num_channels"] * p * p),
        "vision_model.layernorm_pre.weight": (d,), "vision_model.layernorm_pre.bias": (d,),
        "vision_model.layernorm_post.weight": (d,), "vision_model.layernorm_post.bias": (d,),
        "vision_model.vision_adapter.mlp.fc1.weight": (vc["projector_input_dim"], inter),
        "vision_model.vision_adapter.mlp.fc2.weight": (vc["projector_output_dim"], vc["projector_output_dim"]),
        "multi_modal_projector.linear_1.weight": (text_hidden, vc["vision_output_dim"]),
    }
    for i in range(vc["num_hidden_layers"]):
        q = f"vision_model.model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[q + f"self_attn.{proj}.weight"] = (d, d)
            shapes[q + f"self_attn.{proj}.bias"] = (d,)
        shapes.update({q + "mlp.fc1.weight": (inter, d), q + "mlp.fc1.bias": (inter,),
                       q + "mlp.fc2.weight": (d, inter), q + "mlp.fc2.bias": (d,)})
        for ln in ("input_layernorm", "post_attention_layernorm"):
            shapes[q + f"{ln}.weight"] = (d,)
            shapes[q + f"{ln}.bias"] = (d,)
    fn = random_tensor_fn(seed + 1)
    for name, shape in shapes.items():
        yield name, fn(name, shape) * (0.02 if len(shape) > 1 else 1.0)


def _hf_tensors(cfg: Llama4Config, fn: TensorFn, prefix: str, head: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical tensors renamed and reshaped to HF's fused-expert layout ([E, in, out])."""
    I = cfg.intermediate_size
    pending: dict[str, torch.Tensor] = {}
    for name, t in canonical_tensors(cfg, fn):
        if ".experts." in name:
            layer = name.split(".")[1]
            kind = name.rsplit(".", 1)[1]
            base = f"{prefix}layers.{layer}.feed_forward.experts."
            if kind == "down":
                yield base + "down_proj", t.transpose(1, 2).contiguous()
            else:
                pending[kind] = t
                if len(pending) == 2:
                    gate_up = torch.cat([pending["gate"].transpose(1, 2), pending["up"].transpose(1, 2)], dim=2)
                    assert gate_up.shape[2] == 2 * I
                    yield base + "gate_up_proj", gate_up.contiguous()
                    pending.clear()
        else:
            yield to_hf_name(name, prefix, head), t


class ShardWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards capped at `max_bytes`, plus the index."""

    def __init__(self, out: Path, max_bytes: int = 2 << 20, dtype: torch.dtype = torch.bfloat16):
        self.out, self.max_bytes, self.dtype = Path(out), max_bytes, dtype
        self.out.mkdir(parents=True, exist_ok=True)
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.to(self.dtype).contiguous() if t.is_floating_point() else t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + nbytes > self.max_bytes:
            self._flush()
        self.buf[name] = t
        self.buf_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        k = len(self.files) + 1
        save_file(self.buf, str(self.out / f"shard-{k:05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.buf))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> dict[str, str]:
        if self.buf:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            (self.out / f"shard-{k:05d}.tmp").rename(self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map


def write_hf_checkpoint(out: str | Path, text_cfg: dict, fn: TensorFn | None = None, layout: str = "multimodal",
                        max_shard_bytes: int = 2 << 20, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a tiny HF checkpoint; `layout` is "multimodal" (with vision tower) or "text"."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config(text_cfg, layout)
    cfg = from_hf_dict(raw)
    fn = fn or random_tensor_fn(0)
    if layout == "text":
        prefix, head = "model.", "lm_head.weight"
    else:
        prefix, head = "language_model.model.", "language_model.lm_head.weight"
    w = ShardWriter(out, max_shard_bytes, dtype)
    for name, t in _hf_tensors(cfg, fn, prefix, head):
        w.add(name, t)
    if layout != "text":
        for name, t in vision_tensors(raw["vision_config"], cfg.hidden_size):
            w.add(name, t)
    w.close()
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    gen = {"bos_token_id": text_cfg["bos_token_id"], "eos_token_id": text_cfg["eos_token_id"],
           "pad_token_id": text_cfg["pad_token_id"], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def meta_params(text_cfg: dict) -> dict:
    """params.json whose llama-models FFN sizing reproduces the HF config's widths."""
    cfg = from_hf_dict({"model_type": "llama4_text", **text_cfg})
    scaling = cfg.rope_scaling
    base = {
        "dim": cfg.hidden_size, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "use_scaled_rope": scaling is not None, "nope_layer_interval": cfg.no_rope_layer_interval,
        "use_qk_norm": cfg.use_qk_norm, "attention_chunk_size": cfg.attention_chunk_size,
        "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": cfg.floor_scale,
        "attn_scale": cfg.attn_scale, "max_seq_len": cfg.max_position_embeddings, "ffn_exp": 4.0,
    }
    if scaling is not None:
        base.update(rope_scaling_factor=scaling.factor, rope_high_freq_factor=scaling.high_freq_factor)
    for multiple_of in (16, 32, 64, 128, 256):
        for mult in (None, 1.2, 1.0, 1.3, 1.5):
            for auto in (True, False):
                p = {**base, "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
                     "moe_args": {"num_experts": cfg.num_experts, "top_k": cfg.top_k, "capacity_factor": 1.0,
                                  "auto_scale_F": auto, "interleave_moe_layer_step": cfg.interleave_moe_layer_step}}
                got = from_params_dict(p)
                if (got.intermediate_size, got.intermediate_size_mlp) == (cfg.intermediate_size, cfg.intermediate_size_mlp):
                    return p
    raise ValueError("no params.json FFN sizing reproduces these widths; pick llama-models-compatible sizes")


def write_meta_checkpoint(out: str | Path, text_cfg: dict, fn: TensorFn | None = None, shards: int = 2,
                          dtype: torch.dtype = torch.bfloat16) -> Path:
    """Meta's original layout: params.json + consolidated.NN.pth, tensor-parallel split `shards` ways."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = meta_params(text_cfg)
    cfg = from_params_dict(params)
    fn = fn or random_tensor_fn(0)
    S = shards
    sd: list[dict[str, torch.Tensor]] = [{} for _ in range(S)]

    def put(key: str, parts: list[torch.Tensor]) -> None:
        for s in range(S):
            sd[s][key] = parts[s].to(dtype).contiguous()

    def split(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        return list(t.chunk(S, dim=dim))

    qkv: dict[str, torch.Tensor] = {}
    pending_gate = None
    for name, t in canonical_tensors(cfg, fn):
        if name == "tok_embeddings":
            put("tok_embeddings.weight", split(t, 0))
        elif name == "norm":
            put("norm.weight", [t] * S)
        elif name == "output":
            put("output.weight", split(t, 0))
        else:
            _, i, rest = name.split(".", 2)
            p = f"layers.{i}."
            E, H = cfg.num_experts, cfg.hidden_size
            if rest == "attn_norm":
                put(p + "attention.wqkv.layer_norm_weight", [t] * S)
            elif rest == "ffn_norm":
                key = "feed_forward.norm.weight" if cfg.is_moe(int(i)) else "feed_forward.mlp.layer_norm_weight"
                put(p + key, [t] * S)
            elif rest in ("wq", "wk", "wv"):
                qkv[rest] = t
                if len(qkv) == 3:
                    parts = [torch.cat([qkv["wq"].chunk(S, 0)[s], qkv["wk"].chunk(S, 0)[s], qkv["wv"].chunk(S, 0)[s]])
                             for s in range(S)]
                    put(p + "attention.wqkv.weight", parts)
                    qkv.clear()
            elif rest == "wo":
                put(p + "attention.wo.weight", split(t, 1))
            elif rest == "router":
                put(p + "feed_forward.router_DE", [t.t()] * S)
            elif rest in ("experts.gate", "experts.up"):  # [E, F, D] -> per shard [E*D, F/S]
                key = "moe_w_in_eD_F" if rest.endswith("gate") else "moe_w_swiglu_eD_F"
                put(p + "feed_forward.experts." + key, [c.transpose(1, 2).reshape(E * H, -1) for c in t.chunk(S, dim=1)])
            elif rest == "experts.down":  # [E, D, F] -> per shard [E*F/S, D]
                put(p + "feed_forward.experts.moe_w_out_eF_D", [c.transpose(1, 2).reshape(-1, H) for c in t.chunk(S, dim=2)])
            elif rest == "shared.gate":
                put(p + "feed_forward.w_in_shared_FD.weight", split(t, 0))
            elif rest == "shared.up":
                put(p + "feed_forward.w_swiglu_FD.weight", split(t, 0))
            elif rest == "shared.down":
                put(p + "feed_forward.w_out_shared_DF.weight", split(t, 1))
            elif rest == "mlp.gate":
                pending_gate = t
            elif rest == "mlp.up":
                gate_parts = pending_gate.chunk(S, 0)
                put(p + "feed_forward.mlp.fc1_weight", [torch.cat([gate_parts[s], t.chunk(S, 0)[s]]) for s in range(S)])
            elif rest == "mlp.down":
                put(p + "feed_forward.mlp.fc2_weight", split(t, 1))
            else:
                raise AssertionError(rest)
    for s in range(S):
        torch.save(sd[s], out / f"consolidated.{s:02d}.pth")
    (out / "params.json").write_text(json.dumps(params, indent=2))
    return out
