"""`convert --to gguf`: a checkpoint to a llama4 GGUF, by one of three methods (docs/gguf.md).

- ``rtn``: every tensor quantized exactly as ``llama-quantize`` quantizes it without an imatrix
  (bit-exact packers of :mod:`gguf_quants`); no data, no forward pass.
- ``imatrix``: what ``llama-imatrix`` + ``llama-quantize --imatrix`` do: one forward pass of the
  *unquantized* model over the calibration tokens collects, per Linear input column, the mean of x^2
  over tokens (per routed expert over the tokens routed to it, after the router scale, as llama.cpp
  feeds them); each tensor is then quantized with llama.cpp's importance-weighted searches.
- ``gptq``: the layer-wise calibration pipeline (convert/pipeline.py) with :class:`GGUFExporter`:
  every quantized Linear goes through GPTQ error feedback on its GGML block grid
  (:class:`gguf_grid.BlockGrid`: llama.cpp's scale search, weighted by the Hessian diagonal, on the
  error-compensated weights of each super-block), later layers calibrate on the quantized earlier
  ones, and the result is packed. Embeddings get llama.cpp's RTN (a lookup table has no inputs to
  calibrate on).

All three stream: one tensor (one expert) at a time goes from the reader to the file.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Llama4QuantError
from ..model.config import Llama4Config
from . import gguf_quants as gq
from .gguf_grid import GRID_TYPES, grid_for_type, pack_result
from .gguf_mix import BASE, SCHEMES
from .gguf_write import (GGUFFileWriter, PlannedTensor, add_model_metadata, check_expressible, compat_warning,
                         generation_defaults, load_tokenizer_data, plan_tensors, rope_freqs_tensor)
from .gguf_quants import QT

METHODS = ("gptq", "imatrix", "rtn")
_FLOAT = (QT.F32, QT.F16, QT.BF16)
_EXPERT = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.(gate|up|down)$")


def encode(w: torch.Tensor | np.ndarray, qtype: QT, imatrix: np.ndarray | None = None) -> np.ndarray:
    """GGML bytes of float weights [..., cols] in `qtype` (what llama-quantize writes for them)."""
    qtype = QT(qtype)
    if qtype in gq.SUPPORTED_TYPES:
        return gq.quantize(w, qtype, imatrix)
    # fallback types of the mix (Q4_1 / Q5_0 / Q5_1): gguf-py's reference quantizers, no imatrix
    from gguf.quants import quantize as gguf_quantize

    arr = w.detach().float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
    return gguf_quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


# ---------------------------------------------------------------------------------------------------
# importance matrix (llama-imatrix's statistic)
# ---------------------------------------------------------------------------------------------------

# observer name -> the canonical tensors it feeds
_FEEDS = {"attn_in": ("wq", "wk", "wv"), "wo": ("wo",), "shared.in": ("shared.gate", "shared.up", "router"),
          "shared.down": ("shared.down",), "mlp.in": ("mlp.gate", "mlp.up"), "mlp.down": ("mlp.down",)}


@dataclass
class Imatrix:
    """Per canonical Linear: sum of x^2 per input column and the token count; routed experts per expert."""

    sums: dict[str, torch.Tensor]  # [cols] or [E, cols] float64
    counts: dict[str, torch.Tensor]  # [] or [E] int64

    def get(self, canonical: str, expert: int | None = None) -> np.ndarray | None:
        """mean x^2 per column (None when no token reached it)."""
        s, c = self.sums.get(canonical), self.counts.get(canonical)
        if s is None:
            return None
        if expert is not None:
            s, c = s[expert], c[expert]
        if int(c) == 0:
            return None
        return (s / float(c)).float().numpy()

    def tokens_per_expert(self, layer: int) -> list[int] | None:
        c = self.counts.get(f"layers.{layer}.experts.gate")
        return None if c is None else [int(x) for x in c]


@torch.no_grad()
def collect_imatrix(source, tokens: torch.Tensor, device="cpu", dtype=torch.float32, batch_size: int = 4,
                    progress=None, include_output: bool = True) -> Imatrix:
    """One layer-wise forward pass of `source` over `tokens` [N, T], observing every Linear's input."""
    from ..model.forward import rms_norm
    from ..model.runner import LayerwiseRunner, release

    cfg: Llama4Config = source.config
    runner = LayerwiseRunner(source, device, dtype, batch_size, keep_experts=False)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def add(key: str, x: torch.Tensor, e: int | None = None, E: int = 0) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        if key not in sums:
            shape = (E, x2.shape[1]) if e is not None else (x2.shape[1],)
            sums[key] = torch.zeros(shape, dtype=torch.float64)
            counts[key] = torch.zeros(shape[:1] if e is not None else (), dtype=torch.long)
        sq = x2.pow(2).sum(0).cpu()
        if e is None:
            sums[key] += sq
            counts[key] += x2.shape[0]
        else:
            sums[key][e] += sq
            counts[key][e] += x2.shape[0]

    store = runner.embed(tokens)
    try:
        if progress is not None:
            progress.start(cfg.num_layers)
        for i in range(cfg.num_layers):
            if progress is not None:
                progress.layer_start(i, 0)
            p = f"layers.{i}."

            def observer(name: str, x: torch.Tensor, p=p) -> None:
                if name.startswith("experts."):
                    _, e, what = name.split(".")
                    add(p + ("experts.in" if what == "in" else "experts.down"), x, int(e), cfg.num_experts)
                else:
                    add(p + name, x)

            with runner.layer(i) as w:
                runner.forward_layer(i, w, store, observer=observer)
            release(source)
            if progress is not None:
                progress.layer_done(i)
        if include_output and not cfg.tie_word_embeddings:
            norm = source.read("norm").to(device, dtype)
            for sl in runner.batches(len(store)):
                add("output", rms_norm(store.get(sl, device, dtype), norm, cfg.rms_norm_eps))
    finally:
        store.close()
    out_s: dict[str, torch.Tensor] = {}
    out_c: dict[str, torch.Tensor] = {}
    for key, s in sums.items():
        if key == "output":
            out_s[key], out_c[key] = s, counts[key]
            continue
        if key.endswith(".experts.in"):
            base = key[: -len("experts.in")]
            for k in ("experts.gate", "experts.up"):
                out_s[base + k], out_c[base + k] = s, counts[key]
        elif key.endswith(".experts.down"):
            out_s[key], out_c[key] = s, counts[key]
        else:
            m = re.match(r"^(layers\.\d+\.)(.+)$", key)
            for tgt in _FEEDS.get(m.group(2), ()):
                out_s[m.group(1) + tgt], out_c[m.group(1) + tgt] = s, counts[key]
    return Imatrix(out_s, out_c)


def load_imatrix_file(path: str | Path, cfg: Llama4Config) -> Imatrix:
    """An importance matrix written by llama-imatrix (its GGUF format: `<tensor>.in_sum2` [E, cols] and
    `<tensor>.counts` [E] per matrix), keyed by our canonical names."""
    from gguf import GGUFReader

    from .gguf_mix import canonical_name

    path = Path(path)
    try:
        r = GGUFReader(str(path), "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on non-GGUF input
        raise Llama4QuantError(f"{path}: not a GGUF imatrix file ({e}); write it with llama-imatrix "
                               "--output-format gguf") from None
    kind = r.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise Llama4QuantError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')")
    data = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for name, arr in data.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        try:
            canon = canonical_name(base)
        except KeyError:
            continue
        c = data.get(base + ".counts")
        if c is None:
            raise Llama4QuantError(f"{path}: {base} has sums but no counts")
        experts = canon.split(".")[-2] == "experts" if canon.startswith("layers.") else False
        s = torch.from_numpy(arr.reshape(-1, arr.shape[-1]) if experts else arr.reshape(-1))
        cnt = torch.from_numpy(np.rint(c.reshape(-1)).astype(np.int64))
        if experts and s.shape[0] != cfg.num_experts:
            raise Llama4QuantError(f"{path}: {base} has {s.shape[0]} experts, the model {cfg.num_experts}")
        sums[canon] = s
        counts[canon] = cnt if experts else cnt.reshape(())
    if not sums:
        raise Llama4QuantError(f"{path}: no entries for this model's tensors")
    return Imatrix(sums, counts)


# ---------------------------------------------------------------------------------------------------
# the pipeline exporter (gptq)
# ---------------------------------------------------------------------------------------------------


class GGUFExporter:
    """convert/pipeline.py's Exporter for GGUF output (see the module docstring)."""

    def __init__(self, out: str | Path, scheme: str, *, split_max_size: int = 0, force: bool = False,
                 has_imatrix: bool = True, use_importance: bool = True, name: str | None = None,
                 tokenizer: str | Path | None = None,
                 extra_metadata: dict[str, Any] | None = None, verify_data_max_bytes: int = 4 << 30):
        if scheme not in SCHEMES:
            raise Llama4QuantError(f"unknown GGUF scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        self.out = Path(out).expanduser().absolute()
        self.scheme = scheme
        self.split_max_size = split_max_size
        self.force = force
        self.has_imatrix = has_imatrix
        self.use_importance = use_importance
        self.name = name
        self.tokenizer = tokenizer
        self.extra = dict(extra_metadata or {})
        self.verify_data_max_bytes = verify_data_max_bytes
        self.writer: GGUFFileWriter | None = None
        self.source = None
        self.plan: dict[str, PlannedTensor] = {}
        self.grids: dict[QT, Any] = {}
        self.warnings: list[str] = []
        self.files: list[Path] = []
        self.t0 = time.time()

    # -- pipeline.Exporter -----------------------------------------------------------------------------
    def prepare(self, source) -> None:
        if self.source is source and self.writer is not None:
            return
        self.source = source
        cfg = source.config
        check_expressible(cfg)
        self.tok = load_tokenizer_data(self.tokenizer or source.path, cfg)
        self.plan = {p.canonical or p.name: p for p in plan_tensors(cfg, self.scheme, self.has_imatrix)}
        # refuse an existing OUT before any expensive work
        self.writer = GGUFFileWriter(self.out, list(self.plan.values()), self.split_max_size, self.force,
                                     self.verify_data_max_bytes)
        w = compat_warning(cfg)
        if w:
            self.warnings.append(w)

    def grid_for(self, spec):
        """BlockGrid for a Linear in a k-quant/Q4_0/Q8_0 type; None (written as llama.cpp would) otherwise, except
        that routed experts of a layer mixing grid and fallback types all get grids (RefGrid for the latter)."""
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
        self.writer.open(lambda gw: add_model_metadata(gw, cfg, self.tok, self.scheme, name=self.name or _model_name(source),
                                                        sampling=sampling, extra=self.extra))
        rf = self.plan.get("rope_freqs.weight")
        if rf is not None:
            self.writer.write(rf.name, rope_freqs_tensor(cfg))

    def runtime_weight(self, spec, result, grid) -> torch.Tensor:
        return result.weight  # already the float32 values llama.cpp decodes

    def write_tensor(self, spec, tensor: torch.Tensor) -> None:
        m = _EXPERT.match(spec.name)
        if m:
            p = self.plan[f"layers.{m.group(1)}.experts.{m.group(3)}"]
            self.writer.write(p.name, encode(tensor, p.qtype), expert=int(m.group(2)))
            return
        p = self.plan[spec.name]
        self.writer.write(p.name, encode(tensor, p.qtype))

    def write_quantized(self, spec, expert, result, grid) -> None:
        p = self.plan[spec.name]
        self.writer.write(p.name, pack_result(result.weight, result.params), expert=expert)

    def end_layer(self, layer: int) -> None:
        pass

    def finish(self, report: dict[str, Any]) -> dict[str, Any]:
        self.files = self.writer.commit()
        return self.manifest(report)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    # -- reporting --------------------------------------------------------------------------------------
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


def _model_name(source) -> str:
    return Path(str(source.path)).name or "llama4"


# ---------------------------------------------------------------------------------------------------
# direct (rtn / imatrix / float) conversion
# ---------------------------------------------------------------------------------------------------


def convert_direct(source, exporter: GGUFExporter, imatrix: Imatrix | None = None, progress=None,
                   calib_info: dict | None = None) -> dict[str, Any]:
    """Stream every tensor of `source` through `encode` (with `imatrix` entries when given) into the exporter's file."""
    t0 = time.perf_counter()
    cfg: Llama4Config = source.config
    exporter.prepare(source)
    exporter.begin(source, [])
    records: dict[str, dict[str, Any]] = {}
    layers: list[dict[str, Any]] = []
    try:
        if progress is not None:
            progress.start(cfg.num_layers)
        current = -1
        for key, p in exporter.plan.items():
            if p.canonical is None:
                continue  # rope_freqs: written by begin
            layer = int(key.split(".")[1]) if key.startswith("layers.") else None
            if layer is not None and layer != current:
                if current >= 0:
                    _layer_done(exporter, progress, current)
                current = layer
                if progress is not None:
                    progress.layer_start(layer, p.n_experts or (cfg.num_experts if cfg.is_moe(layer) else 0))
                layers.append({"layer": layer, "moe": cfg.is_moe(layer),
                               "tokens_per_expert": imatrix.tokens_per_expert(layer) if imatrix else None})
            if layer is None and current >= 0:
                _layer_done(exporter, progress, current)
                current = -1
            quantized = p.qtype not in _FLOAT
            if p.n_experts:
                kind = key.rsplit(".", 1)[1]
                no_stats = []
                for e in range(p.n_experts):
                    im = imatrix.get(key, e) if (imatrix is not None and quantized) else None
                    if imatrix is not None and quantized and im is None:
                        no_stats.append(e)
                    exporter.writer.write(p.name, encode(source.read_expert(layer, kind, e), p.qtype, im), expert=e)
                    if progress is not None and kind == "down":
                        progress.expert_done(layer, e)
                if quantized:
                    records[key] = _record(p, imatrix is not None, no_stats)
            else:
                im = imatrix.get(key) if (imatrix is not None and quantized) else None
                exporter.writer.write(p.name, encode(source.read(key), p.qtype, im))
                if quantized:
                    records[key] = _record(p, im is not None, [])
        if current >= 0:
            _layer_done(exporter, progress, current)
        method = "imatrix" if imatrix is not None else ("rtn" if any(p.qtype not in _FLOAT for p in exporter.plan.values()) else "none")
        fallbacks = {k: r["reason"] for k, r in records.items() if r.get("reason")}
        warnings = []
        if fallbacks:
            warnings.append(f"{len(fallbacks)} tensor(s) quantized without importance data (no calibration tokens "
                            "reached them), as llama-quantize does without an imatrix")
        report = {"method": method, "calibration": calib_info, "tensors": records, "layers": layers,
                  "rtn_fallbacks": fallbacks, "warnings": warnings, "seconds": round(time.perf_counter() - t0, 3)}
        return exporter.finish(report)
    except BaseException:
        exporter.abort()
        raise


def _layer_done(exporter, progress, layer: int) -> None:
    from ..model.runner import release

    exporter.end_layer(layer)
    release(exporter.source)  # let the reader drop this layer's memory maps
    if progress is not None:
        progress.layer_done(layer)


def _record(p: PlannedTensor, weighted: bool, no_stats: list[int]) -> dict[str, Any]:
    rec: dict[str, Any] = {"method": "imatrix" if weighted else "rtn", "type": p.qtype.name}
    if p.qtype not in GRID_TYPES and weighted:
        rec["method"] = "rtn"
        rec["reason"] = f"{p.qtype.name} (a fallback type) has no importance-weighted quantizer here"
    if no_stats:
        rec["reason"] = f"experts {no_stats} saw no calibration tokens"
    return rec


# ---------------------------------------------------------------------------------------------------
# the whole command
# ---------------------------------------------------------------------------------------------------


def run_gguf_convert(model: str | Path, out: str | Path, *, scheme: str = "q4_k_m", method: str = "auto",
                     calib: str | None = None, calib_samples: int = 128, calib_seqlen: int = 2048, seed: int = 0,
                     split_max_size: int = 0, force: bool = False, act_order: bool = True, damp: float = 0.01,
                     moe_calibration: str = "routed", min_expert_tokens: int = 16, device: str = "auto",
                     dtype: str = "auto", batch_size: int = 4, hessian_memory: int = 8 << 30, progress=None,
                     source=None, name: str | None = None, imatrix_file: str | Path | None = None,
                     tokenizer: str | Path | None = None, heldout_out: list[int] | None = None) -> dict[str, Any]:
    """`convert MODEL OUT --to gguf` without Click; returns the summary dict (see docs/gguf.md).
    `heldout_out`, a list, receives the calibration tokens no sample holds (for --verify)."""
    from ..model.runner import resolve_device, resolve_dtype

    if scheme not in SCHEMES:
        raise Llama4QuantError(f"--to gguf: unknown --scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if method not in METHODS + ("auto",):
        raise Llama4QuantError(f"--to gguf: --method must be one of {', '.join(METHODS)} or auto")
    warnings: list[str] = []
    float_only = BASE[scheme] in _FLOAT
    if float_only:
        if method not in ("auto", "rtn"):
            warnings.append(f"--scheme {scheme} is not quantized: --method {method} has nothing to do")
        method = "none"
    if imatrix_file is not None and not float_only:
        if method not in ("auto", "imatrix"):
            raise Llama4QuantError(f"--imatrix is an importance matrix for --method imatrix, not {method}")
        method = "imatrix"
    reader = source
    if reader is None:
        from ..model.checkpoint import open_checkpoint

        reader = open_checkpoint(_resolve(model))
    cfg = reader.config
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)

    tokens = info = None
    if method in ("auto", "gptq") or (method == "imatrix" and imatrix_file is None):
        from ..calibration.dataset import load_calibration
        from ..calibration.documents import CalibrationError
        from ..model.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(tokenizer or reader.path, total_vocab=cfg.vocab_size)
            cs = load_calibration(calib, tok, calib_samples, calib_seqlen, seed)
            tokens, info = cs.tokens, cs.info
            if heldout_out is not None:
                heldout_out.extend(cs.heldout)
            warnings += [f"calibration: {w}" for w in info.get("warnings", [])]
            if method == "auto":
                method = "gptq"
        except (CalibrationError, Llama4QuantError) as e:
            if method != "auto" or calib is not None:
                raise
            warnings.append(f"no calibration data ({e}); falling back to --method rtn")
            method = "rtn"
    elif calib is not None and method in ("rtn", "imatrix"):
        warnings.append(f"--method {method} {'with --imatrix ' if imatrix_file else ''}uses no calibration data: "
                        "--calib ignored")

    has_imatrix = method in ("gptq", "imatrix")
    extra = {"llama4_quant.scheme": scheme, "llama4_quant.method": method}
    if source is None and not Path(str(model)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        extra["general.source.repo_url"] = f"https://huggingface.co/{model}"  # a Hub repo id
    if info:
        extra["llama4_quant.calibration.source"] = info.get("source")
        extra["llama4_quant.calibration.tokens"] = info.get("tokens")
        extra["llama4_quant.calibration.tokens_sha256"] = info.get("tokens_sha256")
    exporter = GGUFExporter(out, scheme, split_max_size=split_max_size, force=force, has_imatrix=has_imatrix,
                            name=name or Path(str(model)).name, extra_metadata=extra, tokenizer=tokenizer)
    t0 = time.perf_counter()
    if method == "gptq":
        from ..convert.pipeline import Pipeline, PipelineOptions
        from ..quant.gptq import GPTQConfig

        opts = PipelineOptions(method="gptq", gptq=GPTQConfig(damp=damp, act_order=act_order),
                               moe_calibration=moe_calibration, min_expert_tokens=min_expert_tokens, device=dev,
                               dtype=dt, batch_size=batch_size, hessian_budget_bytes=hessian_memory)
        pipe = Pipeline(reader, exporter, opts, progress)
        pipe.warnings.extend(warnings)
        manifest = pipe.run(tokens, info)
    else:
        imatrix = None
        if method == "imatrix":
            exporter.prepare(reader)  # fail fast (existing OUT, tokenizer) before the forward pass
            if imatrix_file is not None:
                imatrix = load_imatrix_file(imatrix_file, cfg)
                info = {"source": f"imatrix file {imatrix_file}"}
            else:
                imatrix = collect_imatrix(reader, tokens, dev, dt, batch_size, progress)
        manifest = convert_direct(reader, exporter, imatrix, progress, info)
        manifest["warnings"] = warnings + manifest["warnings"]
    manifest["method"] = method
    return summary(manifest, cfg, time.perf_counter() - t0)


def _resolve(model) -> Path:
    try:
        from ..hub.resolve import resolve_model
    except ImportError:
        return Path(model)
    return Path(resolve_model(str(model)))


def summary(manifest: dict[str, Any], cfg: Llama4Config, seconds: float) -> dict[str, Any]:
    layers = manifest.get("layers", [])
    flat = [n for l in layers for n in (l.get("tokens_per_expert") or [])]
    calib = manifest.get("calibration")
    return {
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
    }


__all__ = ["GGUFExporter", "Imatrix", "METHODS", "collect_imatrix", "convert_direct", "encode", "load_imatrix_file", "run_gguf_convert",
           "summary"]
