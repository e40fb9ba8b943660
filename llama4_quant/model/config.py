"""One typed Llama 4 text config, parsed from HF config.json or Meta params.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

HF_ARCHS = {"Llama4ForConditionalGeneration", "Llama4ForCausalLM", "Llama4TextModel"}
HF_MODEL_TYPES = {"llama4", "llama4_text"}


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout carries it)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Llama4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # expert and shared-expert width
    intermediate_size_mlp: int  # dense-layer width
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # True where the layer uses RoPE (False: NoPE)
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # explicit per-frequency divisors (GGUF rope_freqs)
    rms_norm_eps: float = 1e-5
    use_qk_norm: bool = True
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    max_position_embeddings: int = 131072
    interleave_moe_layer_step: int = 1
    no_rope_layer_interval: int = 4
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 200000
    eos_token_id: Any = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    source_format: str = "hf"  # hf | hf-text | meta | preset
    vision: dict | None = field(default=None, compare=False)

    # ---- derived -----------------------------------------------------------------
    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer]

    @property
    def nope_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.rope_layers) if not r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["rope_layers"] = list(self.rope_layers)
        d.pop("vision", None)
        return d

    def inv_freq(self):
        """RoPE inverse frequencies (head_dim/2), llama3-scaled when the config says so."""
        import torch

        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        if self.rope_scaling is None and self.rope_freq_factors is None:
            return inv.float()
        return (inv / rope_freq_factors(self).double()).float()


def rope_freq_factors(cfg: Llama4Config):
    """Per-frequency divisors of llama3 rope scaling (what GGUF stores as rope_freqs)."""
    import torch

    if cfg.rope_freq_factors is not None:
        return torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        return torch.ones_like(inv).float()
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    scaled = (1 - smooth) * inv / s.factor + smooth * inv
    new = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    new = torch.where(medium, scaled, new)
    return (inv / new).float()


def _rope_from_hf(tc: dict) -> tuple[float, RopeScaling | None]:
    params = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling") or None
    theta = tc.get("rope_theta", params.get("rope_theta", 500000.0))
    if scaling is None and params.get("rope_type", "default") not in ("default", None):
        scaling = params
    if scaling is None:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope scaling type {kind!r} (llama4-quant supports llama3 scaling)")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def from_hf_dict(raw: dict) -> Llama4Config:
    """Parse a config.json dict of Llama4ForConditionalGeneration or Llama4ForCausalLM."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES and not (set(archs) & HF_ARCHS):
        found = model_type or (archs[0] if archs else "nothing")
        raise ConfigError(f"not a Llama 4 checkpoint: config.json has model_type {found!r} (expected 'llama4')")
    vision = None
    if "text_config" in raw:
        tc = dict(raw["text_config"])
        vision = raw.get("vision_config")
        source = "hf"
    else:
        tc = dict(raw)
        source = "hf-text"
    try:
        n = int(tc["num_hidden_layers"])
        heads = int(tc["num_attention_heads"])
        hidden = int(tc["hidden_size"])
        head_dim = int(tc.get("head_dim") or hidden // heads)
        step = int(tc.get("interleave_moe_layer_step", 1))
        moe = tc.get("moe_layers")
        if moe is None:
            moe = list(range(step - 1, n, step)) if step > 0 else []
        interval = int(tc.get("no_rope_layer_interval", 4))
        nrl = tc.get("no_rope_layers")
        if nrl:
            rope_layers = tuple(bool(x) for x in nrl)
        else:
            rope_layers = tuple((i + 1) % interval != 0 for i in range(n))
        theta, scaling = _rope_from_hf(tc)
        return Llama4Config(
            vocab_size=int(tc["vocab_size"]),
            hidden_size=hidden,
            num_layers=n,
            num_heads=heads,
            num_kv_heads=int(tc.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(tc["intermediate_size"]),
            intermediate_size_mlp=int(tc.get("intermediate_size_mlp", tc["intermediate_size"])),
            num_experts=int(tc.get("num_local_experts", 16)),
            top_k=int(tc.get("num_experts_per_tok", 1)),
            moe_layers=tuple(int(x) for x in moe),
            rope_layers=rope_layers,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-5)),
            use_qk_norm=bool(tc.get("use_qk_norm", True)),
            attention_chunk_size=tc.get("attention_chunk_size", 8192),
            attn_temperature_tuning=bool(tc.get("attn_temperature_tuning", True)),
            floor_scale=float(tc.get("floor_scale", 8192)),
            attn_scale=float(tc.get("attn_scale", 0.1)),
            max_position_embeddings=int(tc.get("max_position_embeddings", 131072)),
            interleave_moe_layer_step=step,
            no_rope_layer_interval=interval,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
            bos_token_id=tc.get("bos_token_id", raw.get("bos_token_id", 200000)),
            eos_token_id=tc.get("eos_token_id", raw.get("eos_token_id")),
            pad_token_id=tc.get("pad_token_id", raw.get("pad_token_id")),
            torch_dtype=str(tc.get("torch_dtype") or raw.get("torch_dtype") or tc.get("dtype") or "bfloat16"),
            source_format=source,
            vision=vision,
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks required Llama 4 field {e.args[0]!r}") from None


def _meta_ffn_dims(p: dict, moe: dict) -> tuple[int, int]:
    """(expert width, dense width) the way llama-models sizes its FFNs from params.json."""
    dim = int(p["dim"])
    multiple_of = int(p.get("multiple_of", 256))
    hidden = int(2 * float(p.get("ffn_exp", 4)) * dim / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(float(p["ffn_dim_multiplier"]) * hidden)

    def round_up(x: int) -> int:
        return x + (-x % multiple_of)

    expert = hidden
    if moe.get("auto_scale_F"):
        expert = int(hidden / (float(moe.get("capacity_factor", 1.0)) + 1))
    return round_up(expert), round_up(hidden)


def from_params_dict(p: dict) -> Llama4Config:
    """Parse Meta's original params.json (llama-models ModelArgs)."""
    p = p.get("model", p)
    moe = p.get("moe_args")
    if moe is None or "dim" not in p:
        raise ConfigError("not a Llama 4 checkpoint: params.json has no 'moe_args' (Llama 4 original layout expected)")
    dim = int(p["dim"])
    n = int(p["n_layers"])
    heads = int(p["n_heads"])
    head_dim = int(p.get("head_dim") or dim // heads)
    expert_hidden, dense_hidden = _meta_ffn_dims(p, moe)
    step = int(moe.get("interleave_moe_layer_step", p.get("interleave_moe_layer_step", 1)))
    interval = p.get("nope_layer_interval")
    rope_layers = tuple(True for _ in range(n)) if not interval else tuple((i + 1) % int(interval) != 0 for i in range(n))
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = RopeScaling(
            factor=float(p.get("rope_scaling_factor") or 8.0),
            low_freq_factor=float(p.get("rope_low_freq_factor") or 1.0),
            high_freq_factor=float(p.get("rope_high_freq_factor") or 4.0),
            original_max_position_embeddings=int(p.get("rope_original_max_position_embeddings", 8192)),
        )
    return Llama4Config(
        vocab_size=int(p["vocab_size"]),
        hidden_size=dim,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(p.get("n_kv_heads") or heads),
        head_dim=head_dim,
        intermediate_size=expert_hidden,
        intermediate_size_mlp=dense_hidden,
        num_experts=int(moe["num_experts"]),
        top_k=int(moe.get("top_k", 1)),
        moe_layers=tuple(range(step - 1, n, step)),
        rope_layers=rope_layers,
        rope_theta=float(p.get("rope_theta", 500000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(p.get("norm_eps", 1e-5)),
        use_qk_norm=bool(p.get("use_qk_norm", False)),
        attention_chunk_size=p.get("attention_chunk_size"),
        attn_temperature_tuning=bool(p.get("attn_temperature_tuning", False)),
        floor_scale=float(p.get("floor_scale", 8192)),
        attn_scale=float(p.get("attn_scale", 0.1)),
        max_position_embeddings=int(p.get("max_seq_len", 131072)),
        interleave_moe_layer_step=step,
        no_rope_layer_interval=int(interval or 0),
        source_format="meta",
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_config(path: str | Path) -> Llama4Config:
    """Config of a checkpoint directory (HF config.json or Meta params.json)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such checkpoint directory")
    if path.is_file():
        raw = _read_json(path)
        return from_params_dict(raw) if path.name == "params.json" else from_hf_dict(raw)
    if (path / "config.json").exists():
        return from_hf_dict(_read_json(path / "config.json"))
    for cand in (path / "params.json", path / "original" / "params.json"):
        if cand.exists():
            return from_params_dict(_read_json(cand))
    raise ConfigError(f"{path}: neither config.json nor params.json found (not a Llama 4 checkpoint directory)")
