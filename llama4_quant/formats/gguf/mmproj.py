"""llama.cpp's `mmproj` GGUF for Llama 4's vision tower: arch `clip`, projector type `llama4` (docs/gguf.md).

What llama.cpp's own `convert_hf_to_gguf.py --mmproj` writes for `Llama4ForConditionalGeneration`
(conversion/base.py: MmprojModel, conversion/llama4.py: Llama4VisionModel, pinned commit of docs/llamacpp.md),
and what llama.cpp's loader reads (tools/mtmd/clip.cpp, models/llama4.cpp):

- keys: `general.architecture` = clip, `general.type` = mmproj, the model-card keys of gguf-py's `Metadata`
  (name, size label, sampling defaults, ...), `general.file_type`, `clip.has_vision_encoder`,
  `clip.projector_type` = llama4, `clip.vision.*` (projection_dim = the text model's width, image/patch size,
  width, FFN width, blocks, heads, LayerNorm eps, image_mean/std from preprocessor_config.json,
  projector.scale_factor = 1 / pixel_shuffle_ratio), `clip.use_gelu`, `general.quantization_version`;
- tensors: one per checkpoint tensor, renamed (`NAMES`, `LAYER_NAMES`), same shapes;
- types (`tensor_type`): F32 for 1-D tensors, norms, `v.position_embd` and names without `.weight`;
  `v.patch_embd` F16 in an f16 file and F32 otherwise; the rest in the file's type, F16 where Q8_0's 32-blocks
  do not fit the rows.

One deliberate difference: the pinned converter writes each layer's `post_attention_layernorm` as
`v.blk.N.attn_post_norm` (in gguf-py's tensor map, Gemma 4's `V_ENC_ATTN_POST_NORM` entry lists the same HF name
as Llama 4's `V_ENC_POST_ATTN_NORM` and, coming later, wins). clip.cpp's ViT applies `attn_post_norm` to the
attention output before the residual, without its bias, and then runs the FFN with no pre-norm: a different
model. We write `v.blk.N.ln2`, the pre-FFN LayerNorm with weight and bias that Llama 4 has and clip.cpp's
`build_vit` applies (tests/convert/test_mmproj.py checks the image embeddings against transformers).

No pipeline imports: convert/mmproj.py reads the checkpoint and publishes the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType as T, GGUFWriter

from ...errors import CheckpointError
from .errors import GGUFWriteError

ARCH = "clip"
PROJECTOR = "llama4"
DEFAULT_TYPE = "f16"
TYPES = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}  # --mmproj-type -> the base GGML type
FILE_TYPE = {"f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's LlamaFileType MOSTLY_F16 / MOSTLY_BF16 / MOSTLY_Q8_0
PROVENANCE_KEYS = ("general.quantized_by", "llama4_quant.scheme")  # ours; llama.cpp ignores them

# transformers' Llama4VisionConfig defaults: what AutoConfig (and so llama.cpp's converter) fills in for keys a
# config.json leaves out
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "hidden_act": "gelu", "num_hidden_layers": 34, "num_attention_heads": 16, "num_channels": 3,
    "intermediate_size": 5632, "vision_output_dim": 7680, "image_size": 448, "patch_size": 14, "norm_eps": 1e-5,
    "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
}
# preprocessor_config.json of Meta's Llama 4 repos (Llama4ImageProcessorFast)
LLAMA4_IMAGE_MEAN = (0.5, 0.5, 0.5)
LLAMA4_IMAGE_STD = (0.5, 0.5, 0.5)

# HF tensor name -> llama.cpp's (tools/mtmd/clip-impl.h)
NAMES = {
    "multi_modal_projector.linear_1.weight": "mm.model.fc.weight",
    "vision_model.class_embedding": "v.class_embd",
    "vision_model.positional_embedding_vlm": "v.position_embd.weight",
    "vision_model.patch_embedding.linear.weight": "v.patch_embd.weight",
    "vision_model.layernorm_pre.weight": "v.pre_ln.weight",
    "vision_model.layernorm_pre.bias": "v.pre_ln.bias",
    "vision_model.layernorm_post.weight": "v.post_ln.weight",
    "vision_model.layernorm_post.bias": "v.post_ln.bias",
    "vision_model.vision_adapter.mlp.fc1.weight": "mm.model.mlp.1.weight",
    "vision_model.vision_adapter.mlp.fc2.weight": "mm.model.mlp.2.weight",
}
# after "vision_model.model.layers.N." -> after "v.blk.N."
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
    "input_layernorm": "ln1", "post_attention_layernorm": "ln2",
}
_LAYER = re.compile(r"^vision_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class VisionParams:
    """The vision_config values the mmproj file records (config.json, with transformers' defaults)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    norm_eps: float
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    text_hidden_size: int

    @property
    def scale_factor(self) -> int:
        return int(1.0 / self.pixel_shuffle_ratio)  # as the converter computes it

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def vision_params(vision_config: Any, text_hidden_size: int, where: str = "config.json: vision_config") -> VisionParams:
    """Checked VisionParams of a Llama 4 vision_config (one clear error for a value llama.cpp cannot run)."""
    if not isinstance(vision_config, dict):
        raise CheckpointError(f"{where}: not an object")
    vc = {**VISION_DEFAULTS, **vision_config}

    def pos_int(key: str) -> int:
        v = vc[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {v!r}")
        return v

    def pos_float(key: str) -> float:
        v = vc[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {v!r}")
        return float(v)

    if vc["hidden_act"] != "gelu":
        raise CheckpointError(f"{where}: hidden_act {vc['hidden_act']!r}: llama.cpp's llama4 projector runs GELU only")
    vp = VisionParams(
        hidden_size=pos_int("hidden_size"), intermediate_size=pos_int("intermediate_size"),
        num_layers=pos_int("num_hidden_layers"), num_heads=pos_int("num_attention_heads"),
        num_channels=pos_int("num_channels"), image_size=pos_int("image_size"), patch_size=pos_int("patch_size"),
        norm_eps=pos_float("norm_eps"), pixel_shuffle_ratio=pos_float("pixel_shuffle_ratio"),
        projector_input_dim=pos_int("projector_input_dim"), projector_output_dim=pos_int("projector_output_dim"),
        vision_output_dim=pos_int("vision_output_dim"), text_hidden_size=int(text_hidden_size),
    )
    if vp.pixel_shuffle_ratio > 1 or vp.scale_factor < 1:
        raise CheckpointError(f"{where}: pixel_shuffle_ratio {vp.pixel_shuffle_ratio:g} must be in (0, 1]")
    if vp.hidden_size % vp.num_heads:
        raise CheckpointError(f"{where}: hidden_size {vp.hidden_size} is not a multiple of num_attention_heads "
                              f"{vp.num_heads}")
    if vp.num_channels != 3:
        raise CheckpointError(f"{where}: num_channels {vp.num_channels}: llama.cpp's llama4 patch embedding takes RGB")
    return vp


def expected_tensors(vp: VisionParams) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of the vision tower and projector (transformers' Llama4VisionModel and
    Llama4MultiModalProjector)."""
    d, inter, p = vp.hidden_size, vp.intermediate_size, vp.patch_size
    out: dict[str, tuple[int, ...]] = {
        "multi_modal_projector.linear_1.weight": (vp.text_hidden_size, vp.vision_output_dim),
        "vision_model.class_embedding": (d,),
        "vision_model.positional_embedding_vlm": (vp.num_positions, d),
        "vision_model.patch_embedding.linear.weight": (d, vp.num_channels * p * p),
        "vision_model.layernorm_pre.weight": (d,), "vision_model.layernorm_pre.bias": (d,),
        "vision_model.layernorm_post.weight": (d,), "vision_model.layernorm_post.bias": (d,),
        "vision_model.vision_adapter.mlp.fc1.weight": (vp.projector_input_dim, inter),
        "vision_model.vision_adapter.mlp.fc2.weight": (vp.projector_output_dim, vp.projector_output_dim),
    }
    for i in range(vp.num_layers):
        q = f"vision_model.model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[q + f"self_attn.{proj}.weight"] = (d, d)
            out[q + f"self_attn.{proj}.bias"] = (d,)
        out.update({q + "mlp.fc1.weight": (inter, d), q + "mlp.fc1.bias": (inter,),
                    q + "mlp.fc2.weight": (d, inter), q + "mlp.fc2.bias": (d,)})
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out[q + f"{ln}.weight"] = (d,)
            out[q + f"{ln}.bias"] = (d,)
    return out


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Llama 4 vision tensor (`vision_model.model.layers.3.mlp.fc1.weight` ->
    `v.blk.3.ffn_up.weight`); KeyError for a name that is not one."""
    if hf_name in NAMES:
        return NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise KeyError(hf_name)
    return f"v.blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def tensor_type(name: str, shape: Sequence[int], mmproj_type: str) -> T:
    """The GGML type llama.cpp's converter gives GGUF tensor `name` of `shape` in a `mmproj_type` file."""
    base = TYPES[mmproj_type]
    if name.endswith(".patch_embd.weight"):  # MmprojModel.tensor_force_quant
        return T.F16 if base == T.F16 else T.F32
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if name == "v.position_embd.weight" or not name.endswith(".weight"):
        return T.F32
    if int(shape[-1]) % GGML_QUANT_SIZES[base][0]:
        return T.F16  # the converter's fallback when the rows do not fit the blocks
    return base


@dataclass(frozen=True)
class MmprojTensor:
    source: str  # the checkpoint's (HF) name
    name: str  # llama.cpp's
    shape: tuple[int, ...]  # numpy order (outermost first)
    qtype: T

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def plan_mmproj(tensors: Iterable[tuple[str, Sequence[int]]], vp: VisionParams, mmproj_type: str) -> list[MmprojTensor]:
    """The file's tensors, in the order given: every tensor the vision config implies, with its shape, and no
    other (one clear error otherwise)."""
    if mmproj_type not in TYPES:
        raise GGUFWriteError(f"unknown mmproj type {mmproj_type!r} (choose from {', '.join(TYPES)})")
    want = expected_tensors(vp)
    plan, seen = [], set()
    for src, shape in tensors:
        shape = tuple(int(s) for s in shape)
        if src not in want:
            raise CheckpointError(f"vision tensor {src} is not part of Llama 4's vision tower (vision_config: "
                                  f"{vp.num_layers} layers); llama.cpp's mmproj has no place for it")
        if shape != want[src]:
            raise CheckpointError(f"vision tensor {src} has shape {list(shape)}, vision_config implies "
                                  f"{list(want[src])}")
        name = gguf_name(src)
        plan.append(MmprojTensor(src, name, shape, tensor_type(name, shape, mmproj_type)))
        seen.add(src)
    missing = [n for n in want if n not in seen]
    if missing:
        raise CheckpointError(f"the vision tower lacks {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                       if len(missing) > 1 else ""))
    return plan


def encode(data: np.ndarray, qtype: T) -> np.ndarray:
    """The GGML bytes of float data in `qtype`, as the converter encodes them (gguf-py's quantizers)."""
    from gguf.quants import quantize

    arr = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F32:
        return arr
    if qtype == T.F16:
        return arr.astype(np.float16)
    return quantize(arr, qtype)


def load_preprocessor(model_dir: str | Path) -> dict[str, Any]:
    """preprocessor_config.json merged with processor_config.json (its `media_proc_cfg` / `image_processor`
    lifted to the top), as the converter reads them; {} when neither is there or readable."""
    out: dict[str, Any] = {}
    for fname, inner in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        f = Path(model_dir) / fname
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: unreadable ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{f}: not a JSON object")
        if isinstance(cfg.get(inner), dict):
            cfg = {**cfg, **cfg[inner]}
        out.update(cfg)
    return out


def image_stats(preprocessor: dict[str, Any] | None) -> tuple[list[float], list[float], bool]:
    """(image_mean, image_std, whether they came from the checkpoint) from the merged preprocessor_config.json /
    processor_config.json; Llama 4's own values otherwise."""
    pre = preprocessor or {}
    mean, std = pre.get("image_mean"), pre.get("image_std")
    ok = all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v) for v in (mean, std))
    if not ok:
        return list(LLAMA4_IMAGE_MEAN), list(LLAMA4_IMAGE_STD), False
    return [float(x) for x in mean], [float(x) for x in std], True


def add_mmproj_metadata(gw: GGUFWriter, vp: VisionParams, mmproj_type: str, *, image_mean: Sequence[float],
                        image_std: Sequence[float], general: Any = None, quantized_by: str | None = None) -> None:
    """Every key, in the converter's order. `general`: a gguf.Metadata (model card, name, sampling), written with
    `general.quantized_by` = `quantized_by`; `llama4_quant.scheme` = the mmproj type."""
    gw.add_type("mmproj")
    if general is not None:
        if quantized_by:
            general.quantized_by = quantized_by
        general.set_gguf_meta_model(gw)
    elif quantized_by:
        gw.add_quantized_by(quantized_by)
    gw.add_file_type(FILE_TYPE[mmproj_type])
    gw.add_clip_has_vision_encoder(True)
    gw.add_vision_projection_dim(vp.text_hidden_size)
    gw.add_vision_image_size(vp.image_size)
    gw.add_vision_patch_size(vp.patch_size)
    gw.add_vision_embedding_length(vp.hidden_size)
    gw.add_vision_feed_forward_length(vp.intermediate_size)
    gw.add_vision_block_count(vp.num_layers)
    gw.add_vision_head_count(vp.num_heads)
    gw.add_vision_image_mean(list(image_mean))
    gw.add_vision_image_std(list(image_std))
    gw.add_clip_projector_type(PROJECTOR)
    gw.add_vision_attention_layernorm_eps(vp.norm_eps)
    gw.add_vision_projector_scale_factor(vp.scale_factor)
    gw.add_vision_use_gelu(True)
    gw.add_quantization_version(GGML_QUANT_VERSION)
    gw.add_string("llama4_quant.scheme", mmproj_type)


def write_mmproj_file(path: Path, plan: list[MmprojTensor], add_metadata: Callable[[GGUFWriter], None],
                      data: Callable[[MmprojTensor], np.ndarray]) -> None:
    """Write the file at `path`, one tensor at a time (`data(t)`: float values of tensor t), then read it back:
    names, types, shapes and a CRC32 of every tensor's bytes. Publishing (temp name, rename) is the caller's."""
    gw = GGUFWriter(path, ARCH)
    crcs: dict[str, int] = {}
    try:
        add_metadata(gw)
        for t in plan:
            gw.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        gw.write_header_to_file()
        gw.write_kv_data_to_file()
        gw.write_ti_data_to_file()
        for t in plan:
            raw = encode(data(t), t.qtype)
            if raw.nbytes != t.nbytes:
                raise GGUFWriteError(f"{t.name}: encoded to {raw.nbytes} bytes, expected {t.nbytes}")
            crcs[t.name] = zlib.crc32(memoryview(np.ascontiguousarray(raw)).cast("B"))
            gw.write_tensor_data(raw)
        for f in gw.fout or []:
            f.flush()
            os.fsync(f.fileno())
    finally:
        gw.close()
    _check_written(path, plan, crcs)


def _check_written(path: Path, plan: list[MmprojTensor], crcs: dict[str, int]) -> None:
    from gguf import GGUFReader

    try:
        r = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises plain ValueError/IndexError/...
        raise GGUFWriteError(f"written mmproj does not read back ({e})") from None
    got = {t.name: t for t in r.tensors}
    if list(got) != [t.name for t in plan]:
        raise GGUFWriteError("written mmproj: tensor list differs on read-back")
    for t in plan:
        g = got[t.name]
        shape = tuple(int(x) for x in reversed(g.shape.tolist()))
        if T(int(g.tensor_type)) != t.qtype or shape != t.shape or int(g.n_bytes) != t.nbytes:
            raise GGUFWriteError(f"{t.name}: reads back as {T(int(g.tensor_type)).name} {shape}")
        raw = np.asarray(r.data[g.data_offset:g.data_offset + g.n_bytes])
        if zlib.crc32(memoryview(raw)) != crcs[t.name]:
            raise GGUFWriteError(f"{t.name}: data read back differs from what was written")
    del r


# ---------------------------------------------------------------------------------------------------
# reading one back (inspect)
# ---------------------------------------------------------------------------------------------------

_VTYPE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types


def gguf_architecture(path: str | Path) -> str | None:
    """`general.architecture` of a GGUF file, reading only the key-value header up to it (None when the file is
    not a GGUF or has no such key). Tells an mmproj (`clip`) from a text model (`llama4`) without parsing a
    200k-token vocabulary."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                return None
            n_kv = struct.unpack("<Q", head[16:24])[0]

            def take(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise EOFError
                return b

            def string() -> bytes:
                n = struct.unpack("<Q", take(8))[0]
                if n > 1 << 20:
                    raise EOFError
                return take(n)

            for _ in range(min(n_kv, 1 << 16)):
                key = string()
                vtype = struct.unpack("<I", take(4))[0]
                if key == b"general.architecture":
                    return string().decode("utf-8", errors="replace") if vtype == 8 else None
                if vtype == 8:
                    string()
                elif vtype == 9:  # array: item type, count, items
                    itype, count = struct.unpack("<IQ", take(12))
                    if itype == 8:
                        for _ in range(count):
                            string()
                    elif itype in _VTYPE_SIZE:
                        f.seek(count * _VTYPE_SIZE[itype], 1)
                    else:
                        return None
                elif vtype in _VTYPE_SIZE:
                    take(_VTYPE_SIZE[vtype])
                else:
                    return None
    except (OSError, EOFError, struct.error):
        return None
    return None


def is_mmproj(path: str | Path) -> bool:
    return gguf_architecture(path) == ARCH


_VISION_KEYS = {
    "projection_dim": "clip.vision.projection_dim", "image_size": "clip.vision.image_size",
    "patch_size": "clip.vision.patch_size", "embedding_length": "clip.vision.embedding_length",
    "feed_forward_length": "clip.vision.feed_forward_length", "block_count": "clip.vision.block_count",
    "head_count": "clip.vision.attention.head_count", "layer_norm_epsilon": "clip.vision.attention.layer_norm_epsilon",
    "scale_factor": "clip.vision.projector.scale_factor", "image_mean": "clip.vision.image_mean",
    "image_std": "clip.vision.image_std",
}


def describe_mmproj(path: str | Path) -> dict[str, Any]:
    """What `llama4-quant inspect FILE.gguf` shows for an mmproj file: projector, vision config, types, tensors."""
    from .reader import _open_reader  # the reader that bounds every read of a corrupt file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such GGUF file")
    r = _open_reader(p)

    def key(k: str, default=None):
        f = r.fields.get(k)
        if f is None:
            return default
        v = f.contents()
        return float(v) if isinstance(v, float) else v

    if key("general.architecture") != ARCH:
        raise CheckpointError(f"{p}: not an mmproj GGUF (architecture {key('general.architecture')!r}, not 'clip')")
    tensors, by_type = [], {}
    for t in r.tensors:
        qt = T(int(t.tensor_type)).name
        shape = [int(x) for x in reversed(t.shape.tolist())]
        n = math.prod(shape)
        e = by_type.setdefault(qt, {"tensors": 0, "bytes": 0, "params": 0})
        e["tensors"] += 1
        e["bytes"] += int(t.n_bytes)
        e["params"] += n
        tensors.append({"name": t.name, "type": qt, "shape": shape, "bytes": int(t.n_bytes)})
    params = sum(x["params"] for x in by_type.values())
    tensor_bytes = sum(x["bytes"] for x in by_type.values())
    meta = {k: key(k) for k in ("general.name", "general.type", "general.file_type", "general.quantized_by",
                                "llama4_quant.scheme") if key(k) is not None}
    layers = key("clip.vision.block_count") or 0
    return {
        "path": str(p),
        "kind": "mmproj",
        "projector_type": key("clip.projector_type"),
        "has_vision_encoder": bool(key("clip.has_vision_encoder", False)),
        "has_audio_encoder": bool(key("clip.has_audio_encoder", False)),
        "metadata": meta,
        "vision": {k: key(v) for k, v in _VISION_KEYS.items()},
        "layers": layers,
        "files": [str(p)],
        "file_bytes": p.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "params": params,
        "bits_per_weight": 8.0 * tensor_bytes / params if params else None,
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensors": tensors,
    }


def mmproj_sizes(vp: VisionParams) -> dict[str, int]:
    """Tensor bytes of the mmproj file per --mmproj-type (for inspect's planning)."""
    shapes = expected_tensors(vp)
    return {mt: sum(MmprojTensor(s, gguf_name(s), sh, tensor_type(gguf_name(s), sh, mt)).nbytes
                    for s, sh in shapes.items()) for mt in TYPES}
