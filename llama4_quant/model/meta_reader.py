"""Meta's original layout: params.json + tensor-parallel consolidated.NN.pth shards.

Shards are loaded with ``weights_only=True, mmap=True`` (no arbitrary unpickling, nothing read until
sliced) and merged per llama-models' split rules on every read.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import CheckpointReader, check_inside
from .config import Llama4Config

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# canonical -> (candidate Meta names, how shards combine: "cat0", "cat1", "same")
_LAYER_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "attn_norm": (("attention.wqkv.layer_norm_weight", "attention_norm.weight"), "same"),
    "wo": (("attention.wo.weight",), "cat1"),
    "router": (("feed_forward.router_DE",), "same"),
    "shared.gate": (("feed_forward.w_in_shared_FD.weight", "feed_forward.w_in_shared_FD"), "cat0"),
    "shared.up": (("feed_forward.w_swiglu_FD.weight", "feed_forward.w_swiglu_FD"), "cat0"),
    "shared.down": (("feed_forward.w_out_shared_DF.weight", "feed_forward.w_out_shared_DF"), "cat1"),
    "mlp.gate": (("feed_forward.w1.weight",), "cat0"),
    "mlp.up": (("feed_forward.w3.weight",), "cat0"),
    "mlp.down": (("feed_forward.mlp.fc2_weight", "feed_forward.w2.weight"), "cat1"),
}
_FFN_NORM = ("feed_forward.norm.weight", "feed_forward.mlp.layer_norm_weight", "feed_forward.mlp.layer_norm.weight", "ffn_norm.weight")
_GLOBAL = {"tok_embeddings": ("tok_embeddings.weight", "cat0"), "norm": ("norm.weight", "same"), "output": ("output.weight", "cat0")}
_EXPERT = {"gate": "feed_forward.experts.moe_w_in_eD_F", "up": "feed_forward.experts.moe_w_swiglu_eD_F", "down": "feed_forward.experts.moe_w_out_eF_D"}


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # Meta's shards carry io.BytesIO `_extra_state` entries: allow that one harmless class, nothing else.
        with torch.serialization.safe_globals([io.BytesIO]):
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickled object"
        raise CheckpointError(f"{path}: refusing to load: it holds pickled objects other than tensors ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable .pth shard ({str(e).splitlines()[0]}); truncated or corrupt?") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class MetaReader(CheckpointReader):
    layout = "meta"

    def __init__(self, path: Path, cfg: Llama4Config):
        self.path = Path(path)
        self.config = cfg
        files = sorted(self.path.glob("consolidated.*.pth"))
        if not files:
            raise CheckpointError(f"{self.path}: params.json found but no consolidated.NN.pth shards")
        idx = [int(f.name.split(".")[1]) for f in files]
        if idx != list(range(len(files))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise CheckpointError(f"{self.path}: missing shard consolidated.{missing[0]:02d}.pth")
        for f in files:
            check_inside(self.path, f.name, f.name)
        if cfg.q_dim % len(files) or cfg.kv_dim % len(files):
            raise CheckpointError(f"{self.path}: {len(files)} shards cannot split the attention "
                                  f"({cfg.num_heads} heads, {cfg.num_kv_heads} kv heads of {cfg.head_dim}) evenly")
        self.files = files
        self.n = len(files)
        # loaded now so an unreadable shard fails at open time; release() drops them, `shards` reloads
        self._shards: list[dict[str, torch.Tensor]] | None = [_load_shard(f) for f in files]
        first = set(self._shards[0])
        for f, sd in zip(files[1:], self._shards[1:]):
            odd = sorted(first ^ set(sd))
            if odd:
                has, lacks = (files[0], f) if odd[0] in first else (f, files[0])
                raise CheckpointError(f"{self.path}: {has.name} holds tensor {odd[0]} but {lacks.name} does not "
                                      "(shards of different checkpoints?)")

    @property
    def shards(self) -> list[dict[str, torch.Tensor]]:
        if self._shards is None:
            self._shards = [_load_shard(f) for f in self.files]
        return self._shards

    def release(self) -> None:
        self._shards = None

    def _find(self, layer_prefix: str, candidates: tuple[str, ...]) -> str | None:
        for c in candidates:
            if layer_prefix + c in self.shards[0]:
                return layer_prefix + c
        return None

    def _combine(self, key: str, how: str) -> torch.Tensor:
        parts = [s[key] for s in self.shards]
        if how == "same" or self.n == 1:
            return parts[0]
        return torch.cat(parts, dim=0 if how == "cat0" else -1)

    def _key(self, name: str) -> tuple[str, str] | None:
        """(Meta key, combine rule) for non-expert canonical names; None if absent."""
        if name in _GLOBAL:
            key, how = _GLOBAL[name]
            return (key, how) if key in self.shards[0] else None
        m = _LAYER.match(name)
        i, rest = m.groups()
        p = f"layers.{i}."
        if rest == "ffn_norm":
            k = self._find(p, _FFN_NORM)
            return (k, "same") if k else None
        if rest in ("wq", "wk", "wv"):
            return (p + "attention.wqkv.weight", "qkv") if p + "attention.wqkv.weight" in self.shards[0] else None
        if rest in ("mlp.gate", "mlp.up") and p + "feed_forward.mlp.fc1_weight" in self.shards[0]:
            return (p + "feed_forward.mlp.fc1_weight", "fc1")
        if rest.startswith("experts."):
            k = p + _EXPERT[rest.split(".")[1]]
            return (k, "expert") if k in self.shards[0] else None
        cands, how = _LAYER_MAP[rest]
        k = self._find(p, cands)
        return (k, how) if k else None

    def _has(self, name: str) -> bool:
        return self._key(name) is not None

    def _shape(self, name: str) -> tuple[int, ...]:
        # shapes are metadata on mmapped tensors; computing them through _read would copy. Slice-free path:
        key, how = self._key(name)
        s0 = tuple(self.shards[0][key].shape)
        cfg = self.config
        if how != "cat0" and how != "cat1" and len(s0) != (1 if name.endswith("norm") else 2):
            return s0  # wrong rank: validate() names the mismatch
        if how == "same":
            return tuple(s0) if not name.endswith("router") else (s0[1], s0[0])
        if how in ("cat0", "cat1"):
            d = 0 if how == "cat0" else len(s0) - 1
            total = sum(s[key].shape[d] for s in self.shards)
            return tuple(total if j == d else s0[j] for j in range(len(s0)))
        if how == "qkv":
            rows = sum(s[key].shape[0] for s in self.shards)
            q = cfg.q_dim * rows // (cfg.q_dim + 2 * cfg.kv_dim)
            kv = cfg.kv_dim * rows // (cfg.q_dim + 2 * cfg.kv_dim)
            return (q, s0[1]) if name.endswith("wq") else (kv, s0[1])
        if how == "fc1":
            return (sum(s[key].shape[0] for s in self.shards) // 2, s0[1])
        # experts: per shard [E*D, F/S] (gate/up) or [E*F/S, D] (down)
        E = cfg.num_experts
        if any(s[key].shape[0] % E for s in self.shards):
            return s0  # not [E*rows, cols] per shard: validate() names the mismatch
        if name.endswith("down"):
            F = sum(s[key].shape[0] for s in self.shards) // E
            return (E, s0[1], F)
        F = sum(s[key].shape[1] for s in self.shards)
        return (E, F, s0[0] // E)

    def _read(self, name: str) -> torch.Tensor:
        key, how = self._key(name)
        cfg = self.config
        if how in ("same", "cat0", "cat1"):
            t = self._combine(key, how)
            return t.t().contiguous() if name.endswith("router") else t.contiguous()
        if how == "qkv":
            S = self.n
            sizes = [cfg.q_dim // S, cfg.kv_dim // S, cfg.kv_dim // S]
            which = {"wq": 0, "wk": 1, "wv": 2}[name.rsplit(".", 1)[1]]
            return torch.cat([s[key].split(sizes, dim=0)[which] for s in self.shards], dim=0).contiguous()
        if how == "fc1":
            which = 0 if name.endswith("gate") else 1
            return torch.cat([s[key].chunk(2, dim=0)[which] for s in self.shards], dim=0).contiguous()
        m = _LAYER.match(name)
        kind = m.group(2).split(".")[1]
        return torch.stack([self._read_expert(int(m.group(1)), kind, e) for e in range(cfg.num_experts)])

    def _read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        key = f"layers.{layer}.{_EXPERT[kind]}"
        E, D = self.config.num_experts, self.config.hidden_size
        if kind == "down":  # per shard [E*F/S, D] viewed (E, F/S, D); shards cat on F
            w = torch.cat([s[key].view(E, -1, D)[e] for s in self.shards], dim=0)  # [F, D]
        else:  # per shard [E*D, F/S] viewed (E, D, F/S); shards cat on F
            w = torch.cat([s[key].view(E, D, -1)[e] for s in self.shards], dim=1)  # [D, F]
        return w.t().contiguous()

    def describe(self, name: str) -> str:
        k = self._key(name) if (name in _GLOBAL or _LAYER.match(name)) else None
        return k[0] if k else name

    def source_dtype(self) -> torch.dtype:
        return self.shards[0]["tok_embeddings.weight"].dtype

    def close(self) -> None:
        self._shards = None
