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


def rope_freq_factors(cfg: Llama4Config, dtype=None):
    """Per-frequency divisors of llama3 rope scaling [head_dim/2], returned as float32: what the forward divides
    the inverse frequencies by (computed in float64) and what a GGUF stores as rope_freqs (computed in float32,
    as llama.cpp's own converter computes them, so that tensor is bit-identical to its output)."""
    import torch

    dtype = dtype or torch.float64
    if cfg.rope_freq_factors is not None:
        return torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    s = cfg.rope_scaling
    if s is None:
        return torch.ones(cfg.head_dim // 2, dtype=torch.float32)
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    return torch.where(wavelen < high_wavelen, torch.ones_like(inv),
                       torch.where(wavelen > low_wavelen, torch.full_like(inv, s.factor), mid)).float()


# ---- checked reads ---------------------------------------------------------------------------------------------
# Bounds far above any real Llama 4 (Maverick: 48 layers, 128 experts, hidden 5120, vocab 202048) and low enough
# that an absurd value fails at once instead of allocating without end.
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_HIDDEN = 65536
MAX_HEADS = 1024
MAX_FFN = 1 << 20
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 32

_REQUIRED = object()


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _int(d: dict, key: str, where: str, lo: int = 1, hi: int | None = None, default: Any = _REQUIRED) -> Any:
    """d[key] as an int in lo..hi (absent or null: `default`). Integral floats such as 48.0 pass; fractions,
    strings and booleans do not. `where` prefixes the field name in messages ("config.json: text_config.")."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}{key} is missing (a required Llama 4 field)")
        return default
    if isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        raise ConfigError(f"{where}{key} must be an integer, got {_short(v)}")
    if n < lo or (hi is not None and n > hi):
        want = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{where}{key} must be an integer {want}, got {_short(v)}")
    return n


def _float(d: dict, key: str, where: str, default: Any, positive: bool = True, hi: float = math.inf) -> Any:
    """d[key] as a finite float, > 0 when `positive`, <= hi (absent or null: `default`)."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}{key} is missing (a required Llama 4 field)")
        return default
    try:
        x = math.nan if isinstance(v, bool) or not isinstance(v, (int, float)) else float(v)
    except OverflowError:  # an integer too large for a float
        x = math.inf
    if not math.isfinite(x) or x > hi or (positive and x <= 0):
        want = "a finite number" + (" > 0" if positive else "") + (f" and <= {hi:g}" if hi != math.inf else "")
        raise ConfigError(f"{where}{key} must be {want}, got {_short(v)}")
    return x


def _flag(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, (bool, int)):
        raise ConfigError(f"{where}{key} must be true or false, got {_short(v)}")
    return bool(v)


def _object(v: Any, what: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(v).__name__} {_short(v)}")
    return v


def _token_id(d: dict, key: str, where: str, default: Any) -> Any:
    """None, an id, or (eos) a list of ids; anything else is refused."""
    v = d.get(key, default)
    ids = v if isinstance(v, list) else [v]
    if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_VOCAB for i in ids):
        raise ConfigError(f"{where}{key} must be a token id (or a list of ids), got {_short(v)}")
    return v


def _layer_list(v: Any, key: str, where: str, n: int) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v):
        raise ConfigError(f"{where}{key} must be a list of layer indices in 0..{n - 1}, got {_short(v)}")
    if len(set(v)) != len(v):
        raise ConfigError(f"{where}{key} lists a layer twice: {_short(v)}")
    return tuple(v)


def _check_relations(cfg: Llama4Config, where: str, f: dict[str, str]) -> None:
    """Rules between fields both parsers share; `f` spells our field names the way the file does."""
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(f"{where}{f['top_k']} {cfg.top_k} exceeds {f['num_experts']} {cfg.num_experts}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"{where}{f['num_heads']} {cfg.num_heads} is not a multiple of "
                          f"{f['num_kv_heads']} {cfg.num_kv_heads}")
    if cfg.head_dim % 2:
        raise ConfigError(f"{where}{f['head_dim']} must be even (RoPE rotates pairs), got {cfg.head_dim}")
    if cfg.q_dim > MAX_HIDDEN:
        raise ConfigError(f"{where}{f['num_heads']} x {f['head_dim']} = {cfg.q_dim} exceeds {MAX_HIDDEN}")
    for name in ("intermediate_size", "intermediate_size_mlp"):
        v = getattr(cfg, name)
        if not 1 <= v <= MAX_FFN:
            raise ConfigError(f"{where}{f[name]} must be in 1..{MAX_FFN}, got {v}")


def _head_dim(d: dict, where: str, key: str, hidden: int, hidden_key: str, heads: int, heads_key: str) -> int:
    if d.get(key) is not None:
        return _int(d, key, where, hi=MAX_HIDDEN)
    if hidden % heads:
        raise ConfigError(f"{where}{hidden_key} {hidden} is not divisible by {heads_key} {heads} (and no {key} given)")
    return hidden // heads


def _rope_from_hf(tc: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = _object(tc.get("rope_parameters") or {}, f"{where}rope_parameters")
    scaling = tc.get("rope_scaling") or None
    theta = _float(tc, "rope_theta", where, None)
    if theta is None:
        theta = _float(params, "rope_theta", f"{where}rope_parameters.", 500000.0)
    if scaling is None and params.get("rope_type", "default") not in ("default", None):
        scaling = params
    if scaling is None:
        return theta, None
    scaling = _object(scaling, f"{where}rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope scaling type {kind!r} (llama4-quant supports llama3 scaling)")
    w = f"{where}rope_scaling."
    return theta, RopeScaling(
        factor=_float(scaling, "factor", w, _REQUIRED),
        low_freq_factor=_float(scaling, "low_freq_factor", w, _REQUIRED),
        high_freq_factor=_float(scaling, "high_freq_factor", w, _REQUIRED),
        original_max_position_embeddings=_int(scaling, "original_max_position_embeddings", w, hi=MAX_POSITIONS),
    )


_HF_NAMES = {"top_k": "num_experts_per_tok", "num_experts": "num_local_experts", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
             "intermediate_size_mlp": "intermediate_size_mlp"}


def _check_identity(raw: dict, where: str) -> None:
    """model_type and architectures both say Llama 4, and agree with each other and the layout."""
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: architectures must be a list of class names, got {_short(archs)}")
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{where}: model_type must be a string, got {_short(model_type)}")
    ours = [a for a in archs if a in HF_ARCHS]
    if model_type is not None and model_type not in HF_MODEL_TYPES:
        if ours:
            raise ConfigError(f"not a Llama 4 checkpoint: {where} has model_type {model_type!r}, which contradicts "
                              f"architectures {archs} (expected 'llama4' or 'llama4_text')")
        raise ConfigError(f"not a Llama 4 checkpoint: {where} has model_type {model_type!r} (expected 'llama4')")
    if not ours:
        if archs:
            raise ConfigError(f"not a Llama 4 checkpoint: {where} has architectures {archs}"
                              + (f", which contradicts model_type {model_type!r}" if model_type else ""))
        if model_type is None:
            raise ConfigError(f"not a Llama 4 checkpoint: {where} has no model_type or architectures")
    nested = "text_config" in raw
    if model_type is not None and model_type != ("llama4" if nested else "llama4_text"):
        raise ConfigError(f"{where}: model_type {model_type!r} does not fit a config "
                          + ("with" if nested else "without") + " a text_config")
    if "Llama4ForConditionalGeneration" in archs and not nested:
        raise ConfigError(f"{where}: architectures {archs} needs a text_config (none found)")


def from_hf_dict(raw: Any, where: str = "config.json") -> Llama4Config:
    """Parse a config.json dict of Llama4ForConditionalGeneration or Llama4ForCausalLM (every field checked:
    a bad value raises ConfigError naming the field and the value)."""
    _object(raw, where)
    _check_identity(raw, where)
    vision = None
    if "text_config" in raw:
        tc = _object(raw["text_config"], f"{where}: text_config")
        vision = raw.get("vision_config")
        if vision is not None:
            _object(vision, f"{where}: vision_config")
        source, w = "hf", f"{where}: text_config."
        mt = tc.get("model_type")
        if mt is not None and mt != "llama4_text":
            raise ConfigError(f"{w}model_type must be 'llama4_text', got {_short(mt)}")
    else:
        tc = raw
        source, w = "hf-text", f"{where}: "
    n = _int(tc, "num_hidden_layers", w, hi=MAX_LAYERS)
    heads = _int(tc, "num_attention_heads", w, hi=MAX_HEADS)
    hidden = _int(tc, "hidden_size", w, hi=MAX_HIDDEN)
    head_dim = _head_dim(tc, w, "head_dim", hidden, "hidden_size", heads, "num_attention_heads")
    step = _int(tc, "interleave_moe_layer_step", w, hi=MAX_LAYERS, default=1)
    moe = tc.get("moe_layers")
    moe_layers = tuple(range(step - 1, n, step)) if moe is None else _layer_list(moe, "moe_layers", w, n)
    nrl = tc.get("no_rope_layers")
    if nrl:
        if not isinstance(nrl, list) or len(nrl) != n or not all(x in (0, 1) for x in nrl):
            raise ConfigError(f"{w}no_rope_layers must list 0 or 1 for each of the {n} layers, got {_short(nrl)}")
        rope_layers = tuple(bool(x) for x in nrl)
        interval = _int(tc, "no_rope_layer_interval", w, lo=0, hi=MAX_LAYERS, default=4)
    else:
        interval = _int(tc, "no_rope_layer_interval", w, hi=MAX_LAYERS, default=4)
        rope_layers = tuple((i + 1) % interval != 0 for i in range(n))
    theta, scaling = _rope_from_hf(tc, w)
    inter = _int(tc, "intermediate_size", w, hi=MAX_FFN)
    experts = _int(tc, "num_local_experts", w, hi=MAX_EXPERTS, default=16)
    chunk = _int(tc, "attention_chunk_size", w, hi=MAX_POSITIONS, default=None) if "attention_chunk_size" in tc else 8192
    tie = raw.get("tie_word_embeddings", tc.get("tie_word_embeddings"))
    dtype = tc.get("torch_dtype") or raw.get("torch_dtype") or tc.get("dtype") or "bfloat16"
    if not isinstance(dtype, str):
        raise ConfigError(f"{w}torch_dtype must be a string, got {_short(dtype)}")
    cfg = Llama4Config(
        vocab_size=_int(tc, "vocab_size", w, hi=MAX_VOCAB),
        hidden_size=hidden,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=_int(tc, "num_key_value_heads", w, hi=MAX_HEADS, default=heads),
        head_dim=head_dim,
        intermediate_size=inter,
        intermediate_size_mlp=_int(tc, "intermediate_size_mlp", w, hi=MAX_FFN, default=inter),
        num_experts=experts,
        top_k=_int(tc, "num_experts_per_tok", w, hi=MAX_EXPERTS, default=1),
        moe_layers=moe_layers,
        rope_layers=rope_layers,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=_float(tc, "rms_norm_eps", w, 1e-5, hi=1.0),
        use_qk_norm=_flag(tc, "use_qk_norm", w, True),
        attention_chunk_size=chunk,
        attn_temperature_tuning=_flag(tc, "attn_temperature_tuning", w, True),
        floor_scale=_float(tc, "floor_scale", w, 8192.0),
        attn_scale=_float(tc, "attn_scale", w, 0.1, positive=False),
        max_position_embeddings=_int(tc, "max_position_embeddings", w, hi=MAX_POSITIONS, default=131072),
        interleave_moe_layer_step=step,
        no_rope_layer_interval=interval,
        tie_word_embeddings=_flag({"tie_word_embeddings": tie}, "tie_word_embeddings", w, False),
        bos_token_id=_token_id(tc, "bos_token_id", w, raw.get("bos_token_id", 200000)),
        eos_token_id=_token_id(tc, "eos_token_id", w, raw.get("eos_token_id")),
        pad_token_id=_token_id(tc, "pad_token_id", w, raw.get("pad_token_id")),
        torch_dtype=dtype,
        source_format=source,
        vision=vision,
    )
    _check_relations(cfg, w, _HF_NAMES)
    return cfg


def _meta_ffn_dims(p: dict, moe: dict, where: str) -> tuple[int, int]:
    """(expert width, dense width) the way llama-models sizes its FFNs from params.json."""
    dim = _int(p, "dim", where, hi=MAX_HIDDEN)
    multiple_of = _int(p, "multiple_of", where, hi=MAX_FFN, default=256)
    hidden = int(2 * _float(p, "ffn_exp", where, 4.0, hi=1024.0) * dim / 3)
    mult = _float(p, "ffn_dim_multiplier", where, None, hi=1024.0)
    if mult is not None:
        hidden = int(mult * hidden)

    def round_up(x: int) -> int:
        return x + (-x % multiple_of)

    expert = hidden
    if moe.get("auto_scale_F"):
        expert = int(hidden / (_float(moe, "capacity_factor", f"{where}moe_args.", 1.0) + 1))
    return round_up(expert), round_up(hidden)


_META_NAMES = {"top_k": "moe_args.top_k", "num_experts": "moe_args.num_experts", "num_heads": "n_heads",
               "num_kv_heads": "n_kv_heads", "head_dim": "head_dim",
               "intermediate_size": "expert FFN width (from dim, ffn_exp, ffn_dim_multiplier, multiple_of)",
               "intermediate_size_mlp": "dense FFN width (from dim, ffn_exp, ffn_dim_multiplier, multiple_of)"}


def from_params_dict(p: Any, where: str = "params.json") -> Llama4Config:
    """Parse Meta's original params.json (llama-models ModelArgs); every field checked like config.json's."""
    p = _object(p, where)
    p = _object(p.get("model", p), f"{where}: model")
    moe = p.get("moe_args")
    if moe is None or "dim" not in p:
        raise ConfigError("not a Llama 4 checkpoint: params.json has no 'moe_args' (Llama 4 original layout expected)")
    w = f"{where}: "
    moe = _object(moe, f"{w}moe_args")
    wm = f"{w}moe_args."
    dim = _int(p, "dim", w, hi=MAX_HIDDEN)
    n = _int(p, "n_layers", w, hi=MAX_LAYERS)
    heads = _int(p, "n_heads", w, hi=MAX_HEADS)
    head_dim = _head_dim(p, w, "head_dim", dim, "dim", heads, "n_heads")
    expert_hidden, dense_hidden = _meta_ffn_dims(p, moe, w)
    if "interleave_moe_layer_step" in moe:
        step = _int(moe, "interleave_moe_layer_step", wm, hi=MAX_LAYERS)
    else:
        step = _int(p, "interleave_moe_layer_step", w, hi=MAX_LAYERS, default=1)
    interval = _int(p, "nope_layer_interval", w, lo=0, hi=MAX_LAYERS, default=0)
    rope_layers = tuple(True for _ in range(n)) if not interval else tuple((i + 1) % interval != 0 for i in range(n))
    scaling = None
    if _flag(p, "use_scaled_rope", w, False):
        scaling = RopeScaling(
            factor=_float(p, "rope_scaling_factor", w, 8.0),
            low_freq_factor=_float(p, "rope_low_freq_factor", w, 1.0),
            high_freq_factor=_float(p, "rope_high_freq_factor", w, 4.0),
            original_max_position_embeddings=_int(p, "rope_original_max_position_embeddings", w, hi=MAX_POSITIONS,
                                                  default=8192),
        )
    cfg = Llama4Config(
        vocab_size=_int(p, "vocab_size", w, hi=MAX_VOCAB),
        hidden_size=dim,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=_int(p, "n_kv_heads", w, hi=MAX_HEADS, default=heads),
        head_dim=head_dim,
        intermediate_size=expert_hidden,
        intermediate_size_mlp=dense_hidden,
        num_experts=_int(moe, "num_experts", wm, hi=MAX_EXPERTS),
        top_k=_int(moe, "top_k", wm, hi=MAX_EXPERTS, default=1),
        moe_layers=tuple(range(step - 1, n, step)),
        rope_layers=rope_layers,
        rope_theta=_float(p, "rope_theta", w, 500000.0),
        rope_scaling=scaling,
        rms_norm_eps=_float(p, "norm_eps", w, 1e-5, hi=1.0),
        use_qk_norm=_flag(p, "use_qk_norm", w, False),
        attention_chunk_size=_int(p, "attention_chunk_size", w, hi=MAX_POSITIONS, default=None),
        attn_temperature_tuning=_flag(p, "attn_temperature_tuning", w, False),
        floor_scale=_float(p, "floor_scale", w, 8192.0),
        attn_scale=_float(p, "attn_scale", w, 0.1, positive=False),
        max_position_embeddings=_int(p, "max_seq_len", w, hi=MAX_POSITIONS, default=131072),
        interleave_moe_layer_step=step,
        no_rope_layer_interval=interval,
        source_format="meta",
    )
    _check_relations(cfg, w, _META_NAMES)
    return cfg


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: not valid JSON ({str(e)[:100]})") from None


def load_config(path: str | Path) -> Llama4Config:
    """Config of a checkpoint directory (HF config.json or Meta params.json)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such checkpoint directory")
    if path.is_file():
        raw = _read_json(path)
        return from_params_dict(raw, str(path)) if path.name == "params.json" else from_hf_dict(raw, str(path))
    if (path / "config.json").exists():
        return from_hf_dict(_read_json(path / "config.json"), str(path / "config.json"))
    for cand in (path / "params.json", path / "original" / "params.json"):
        if cand.exists():
            return from_params_dict(_read_json(cand), str(cand))
    raise ConfigError(f"{path}: neither config.json nor params.json found (not a Llama 4 checkpoint directory)")
