"""Read a llama4 GGUF (single or split) back as a WeightSource, decoded as llama.cpp decodes it.

The config is what llama.cpp will run, not what the source checkpoint said: llama.cpp hard-codes for
llama4 a chunk of 8192, temperature tuning (floor 8192, scale 0.1) on NoPE layers, NoPE every 4th layer,
and qk-norm unless the model has exactly 128 experts; llama3 rope scaling comes from `rope_freqs`.
Tensors are decoded with gguf-py's dequantizers (bit-exact with ggml's reference decoders).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType as V
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.quants import dequantize

from ...errors import CheckpointError
from ...model.checkpoint import CheckpointReader
from ...model.config import Llama4Config
from ...model.tensors import expected_shapes
from .constants import ARCH, LLAMACPP_ATTN_SCALE, LLAMACPP_CHUNK, LLAMACPP_FLOOR_SCALE, LLAMACPP_NOPE_INTERVAL
from .names import ROPE_FREQS, gguf_name


_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")

# The llama4.* integers llama.cpp reads (all uint32, as its converter and ours write them), each with the upper
# bound of a sane config: far above any real Llama 4 (Maverick: 48 layers, 128 experts, hidden 5120, vocab
# 202048), low enough that a corrupt value fails here instead of allocating or looping without end.
_INT_KEYS = {
    "block_count": 1024, "context_length": (1 << 32) - 1, "embedding_length": 65536,
    "feed_forward_length": 1 << 20, "expert_feed_forward_length": 1 << 20,
    "attention.head_count": 1024, "attention.head_count_kv": 1024, "attention.key_length": 4096,
    "attention.value_length": 4096, "rope.dimension_count": 4096, "expert_count": 4096,
    "expert_used_count": 4096, "interleave_moe_layer_step": 1024, "vocab_size": 1 << 20,
}
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
_MAX_ARRAY = 1 << 20  # elements in one metadata array (Llama 4's token list: 202048; gguf-py reads ~100k/s)
_MAX_ELEMENTS = 1 << 40  # elements in one tensor
# GGML types a weight may have: F32, F16 and the types gguf-py's dequantize decodes (its table of them), i.e.
# ggml's weight types (not I8..I64, F64, Q8_K). Norms, routers and rope_freqs: F32 only.
_WEIGHT_TYPES = {T.F32, T.F16, *gguf_quants._type_traits}
_F32_ONLY = ("attn_norm.weight", "ffn_norm.weight", "output_norm.weight", "ffn_gate_inp.weight", ROPE_FREQS)


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


class _Bad(ValueError):
    """A tensor-info problem _Reader names precisely (reported as is, not as an unreadable file)."""


class _Reader(GGUFReader):
    """gguf-py's reader, made safe on corrupt input: gguf-py reads past the end of the file as short arrays
    (a corrupt array length then loops over nothing for ~2**64 elements), and takes tensor infos on trust.
    Here every read must lie inside the file, array lengths are bounded, and each tensor info is checked as
    llama.cpp's gguf.cpp checks it before any array is built."""

    def _get(self, offset, dtype, count=1, override_order=None):
        a = super()._get(offset, dtype, count, override_order)
        if len(a) != int(count):
            raise ValueError(f"reads past the end of the file ({self.data.size} bytes) at byte {offset}")
        return a

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) == V.ARRAY:  # [item type u32][length u64][items]: each item takes at least one byte
            n = int(self._get(orig_offs + 4, np.uint64)[0])
            if n > min(_MAX_ARRAY, self.data.size - orig_offs):
                raise ValueError(f"metadata array at byte {orig_offs} claims {n} elements")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs, fields):
        expect = 0  # llama.cpp: each tensor's data starts where the previous one's (padded) ends
        for f in fields:
            name = str(bytes(f.parts[1]), encoding="utf-8")
            dims = [int(d) for d in f.parts[3]]
            if not 1 <= len(dims) <= 4 or min(dims) < 1 or math.prod(dims) > _MAX_ELEMENTS:
                raise _Bad(f"tensor {name} has dimensions {dims}")
            raw = int(f.parts[4][0])
            if raw not in _WEIGHT_TYPES:
                what = T(raw).name if raw in iter(T) else raw
                raise _Bad(f"tensor {name} has GGML type {what}, not a weight type llama.cpp reads")
            qtype = T(raw)
            block, size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise _Bad(f"tensor {name}: rows of {dims[0]} are not a whole number of {qtype.name} blocks ({block})")
            off = int(f.parts[5][0])
            if off != expect:
                raise _Bad(f"tensor {name} has data offset {off}, expected {expect}")
            expect = off + -(-(math.prod(dims) // block * size) // self.alignment) * self.alignment  # padded end
            if start_offs + expect > self.data.size:
                raise _Bad(f"tensor {name}'s data (with its padding) ends at byte {start_offs + expect}, past the "
                           f"end of the file ({self.data.size} bytes): truncated?")
        super()._build_tensors(start_offs, fields)


def _open_reader(f: Path) -> GGUFReader:
    try:
        return _Reader(str(f), "r")
    except _Bad as e:
        raise CheckpointError(f"{f}: {e}") from None
    except Exception as e:  # gguf-py raises ValueError, IndexError, KeyError, UnicodeDecodeError, ... on bad bytes
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: not a readable GGUF file ({msg}); truncated or corrupt?") from None


def _decode(data: np.ndarray, qtype: T) -> np.ndarray:
    """float32 values of GGUF tensor data (a copy: the reader's arrays are read-only memory maps)."""
    if qtype in (T.F32, T.F16):
        return np.array(data, dtype=np.float32)
    return np.asarray(dequantize(data, qtype), dtype=np.float32)


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types == [V.STRING]:  # bytes that are not UTF-8 show as U+FFFD instead of raising
        return bytes(f.parts[-1]).decode("utf-8", errors="replace")
    return f.contents()


class GGUFSource(CheckpointReader):
    """WeightSource over a llama4 GGUF: canonical names, dequantized to float32 on read.

    Opening checks the file before anything is computed (see :meth:`_check_metadata`, :meth:`_check_tensors`):
    every llama4 key llama.cpp needs, with its GGUF type and a sane value; the tokenizer's token list; split
    keys; exactly the tensors the metadata implies, with their shapes and types; rope_freqs' values."""

    layout = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        self.files = split_files(self.path)
        self.readers = [_open_reader(f) for f in self.files]
        self.tensors = {}
        for k, (f, r) in enumerate(zip(self.files, self.readers)):
            self._check_split(k, r)
            for t in r.tensors:
                if t.name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {t.name} is in both {self.tensors[t.name][1].name} and {f.name}")
                self.tensors[t.name] = (t, f)
        self.metadata = self.readers[0]
        count = self._value("split.tensors.count", V.INT32, required=len(self.files) > 1)
        if count is not None and count != len(self.tensors):
            raise CheckpointError(f"{self.path}: split.tensors.count is {count}, the {len(self.files)} file(s) "
                                  f"hold {len(self.tensors)} tensors")
        arch = self._value("general.architecture", V.STRING)
        if arch != ARCH:
            raise CheckpointError(f"{self.path}: GGUF architecture is {arch!r}, not {ARCH!r}")
        self.config = self._config(self._check_metadata())
        self._check_tensors()
        if ROPE_FREQS in self.tensors:
            self.config = dataclasses.replace(self.config, rope_freq_factors=self._rope_freqs())

    # -- metadata ---------------------------------------------------------------------
    def key(self, name: str, default=None):
        return _field(self.metadata, name, default)

    def _value(self, key: str, vtype: V, reader: GGUFReader | None = None, required: bool = True):
        """The value of metadata `key`, which must have GGUF type `vtype` (llama.cpp refuses any other)."""
        f = (reader or self.metadata).fields.get(key)
        if f is None:
            if required:
                raise CheckpointError(f"{self.path}: GGUF lacks {key} (llama.cpp needs it for {ARCH})")
            return None
        if f.types != [vtype]:
            raise CheckpointError(f"{self.path}: GGUF key {key} has type {'/'.join(t.name for t in f.types)}, "
                                  f"llama.cpp reads it as {vtype.name}")
        return _field(reader or self.metadata, key)

    def _check_split(self, k: int, r: GGUFReader) -> None:
        """File k of a split set says split.no k of split.count (a single file: no split keys, or 0 of 1)."""
        n = len(self.files)
        count = self._value("split.count", V.UINT16, r, required=n > 1)
        no = self._value("split.no", V.UINT16, r, required=n > 1)
        if (count or 1) != n or (no or 0) != k:
            raise CheckpointError(f"{self.files[k]}: split keys say part {no} of {count}, "
                                  f"but it is part {k} of {n} files")

    def _check_metadata(self) -> dict[str, Any]:
        """The llama4 hyper-parameters, each present, typed and in range, and consistent with each other."""

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: {what}")

        v: dict[str, Any] = {}
        for key, hi in _INT_KEYS.items():
            v[key] = self._value(f"{ARCH}.{key}", V.UINT32)
            if not 1 <= v[key] <= hi:
                raise bad(f"{ARCH}.{key} is {v[key]}, must be in 1..{hi}")
        if v["expert_used_count"] > v["expert_count"]:
            raise bad(f"{ARCH}.expert_used_count is {v['expert_used_count']}, must be in 1..expert_count "
                      f"({v['expert_count']})")
        if v["attention.head_count"] % v["attention.head_count_kv"]:
            raise bad(f"{ARCH}.attention.head_count {v['attention.head_count']} is not a multiple of "
                      f"head_count_kv {v['attention.head_count_kv']}")
        hd = v["attention.key_length"]
        if hd % 2 or v["attention.value_length"] != hd or v["rope.dimension_count"] != hd:
            raise bad(f"{ARCH}.attention.key_length {hd}, value_length {v['attention.value_length']} and "
                      f"rope.dimension_count {v['rope.dimension_count']} must be one even head size")
        if v["attention.head_count"] * hd > _INT_KEYS["embedding_length"]:
            raise bad(f"{ARCH}.attention.head_count x key_length = {v['attention.head_count'] * hd} exceeds "
                      f"{_INT_KEYS['embedding_length']}")
        if v["interleave_moe_layer_step"] > v["block_count"]:
            raise bad(f"{ARCH}.interleave_moe_layer_step is {v['interleave_moe_layer_step']}, more than "
                      f"block_count {v['block_count']} (no MoE layer)")
        for key, lo, hi in (("rope.freq_base", 0.0, math.inf), ("attention.layer_norm_rms_epsilon", 0.0, 1.0)):
            v[key] = x = self._value(f"{ARCH}.{key}", V.FLOAT32)
            if not (math.isfinite(x) and lo < x < hi):
                raise bad(f"{ARCH}.{key} is {x}, must be a finite number > {lo:g}" + (f" and < {hi:g}" if hi < math.inf else ""))
        v["sliding_window"] = self._value(f"{ARCH}.attention.sliding_window", V.UINT32, required=False)

        tokens = self.metadata.fields.get("tokenizer.ggml.tokens")
        if tokens is None or tokens.types != [V.ARRAY, V.STRING]:
            raise bad("GGUF has no tokenizer.ggml.tokens list of strings")
        if len(tokens.data) != v["vocab_size"]:
            raise bad(f"tokenizer.ggml.tokens has {len(tokens.data)} tokens, {ARCH}.vocab_size is {v['vocab_size']}")
        for t in _TOKEN_ID_KEYS:
            v[t] = i = self._value(f"tokenizer.ggml.{t}", V.UINT32, required=False)
            if i is not None and i >= v["vocab_size"]:
                raise bad(f"tokenizer.ggml.{t} is {i}, outside the vocabulary (0..{v['vocab_size'] - 1})")
        return v

    def _rope_freqs(self) -> tuple[float, ...]:
        """The values of rope_freqs.weight (llama3 rope scaling; shape and type checked already): finite, > 0."""
        f = _decode(self.tensors[ROPE_FREQS][0].data, T.F32).reshape(-1)
        if not (np.isfinite(f).all() and (f > 0).all()):
            raise CheckpointError(f"{self.path}: {ROPE_FREQS} holds non-finite or non-positive values")
        return tuple(float(x) for x in f)

    def _check_tensors(self) -> None:
        """Exactly the tensors the metadata implies (plus optional rope_freqs), shaped as it implies, norms,
        routers and rope_freqs F32. Metadata only: no tensor data is read."""
        want = {gguf_name(n): s for n, s in expected_shapes(self.config).items()}
        for name in want:
            if name not in self.tensors:
                raise CheckpointError(f"{self.path}: GGUF has no tensor {name}, which the metadata implies "
                                      f"(block_count {self.config.num_layers}, expert_count {self.config.num_experts})")
        want[ROPE_FREQS] = (self.config.head_dim // 2,)  # optional
        for name, (t, _) in self.tensors.items():
            if name not in want:
                raise CheckpointError(f"{self.path}: unexpected tensor {name} (not part of the model the metadata "
                                      f"describes: block_count {self.config.num_layers})")
            shape = want[name]
            got = tuple(int(x) for x in reversed(t.shape.tolist()))
            if got != shape:
                raise CheckpointError(f"{self.path}: tensor {name} has shape {list(got)}, the metadata implies {list(shape)}")
            qtype = T(int(t.tensor_type))
            if name.endswith(_F32_ONLY) and qtype != T.F32:
                raise CheckpointError(f"{self.path}: tensor {name} is {qtype.name}; llama.cpp keeps it F32")

    def _config(self, v: dict[str, Any]) -> Llama4Config:
        n, E, step = v["block_count"], v["expert_count"], v["interleave_moe_layer_step"]
        no_rope = v["sliding_window"] == 0
        rope_layers = tuple(True if no_rope else (i + 1) % LLAMACPP_NOPE_INTERVAL != 0 for i in range(n))
        return Llama4Config(
            vocab_size=v["vocab_size"],
            hidden_size=v["embedding_length"],
            num_layers=n,
            num_heads=v["attention.head_count"],
            num_kv_heads=v["attention.head_count_kv"],
            head_dim=v["attention.key_length"],
            intermediate_size=v["expert_feed_forward_length"],
            intermediate_size_mlp=v["feed_forward_length"],
            num_experts=E,
            top_k=v["expert_used_count"],
            moe_layers=tuple(i for i in range(n) if (i + 1) % step == 0),
            rope_layers=rope_layers,
            rope_theta=v["rope.freq_base"],
            rms_norm_eps=v["attention.layer_norm_rms_epsilon"],
            use_qk_norm=E != 128,
            attention_chunk_size=None if no_rope else LLAMACPP_CHUNK,
            attn_temperature_tuning=not no_rope,
            floor_scale=LLAMACPP_FLOOR_SCALE,
            attn_scale=LLAMACPP_ATTN_SCALE,
            max_position_embeddings=v["context_length"],
            interleave_moe_layer_step=step,
            no_rope_layer_interval=LLAMACPP_NOPE_INTERVAL,
            tie_word_embeddings=False,  # Llama 4 never ties: a GGUF without output.weight is incomplete
            bos_token_id=v["bos_token_id"],
            eos_token_id=v["eos_token_id"],
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
