"""Read a llama4 GGUF (single or split) back as a WeightSource, decoded as llama.cpp decodes it.

The config is what llama.cpp will run, not what the source checkpoint said: llama.cpp hard-codes for
llama4 a chunk of 8192, temperature tuning (floor 8192, scale 0.1) on NoPE layers, NoPE every 4th layer,
and qk-norm unless the model has exactly 128 experts; llama3 rope scaling comes from `rope_freqs`.
Tensors are decoded with gguf-py's dequantizers (bit-exact with ggml's reference decoders).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

from ...errors import CheckpointError
from ...model.checkpoint import CheckpointReader
from ...model.config import Llama4Config
from .constants import ARCH, LLAMACPP_ATTN_SCALE, LLAMACPP_CHUNK, LLAMACPP_FLOOR_SCALE, LLAMACPP_NOPE_INTERVAL
from .names import gguf_name


_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass
class GGUFTensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # numpy order (outermost first), as our canonical tensors
    n_bytes: int
    file: str


def split_files(path: Path) -> list[Path]:
    """All files of a split GGUF given any one of them (or the only file)."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    stem, n = m.group(1), int(m.group(3))
    files = [path.with_name(f"{stem}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path}: split GGUF is missing {missing[0]}")
    return files


def _open_reader(f: Path) -> GGUFReader:
    try:
        return GGUFReader(str(f), "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{f}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); truncated or corrupt?") from None


def _decode(data: np.ndarray, qtype: T) -> np.ndarray:
    """float32 values of GGUF tensor data (a copy: the reader's arrays are read-only memory maps)."""
    if qtype in (T.F32, T.F16):
        return np.array(data, dtype=np.float32)
    return np.asarray(dequantize(data, qtype), dtype=np.float32)


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFSource(CheckpointReader):
    """WeightSource over a llama4 GGUF: canonical names, dequantized to float32 on read."""

    layout = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        self.files = split_files(self.path)
        self.readers = [_open_reader(f) for f in self.files]
        self.tensors = {}
        for f, r in zip(self.files, self.readers):
            for t in r.tensors:
                self.tensors[t.name] = (t, f)
        self.metadata = self.readers[0]
        arch = _field(self.metadata, "general.architecture")
        if arch != ARCH:
            raise CheckpointError(f"{self.path}: GGUF architecture is {arch!r}, not {ARCH!r}")
        self.config = self._config()

    # -- metadata ---------------------------------------------------------------------
    def key(self, name: str, default=None):
        return _field(self.metadata, name, default)

    def _config(self) -> Llama4Config:
        k = lambda s, d=None: self.key(f"llama4.{s}", d)  # noqa: E731
        try:
            n = int(k("block_count"))
            heads = int(k("attention.head_count"))
            hidden = int(k("embedding_length"))
            E = int(k("expert_count", 0))
            step = int(k("interleave_moe_layer_step", 1))
            head_dim = int(k("attention.key_length", hidden // heads))
        except TypeError:
            raise CheckpointError(f"{self.path}: GGUF lacks llama4 hyper-parameters (block_count, head_count, ...)") from None
        vocab = self.key("llama4.vocab_size") or len(self.key("tokenizer.ggml.tokens", []))
        swa = k("attention.sliding_window")
        no_rope = swa == 0
        rope_layers = tuple(True if no_rope else (i + 1) % LLAMACPP_NOPE_INTERVAL != 0 for i in range(n))
        factors = None
        if "rope_freqs.weight" in self.tensors:
            t = self.tensors["rope_freqs.weight"][0]
            factors = tuple(float(x) for x in _decode(t.data, T(int(t.tensor_type))).reshape(-1))
        return Llama4Config(
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=n,
            num_heads=heads,
            num_kv_heads=int(k("attention.head_count_kv", heads)),
            head_dim=head_dim,
            intermediate_size=int(k("expert_feed_forward_length", 0)),
            intermediate_size_mlp=int(k("feed_forward_length", 0)),
            num_experts=E,
            top_k=int(k("expert_used_count", 1)),
            moe_layers=tuple(i for i in range(n) if step > 0 and (i + 1) % step == 0),
            rope_layers=rope_layers,
            rope_theta=float(k("rope.freq_base", 500000.0)),
            rope_freq_factors=factors,
            rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-5)),
            use_qk_norm=E != 128,
            attention_chunk_size=None if no_rope else LLAMACPP_CHUNK,
            attn_temperature_tuning=not no_rope,
            floor_scale=LLAMACPP_FLOOR_SCALE,
            attn_scale=LLAMACPP_ATTN_SCALE,
            max_position_embeddings=int(k("context_length", 131072)),
            interleave_moe_layer_step=step,
            no_rope_layer_interval=LLAMACPP_NOPE_INTERVAL,
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self.key("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.key("tokenizer.ggml.eos_token_id"),
            source_format="gguf",
        )

    # -- tensors (CheckpointReader interface: read()/read_expert() add the NaN/inf check) ---------------
    def _tensor(self, name: str):
        g = gguf_name(name)
        if g not in self.tensors:
            raise CheckpointError(f"{self.path}: GGUF has no tensor {g}")
        return self.tensors[g][0]

    def _has(self, name: str) -> bool:
        return gguf_name(name) in self.tensors

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._tensor(name).shape.tolist()))

    def describe(self, name: str) -> str:
        return gguf_name(name)

    def _read(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        return torch.from_numpy(_decode(t.data, T(int(t.tensor_type))).reshape(self._shape(name)))

    def _read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        t = self._tensor(f"layers.{layer}.experts.{kind}")
        # data is [E, rows, bytes_per_row] (or [E, rows, cols] for float types)
        return torch.from_numpy(_decode(t.data[e], T(int(t.tensor_type))))

    def tensor_infos(self) -> list[GGUFTensorInfo]:
        return [
            GGUFTensorInfo(name, T(int(t.tensor_type)).name, tuple(int(x) for x in reversed(t.shape.tolist())),
                           int(t.n_bytes), f.name)
            for name, (t, f) in self.tensors.items()
        ]

    def close(self) -> None:
        self.readers = []
        self.tensors = {}


def open_gguf(path: str | Path, validate: bool = True) -> GGUFSource:
    src = GGUFSource(path)
    if validate:
        src.validate()
    return src


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What `llama4-quant inspect FILE.gguf` shows: metadata summary, and every tensor's type and size."""
    src = open_gguf(path, validate=False)
    try:
        infos = src.tensor_infos()
        by_type: dict[str, dict[str, int]] = {}
        total = 0
        for t in infos:
            e = by_type.setdefault(t.type, {"tensors": 0, "bytes": 0, "params": 0})
            e["tensors"] += 1
            e["bytes"] += t.n_bytes
            e["params"] += int(np.prod(t.shape))
            total += t.n_bytes
        params = sum(int(np.prod(t.shape)) for t in infos)
        keys = {}
        for k in ("general.name", "general.file_type", "general.quantization_version", "general.quantized_by",
                  "llama4.block_count", "llama4.embedding_length", "llama4.expert_count", "llama4.expert_used_count",
                  "llama4.context_length", "llama4.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre"):
            v = src.key(k)
            if v is not None:
                keys[k] = v
        cfg = src.config
        return {
            "path": str(path),
            "files": [str(f) for f in src.files],
            "file_bytes": sum(os.path.getsize(f) for f in src.files),
            "tensor_bytes": total,
            "params": params,
            "bits_per_weight": 8.0 * total / params if params else None,
            "metadata": keys,
            "llama_cpp_runs": {
                "layers": cfg.num_layers, "experts": cfg.num_experts, "moe_layers": list(cfg.moe_layers),
                "nope_layers": list(cfg.nope_layers), "attention_chunk_size": cfg.attention_chunk_size,
                "qk_norm": cfg.use_qk_norm,
            },
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
            "tensors": [{"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.n_bytes, "file": t.file}
                        for t in infos],
        }
    finally:
        src.close()
