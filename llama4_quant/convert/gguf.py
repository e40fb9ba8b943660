"""The GGUF exporter: the pipeline's tensors into a llama4 GGUF, by one of three methods (docs/gguf.md).

- ``rtn``: every tensor encoded exactly as ``llama-quantize`` encodes it without an imatrix (the bit-exact
  packers of formats/gguf/quants.py); no data, no forward pass.
- ``imatrix``: what ``llama-imatrix`` + ``llama-quantize --imatrix`` do: the pipeline's importance pass
  (one forward of the *unquantized* model, `Pipeline.collect_importance`) or llama-imatrix's own file gives
  mean x^2 per input column, and each tensor is encoded with llama.cpp's importance-weighted searches.
- ``gptq``: every quantized Linear goes through GPTQ error feedback on its GGML block grid
  (formats/gguf/grid.py), later layers calibrate on the quantized earlier ones, and the result is packed.
  Embeddings get llama.cpp's RTN (a lookup table has no inputs to calibrate on).

The first two are the pipeline's `rtn` method with this exporter in *direct* mode: it claims no grid, so
every tensor arrives through `write_tensor` and is encoded here. All three stream one tensor (one expert)
at a time from the reader to the file.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import Llama4QuantError
from ..formats.gguf import quants as gq
from ..formats.gguf.grid import GRID_TYPES, grid_for_type, pack_result
from ..formats.gguf.imatrix import Imatrix
from ..formats.gguf.metadata import (add_model_metadata, check_expressible, compat_warning, generation_defaults,
                                     rope_freqs_tensor)
from ..formats.gguf.mix import BASE, SCHEMES, PlannedTensor, plan_tensors
from ..formats.gguf.quants import QT
from ..formats.gguf.vocab import load_tokenizer_data
from ..formats.gguf.writer import GGUFFileWriter, check_destination, existing_outputs
from ..formats.manifest import SIDECAR_SUFFIX, ours
from ..fsutil import sha256_file, write_json_atomic
from .fit import FTYPE_GUESSED
from .pipeline import router_refits

METHODS = ("gptq", "imatrix", "rtn")
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
_EXPERT = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.(gate|up|down)$")
# encode()'s nanoseconds per element on 2 cores for a [2048 x 5120] block, (plain, with imatrix weights): the
# qkx searches of Q4_K / Q5_K cost more than Q6_K's, and three times as much with weights (docs/performance.md);
# other types are put at the middle. READ_NS: reading, bf16 -> float32 and writing, the same for every type.
_ENCODE_NS = {QT.Q4_K: (9.5, 28.5), QT.Q5_K: (8.1, 30.2), QT.Q6_K: (6.4, 6.4), QT.Q8_0: (5.6, 5.5)}
_OTHER_NS, _FLOAT_NS, READ_NS = (8.0, 20.0), 1.0, 10.0


def encode(w: torch.Tensor | np.ndarray, qtype: QT, imatrix: np.ndarray | None = None) -> np.ndarray:
    """GGML bytes of float weights [..., cols] in `qtype` (what llama-quantize writes for them)."""
    qtype = QT(qtype)
    if qtype in gq.SUPPORTED_TYPES:
        return gq.quantize(w, qtype, imatrix)
    # fallback types of the mix (Q4_1 / Q5_0 / Q5_1): gguf-py's reference quantizers, no imatrix
    from gguf.quants import quantize as gguf_quantize

    arr = w.detach().float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
    return gguf_quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def is_float_scheme(scheme: str) -> bool:
    return BASE[scheme] in FLOAT_TYPES


class GGUFExporter:
    """convert/pipeline.py's Exporter for GGUF output (see the module docstring).

    direct: encode every tensor here (rtn / imatrix methods, with `imatrix` entries when given) instead of
    receiving GPTQ results on block grids."""

    def __init__(self, out: str | Path, scheme: str, *, split_max_size: int = 0, force: bool = False,
                 has_imatrix: bool = True, direct: bool = False, imatrix: Imatrix | None = None,
                 use_importance: bool = True, name: str | None = None, tokenizer: str | Path | None = None,
                 extra_metadata: dict[str, Any] | None = None, verify_data_max_bytes: int = 4 << 30):
        if scheme not in SCHEMES:
            raise Llama4QuantError(f"unknown GGUF scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        self.out = Path(out).expanduser().absolute()
        self.scheme = scheme
        self.split_max_size = split_max_size
        self.force = force
        self.has_imatrix = has_imatrix
        self.direct = direct
        self.imatrix = imatrix
        self.use_importance = use_importance
        self.name = name
        self.tokenizer = tokenizer
        self.extra = dict(extra_metadata or {})
        self.verify_data_max_bytes = verify_data_max_bytes
        self.writer: GGUFFileWriter | None = None
        self.source = None
        self.plan: dict[str, PlannedTensor] = {}
        self.grids: dict[QT, Any] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.no_stats: dict[str, list[int]] = {}
        self.warnings: list[str] = []
        self.files: list[Path] = []
        self.type_overrides: dict[str, str] | None = None  # canonical -> GGML type name (convert/fit.py)
        self.t0 = time.time()
        if not self.out.name.endswith(".gguf"):
            raise Llama4QuantError(f"{self.out}: the output file name must end in .gguf")
        check_destination(self.out, force)
        for f in existing_outputs(self.out):
            ok, why = ours(f)
            if not ok:
                raise Llama4QuantError(f"--force replaces only an earlier llama4-quant output: {why}; "
                                       "choose another OUT or remove it yourself")

    @property
    def artifact(self) -> Path:
        return self.out

    # -- pipeline.Exporter -----------------------------------------------------------------------------
    def prepare(self, source) -> None:
        if self.source is source and self.writer is not None:
            return
        self.source = source
        cfg = source.config
        check_expressible(cfg)
        self.tok = load_tokenizer_data(self.tokenizer or source.path, cfg)
        self.plan = {p.canonical or p.name: p for p in plan_tensors(cfg, self.scheme, self.has_imatrix)}
        for name, t in (self.type_overrides or {}).items():  # a --fit / --plan mix
            self.plan[name] = dataclasses.replace(self.plan[name], qtype=QT[t])
        # refuse an existing OUT before any expensive work
        self.writer = GGUFFileWriter(self.out, list(self.plan.values()), self.split_max_size, self.force,
                                     self.verify_data_max_bytes)
        w = compat_warning(cfg)
        if w:
            self.warnings.append(w)

    def grid_for(self, spec):
        """BlockGrid for a Linear in a k-quant/Q4_0/Q8_0 type; None (encoded here as llama.cpp would) otherwise,
        except that routed experts of a layer mixing grid and fallback types all get grids (RefGrid for the
        latter). Direct mode: always None."""
        if self.direct:
            return None
        p = self.plan[spec.name]
        if spec.role in ("embed", "norm", "router"):
            return None
        if p.qtype not in GRID_TYPES:
            if not p.n_experts:
                return None
            siblings = [self.plan[f"layers.{spec.layer}.experts.{k}"].qtype for k in ("gate", "up", "down")]
            if not any(t in GRID_TYPES for t in siblings):
                return None
        if p.qtype not in self.grids:
            self.grids[p.qtype] = grid_for_type(p.qtype, self.use_importance)
        return self.grids[p.qtype]

    def begin(self, source, plan) -> None:
        if self.writer is None:
            self.prepare(source)
        cfg = source.config
        sampling = generation_defaults(source.path)
        ftype = FTYPE_GUESSED if self.type_overrides else None
        self.writer.open(lambda gw: add_model_metadata(gw, cfg, self.tok, self.scheme, name=self.name or _model_name(source),
                                                        sampling=sampling, extra=self.extra, file_type=ftype))
        rf = self.plan.get("rope_freqs.weight")
        if rf is not None:
            self.writer.write(rf.name, rope_freqs_tensor(cfg))

    def runtime_weight(self, spec, result, grid) -> torch.Tensor:
        return result.weight  # already the float32 values llama.cpp decodes

    def runtime_rows(self, spec, rows: torch.Tensor) -> torch.Tensor:
        """The float32 values llama.cpp computes with for rows of a tensor this exporter encodes itself
        (write_tensor / write_rows: the embeddings): the rows encoded as they are written, and decoded. GGML types
        encode each row on its own, so any subset of rows decodes as it does in the file."""
        p = self.plan[spec.name]
        data = encode(rows, p.qtype, self._importance(spec.name, p, None))
        if p.qtype in gq.SUPPORTED_TYPES:
            values = gq.dequantize(data, p.qtype, tuple(rows.shape))
        else:
            from gguf.quants import dequantize as gguf_dequantize

            values = gguf_dequantize(data, p.qtype).reshape(tuple(rows.shape))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def encode_cost(self, spec) -> float:
        """Relative time per element this exporter takes to write `spec` unquantized by GPTQ (convert.clock):
        its type's search, with or without importance weights."""
        p = self.plan.get(spec.name) if self.plan else None
        if p is None:
            return 1.0
        if p.qtype in FLOAT_TYPES:
            return READ_NS + _FLOAT_NS
        plain, weighted = _ENCODE_NS.get(p.qtype, _OTHER_NS)
        return READ_NS + (weighted if self.imatrix is not None else plain)

    def write_tensor(self, spec, tensor: torch.Tensor) -> None:
        m = _EXPERT.match(spec.name)
        if m:
            key, expert = f"layers.{m.group(1)}.experts.{m.group(3)}", int(m.group(2))
        else:
            key, expert = spec.name, None
        p = self.plan[key]
        im = self._importance(key, p, expert)
        self.writer.write(p.name, encode(tensor, p.qtype, im), expert=expert)
        if p.qtype not in FLOAT_TYPES:
            if expert is None:
                self.records[key] = self._record(key, p, im is not None)
            elif expert == p.n_experts - 1:
                self.records[key] = self._record(key, p, self.imatrix is not None)

    def write_rows(self, spec, row0: int, rows: torch.Tensor) -> None:
        """Rows row0.. of a 2-D tensor the pipeline streams in blocks (the embeddings, the head without
        calibration); each block is encoded as write_tensor would encode the whole (GGML types quantize rows
        independently), so the bytes are the same."""
        p = self.plan[spec.name]
        im = self._importance(spec.name, p, None)
        self.writer.write_rows(p.name, row0, encode(rows, p.qtype, im))
        if p.qtype not in FLOAT_TYPES and row0 + rows.shape[0] == spec.shape[0]:
            self.records[spec.name] = self._record(spec.name, p, im is not None)

    def _importance(self, key: str, p: PlannedTensor, expert: int | None) -> np.ndarray | None:
        if self.imatrix is None or p.qtype in FLOAT_TYPES:
            return None
        im = self.imatrix.get(key, expert)
        if im is None and expert is not None:
            self.no_stats.setdefault(key, []).append(expert)
        return im

    def _record(self, key: str, p: PlannedTensor, weighted: bool) -> dict[str, Any]:
        no_stats = self.no_stats.get(key, [])
        rec: dict[str, Any] = {"method": "imatrix" if weighted else "rtn", "type": p.qtype.name}
        if p.qtype not in GRID_TYPES and weighted:
            rec["method"] = "rtn"
            rec["reason"] = f"{p.qtype.name} (a fallback type) has no importance-weighted quantizer here"
        if no_stats:
            rec["reason"] = f"experts {no_stats} saw no calibration tokens"
        return rec

    def write_quantized(self, spec, expert, result, grid) -> None:
        p = self.plan[spec.name]
        self.writer.write(p.name, pack_result(result.weight, result.params), expert=expert)

    def write_quantized_rows(self, spec, row0: int, result, grid) -> None:
        """Rows row0.. of a 2-D tensor quantized in row blocks (the calibrated head): GGML rows pack on their own."""
        self.writer.write_rows(self.plan[spec.name].name, row0, pack_result(result.weight, result.params))

    def end_layer(self, layer: int) -> None:
        pass

    def finish(self, report: dict[str, Any]) -> dict[str, Any]:
        if self.direct:
            report = self._direct_report(report)
        self.files = self.writer.commit()
        return self.manifest(report)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    # -- reporting --------------------------------------------------------------------------------------
    def _direct_report(self, report: dict[str, Any]) -> dict[str, Any]:
        quantized = any(p.qtype not in FLOAT_TYPES for p in self.plan.values())
        method = "imatrix" if self.imatrix is not None else ("rtn" if quantized else "none")
        fallbacks = {k: r["reason"] for k, r in self.records.items() if r.get("reason")}
        warnings = list(report.get("warnings", []))
        if fallbacks:
            warnings.append(f"{len(fallbacks)} tensor(s) quantized without importance data (no calibration tokens "
                            "reached them), as llama-quantize does without an imatrix")
        layers = [{"layer": l["layer"], "moe": l["moe"],
                   "tokens_per_expert": self.imatrix.tokens_per_expert(l["layer"]) if self.imatrix else None}
                  for l in report.get("layers", [])]  # imatrix runs: RTN, nothing calibrated, no router refit
        return {**report, "method": method, "tensors": dict(self.records), "layers": layers,
                "rtn_fallbacks": fallbacks, "warnings": warnings}

    def manifest(self, report: dict[str, Any]) -> dict[str, Any]:
        types: dict[str, dict[str, int]] = {}
        for p in self.plan.values():
            t = types.setdefault(p.qtype.name, {"tensors": 0, "bytes": 0})
            t["tensors"] += 1
            t["bytes"] += p.nbytes
        return {
            "format": "gguf",
            "scheme": self.scheme,
            "files": [str(f) for f in self.files],
            "total_bytes": sum(f.stat().st_size for f in self.files),
            "tensor_types": types,
            "tensors": {p.name: {"type": p.qtype.name, "shape": list(p.shape)} for p in self.plan.values()},
            **report,
            "warnings": list(report.get("warnings", [])) + [w for w in self.warnings if w not in report.get("warnings", [])],
        }

    def summary(self, manifest: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The `--json` summary of a finished conversion; writes the sidecar manifest beside the file."""
        layers = manifest.get("layers", [])
        flat = [n for l in layers for n in (l.get("tokens_per_expert") or [])]
        calib = manifest.get("calibration")
        out = {
            "output": manifest["files"][0],
            "files": manifest["files"],
            "format": "gguf",
            "scheme": manifest["scheme"],
            "method": manifest["method"],
            "total_bytes": manifest["total_bytes"],
            "tensor_types": manifest["tensor_types"],
            "quantized_tensors": len(manifest.get("tensors", {})),
            "rtn_fallbacks": manifest.get("rtn_fallbacks", {}),
            "calibration": None if not calib else {
                k: calib.get(k) for k in ("source", "samples", "seqlen", "seed", "tokens", "tokens_sha256")},
            "tokens_per_expert": {"min": min(flat), "max": max(flat),
                                  "zero_token_experts": sum(1 for n in flat if n == 0)} if flat else None,
            "layer_loss": [l.get("loss") for l in layers] if any(l.get("loss") is not None for l in layers) else None,
            "warnings": manifest.get("warnings", []),
            "seconds": round(seconds, 3),
            "timing": manifest.get("timing"),
            "rtn_guard": [l["rtn_guard"] for l in layers] if any("rtn_guard" in l for l in layers) else None,
            "router_refit": router_refits(layers),
        }
        out["manifest"] = str(write_sidecar(out))
        return out

    def manifest_path(self, summary: dict[str, Any]) -> Path:
        first = Path(summary["files"][0])
        return first.with_name(first.name + SIDECAR_SUFFIX)


def write_sidecar(summary: dict[str, Any]) -> Path:
    """`OUT.gguf.llama4-quant.json` beside the GGUF: the run's summary, tool version and the sha256 of every file
    (the GGUF itself carries its provenance as llama4_quant.* metadata). Written after the GGUF is complete."""
    first = Path(summary["files"][0])
    manifest = {"tool": "llama4-quant", "version": __version__, **summary,
                "sha256": {Path(f).name: sha256_file(Path(f)) for f in summary["files"]}}
    path = first.with_name(first.name + SIDECAR_SUFFIX)
    write_json_atomic(path, manifest)
    return path


def _model_name(source) -> str:
    return Path(str(source.path)).name or "llama4"


class GGUFFormat:
    """`--to gguf` for convert/run.py: llama.cpp GGUF files."""

    name = "gguf"
    default_scheme = "q4_k_m"
    schemes = SCHEMES
    methods = METHODS
    options = ("split_max_size", "imatrix_file")

    def resolve_method(self, scheme: str, o) -> str:
        if is_float_scheme(scheme):
            return "none"
        if o.imatrix_file is not None:
            if o.method not in ("auto", "imatrix"):
                raise Llama4QuantError(f"--imatrix is an importance matrix for --method imatrix, not {o.method}")
            return "imatrix"
        return o.method  # auto: gptq when calibration data can be had, else rtn (convert/run.py)

    def final_method(self, method: str, scheme: str) -> str:
        return "gptq" if method == "auto" else method

    def reads_calibration(self, method: str, o) -> bool:
        return method in ("auto", "gptq") or (method == "imatrix" and o.imatrix_file is None)

    def option_warnings(self, scheme: str, o) -> list[str]:
        if is_float_scheme(scheme) and o.method not in ("auto", "rtn"):
            return [f"--scheme {scheme} is not quantized: --method {o.method} has nothing to do"]
        return []

    def exporter(self, o, scheme: str, method: str) -> GGUFExporter:
        return GGUFExporter(o.out, scheme, split_max_size=o.split_max_size or 0, force=o.force,
                            name=o.name or Path(str(o.model)).name, tokenizer=o.tokenizer)

    def configure(self, exporter: GGUFExporter, o, method: str, calib_info: dict | None, is_hub_id: bool) -> None:
        exporter.has_imatrix = method in ("gptq", "imatrix")
        exporter.direct = method != "gptq"
        extra = {"llama4_quant.scheme": exporter.scheme, "llama4_quant.method": method}
        if is_hub_id:
            extra["general.source.repo_url"] = f"https://huggingface.co/{o.model}"
        if calib_info:
            extra["llama4_quant.calibration.source"] = calib_info.get("source")
            extra["llama4_quant.calibration.tokens"] = calib_info.get("tokens")
            extra["llama4_quant.calibration.tokens_sha256"] = calib_info.get("tokens_sha256")
        exporter.extra.update(extra)
