"""The compressed-tensors safetensors exporter: a complete model directory that vLLM and transformers load.

Layout (see formats/compressed_tensors.py for the per-Linear tensors):
- HF names of the source (`language_model.model.layers.N...` for Llama4ForConditionalGeneration sources,
  `model.layers.N...` for text-only ones and for Meta sources, which get a synthesized Llama4ForCausalLM
  config.json); routed experts *unfused*, one module per expert: `feed_forward.experts.{e}.gate_proj.*` ([out, in]),
  which is what vLLM's Llama 4 loader and transformers' compressed-tensors path (which swaps Llama4TextExperts
  for a list of per-expert MLPs) expect. All experts of a layer share one scheme.
- config.json = the source's, plus `quantization_config` (one config group targeting `Linear`; every Linear left
  unquantized is listed in `ignore`, the vision tower as `re:vision_model.*` / `re:multi_modal_projector.*`).
- sharded `model-0000k-of-0000n.safetensors` (each at most `max_shard_bytes` of tensor data, streamed to disk
  tensor by tensor: nothing of the output is held in memory) + `model.safetensors.index.json`; tokenizer, generation config and other small files copied;
  the vision tower copied unchanged; `llama4-quant.json`: the run's manifest with the sha256 of every file.

Atomicity: everything is written into a sibling `OUT.tmp-<pid>-<rand>` directory, which is renamed to OUT only
at the very end (an existing OUT is replaced only with `force`). A failed or interrupted run removes its temp
directory; one killed outright leaves it behind under the .tmp- name, and the next run removes it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..fsutil import pid_alive, sha256_file
from ..errors import Llama4QuantError
from ..formats.compressed_tensors import config as ct_config
from ..formats.compressed_tensors import tensors as ct_tensors
from ..formats.compressed_tensors.tensors import INDEX, torch_dtype
from ..formats.manifest import MANIFEST, ours
from ..model.checkpoint import CheckpointReader
from ..model.config import Llama4Config
from ..model.hf_reader import to_hf_name
from ..quant.api import make_grid
from ..quant.grid import Grid
from ..quant.rtn import QuantResult
from ..quant.scheme import SCHEMES, IntScheme, QuantizedLinear, Scheme, make_scheme
from ..model.tensors import TensorSpec
from .pipeline import Selection, router_refits
from .sizes import DEFAULT_MAX_SHARD_BYTES, header_reserve as default_header_reserve

# the text model's module prefix in either layout (see SafetensorsExporter.ignore_list)
_ANY_PREFIX = r"(language_model\.)?model\."
# a --fit mix's config-group targets (SafetensorsExporter.plan_targets): module family per role, projection names
_FAMILY = {"experts": r"feed_forward\.experts\.\d+\.{}_proj", "shared": r"feed_forward\.shared_expert\.{}_proj",
           "mlp": r"feed_forward\.{}_proj", "attn": r"self_attn\.{}_proj"}
_PROJ = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "gate": "gate", "up": "up", "down": "down"}
_SCHEME_ORDER = list(SCHEMES)
# files a checkpoint carries besides weights and config that belong with the quantized model
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json")

_ST_DTYPES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


# ---------------------------------------------------------------------------------------------------------------
def _st_entry(t: torch.Tensor, offset: int) -> dict[str, Any]:
    if t.dtype not in _ST_DTYPES:
        raise ValueError(f"dtype {t.dtype} cannot be stored in safetensors")
    return {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * t.element_size()]}


def _write_tensor_bytes(f, t: torch.Tensor) -> None:
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class _StreamingShard:
    """One safetensors file written tensor by tensor: the data goes to disk at once, after a header area of
    `reserve` bytes that is filled at close (the format allows the header to be padded with spaces)."""

    def __init__(self, path: Path, reserve: int):
        self.path, self.reserve = path, reserve
        self.f = open(path, "wb")
        self.f.seek(8 + reserve)
        self.header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.header_bytes = len(json.dumps(self.header, separators=(",", ":")))
        self.data_bytes = 0

    def room_for(self, name: str, t: torch.Tensor) -> bool:
        return self.header_bytes + len(json.dumps({name: _st_entry(t, self.data_bytes)}, separators=(",", ":"))) <= self.reserve

    def add(self, name: str, t: torch.Tensor) -> None:
        entry = _st_entry(t, self.data_bytes)
        self.header_bytes += len(json.dumps({name: entry}, separators=(",", ":"))) - 1  # braces -> comma
        self.header[name] = entry
        _write_tensor_bytes(self.f, t)
        self.data_bytes = entry["data_offsets"][1]

    def close(self) -> None:
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        assert len(raw) <= self.reserve, (len(raw), self.reserve)
        self.f.seek(0)
        self.f.write(self.reserve.to_bytes(8, "little"))
        self.f.write(raw + b" " * (self.reserve - len(raw)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def discard(self) -> None:
        self.f.close()


class ShardedWriter:
    """Tensors streamed into size-capped shards (nothing buffered in memory), renamed model-k-of-n at close."""

    def __init__(self, root: Path, max_bytes: int, header_reserve: int | None = None):
        self.root, self.max_bytes = root, max_bytes
        self.reserve = header_reserve or default_header_reserve(max_bytes)
        self.current: _StreamingShard | None = None
        self.shards: list[list[str]] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        cur = self.current
        if cur is not None and len(cur.header) > 1 and (cur.data_bytes + n > self.max_bytes or not cur.room_for(name, t)):
            self.flush()
        if self.current is None:
            self.current = _StreamingShard(self.root / f"shard-{len(self.shards) + 1:05d}.partial", self.reserve)
            self.shards.append([])
        if not self.current.room_for(name, t):
            raise ValueError(f"tensor name {name[:80]} too long for the shard header")
        self.current.add(name, t)
        self.shards[-1].append(name)
        self.total += n

    def flush(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def abort(self) -> None:
        if self.current is not None:
            self.current.discard()
            self.current = None

    def close(self) -> dict[str, str]:
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards, 1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.root / f"shard-{k:05d}.partial", self.root / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map




def clean_stale_temps(out: Path) -> list[Path]:
    """Remove `OUT.tmp-<pid>-*` siblings left by runs that no longer exist (killed outright)."""
    removed = []
    if not out.parent.exists():
        return removed
    for p in out.parent.glob(out.name + ".tmp-*"):
        m = re.match(re.escape(out.name) + r"\.tmp-(\d+)-[0-9a-f]+$", p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def hf_text_config(cfg: Llama4Config) -> dict[str, Any]:
    """A Llama4ForCausalLM config.json for a source without one (Meta's original layout)."""
    tc: dict[str, Any] = {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "intermediate_size_mlp": cfg.intermediate_size_mlp, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "num_experts_per_tok": cfg.top_k, "num_local_experts": cfg.num_experts,
        "interleave_moe_layer_step": cfg.interleave_moe_layer_step, "moe_layers": list(cfg.moe_layers),
        "use_qk_norm": cfg.use_qk_norm, "no_rope_layers": [int(r) for r in cfg.rope_layers],
        "no_rope_layer_interval": cfg.no_rope_layer_interval, "attention_chunk_size": cfg.attention_chunk_size,
        "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": int(cfg.floor_scale),
        "attn_scale": cfg.attn_scale, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.torch_dtype,
    }
    s = cfg.rope_scaling
    if s is not None:
        tc["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings}
    return tc


# ---------------------------------------------------------------------------------------------------------------
class SafetensorsExporter:
    """See the module docstring; implements pipeline.Exporter."""

    def __init__(self, out: str | Path, scheme: Scheme, selection: Selection = Selection(), *, force: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, observer: str = "minmax", actorder: bool = False,
                 scheme_name: str | None = None, source_label: str | None = None, group_size: int | None = 128):
        self.out = Path(out).expanduser().absolute()
        self.scheme, self.selection, self.force = scheme, selection, force
        self.max_shard_bytes, self.observer, self.actorder = max_shard_bytes, observer, actorder
        self.scheme_name = scheme_name or repr(scheme)
        self.source_label = source_label
        self.group_size = group_size  # int schemes of a --fit/--plan mix (None: per channel)
        # a --fit/--plan mix (convert/fit.py): canonical Linear -> scheme name ("bf16": kept as stored)
        self.scheme_overrides: dict[str, str] | None = None
        self.tmp: Path | None = None
        self.writer: ShardedWriter | None = None
        self.source: CheckpointReader | None = None
        # the last written result (a weak reference: an id() could be reused by a later result) and its packing
        self._last: tuple[weakref.ref, QuantizedLinear] | None = None
        self._grids: dict[tuple, Grid] = {}
        self.warnings: list[str] = []
        self.check_destination()

    # -- naming -----------------------------------------------------------------------------------------------------
    def prepare(self, source: CheckpointReader) -> None:
        self.source = source
        cfg = source.config
        self.model_dtype = torch_dtype(cfg.torch_dtype)
        self.prefix = getattr(source, "model_prefix", "model.")
        self.head = getattr(source, "head_name", "lm_head.weight")
        self.multimodal = self.prefix.startswith("language_model.")

    def module_name(self, name: str) -> str:
        """HF module name of a canonical Linear (or per-expert name `layers.N.experts.E.kind`)."""
        m = re.match(r"^layers\.(\d+)\.experts\.(\d+)\.(gate|up|down)$", name)
        if m:
            return f"{self.prefix}layers.{m.group(1)}.feed_forward.experts.{m.group(2)}.{m.group(3)}_proj"
        return to_hf_name(name, self.prefix, self.head).removesuffix(".weight")

    def tensor_name(self, name: str) -> str:
        m = re.match(r"^layers\.\d+\.experts\.\d+\.(gate|up|down)$", name)
        return self.module_name(name) + ".weight" if m else to_hf_name(name, self.prefix, self.head)

    # -- destination -------------------------------------------------------------------------------------------------
    def check_destination(self) -> None:
        if self.out.exists() and not self.force:
            raise Llama4QuantError(f"{self.out} already exists (pass --force to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise Llama4QuantError(f"{self.out} exists and is not a directory")
        if self.out.exists():
            ok, why = ours(self.out)
            if not ok:
                raise Llama4QuantError(f"--force replaces only an earlier llama4-quant output: {why}; "
                                       "choose another OUT or remove it yourself")

    # -- pipeline.Exporter -----------------------------------------------------------------------------------------
    def selected(self, spec: TensorSpec) -> bool:
        """Whether --targets/--ignore pick this Linear for quantization (what a --fit plan chooses schemes for)."""
        if self.source is None:
            raise RuntimeError("prepare(source) first")
        if not spec.is_linear or spec.role == "router":
            return False
        aliases = [self.module_name(spec.name)] if spec.num_experts == 0 else [
            self.module_name(spec.expert_name(e)) for e in range(spec.num_experts)] + [
            f"{self.prefix}layers.{spec.layer}.feed_forward.experts"]
        return self.selection.selects(spec, aliases)

    def scheme_for(self, spec: TensorSpec) -> Scheme | None:
        """The scheme of a selected Linear: --scheme, or the plan's (None where the plan keeps it as stored)."""
        if self.scheme_overrides is None:
            return self.scheme
        name = self.scheme_overrides[spec.name]
        return None if name == "bf16" else make_scheme(name, self.group_size)

    def grid_for(self, spec: TensorSpec) -> Grid | None:
        if not self.selected(spec):
            return None
        scheme = self.scheme_for(spec)
        if scheme is None:
            return None
        out_f, in_f = spec.shape
        if isinstance(scheme, IntScheme) and not scheme.per_channel and in_f % scheme.group_size:
            raise Llama4QuantError(
                f"{spec.name} has {in_f} input features, not a multiple of --group-size {scheme.group_size}"
                " (use a divisor, or -1 for per-channel scales)")
        key = (type(scheme), scheme)
        if key not in self._grids:
            self._grids[key] = make_grid(scheme, self.model_dtype, mse=self.observer == "mse")
        return self._grids[key]

    def begin(self, source: CheckpointReader, plan: list[tuple[TensorSpec, Grid | None]]) -> None:
        self.plan = plan
        if not any(g is not None for _, g in plan):
            raise Llama4QuantError("nothing to quantize: --targets/--ignore leave no Linear selected")
        self.check_destination()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.out)
        self.tmp = self.out.parent / f"{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self.writer = ShardedWriter(self.tmp, self.max_shard_bytes)
        self.t0 = time.time()
        # the vision tower, unchanged
        self.vision = [t.name for t in source.vision_tensors()]
        for name in self.vision:
            self.writer.add(name, source.read_raw(name))

    def runtime_weight(self, spec: TensorSpec, result: QuantResult, grid: Grid) -> torch.Tensor:
        q = self._last[1] if self._last and self._last[0]() is result else result.finalize(grid)
        return q.dequantize(self.model_dtype)  # what compressed-tensors decompresses to

    def write_tensor(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        self.writer.add(self.tensor_name(spec.name), tensor)

    def write_quantized(self, spec: TensorSpec, expert: int | None, result: QuantResult, grid: Grid) -> None:
        q = result.finalize(grid)
        self._last = (weakref.ref(result), q)
        module = self.module_name(spec.name if expert is None else spec.expert_name(expert))
        for key, t in ct_tensors.linear_tensors(q, self.model_dtype).items():
            self.writer.add(f"{module}.{key}", t)

    def end_layer(self, layer: int) -> None:
        pass

    # -- finishing ---------------------------------------------------------------------------------------------------
    def ignore_list(self) -> list[str]:
        """compressed-tensors `ignore` entries for every Linear left unquantized, as `re:` patterns that match both
        module layouts a loader may build: `language_model.model.layers.N...` (Llama4ForConditionalGeneration)
        and `model.layers.N...` (AutoModelForCausalLM -> Llama4ForCausalLM). A role kept whole in every layer
        (attention, router) gets one pattern, as llm-compressor's Llama 4 checkpoints have it."""
        kept = [spec for spec, grid in self.plan if grid is None and spec.is_linear]
        all_layers = {spec.role: spec for spec, _ in self.plan if spec.is_linear}
        ign: list[str] = []
        whole = {role for role in ("attn", "router")
                 if role in all_layers and all(g is None for sp, g in self.plan if sp.role == role)}
        if "attn" in whole:
            ign.append("re:.*self_attn\\.(q|k|v|o)_proj$")
        if "router" in whole:
            ign.append("re:.*feed_forward\\.router$")
        for spec in kept:
            if spec.role in whole:
                continue
            if spec.role == "head":
                ign.append("re:.*lm_head$")
            elif spec.num_experts:
                if spec.local == "experts.gate":
                    ign.append(f"re:{_ANY_PREFIX}layers\\.{spec.layer}\\.feed_forward\\.experts($|\\.)")
            else:
                local = self.module_name(spec.name).removeprefix(self.prefix)
                ign.append(f"re:{_ANY_PREFIX}{re.escape(local)}$")
        if self.source.config.tie_word_embeddings and "re:.*lm_head$" not in ign:
            ign.append("re:.*lm_head$")
        if self.vision:
            ign += ["re:vision_model.*", "re:multi_modal_projector.*"]
        return ign

    def _config(self) -> dict[str, Any]:
        src = Path(self.source.path)
        if (src / "config.json").exists():
            config = json.loads((src / "config.json").read_text())
        else:
            config = hf_text_config(self.source.config)
            self.warnings.append("source has no config.json (Meta layout): wrote a Llama4ForCausalLM config")
        if self.scheme_overrides is None:
            groups = [ct_config.ConfigGroup(["Linear"], self.scheme, observer=self.observer, actorder=self.actorder)]
        else:
            groups = [ct_config.ConfigGroup(targets, make_scheme(name, self.group_size), observer=self.observer,
                                            actorder=self.actorder) for name, targets in self.plan_targets()]
        qc = ct_config.quantization_config(groups, self.ignore_list())
        config["quantization_config"] = qc
        return config

    def plan_targets(self) -> list[tuple[str, list[str]]]:
        """A --fit/--plan mix as compressed-tensors config groups: (scheme, `re:` targets) per scheme in use, the
        targets naming exactly the modules of that scheme in both module layouts (`language_model.model.layers.N`
        and `model.layers.N`): per module family and kinds, the layers that use the scheme."""
        rows: dict[str, dict[tuple[str, str], list[int]]] = {}  # scheme -> (family, kind) -> layers
        head: list[str] = []
        for spec, grid in self.plan:
            if grid is None:
                continue
            name = self.scheme_overrides[spec.name]
            if spec.role == "head":
                head.append(name)
                rows.setdefault(name, {})
                continue
            kind = _PROJ[spec.local.split(".")[-1]]
            rows.setdefault(name, {}).setdefault((spec.role, kind), []).append(spec.layer)
        out = []
        for name in sorted(rows, key=_SCHEME_ORDER.index):
            by_layers: dict[tuple[str, tuple[int, ...]], list[str]] = {}
            for (role, kind), layers in rows[name].items():
                by_layers.setdefault((role, tuple(layers)), []).append(kind)
            targets = []
            for (role, layers), kinds in by_layers.items():
                alt = kinds[0] if len(kinds) == 1 else "(" + "|".join(kinds) + ")"
                lay = str(layers[0]) if len(layers) == 1 else "(" + "|".join(map(str, layers)) + ")"
                targets.append(f"re:{_ANY_PREFIX}layers\\.{lay}\\.{_FAMILY[role].format(alt)}$")
            if name in head:
                targets.append("re:.*lm_head$")
            out.append((name, targets))
        return out

    def _copy_side_files(self) -> list[str]:
        """The source's tokenizer, chat template, generation and processor configs and license texts; nothing else
        (weights, indexes and configs are written anew, and unknown files are not ours to publish)."""
        src = Path(self.source.path)
        copied = []
        for p in sorted(src.iterdir()):
            if p.is_file() and (p.name in SIDE_FILES or p.name.upper().startswith(("LICENSE", "USE_POLICY"))):
                shutil.copy2(p, self.tmp / p.name)
                copied.append(p.name)
        if "tokenizer.json" not in copied:
            self.warnings.append("the source has no tokenizer.json: copy a tokenizer into the output before serving it")
        return copied

    def finish(self, report: dict[str, Any]) -> dict[str, Any]:
        weight_map = self.writer.close()
        config = self._config()
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = self._copy_side_files()
        files = {}
        for p in sorted(self.tmp.iterdir()):
            files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = self._manifest(report, config, files, copied, weight_map)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        self._publish()
        return manifest

    def _manifest(self, report, config, files, copied, weight_map) -> dict[str, Any]:
        src = Path(self.source.path)
        src_cfg = src / "config.json"
        tensors = {}
        for name, rec in report["tensors"].items():
            tensors[self.module_name(name)] = {"canonical": name, **rec}
        plan = {}
        for spec, grid in self.plan:
            if not spec.is_linear:
                continue
            if spec.num_experts:
                key = f"{self.prefix}layers.{spec.layer}.feed_forward.experts.*.{spec.local.split('.')[1]}_proj"
            else:
                key = self.module_name(spec.name)
            if grid is None:
                plan[key] = "unquantized"
            else:
                plan[key] = self.scheme_name if self.scheme_overrides is None else self.scheme_overrides[spec.name]
        total = sum(f["bytes"] for f in files.values())
        return {
            "tool": {"name": "llama4-quant", "version": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "format": "compressed-tensors",
            "source": {
                "path": self.source_label or str(src), "layout": getattr(self.source, "layout", "?"),
                "config_sha256": sha256_file(src_cfg) if src_cfg.exists() else None,
                "index_sha256": sha256_file(src / INDEX) if (src / INDEX).exists() else None,
            },
            "scheme": {"name": self.scheme_name, "repr": repr(self.scheme) if self.scheme_overrides is None else
                       "per module (per_module): " + ", ".join(n for n, _ in self.plan_targets()),
                       "quantization_config": config["quantization_config"]},
            "targets": sorted(self.selection.roles), "ignore_patterns": list(self.selection.ignore),
            "per_module": plan,
            **{k: v for k, v in report.items() if k not in ("tensors",)},
            "tensors": tensors,
            "vision_tensors_passed_through": len(self.vision),
            "copied_files": copied,
            "warnings": report.get("warnings", []) + self.warnings,
            "output": {"files": files, "total_bytes": total, "shards": len(set(weight_map.values()))},
        }

    def _publish(self) -> None:
        old = None
        if self.out.exists():
            if not self.force:
                raise Llama4QuantError(f"{self.out} appeared while converting (pass --force to replace it)")
            self.check_destination()  # still ours?
            old = self.out.parent / f"{self.out.name}.tmp-{os.getpid()}-old{secrets.token_hex(2)}"
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None:  # put the previous output back
                os.replace(old, self.out)
            raise
        self.tmp = None
        try:
            fd = os.open(self.out.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self.writer = None
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None


    # -- the command's summary --------------------------------------------------------------------------------------
    @property
    def artifact(self) -> Path:
        return self.out

    def summary(self, manifest: dict[str, Any], seconds: float) -> dict[str, Any]:
        return summary(manifest, self.out)

    def manifest_path(self, summary: dict[str, Any]) -> Path:
        return self.out / MANIFEST


def summary(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """The `--json` summary of a finished conversion."""
    layers = manifest.get("layers", [])
    tpe = [l["tokens_per_expert"] for l in layers if l.get("tokens_per_expert")]
    flat = [n for row in tpe for n in row]
    return {
        "output": str(out),
        "format": manifest["format"],
        "scheme": manifest["scheme"]["name"],
        "method": manifest["method"],
        "targets": manifest["targets"],
        "quantized_tensors": len(manifest["tensors"]),
        "rtn_fallbacks": len(manifest.get("rtn_fallbacks", {})),
        "total_bytes": manifest["output"]["total_bytes"],
        "shards": manifest["output"]["shards"],
        "seconds": manifest["seconds"],
        "calibration": None if not manifest.get("calibration") else {
            k: manifest["calibration"].get(k) for k in ("source", "samples", "seqlen", "seed", "tokens_sha256")},
        "layer_loss": [l.get("loss") for l in layers],
        "tokens_per_expert": {"min": min(flat), "max": max(flat),
                              "zero_token_experts": sum(1 for n in flat if n == 0)} if flat else None,
        "warnings": manifest["warnings"],
        "timing": manifest.get("timing"),
        "router_refit": router_refits(layers),
        "manifest": MANIFEST,
    }


class SafetensorsFormat:
    """`--to safetensors` for convert/run.py: compressed-tensors checkpoints (vLLM, transformers)."""

    name = "safetensors"
    default_scheme = "w4a16"
    methods = ("gptq", "rtn")
    options = ("group_size", "targets", "ignore", "observer", "max_shard_size", "fit_schemes")

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(SCHEMES)

    def resolve_method(self, scheme: str, o) -> str:
        if o.method == "auto":
            return "rtn" if scheme.startswith("fp8") else "gptq"
        return o.method

    def final_method(self, method: str, scheme: str) -> str:
        return method

    def reads_calibration(self, method: str, o) -> bool:
        # --fit/--target-size/--target-bpw measure importance on calibration tokens, whatever the method
        return method == "gptq" or any(t is not None for t in (o.fit, o.target_size, o.target_bpw))

    def option_warnings(self, scheme: str, o) -> list[str]:
        if "attn" in Selection.parse(o.targets, o.ignore or ()).roles:
            return ["attention is quantized: vLLM's Llama 4 loader permutes q/k rows without permuting grouped "
                    "scales, so this checkpoint may load but compute wrong attention there (see docs/convert.md)"]
        return []

    def exporter(self, o, scheme: str, method: str) -> SafetensorsExporter:
        g = 128 if o.group_size is None else o.group_size
        return SafetensorsExporter(o.out, make_scheme(scheme, None if g == -1 else g),
                                   Selection.parse(o.targets, o.ignore or ()), force=o.force,
                                   max_shard_bytes=o.max_shard_size or DEFAULT_MAX_SHARD_BYTES,
                                   observer=o.observer or "minmax", actorder=o.act_order and method == "gptq",
                                   scheme_name=scheme, source_label=o.model, group_size=None if g == -1 else g)

    def configure(self, exporter, o, method: str, calib_info: dict | None, is_hub_id: bool) -> None:
        pass
