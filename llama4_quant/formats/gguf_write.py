"""Write llama4 GGUF files the way llama.cpp reads them, streamed and atomic (see docs/gguf.md).

Pieces:

- :func:`llamacpp_differences` / :func:`compat_warning`: where a checkpoint's config differs from what
  llama.cpp hard-codes for arch ``llama4`` (chunk 8192, temperature tuning floor 8192 / scale 0.1 on
  NoPE layers, NoPE every 4th layer, qk-norm unless exactly 128 experts), i.e. where llama.cpp will
  run the model differently from the checkpoint.
- :func:`load_tokenizer_data`: the BPE vocabulary as llama.cpp wants it (``gpt2`` model, ``llama4``
  pre-tokenizer, tokens, token types, merges, special ids, add_bos) from ``tokenizer.json`` (+
  ``tokenizer_config.json``, ``config.json``).
- :func:`plan_tensors`: every tensor of the file (GGUF name, shape, GGML type by the
  :mod:`gguf_mix` rule, byte size), in file order.
- :func:`add_model_metadata`: every key llama.cpp's llama4 loader reads, plus general.* provenance.
- :class:`GGUFFileWriter`: header, metadata and tensor infos through gguf-py's ``GGUFWriter`` before
  any data exists; then tensor data written at precomputed offsets as it is produced (a routed-expert
  tensor one expert slab at a time, in any order), so nothing is held longer than one tensor (one
  expert). Output goes to a hidden temporary directory next to OUT and is renamed into place only
  after every tensor was written and the files were read back and checked (headers always, data
  CRCs for files up to ``verify_data_max_bytes``). Split output follows llama.cpp's ``gguf-split``
  format (``split.no``/``split.count``/``split.tensors.count``, ``NAME-0000k-of-0000N.gguf``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, SHARD_NAME_FORMAT, GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, TokenType

from ..errors import Llama4QuantError
from ..fsutil import pid_alive
from ..model.config import Llama4Config
from .gguf_mix import FILE_TYPE, ROPE_FREQS, gguf_name, tensor_type, type_bytes

ARCH = "llama4"
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; we never write general.alignment

# What llama.cpp (src/models/llama4.cpp) hard-codes for arch llama4.
LLAMACPP_CHUNK = 8192
LLAMACPP_FLOOR_SCALE = 8192.0
LLAMACPP_ATTN_SCALE = 0.1
LLAMACPP_NOPE_INTERVAL = 4

_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")


class GGUFWriteError(Llama4QuantError):
    pass


# ---------------------------------------------------------------------------------------------------
# llama.cpp compatibility
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------


@dataclass
class TokenizerData:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / pad / unk
    add_special: dict[str, bool] = field(default_factory=dict)  # bos / eos
    chat_template: str | None = None
    model: str = "gpt2"
    pre: str = "llama4"
    source: str = ""


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _tokenizer_json(model_dir: Path, cfg: Llama4Config) -> tuple[dict, Path, bool]:
    """(tokenizer.json as a dict, the file it came from, whether it is Meta's tiktoken tokenizer.model)."""
    from ..errors import CheckpointError
    from ..model.tokenizer import find_tokenizer_file, load_tokenizer

    f = model_dir if model_dir.is_file() else find_tokenizer_file(model_dir)
    if f is None:
        raise GGUFWriteError(f"{model_dir}: no tokenizer.json or tokenizer.model; a GGUF needs the tokenizer")
    if f.suffix == ".model":
        try:
            tok = load_tokenizer(f, total_vocab=cfg.vocab_size).tokenizer
        except CheckpointError as e:
            raise GGUFWriteError(str(e)) from None
        return json.loads(tok.to_str()), f, True
    try:
        return json.loads(f.read_text(encoding="utf-8")), f, False
    except (OSError, json.JSONDecodeError) as e:
        raise GGUFWriteError(f"{f}: unreadable ({e})") from None


def load_tokenizer_data(model_dir: str | Path, cfg: Llama4Config) -> TokenizerData:
    """Read the BPE tokenizer (see module docstring) for a vocabulary of ``cfg.vocab_size`` entries.
    `model_dir`: the checkpoint directory, or a tokenizer.json / tokenizer.model file (its directory's
    tokenizer_config.json is read too).

    Meta-layout checkpoints with only tiktoken's tokenizer.model: its ranks become the BPE vocabulary and
    merges (model/tokenizer.py), the Llama 4 special tokens follow; BOS is added, EOS is ``<|eot|>``."""
    tj, src, meta = _tokenizer_json(Path(model_dir), cfg)
    d = src.parent
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFWriteError(f"{src}: not a BPE tokenizer (llama4 GGUFs need Llama 4's byte-level BPE)")
    tc_path = d / "tokenizer_config.json"
    tcfg = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() and not meta else {}
    if meta:
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>",
                "add_bos_token": True, "add_eos_token": False}

    n = cfg.vocab_size
    by_id: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        by_id[int(i)] = tok
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= n:
        raise GGUFWriteError(f"tokenizer has token id {max(by_id)} but the model's vocabulary is {n}: they do not belong together")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            special = bool(added[i].get("special")) or _looks_special(by_id[i])
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))

    merges_raw = model.get("merges") or []
    merges: list[str] = []
    for m in merges_raw:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            # llama.cpp splits merges on the space: encode literal spaces the way its converter does
            merges.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
        else:
            raise GGUFWriteError(f"{src}: unknown merges format")

    content_to_id = {a["content"]: i for i, a in sorted(added.items())}

    def token_id(entry) -> int | None:
        if isinstance(entry, dict):
            entry = entry.get("content")
        if not isinstance(entry, str):
            return None
        return content_to_id.get(entry, model["vocab"].get(entry))

    special: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        tid = token_id(tcfg.get(f"{typ}_token"))
        if tid is None:
            tid = _config_token_id(Path(model_dir), typ, cfg)
        if isinstance(tid, int) and 0 <= tid < n:
            special[typ] = tid

    add: dict[str, bool] = {}
    pp = tj.get("post_processor") or {}
    for proc in pp.get("processors", [pp]) if pp else []:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            if first is not None:
                add["bos"] = token_id(first) == special.get("bos")
            if last is not None:
                add["eos"] = token_id(last) == special.get("eos")
    for typ in ("bos", "eos"):
        if isinstance(tcfg.get(f"add_{typ}_token"), bool):
            add[typ] = tcfg[f"add_{typ}_token"]

    template = tcfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (d / "chat_template.json").is_file():
        template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if not isinstance(template, str):
        template = None
    return TokenizerData(tokens, types, merges, special, add, template, source=str(src))


def _config_token_id(model_dir: Path, typ: str, cfg: Llama4Config) -> int | None:
    v = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}.get(typ)
    return v if isinstance(v, int) else None


# ---------------------------------------------------------------------------------------------------
# tensors and metadata
# ---------------------------------------------------------------------------------------------------


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


def canonical_shapes(cfg: Llama4Config) -> list[tuple[str, tuple[int, ...], int]]:
    """(canonical name, full shape, experts) of every text tensor, in our file order."""
    H, V, I, Im, E = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_experts
    out: list[tuple[str, tuple[int, ...], int]] = [("tok_embeddings", (V, H), 0)]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out += [(p + "attn_norm", (H,), 0), (p + "wq", (cfg.q_dim, H), 0), (p + "wk", (cfg.kv_dim, H), 0),
                (p + "wv", (cfg.kv_dim, H), 0), (p + "wo", (H, cfg.q_dim), 0), (p + "ffn_norm", (H,), 0)]
        if cfg.is_moe(i):
            out += [(p + "router", (E, H), 0), (p + "shared.gate", (I, H), 0), (p + "shared.up", (I, H), 0),
                    (p + "shared.down", (H, I), 0), (p + "experts.gate", (E, I, H), E),
                    (p + "experts.up", (E, I, H), E), (p + "experts.down", (E, H, I), E)]
        else:
            out += [(p + "mlp.gate", (Im, H), 0), (p + "mlp.up", (Im, H), 0), (p + "mlp.down", (H, Im), 0)]
    out.append(("norm", (H,), 0))
    if not cfg.tie_word_embeddings:
        out.append(("output", (V, H), 0))
    return out


def plan_tensors(cfg: Llama4Config, scheme: str, has_imatrix: bool = False) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in file order: rope_freqs (llama3 scaling only), then ours."""
    plan: list[PlannedTensor] = []
    if cfg.rope_scaling is not None or getattr(cfg, "rope_freq_factors", None) is not None:
        plan.append(PlannedTensor(ROPE_FREQS, None, (cfg.head_dim // 2,), T.F32))
    for name, shape, E in canonical_shapes(cfg):
        qt = tensor_type(scheme, name, cfg.num_layers, shape[-1], n_experts=cfg.num_experts, has_imatrix=has_imatrix)
        plan.append(PlannedTensor(gguf_name(name), name, shape, qt, E))
    return plan


def rope_freqs_tensor(cfg: Llama4Config) -> np.ndarray:
    """llama3 rope scaling as llama.cpp takes it: per-frequency divisors, float32 [head_dim/2].

    Computed the way llama.cpp's own converter computes them (float32 tensor arithmetic throughout), so the
    tensor is bit-identical to its output."""
    import math

    import torch

    explicit = getattr(cfg, "rope_freq_factors", None)
    if explicit is not None:
        return np.asarray(explicit, dtype=np.float32)
    s = cfg.rope_scaling
    if s is None:
        return np.ones(cfg.head_dim // 2, dtype=np.float32)
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    out = torch.where(wavelen < high_wavelen, torch.ones_like(inv),
                      torch.where(wavelen > low_wavelen, torch.full_like(inv, s.factor), mid))
    return out.numpy().astype(np.float32)


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
                       extra: dict[str, Any] | None = None) -> None:
    """Every key llama.cpp reads for llama4 (src/llama-model.cpp, src/models/llama4.cpp), the tokenizer
    (src/llama-vocab.cpp) and general.* (see docs/gguf.md for the list)."""
    from .. import __version__

    w.add_type("model")
    w.add_name(name)
    w.add_quantized_by(f"llama4-quant {__version__}")
    w.add_file_type(FILE_TYPE[scheme])
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


# ---------------------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------------------


def split_names(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(SHARD_NAME_FORMAT.format(stem, k + 1, n)) for k in range(n)]


def existing_outputs(out: Path) -> list[Path]:
    """OUT itself and any OUT-stem split set next to it."""
    found = [out] if out.exists() else []
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = _SPLIT_NAME.match(p.name)
            if m and m.group("stem") == stem:
                found.append(p)
    return sorted(found)


def _clean_stale_partials(out: Path) -> None:
    prefix = f".{out.name}.partial-"
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    info: PlannedTensor
    shard: int
    offset: int  # absolute file offset of the tensor's data
    written: list[int | None] = field(default_factory=list)  # crc32 per slab (None: not yet written)


class GGUFFileWriter:
    """Streamed, atomic GGUF output (see module docstring). Usage::

        w = GGUFFileWriter(out, plan, split_max_size=0, force=False)
        w.open(lambda gw: add_model_metadata(gw, ...))
        w.write(name, array)              # whole tensor
        w.write(name, slab, expert=e)     # one expert of a routed-expert tensor
        files = w.commit()                # or w.abort()
    """

    def __init__(self, out: str | Path, plan: list[PlannedTensor], split_max_size: int = 0, force: bool = False,
                 verify_data_max_bytes: int = 4 << 30):
        self.out = Path(out)
        self.plan = plan
        self.split_max_size = int(split_max_size or 0)
        self.force = force
        self.verify_data_max_bytes = verify_data_max_bytes
        self.tmpdir: Path | None = None
        self.files: list[Path] = []  # temp files
        self.final: list[Path] = []
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._sizes: list[int] = []
        self._data_start: list[int] = []
        self.committed = False
        names = [p.name for p in plan]
        if len(set(names)) != len(names):
            raise GGUFWriteError("duplicate tensor names in the GGUF plan")
        if not self.out.name.endswith(".gguf"):
            raise GGUFWriteError(f"{self.out}: the output file name must end in .gguf")
        self.check_destination()

    def check_destination(self) -> None:
        if self.out.is_dir():
            raise GGUFWriteError(f"{self.out} is a directory; give a file name ending in .gguf")
        if not self.out.parent.exists():
            raise GGUFWriteError(f"{self.out.parent}: no such directory")
        existing = existing_outputs(self.out)
        if existing and not self.force:
            raise GGUFWriteError(f"{existing[0]} exists (use --force to replace it)")

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes)

    def open(self, add_metadata) -> None:
        """Create the temp files: header, metadata (``add_metadata(GGUFWriter)``), tensor infos."""
        _clean_stale_partials(self.out)
        self.tmpdir = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.tmpdir.mkdir()
        try:
            gw = GGUFWriter(self.tmpdir / self.out.name, ARCH, split_max_size=self.split_max_size)
            add_metadata(gw)
            for p in self.plan:
                gw.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
            n_shards = len(gw.tensors)
            shard_of = {name: k for k, ts in enumerate(gw.tensors) for name in ts}
            rel: dict[str, int] = {}
            sizes = [0] * n_shards
            for k, ts in enumerate(gw.tensors):
                for name, ti in ts.items():
                    rel[name] = sizes[k]
                    sizes[k] += GGUFWriter.ggml_pad(ti.nbytes, ALIGNMENT)
            self.files = gw.format_shard_names(self.tmpdir / self.out.name)
            self.final = split_names(self.out, n_shards)
            gw.write_header_to_file()
            gw.write_kv_data_to_file()
            gw.write_ti_data_to_file()
            assert gw.fout is not None
            for k, f in enumerate(gw.fout):
                f.flush()
                start = GGUFWriter.ggml_pad(f.tell(), ALIGNMENT)
                self._data_start.append(start)
                self._sizes.append(start + sizes[k])
            gw.close()
            free = shutil.disk_usage(self.tmpdir).free
            if free < self.total_bytes:
                raise GGUFWriteError(f"{self.out.parent}: {free / 2**30:.1f} GiB free, the output needs "
                                     f"{self.total_bytes / 2**30:.1f} GiB")
            for k, path in enumerate(self.files):
                fd = os.open(path, os.O_RDWR)
                self._fds.append(fd)
                _reserve(fd, self._sizes[k])
            for p in self.plan:
                k = shard_of[p.name]
                self.slots[p.name] = _Slot(p, k, self._data_start[k] + rel[p.name], [None] * max(1, p.n_experts))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data: np.ndarray, expert: int | None = None) -> None:
        """Write a whole tensor (or, with `expert`, slab `expert` of a routed-expert tensor): the bytes
        of `data` (any dtype, C order) must be exactly the tensor's (slab's) GGML encoding."""
        slot = self.slots.get(name)
        if slot is None:
            raise GGUFWriteError(f"tensor {name} is not in the GGUF plan")
        info = slot.info
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if expert is None:
            if info.n_experts:
                if buf.nbytes != info.nbytes:
                    raise GGUFWriteError(f"{name}: got {buf.nbytes} bytes, expected {info.nbytes}")
                for e in range(info.n_experts):
                    self._put(slot, e, buf[e * info.slab_bytes:(e + 1) * info.slab_bytes])
                return
            if buf.nbytes != info.nbytes:
                raise GGUFWriteError(f"{name}: got {buf.nbytes} bytes, expected {info.nbytes} ({info.qtype.name} {info.shape})")
            self._put(slot, 0, buf)
            return
        if not info.n_experts or not 0 <= expert < info.n_experts:
            raise GGUFWriteError(f"{name}: no expert slab {expert}")
        if buf.nbytes != info.slab_bytes:
            raise GGUFWriteError(f"{name}[{expert}]: got {buf.nbytes} bytes, expected {info.slab_bytes}")
        self._put(slot, expert, buf)

    def _put(self, slot: _Slot, k: int, buf: memoryview) -> None:
        if slot.written[k] is not None:
            raise GGUFWriteError(f"{slot.info.name}: slab {k} written twice")
        fd = self._fds[slot.shard]
        off = slot.offset + k * slot.info.slab_bytes
        done = 0
        while done < buf.nbytes:
            done += os.pwrite(fd, buf[done:], off + done)
        slot.written[k] = zlib.crc32(buf)

    def missing(self) -> list[str]:
        return [f"{s.info.name}" + (f"[{k}]" if s.info.n_experts else "")
                for s in self.slots.values() for k, c in enumerate(s.written) if c is None]

    def commit(self) -> list[Path]:
        """Verify and publish; returns the final file paths."""
        try:
            missing = self.missing()
            if missing:
                raise GGUFWriteError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]}")
            for fd in self._fds:
                os.fsync(fd)
                os.close(fd)
            self._fds = []
            self.verify()
            if self.force:
                for p in existing_outputs(self.out):
                    p.unlink()
            else:
                self.check_destination()
            # the first shard last: llama.cpp opens a split set through it
            for tmp, final in reversed(list(zip(self.files, self.final))):
                os.replace(tmp, final)
            _fsync_dir(self.out.parent)
            self.committed = True
            return list(self.final)
        except BaseException:
            self.abort()
            raise
        finally:
            if self.tmpdir is not None and self.committed:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def verify(self) -> None:
        """Read the temp files back with gguf-py: tensor names, types, shapes, offsets, split keys; data CRCs
        too when the output is at most `verify_data_max_bytes`."""
        check_data = self.total_bytes <= self.verify_data_max_bytes
        seen = set()
        for k, path in enumerate(self.files):
            try:
                r = GGUFReader(path, "r")
            except Exception as e:  # gguf-py raises plain ValueError/IndexError/...
                raise GGUFWriteError(f"written GGUF does not read back ({e})") from None
            if os.path.getsize(path) != self._sizes[k]:
                raise GGUFWriteError(f"{path.name}: size {os.path.getsize(path)} != planned {self._sizes[k]}")
            if len(self.files) > 1:
                f_no = r.fields.get("split.no")
                if f_no is None or f_no.contents() != k or r.fields["split.count"].contents() != len(self.files):
                    raise GGUFWriteError(f"{path.name}: split keys missing or wrong")
            for t in r.tensors:
                slot = self.slots.get(t.name)
                if slot is None or slot.shard != k:
                    raise GGUFWriteError(f"{path.name}: unexpected tensor {t.name}")
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))
                if T(int(t.tensor_type)) != slot.info.qtype or shape != slot.info.shape:
                    raise GGUFWriteError(f"{t.name}: reads back as {T(int(t.tensor_type)).name} {shape}, "
                                         f"wrote {slot.info.qtype.name} {slot.info.shape}")
                if int(t.data_offset) != slot.offset or int(t.n_bytes) != slot.info.nbytes:
                    raise GGUFWriteError(f"{t.name}: data offset/size mismatch on read-back")
                if check_data:
                    raw = np.asarray(r.data[t.data_offset:t.data_offset + t.n_bytes])
                    sb = slot.info.slab_bytes
                    for e, crc in enumerate(slot.written):
                        if zlib.crc32(memoryview(raw[e * sb:(e + 1) * sb])) != crc:
                            raise GGUFWriteError(f"{t.name}: data read back differs from what was written")
                seen.add(t.name)
            del r
        if seen != set(self.slots):
            raise GGUFWriteError(f"read-back is missing {sorted(set(self.slots) - seen)[:3]}")

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self.tmpdir is not None and not self.committed:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size (sparse: the data is written at offsets later)."""
    os.ftruncate(fd, size)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# reading back (inspect)
# ---------------------------------------------------------------------------------------------------


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What `llama4-quant inspect FILE.gguf` shows: metadata summary, and every tensor's type and size."""
    from .gguf_read import open_gguf

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


__all__ = [
    "ARCH", "GGUFFileWriter", "GGUFWriteError", "PlannedTensor", "TokenizerData", "add_model_metadata",
    "all_full_attention", "canonical_shapes", "check_expressible", "compat_warning", "describe_gguf",
    "existing_outputs", "generation_defaults", "llamacpp_differences", "load_tokenizer_data", "plan_tensors", "rope_freqs_tensor",
    "split_names", "tensor_nbytes",
]
