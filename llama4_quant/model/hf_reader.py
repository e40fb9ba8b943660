"""Hugging Face layout: sharded safetensors + model.safetensors.index.json, memory-mapped, lazy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .arrays import transposed
from .checkpoint import CheckpointReader, TensorInfo, check_inside
from .config import Llama4Config

# canonical suffix -> HF suffix (after "<prefix>layers.N.")
_LAYER_MAP = {
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "router": "feed_forward.router.weight",
    "shared.gate": "feed_forward.shared_expert.gate_proj.weight",
    "shared.up": "feed_forward.shared_expert.up_proj.weight",
    "shared.down": "feed_forward.shared_expert.down_proj.weight",
    "mlp.gate": "feed_forward.gate_proj.weight",
    "mlp.up": "feed_forward.up_proj.weight",
    "mlp.down": "feed_forward.down_proj.weight",
}
_VISION = re.compile(r"^(vision_model|multi_modal_projector)\.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def to_hf_name(name: str, model_prefix: str = "language_model.model.", head: str = "language_model.lm_head.weight") -> str:
    """HF tensor name of a canonical non-expert name (see checkpoint.py)."""
    if name == "tok_embeddings":
        return model_prefix + "embed_tokens.weight"
    if name == "norm":
        return model_prefix + "norm.weight"
    if name == "output":
        return head
    m = _LAYER.match(name)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(name)
    return f"{model_prefix}layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"


_PREAD_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def safetensors_header(fpath: Path) -> tuple[dict, int]:
    """(header, offset of the data section) of a safetensors file."""
    with open(fpath, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(header_len)), 8 + header_len


def open_safetensors(fpath: Path):
    """A lazy safetensors handle, after checking the file holds every byte its header promises (the map is
    lazy: a truncated file would otherwise fail only when a late tensor is touched)."""
    try:
        handle = safe_open(str(fpath), framework="pt")
        with open(fpath, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{fpath}: unreadable safetensors file ({e}); truncated or corrupt download?") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = fpath.stat().st_size
    if size < 8 + header_len + end:
        raise CheckpointError(f"{fpath}: truncated safetensors file ({size} bytes, header promises {8 + header_len + end})")
    return handle


class HFReader(CheckpointReader):
    layout = "hf"

    def __init__(self, path: Path, cfg: Llama4Config):
        self.path = Path(path)
        self.config = cfg
        self._files: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}  # tensor names each file holds (its header)
        self._headers: dict[str, tuple[dict, int]] = {}  # file -> (header, data offset), for _expert_slab
        self._slab: tuple[tuple[str, int], torch.Tensor] | None = None
        self.weight_map = self._weight_map()
        keys = self.weight_map.keys()
        if any(k.startswith("language_model.") for k in keys):
            self.model_prefix, self.head_name = "language_model.model.", "language_model.lm_head.weight"
        else:
            self.model_prefix, self.head_name = "model.", "lm_head.weight"
        self._unfused = any(".feed_forward.experts.0." in k for k in keys)

    # -- file handling ------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        """{tensor: file} from model.safetensors.index.json, else from the headers of the directory's
        *.safetensors files (a single model.safetensors); either way every file is checked to lie inside
        the directory before anything opens it."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            check_inside(self.path, index.name, index.name)
            try:
                wm = json.loads(index.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            if not isinstance(wm, dict) or not all(isinstance(f, str) and f for f in wm.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            for f in sorted(set(wm.values())):
                check_inside(self.path, f, f"{index.name} entry {f!r}")
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{self.path}: missing shard {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + " listed in model.safetensors.index.json"
                )
            return wm
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no safetensors files (and no model.safetensors.index.json)")
        wm = {}
        for f in files:
            check_inside(self.path, f.name, f.name)
            self._open(f.name)
            for k in sorted(self._keys[f.name]):
                if k in wm:
                    raise CheckpointError(f"{self.path}: tensor {k} is in both {wm[k]} and {f.name} "
                                          "(and no model.safetensors.index.json says which to use)")
                wm[k] = f.name
        return wm

    def _open(self, fname: str):
        h = self._files.get(fname)
        if h is None:
            h = self._files[fname] = open_safetensors(self.path / fname)
            if fname not in self._keys:
                self._keys[fname] = set(h.keys())
        return h

    def _file_of(self, hf_name: str):
        """The open file that holds `hf_name` (refusing an index entry whose file lacks the tensor)."""
        fname = self.weight_map[hf_name]
        h = self._open(fname)
        if hf_name not in self._keys[fname]:
            raise CheckpointError(f"{self.path}: model.safetensors.index.json puts tensor {hf_name} in {fname}, "
                                  "which does not hold it (corrupt index?)")
        return h

    def close(self) -> None:
        self._files.clear()
        self._slab = None

    def release(self) -> None:
        self._files.clear()
        self._slab = None

    def _expert_slab(self, hf_name: str, e: int) -> torch.Tensor:
        """Expert e of a fused [E, ...] tensor, read with pread into memory of our own: the slab is contiguous
        in the file, and a memory map would keep every page read resident until the layer's maps are dropped
        (a whole MoE layer, 4.4 GB for Scout). The last slab is kept, since gate and up share one."""
        if self._slab is not None and self._slab[0] == (hf_name, e):
            return self._slab[1]
        fname, info, data_start = self._tensor_info(hf_name)
        dtype = _PREAD_DTYPES.get(info["dtype"])
        shape = info["shape"]
        if dtype is None or len(shape) != 3:
            t = self._file_of(hf_name).get_slice(hf_name)[e]
        else:
            begin, end = info["data_offsets"]
            slab = (end - begin) // shape[0]
            buf = self._pread(fname, data_start + begin + e * slab, slab, f"{hf_name}[{e}]")
            t = torch.frombuffer(buf, dtype=dtype).view(shape[1:])
        self._slab = ((hf_name, e), t)
        return t

    def _tensor_info(self, hf_name: str) -> tuple[str, dict, int]:
        """(file, header entry, offset of the file's data section) of a tensor, for reading it with pread."""
        fname = self.weight_map[hf_name]
        self._file_of(hf_name)  # checks the file holds the tensor
        if fname not in self._headers:
            self._headers[fname] = safetensors_header(self.path / fname)
        header, data_start = self._headers[fname]
        return fname, header[hf_name], data_start

    def _pread(self, fname: str, offset: int, nbytes: int, what: str) -> bytearray:
        """`nbytes` of a shard from `offset`, read into memory of our own (not mapped: no page of the file stays
        resident in this process after the read)."""
        buf = bytearray(nbytes)
        view, n = memoryview(buf), 0
        with open(self.path / fname, "rb", buffering=0) as f:
            f.seek(offset)
            while n < nbytes:
                got = f.readinto(view[n:])
                if not got:
                    break
                n += got
        if n != nbytes:
            raise CheckpointError(f"{self.path / fname}: short read of {what} (truncated file?)")
        return buf

    def file_ranges(self, layer: int | str | None) -> list[tuple[Path, int, int]]:
        """(file, offset, length) of decoder layer `layer`'s tensors, with None of the final norm and the head,
        with "embeddings" of the embedding table: what `model.readahead` reads ahead."""
        if layer is None:
            names = [self._hf_name("norm"), self.head_name]
        elif layer == "embeddings":
            names = [self._hf_name("tok_embeddings")]
        else:
            p = f"{self.model_prefix}layers.{layer}."
            names = [k for k in self.weight_map if k.startswith(p)]
        out = []
        for hf in names:
            if hf not in self.weight_map:
                continue
            try:
                fname, info, data_start = self._tensor_info(hf)
                begin, end = info["data_offsets"]
            except (CheckpointError, OSError, KeyError, TypeError, ValueError):
                continue  # the read itself reports it
            out.append((self.path / fname, data_start + int(begin), int(end) - int(begin)))
        return out

    # -- naming ---------------------------------------------------------------------
    def _hf_name(self, name: str) -> str:
        m = _LAYER.match(name)
        if m and m.group(2).startswith("experts."):
            p = f"{self.model_prefix}layers.{m.group(1)}.feed_forward.experts."
            kind = m.group(2).split(".")[1]
            if self._unfused:
                return p + f"0.{kind}_proj.weight"
            return p + ("down_proj" if kind == "down" else "gate_up_proj")
        return to_hf_name(name, self.model_prefix, self.head_name)

    def describe(self, name: str) -> str:
        try:
            return self._hf_name(name)
        except KeyError:
            return name

    def _raw(self, hf_name: str) -> torch.Tensor:
        return self._file_of(hf_name).get_tensor(hf_name)

    def _raw_shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(self._file_of(hf_name).get_slice(hf_name).get_shape())

    # -- interface ------------------------------------------------------------------
    def _has(self, name: str) -> bool:
        return self._hf_name(name) in self.weight_map

    def _shape(self, name: str) -> tuple[int, ...]:
        raw = self._raw_shape(self._hf_name(name))
        if not name.split(".", 2)[-1].startswith("experts."):
            return raw
        E = self.config.num_experts
        if self._unfused:
            return (E, *raw)
        # fused HF tensors are [E, in, out]; gate_up holds gate then up on the last dim (a tensor of another
        # rank, or an odd gate_up, is returned as it is: validate() then names the mismatch)
        if len(raw) != 3 or (not name.endswith("experts.down") and raw[2] % 2):
            return raw
        if name.endswith("experts.down"):
            return (raw[0], raw[2], raw[1])
        return (raw[0], raw[2] // 2, raw[1])

    def _read(self, name: str) -> torch.Tensor:
        m = _LAYER.match(name)
        if m and m.group(2).startswith("experts."):
            kind = m.group(2).split(".")[1]
            return torch.stack([self._read_expert(int(m.group(1)), kind, e) for e in range(self.config.num_experts)])
        return self._raw(self._hf_name(name))

    def _read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a 2-D tensor: one contiguous byte range, read with pread (the embeddings and the head are
        2 GB each at Scout's size: read through the map, every block would stay resident until the next release)."""
        hf = self._hf_name(name)
        fname, info, data_start = self._tensor_info(hf)
        dtype, shape = _PREAD_DTYPES.get(info["dtype"]), info["shape"]
        if dtype is None or len(shape) != 2:
            return self._file_of(hf).get_slice(hf)[r0:r1]
        r0, r1 = max(0, min(r0, shape[0])), max(0, min(r1, shape[0]))
        row = (info["data_offsets"][1] - info["data_offsets"][0]) // shape[0]
        if r1 <= r0:
            return torch.empty(0, shape[1], dtype=dtype)
        buf = self._pread(fname, data_start + info["data_offsets"][0] + r0 * row, (r1 - r0) * row, f"{hf}[{r0}:{r1}]")
        return torch.frombuffer(buf, dtype=dtype).view(r1 - r0, shape[1])

    def _read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        p = f"{self.model_prefix}layers.{layer}.feed_forward.experts."
        if self._unfused:
            return self._raw(f"{p}{e}.{kind}_proj.weight")
        I = self.config.intermediate_size
        if kind == "down":
            return transposed(self._expert_slab(p + "down_proj", e))
        w = self._expert_slab(p + "gate_up_proj", e)  # [H, 2I]
        return transposed(w[:, :I] if kind == "gate" else w[:, I:])

    def validate(self) -> None:
        super().validate()
        if self._unfused:
            for i in self.config.moe_layers:
                for e in range(self.config.num_experts):
                    for kind in ("gate", "up", "down"):
                        n = f"{self.model_prefix}layers.{i}.feed_forward.experts.{e}.{kind}_proj.weight"
                        if n not in self.weight_map:
                            raise CheckpointError(f"{self.path}: missing tensor {n} (incomplete checkpoint?)")
        for name in self.weight_map:
            self._file_of(name)  # every file opens, and holds what the index says it holds

    def vision_tensors(self) -> list[TensorInfo]:
        out = []
        for k in self.weight_map:
            if _VISION.match(k):
                sl = self._file_of(k).get_slice(k)
                out.append(TensorInfo(k, tuple(sl.get_shape()), str(sl.get_dtype())))
        return out

    def read_raw(self, hf_name: str) -> torch.Tensor:
        """A tensor by its file name (used to pass the vision tower through unchanged)."""
        t = self._raw(hf_name)
        self._check_finite(hf_name, t)
        return t

    def source_dtype(self) -> torch.dtype:
        name = self.model_prefix + "embed_tokens.weight"
        code = self._file_of(name).get_slice(name).get_dtype()
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(code, torch.bfloat16)
