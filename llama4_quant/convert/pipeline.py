"""The sequential quantization pipeline, independent of the output format.

For each decoder layer i, in order:

  1. the calibration hidden states in the `ActivationStore` are what layers 0..i-1 *as quantized* produce;
  2. attention: if any of wq/wk/wv/wo is a target, one pass gathers their input Hessians through the forward's
     observer (`attn_in`, `wo`); they are quantized, written, and their runtime (dequantized) weights put into
     the layer with `LayerWeights.set`; a second pass computes h + attn(h) with them (in place);
  3. FFN input x = ffn_norm(h). Dense layers: one observed pass (`mlp.in`, `mlp.down`), quantize, then
     h <- h + mlp_q(x). MoE layers: one pass counts the tokens routed to every expert and gathers the shared
     expert's Hessians (`shared.in`, `shared.down`); the shared expert is quantized; then the routed experts go
     in chunks sized to `hessian_budget_bytes`: a pass gathers the chunk's per-expert Hessians from the tokens
     routed to each expert (`moe_calibration="all"`: from every token, scaled by that expert's own router
     score; statistics only, the forward stays exact), each expert is quantized and its Hessians freed at
     once, then a pass adds the quantized chunk's outputs to an accumulator store; finally
     h <- h + shared_q(x) + sum of experts;
  4. everything the layer holds is freed before the next one. Peak memory: one layer's weights, one chunk of
     expert Hessians, and two activation stores (which spill to disk above their budget).

An expert that saw fewer than `min_expert_tokens` tokens is quantized with RTN and MSE-optimal clipping
(int grids; fp8 grids use plain RTN), and the report says so. With `method="rtn"` nothing is calibrated and
no forward pass runs at all.

Output goes through an `Exporter` (see `Exporter` below), which picks a grid per canonical tensor (or None:
keep it as stored), receives every tensor, and publishes the result atomically in `finish`.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol

import torch
import torch.nn.functional as F

from ..errors import Llama4QuantError
from .clock import LayerClock, tail_share, tensor_work
from .distributed import Ranks
from ..model.checkpoint import CheckpointReader
from ..formats.gguf.imatrix import Imatrix
from ..model.config import Llama4Config
from ..model.forward import LayerWeights, attention_block, dense_block, rms_norm, route, swiglu
from ..model.tensors import ATTN, TensorSpec, tensor_specs
from ..model.runner import DEFAULT_SPILL_BYTES, ActivationStore, LayerwiseRunner, release
from ..model.readahead import Readahead
from ..quant.gptq import GPTQConfig, GPTQJob, gptq_batch, gptq_rows
from ..quant.grid import Grid, IntGrid
from ..quant.hessian import HessianAccumulator
from ..quant.router import RouterFit
from ..quant.rtn import QuantResult, hessian_loss, row_sample, rtn

# --targets vocabulary -> roles
TARGET_NAMES = {"experts": "experts", "shared": "shared", "mlp": "mlp", "attn": "attn", "lm_head": "head"}
DEFAULT_TARGETS = ("experts", "shared", "mlp")
RESIDUAL_WRITERS = ("wo", "shared.down", "mlp.down")  # non-expert Linears whose output joins the residual stream
ROW_BLOCK_ELEMENTS = 1 << 25  # the embeddings / head are streamed in blocks of about this many weights
_OBSERVED_BY = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "wo", "shared.gate": "shared.in",
                "shared.up": "shared.in", "shared.down": "shared.down", "mlp.gate": "mlp.in", "mlp.up": "mlp.in",
                "mlp.down": "mlp.down"}

# observer name -> the Linears whose input it sees (the router reads the same input as the shared expert)
_FEEDS: dict[str, tuple[str, ...]] = {}
for _t, _o in _OBSERVED_BY.items():
    _FEEDS[_o] = _FEEDS.get(_o, ()) + (_t,)
_FEEDS["shared.in"] += ("router",)


# ---------------------------------------------------------------------------------------------------------------
# what gets converted
@dataclass(frozen=True)
class Selection:
    """Which Linears to quantize: roles from `--targets` minus `--ignore` glob patterns.

    Patterns match canonical names (`layers.0.*`, `*.wo`, `layers.3.experts.*`) or, through `aliases`,
    a format's own module names. Router, norms and embeddings are never selected."""

    roles: frozenset[str] = frozenset(TARGET_NAMES[t] for t in DEFAULT_TARGETS)
    ignore: tuple[str, ...] = ()

    @classmethod
    def parse(cls, targets: Iterable[str] | None, ignore: Iterable[str] = ()) -> "Selection":
        names: list[str] = []
        for t in targets or DEFAULT_TARGETS:
            names += [x.strip() for x in t.split(",") if x.strip()]
        bad = [n for n in names if n not in TARGET_NAMES]
        if bad:
            raise Llama4QuantError(f"unknown --targets {bad[0]!r} (choose from {', '.join(TARGET_NAMES)})")
        return cls(frozenset(TARGET_NAMES[n] for n in names), tuple(ignore))

    def selects(self, spec: TensorSpec, aliases: Iterable[str] = ()) -> bool:
        if spec.role not in self.roles:
            return False
        names = [spec.name, *aliases]
        return not any(fnmatch.fnmatchcase(n, pat) for pat in self.ignore for n in names)


# ---------------------------------------------------------------------------------------------------------------
# the exporter interface
class Exporter(Protocol):
    """What the pipeline needs from an output format (convert/safetensors.py and convert/gguf.py hold the two).

    Call order: prepare(source) -> grid_for (every spec, before anything runs) -> begin(plan) -> write_tensor /
    write_quantized (spec order; within a MoE layer experts come expert by expert, gate/up/down each)
    with end_layer(i) after each layer -> finish(report), or abort() on any failure (also on Ctrl-C).

    Routed experts: grid_for sees one spec per kind (`layers.N.experts.gate`, num_experts = E) and its grid applies
    to every expert; write_quantized then gets that spec with `expert` = e. Experts kept unquantized arrive through
    write_tensor as specs named `layers.N.experts.E.gate` (role "experts", num_experts 0), one per expert.
    `report` (finish) holds per-tensor QuantRecords (+ rel_loss, grid), per-layer stats incl. tokens per expert,
    the calibration info and warnings; the exporter adds its own (files, hashes) and publishes atomically."""

    def prepare(self, source: CheckpointReader) -> None:
        """Learn the source (naming, dtype) before grids are chosen."""
        ...

    def grid_for(self, spec: TensorSpec) -> Grid | None:
        """The grid to quantize this tensor onto, or None to keep it as stored."""
        ...

    def begin(self, source: CheckpointReader, plan: list[tuple[TensorSpec, Grid | None]]) -> None: ...

    def runtime_weight(self, spec: TensorSpec, result: QuantResult, grid: Grid) -> torch.Tensor:
        """The weight the runtime will actually compute with (e.g. dequantized in bf16); feeds later layers."""
        ...

    def write_tensor(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        """An unquantized tensor, exactly as the source stores it."""
        ...

    def write_quantized(self, spec: TensorSpec, expert: int | None, result: QuantResult, grid: Grid) -> None: ...

    def end_layer(self, layer: int) -> None: ...

    def finish(self, report: dict[str, Any]) -> Any: ...

    def abort(self) -> None: ...


class Progress:
    """Progress sink (no-op); the CLI's draws rich bars."""

    def start(self, num_layers: int, tokens: int = 0) -> None:
        """`tokens`: calibration tokens each layer processes (0: none, no forward pass)."""

    def layer_start(self, layer: int, num_experts: int) -> None: ...

    def expert_done(self, layer: int, e: int) -> None: ...

    def layer_done(self, layer: int, eta: float | None = None) -> None:
        """`eta`: estimated seconds left (convert.clock)."""

    def status(self, text: str) -> None: ...


@dataclass
class PipelineOptions:
    method: str = "gptq"  # gptq | rtn
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    moe_calibration: str = "routed"  # routed | all
    min_expert_tokens: int = 16
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32  # forward compute dtype
    batch_size: int = 4
    hessian_budget_bytes: int | None = None  # None: 8 GiB on a GPU, 3 GiB on a CPU (see chunk_budget)
    spill_bytes: int = DEFAULT_SPILL_BYTES
    gptq_experts: int = 0  # routed experts per batched GPTQ loop; 0: auto (1 on a CPU, the whole chunk on a GPU)
    router_aware: bool | None = None  # shape residual writers' error away from the later routers: None (auto) on
    #                                   int grids, True on GGUF's linear grids too, False off (docs/quality.md)
    router_max_bits: int = 4  # ... of at most this many bits (at 8 bits it gained nothing: docs/quality.md)
    refit_router: bool = True  # GPTQ: refit each (unquantized) router to the quantized stream (quant/router.py)

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise Llama4QuantError(f"--method must be gptq or rtn, got {self.method!r}")
        if self.moe_calibration not in ("routed", "all"):
            raise Llama4QuantError(f"--moe-calibration must be routed or all, got {self.moe_calibration!r}")


# ---------------------------------------------------------------------------------------------------------------
def mse_variant(grid: Grid) -> Grid:
    """The same grid with MSE-optimal clipping, where the grid has such a search (int grids)."""
    if isinstance(grid, IntGrid) and not grid.mse:
        return IntGrid(grid.scheme, grid.scale_dtype, mse=True)
    return grid


def describe_grid(grid: Grid | None) -> str | None:
    if grid is None:
        return None
    scheme = getattr(grid, "scheme", None)
    text = repr(scheme) if scheme is not None else type(grid).__name__
    return text + ("+mse" if getattr(grid, "mse", False) else "")


def _inject(layer: int, path_hint: str = "") -> None:
    """Test hook: LLAMA4_QUANT_INJECT=KIND@LAYER[@RANK] with KIND error | enospc | kill | term."""
    spec = os.environ.get("LLAMA4_QUANT_INJECT", "")
    if not spec or "@" not in spec:
        return
    kind, at, *rank = spec.split("@")
    if int(at) != layer or (rank and rank[0] != os.environ.get("RANK", "0")):
        return
    if kind == "error":
        raise Llama4QuantError(f"injected failure after layer {layer}")
    if kind == "enospc":
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path_hint or None)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)


class Pipeline:
    def __init__(self, source: CheckpointReader, exporter: Exporter, options: PipelineOptions | None = None,
                 progress: Progress | None = None, ranks: Ranks | None = None):
        self.source = source
        self.ranks = ranks or Ranks()  # expert-parallel runs (convert/distributed.py): rank e % N owns expert e
        self.cfg: Llama4Config = source.config
        self.exporter = exporter
        self.opt = options or PipelineOptions()
        self.progress = progress or Progress()
        self.device = torch.device(self.opt.device)
        self.records: dict[str, dict[str, Any]] = {}
        self.layers: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.clock = LayerClock(self.cfg.num_layers)  # run() sets the head's share

    # -- small helpers -----------------------------------------------------------------------------------------
    def _batches(self, n: int):
        for s in range(0, n, self.opt.batch_size):
            yield slice(s, min(n, s + self.opt.batch_size))

    def _quantize(self, spec: TensorSpec, name: str, weight: torch.Tensor, grid: Grid,
                  acc: HessianAccumulator | None, expert_fallback: str = "") -> QuantResult:
        """GPTQ against acc's Hessian, or RTN (method rtn, no statistics, or an under-fed expert).

        GPTQ also rounds the same grid to nearest and keeps whichever has the lower Hessian loss (quant/gptq.py,
        `rtn_guard`): the record's `method` says which was written, `reason` why, and `gptq_loss` / `rtn_loss`
        (with `rel_gptq_loss` / `rel_rtn_loss`, relative to the unquantized output energy) give both."""
        return self._quantize_jobs([[(name, weight)]], grid, [acc], expert_fallback)[name]

    def _quantize_jobs(self, jobs: list[list[tuple[str, torch.Tensor]]], grid: Grid,
                       accs: list[HessianAccumulator | None], expert_fallback: str = "",
                       metric: torch.Tensor | None = None) -> dict[str, QuantResult]:
        """Several Linears on one grid, {name: result}: jobs[j] are the (name, weight) pairs that read the input
        accs[j] observed (one Hessian, one factorisation); the GPTQ jobs run in one batched column loop
        (quant.gptq.gptq_batch). `metric`: the output directions the later routers read, for Linears that write
        the residual stream (router_metric). Records as _quantize describes."""
        t0 = time.perf_counter()
        out: dict[str, QuantResult] = {}
        gptq_jobs, gptq_names = [], []
        by_name: dict[str, tuple[torch.Tensor, HessianAccumulator | None]] = {}
        for pairs, acc in zip(jobs, accs):
            ws = [w.to(self.device, torch.float32) for _, w in pairs]
            by_name.update({name: (w, acc) for (name, _), w in zip(pairs, ws)})
            if expert_fallback or not (self.opt.method == "gptq" and acc is not None):
                for (name, _), w in zip(pairs, ws):
                    if expert_fallback:
                        res = rtn(w, mse_variant(grid), reason=expert_fallback)
                        res.record.n_tokens = acc.n_tokens if acc is not None else 0
                    else:
                        res = rtn(w, grid)
                    out[name] = res
                continue
            gptq_jobs.append(GPTQJob(ws, acc.hessian, acc.n_tokens, out_metrics=None if metric is None else
                                     [metric] * len(ws)))
            gptq_names.append([name for name, _ in pairs])
        if gptq_jobs:
            for names, results in zip(gptq_names, gptq_batch(gptq_jobs, grid, self.opt.gptq)):
                out.update(zip(names, results))
        seconds = (time.perf_counter() - t0) / max(1, len(out))
        for name, result in out.items():
            w, acc = by_name[name]
            self._record(name, w, grid, acc, result, expert_fallback, seconds)
        return out

    def _record(self, name: str, weight: torch.Tensor, grid: Grid, acc: HessianAccumulator | None,
                result: QuantResult, expert_fallback: str, seconds: float) -> None:
        rec = asdict(result.record)
        rec["seconds"] = seconds
        rec["grid"] = describe_grid(grid if not expert_fallback else mse_variant(grid))
        if rec.get("loss_kind") == "hessian" and acc is not None:
            ref = output_energy(weight.to(self.device, torch.float32), acc.hessian.to(self.device))
            rec["rel_loss"] = rec["loss"] / ref if ref > 0 else None
            for k in ("gptq_loss", "rtn_loss"):
                if rec.get(k) is not None:
                    rec["rel_" + k] = rec[k] / ref if ref > 0 else None
        if self.opt.method == "gptq" and acc is None and not expert_fallback:
            rec["reason"] = rec.get("reason") or "no calibration statistics"
        self.records[name] = rec

    def _emit(self, spec: TensorSpec, expert: int | None, result: QuantResult, grid: Grid,
              runtime: bool = False) -> torch.Tensor | None:
        """Hand a result to the exporter; with `runtime`, return the weight later forwards compute with."""
        self.exporter.write_quantized(spec, expert, result, grid)
        return self.exporter.runtime_weight(spec, result, grid) if runtime else None

    # -- main --------------------------------------------------------------------------------------------------
    def run(self, calib_tokens: torch.Tensor | None = None, calib_info: dict | None = None) -> Any:
        t_start = time.perf_counter()
        specs = tensor_specs(self.cfg)
        self.exporter.prepare(self.source)
        plan = [(s, self.exporter.grid_for(s)) for s in specs]
        grids = {s.name: g for s, g in plan}
        by_name = {s.name: s for s in specs}
        calibrate = self.opt.method == "gptq" and any(g is not None for g in grids.values())
        if calibrate and calib_tokens is None:
            raise Llama4QuantError("GPTQ needs calibration tokens")
        works, tail = _work(plan, calibrate, self._descends, getattr(self.exporter, "encode_cost", lambda spec: 1.0))
        self.clock = LayerClock(self.cfg.num_layers, tail, works=works)
        store = None
        self.reference = None  # the unquantized model's calibration stream (refit_router)
        self._ref_ffn: ActivationStore | None = None  # ... its FFN output of the MoE layer being converted
        self._ref_router: torch.Tensor | None = None  # ... and that layer's original router
        ahead = Readahead()
        try:
            # one sequential stream on the disk: the embedding table (which this thread reads next, and then
            # quantizes while the read-ahead goes on to layer 0), then layer 0
            self._read_ahead(ahead, "embeddings")
            self._read_ahead(ahead, 0)
            self.exporter.begin(self.source, plan)
            self.progress.start(self.cfg.num_layers, int(calib_tokens.numel()) if calibrate else 0)
            self._embeddings(by_name["tok_embeddings"], grids.get("tok_embeddings"))
            if calibrate:
                self.progress.status("embedding calibration tokens")
                runner = LayerwiseRunner(self.source, self.device, self.opt.dtype, self.opt.batch_size,
                                         keep_experts=False, spill_bytes=self.opt.spill_bytes)
                rows, inverse = runner.embedding_rows(calib_tokens)
                if self.opt.refit_router and any(self.cfg.is_moe(i) for i in range(self.cfg.num_layers)):
                    self.reference = runner.fill(rows, inverse)
                # the quantized stream starts from the embeddings the runtime computes with (GGUF quantizes the
                # table: q4_k_m's token_embd is Q4_K), so layer 0 is calibrated on the inputs it will get
                store = runner.fill(self._runtime_embeddings(by_name["tok_embeddings"], rows), inverse)
                del rows, inverse
            self._release_source()  # the embedding table's pages, where a reader maps them
            for i in range(self.cfg.num_layers):
                self._read_ahead(ahead, i + 1 if i + 1 < self.cfg.num_layers else None)
                self._layer(i, store, grids, by_name)
                self.exporter.end_layer(i)
                self._release_source()
                _inject(i)
            self.exporter.write_tensor(by_name["norm"], self.source.read("norm"))
            if "output" in by_name:
                self._head(by_name["output"], grids.get("output"), store)
            report = self._report(calib_info, time.perf_counter() - t_start)
            result = self.exporter.finish(report)
        except BaseException:
            self.exporter.abort()
            raise
        finally:
            ahead.close()
            for s in (store, self.reference, self._ref_ffn):
                if s is not None:
                    s.close()
            self.reference = self._ref_ffn = None
        return result

    def _read_ahead(self, ahead: Readahead, layer: int | str | None) -> None:
        """Have the disk read decoder layer `layer` (None: the head; "embeddings": the embedding table) while
        this process works on what comes before it."""
        ranges = getattr(self.source, "file_ranges", None)
        if ranges is not None:
            ahead.want(ranges(layer))

    def _release_source(self) -> None:
        release(self.source)

    def _write_plain_or_rtn(self, spec: TensorSpec, tensor: torch.Tensor, grid: Grid | None) -> None:
        if grid is None:
            self.exporter.write_tensor(spec, tensor)
        else:
            self._emit(spec, None, self._quantize(spec, spec.name, tensor, grid, None), grid)

    def _in_row_blocks(self, spec: TensorSpec, name: str) -> bool:
        """Stream a 2-D tensor to an exporter that encodes row blocks itself (``write_rows``): memory stays
        at one block instead of the whole table (202,048 x 5,120 for Scout: 2 GB in bf16, 4 GB as float32)."""
        write_rows = getattr(self.exporter, "write_rows", None)
        if write_rows is None:
            return False
        rows = spec.shape[0]
        step = max(1, ROW_BLOCK_ELEMENTS // spec.shape[1])
        for r0 in range(0, rows, step):
            write_rows(spec, r0, self.source.read_rows(name, r0, min(rows, r0 + step)))
        return True

    def _embeddings(self, spec: TensorSpec, grid: Grid | None) -> None:
        if grid is None and self._in_row_blocks(spec, "tok_embeddings"):
            return
        self._write_plain_or_rtn(spec, self.source.read("tok_embeddings"), grid)

    def _runtime_embeddings(self, spec: TensorSpec, rows: torch.Tensor) -> torch.Tensor:
        """Embedding rows as the output's runtime computes with them: encoded by the exporter itself where it
        quantizes the table (`runtime_rows`: GGUF's types), else as stored (no format quantizes the embeddings
        through a grid: Selection never selects them)."""
        runtime_rows = getattr(self.exporter, "runtime_rows", None)
        return rows if runtime_rows is None else runtime_rows(spec, rows).float()

    def _head(self, spec: TensorSpec, grid: Grid | None, store: ActivationStore | None) -> None:
        if grid is None and self._in_row_blocks(spec, "output"):
            return
        if grid is None:
            self.exporter.write_tensor(spec, self.source.read("output"))
            return
        acc = None
        if store is not None and self.opt.method == "gptq":
            acc = HessianAccumulator(self.cfg.hidden_size, self.device)
            norm = self.source.read("norm").to(self.device, self.opt.dtype)
            with torch.no_grad():
                for sl in self._batches(len(store)):
                    h = store.get(sl, self.device, self.opt.dtype)
                    acc.add(rms_norm(h, norm, self.cfg.rms_norm_eps))
        if acc is not None and hasattr(self.exporter, "write_quantized_rows"):
            self._head_in_row_blocks(spec, grid, acc)
            return
        self._emit(spec, None, self._quantize(spec, "output", self.source.read("output"), grid, acc), grid)

    def _head_in_row_blocks(self, spec: TensorSpec, grid: Grid, acc: HessianAccumulator) -> None:
        """GPTQ of the calibrated head in row blocks against one factor of its Hessian (quant.gptq.gptq_rows),
        each block packed and written as it is done: memory stays at one block of the 202,048 x 5,120 table. One
        record for the tensor: losses summed over the blocks, the RTN guard decided per block."""
        t0 = time.perf_counter()
        rows = spec.shape[0]
        step = max(1, ROW_BLOCK_ELEMENTS // spec.shape[1])
        starts = list(range(0, rows, step))
        sums = {"loss": 0.0, "gptq_loss": 0.0, "rtn_loss": 0.0, "ref": 0.0}

        def blocks():
            for r0 in starts:
                block = self.source.read_rows("output", r0, min(rows, r0 + step)).to(self.device, torch.float32)
                sums["ref"] += output_energy(block, acc.hessian)
                yield block

        methods: list[str] = []
        sampled: list[int] = []  # rows each block's RTN loss was measured on
        first: dict[str, Any] | None = None
        for r0, res in zip(starts, gptq_rows(blocks(), acc.hessian, grid, self.opt.gptq, acc.n_tokens)):
            rec = res.record
            first = first or asdict(rec)
            methods.append(rec.method)
            sums["loss"] += rec.loss
            sums["gptq_loss"] += rec.gptq_loss if rec.gptq_loss is not None else rec.loss
            sums["rtn_loss"] += rec.rtn_loss if rec.rtn_loss is not None else rec.loss
            sampled.append(rec.rtn_rows if rec.rtn_rows is not None else res.weight.shape[0])
            self.exporter.write_quantized_rows(spec, r0, res, grid)
            del res
        assert first is not None
        rec = dict(first)
        kept = methods.count("rtn")
        rec.update(method="gptq" if kept < len(methods) else "rtn", loss=sums["loss"],
                   seconds=time.perf_counter() - t0, grid=describe_grid(grid), row_blocks=len(methods),
                   rtn_rows=sum(sampled) if sum(sampled) < rows else None)
        if first.get("gptq_loss") is not None:
            rec.update(gptq_loss=sums["gptq_loss"], rtn_loss=sums["rtn_loss"])
        if 0 < kept < len(methods):
            rec["reason"] = f"{kept} of {len(methods)} row blocks kept RTN (lower Hessian loss than GPTQ's)"
        if rec.get("loss_kind") == "hessian" and sums["ref"] > 0:
            for k in ("loss", "gptq_loss", "rtn_loss"):
                if rec.get(k) is not None:
                    rec["rel_" + k] = rec[k] / sums["ref"]
        self.records["output"] = rec

    # -- one decoder layer -------------------------------------------------------------------------------------
    def _layer(self, i: int, store: ActivationStore | None, grids: dict, by_name: dict) -> None:
        cfg, opt = self.cfg, self.opt
        t0 = time.perf_counter()
        moe = cfg.is_moe(i)
        self.clock.layer_start()
        self.progress.layer_start(i, cfg.num_experts if moe else 0)
        p = f"layers.{i}."
        info: dict[str, Any] = {"layer": i, "moe": moe}
        targets = self._reference_start(i) if store is not None and self.reference is not None else None
        w = LayerWeights(self.source, i, self.device, opt.dtype, keep_experts=False)
        try:
            self.exporter.write_tensor(by_name[p + "attn_norm"], self.source.read(p + "attn_norm"))
            self._linears(i, store, w, [n for n in ATTN], grids, by_name, self._observe_attention)
            if store is not None:
                self._apply(store, lambda h: h + attention_block(cfg, i, w, rms_norm(h, w.get("attn_norm"), cfg.rms_norm_eps)))
            self.exporter.write_tensor(by_name[p + "ffn_norm"], self.source.read(p + "ffn_norm"))
            if moe:
                router, ffn_in = self.source.read(p + "router"), None
                if targets is not None:
                    router, ffn_in = self._refit_router(i, store, w, router, targets, info)
                    del targets
                self.exporter.write_tensor(by_name[p + "router"], router)
                self._moe(i, store, w, grids, by_name, info, ffn_in)
            else:
                self._linears(i, store, w, ["mlp.gate", "mlp.up", "mlp.down"], grids, by_name, self._observe_dense)
                if store is not None:
                    self._apply(store, lambda h: h + dense_block(w, self._ffn_in(w, h)))
        finally:
            w.free()
        recs = {k: v for k, v in self.records.items() if k.startswith(p)}
        losses = [r["loss"] for r in recs.values() if r.get("loss_kind") == "hessian"]
        rels = [r["rel_loss"] for r in recs.values() if r.get("rel_loss") is not None]
        info.update(seconds=round(time.perf_counter() - t0, 3), quantized=len(recs),
                    loss=sum(losses) if losses else None, rel_loss_mean=(sum(rels) / len(rels)) if rels else None,
                    rtn_fallbacks=sorted(k[len(p):] for k, r in recs.items()
                                         if r["method"] == "rtn" and opt.method == "gptq"))
        if opt.method == "gptq":  # how the RTN guard decided: on a sample of rows, or exactly on all of them
            info["rtn_guard"] = {
                "sampled": sum(1 for r in recs.values() if r.get("rtn_rows") is not None),
                "exact": sum(1 for r in recs.values() if r.get("rtn_rows") is None and r.get("rtn_loss") is not None)}
        self.layers.append(info)
        self.progress.layer_done(i, self.clock.layer_done())

    # -- the router refit ------------------------------------------------------------------------------------------
    def _reference_start(self, i: int) -> torch.Tensor | None:
        """Advance the unquantized model's calibration stream (self.reference) through layer i's attention with the
        source's weights, and through its FFN if dense. For a MoE layer, return the router logits the unquantized
        model computes ([N, T, E] float32, on the host: the router refit's targets) and start its FFN output
        (self._ref_ffn) with the shared expert's; the routed experts add theirs in `_expert_chunk`, from the weights
        read there for GPTQ's statistics (no second read of an expert), and `_reference_finish` adds it all."""
        cfg, opt = self.cfg, self.opt
        ref = self.reference
        N, T, H = ref.shape
        w = LayerWeights(self.source, i, self.device, opt.dtype, keep_experts=False)
        try:
            self._apply(ref, lambda h: h + attention_block(cfg, i, w, rms_norm(h, w.get("attn_norm"), cfg.rms_norm_eps)))
            if not cfg.is_moe(i):
                self._apply(ref, lambda a: a + dense_block(w, self._ffn_in(w, a)))
                return None
            E = cfg.num_experts
            logits = torch.empty(N, T, E, dtype=torch.float32)
            self._ref_ffn = ActivationStore(N, T, H, spill_bytes=opt.spill_bytes)
            self._ref_router = w.get("router")
            with torch.no_grad():
                for sl in self._batches(N):
                    x2 = self._ffn_in(w, ref.get(sl, self.device, opt.dtype)).reshape(-1, H)
                    logits[sl] = F.linear(x2, self._ref_router).float().view(-1, T, E).cpu()
                    self._ref_ffn.put(sl, swiglu(x2, w.get("shared.gate"), w.get("shared.up"),
                                                 w.get("shared.down")).view(-1, T, H))
            return logits
        finally:
            w.free()

    def _reference_experts(self, w: LayerWeights, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """Add the routed experts `weights` ({expert: source weights}, this rank's share of a chunk) to the
        unquantized stream's FFN output, routed by the original router."""
        mats = {e: [m[k].to(self.device, self.opt.dtype) for k in ("gate", "up", "down")] for e, m in weights.items()}
        self._add_routed(w, self.reference, self._ref_ffn, mats, self._ref_router)

    def _add_routed(self, w: LayerWeights, store: ActivationStore, acc: ActivationStore,
                    mats: dict[int, list[torch.Tensor]], router: torch.Tensor | None = None) -> None:
        """acc += the output of the routed experts `mats` ({expert: [gate, up, down]}) for the tokens of `store`
        (states before the FFN) routed to them, by the layer's router or `router`. Expert-parallel: `mats` is this
        rank's share, and the ranks' parts are summed (top-1 routing: every token gets one expert's output and
        zeros, so the sum is exact)."""
        cfg, opt, ranks = self.cfg, self.opt, self.ranks
        H = cfg.hidden_size
        with torch.no_grad():
            for sl in self._batches(len(store)):
                h = store.get(sl, self.device, opt.dtype)
                x2 = self._ffn_in(w, h).reshape(-1, H)
                idx, scale = route(cfg, w, x2, router)
                y = acc.get(sl, self.device, opt.dtype).reshape(-1, H)
                part = torch.zeros_like(y) if ranks.active else y
                for e, m in mats.items():
                    tok, slot = torch.nonzero(idx == e, as_tuple=True)
                    if tok.numel():
                        part.index_add_(0, tok, swiglu(x2[tok] * scale[tok, slot][:, None], *m))
                if ranks.active:
                    ranks.all_sum(part)
                    y = y + part
                acc.put(sl, y.view(h.shape))

    def _reference_finish(self) -> None:
        """The unquantized stream past the MoE layer: its post-attention state plus the FFN output gathered."""
        ref, out = self.reference, self._ref_ffn
        for sl in self._batches(len(ref)):
            ref.put(sl, ref.get(sl, self.device, self.opt.dtype) + out.get(sl, self.device, self.opt.dtype))
        out.close()
        self._ref_ffn = self._ref_router = None

    def _refit_router(self, i: int, store: ActivationStore, w: LayerWeights, router: torch.Tensor,
                      targets: torch.Tensor, info: dict) -> tuple[torch.Tensor, HessianAccumulator]:
        """Layer i's router refitted (quant.router) so that on the quantized stream (store: after layer i's
        quantized attention) it gives the logits the unquantized model gives on its own stream (`targets`). The
        refit, in the source's dtype, replaces the router in `w` and is what gets written; it is kept only if it
        fits the calibration logits better than the original (it always should; rounding to the dtype aside).
        Also returns the Hessian of the FFN input it accumulated: the shared expert's gate/up read that input, so
        their GPTQ takes it instead of a second pass (the same batches in the same order: the same matrix)."""
        cfg = self.cfg
        H, E = cfg.hidden_size, cfg.num_experts
        fit = RouterFit(H, E, self.device)
        with torch.no_grad():
            for sl in self._batches(len(store)):
                fit.add(self._ffn_in(w, store.get(sl, self.device, self.opt.dtype)).reshape(-1, H),
                        targets[sl].to(self.device))
        new = fit.solve(router.to(self.device)).to(router.dtype).cpu()
        before, after = fit.error(router), fit.error(new)
        kept = after < before
        energy = max(fit.c, 1e-30)
        info["router_refit"] = {"kept": kept, "tokens": fit.n_tokens,
                                "rel_change": float((new.float() - router.float()).norm()
                                                    / router.float().norm().clamp_min(1e-30)),
                                "rel_logit_error_before": before / energy, "rel_logit_error_after": after / energy}
        if not kept:
            return router, fit.inputs
        w.set("router", new)
        return new, fit.inputs

    def _ffn_in(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, w.get("ffn_norm"), self.cfg.rms_norm_eps)

    def _apply(self, store: ActivationStore, fn) -> None:
        """h <- fn(h) for every batch of the store (in place)."""
        with torch.no_grad():
            for sl in self._batches(len(store)):
                store.put(sl, fn(store.get(sl, self.device, self.opt.dtype)))

    def _observe(self, store: ActivationStore, run_batch, wanted: set[str], widths: dict[str, int]) -> dict[str, HessianAccumulator]:
        accs = {k: HessianAccumulator(widths[k], self.device) for k in wanted}

        def observer(name: str, x: torch.Tensor) -> None:
            acc = accs.get(name)
            if acc is not None:
                acc.add(x)

        with torch.no_grad():
            for sl in self._batches(len(store)):
                run_batch(store.get(sl, self.device, self.opt.dtype), observer)
        return accs

    def _observe_attention(self, i, w, store, wanted):
        cfg = self.cfg
        return self._observe(store, lambda h, obs: attention_block(cfg, i, w, rms_norm(h, w.get("attn_norm"), cfg.rms_norm_eps), obs),
                             wanted, {"attn_in": cfg.hidden_size, "wo": cfg.q_dim})

    def _observe_dense(self, i, w, store, wanted):
        cfg = self.cfg
        return self._observe(store, lambda h, obs: dense_block(w, self._ffn_in(w, h), obs), wanted,
                             {"mlp.in": cfg.hidden_size, "mlp.down": cfg.intermediate_size_mlp})

    def _linears(self, i, store, w, locals_: list[str], grids, by_name, observe) -> None:
        """Quantize (or pass through) a group of non-expert Linears that one observed pass feeds."""
        p = f"layers.{i}."
        targets = [n for n in locals_ if grids.get(p + n) is not None]
        accs: dict[str, HessianAccumulator] = {}
        if store is not None and targets and self.opt.method == "gptq":
            accs = observe(i, w, store, {_OBSERVED_BY[n] for n in targets})
        self._quantize_group(i, w, locals_, grids, by_name, accs, calibrate=store is not None)

    def _quantize_group(self, i, w, locals_: list[str], grids, by_name, accs, calibrate: bool) -> None:
        """Write each of a layer's non-expert tensors, quantized with its Hessian when it has a grid (Linears that
        read the same input on the same grid share one GPTQ job: q/k/v, gate/up); when calibrating, the quantized
        weight replaces the original for the next layers' activations."""
        p = f"layers.{i}."
        jobs: dict[tuple[str, str], list[str]] = {}
        for n in locals_:
            if grids.get(p + n) is not None:
                jobs.setdefault((_OBSERVED_BY[n], repr(grids[p + n])), []).append(n)
        results: dict[str, QuantResult] = {}
        by_grid: dict[str, list[tuple[str, list[str]]]] = {}
        for (obs, g), names in jobs.items():
            by_grid.setdefault(g, []).append((obs, names))
        for g, group in by_grid.items():
            grid = grids[p + group[0][1][0]]
            for writes, part in ((True, [g for g in group if g[1][0] in RESIDUAL_WRITERS]),
                                 (False, [g for g in group if g[1][0] not in RESIDUAL_WRITERS])):
                if not part:
                    continue
                got = self._quantize_jobs([[(by_name[p + n].name, w.get(n)) for n in names] for _, names in part],
                                          grid, [accs.get(obs) for obs, _ in part],
                                          metric=self.router_metric(i, grid) if writes else None)
                results.update({n[len(p):]: r for n, r in got.items()})
        for n in locals_:
            spec, grid = by_name[p + n], grids.get(p + n)
            if grid is None:
                self.exporter.write_tensor(spec, self.source.read(p + n))
                continue
            result = results.pop(n)
            if calibrate:
                w.set(n, self._emit(spec, None, result, grid, runtime=True))
            else:
                self._emit(spec, None, result, grid)
            del result
        accs.clear()

    # -- MoE -----------------------------------------------------------------------------------------------------
    def _moe(self, i, store, w, grids, by_name, info, ffn_in: HessianAccumulator | None = None) -> None:
        """`ffn_in`: the Hessian of the FFN input when the router refit has gathered it already."""
        cfg, opt = self.cfg, self.opt
        p = f"layers.{i}."
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        calibrate = store is not None
        shared = ["shared.gate", "shared.up", "shared.down"]
        shared_targets = [n for n in shared if grids.get(p + n) is not None]

        # pass 1: routing counts + shared-expert statistics
        counts = torch.zeros(E, dtype=torch.long)
        if calibrate:
            wanted = {_OBSERVED_BY[n] for n in shared_targets} if opt.method == "gptq" else set()

            def pass1(h, obs):
                x2 = self._ffn_in(w, h).reshape(-1, H)
                idx, _ = route(cfg, w, x2)
                counts.add_(torch.bincount(idx.reshape(-1).cpu(), minlength=E))
                if wanted:
                    obs("shared.in", x2)
                    swiglu(x2, w.get("shared.gate"), w.get("shared.up"), w.get("shared.down"),
                           lambda hh: obs("shared.down", hh))

            given = {"shared.in": ffn_in} if ffn_in is not None and "shared.in" in wanted else {}
            accs = self._observe(store, pass1, wanted - set(given), {"shared.in": H, "shared.down": I})
            accs.update(given)
        else:
            accs = {}
        self._quantize_group(i, w, shared, grids, by_name, accs, calibrate)
        if calibrate:
            info["tokens_per_expert"] = counts.tolist()
            info["zero_token_experts"] = [e for e in range(E) if counts[e] == 0]

        # routed experts, in chunks
        kinds = ("gate", "up", "down")
        especs = {k: by_name[p + f"experts.{k}"] for k in kinds}
        egrids = {k: grids.get(p + f"experts.{k}") for k in kinds}
        if len({g is None for g in egrids.values()}) > 1:
            raise Llama4QuantError(f"layer {i}: experts.gate/up/down must be all quantized or all kept")
        quantized = egrids["gate"] is not None
        chunk = expert_budget(cfg, chunk_budget(opt.hessian_budget_bytes, self.device))
        if self.ranks.active:  # whole rounds: each rank holds ceil(chunk / N) experts of a chunk, none idles
            chunk = min(E, -(-chunk // self.ranks.world) * self.ranks.world)
        out = None
        if calibrate:
            out = ActivationStore(*store.shape, spill_bytes=opt.spill_bytes)
            out.data.zero_()
        try:
            for c0 in range(0, E, chunk):
                experts = list(range(c0, min(E, c0 + chunk)))
                self._expert_chunk(i, w, store, out, experts, especs, egrids, quantized, counts)
            if calibrate:
                with torch.no_grad():
                    for sl in self._batches(len(store)):
                        h = store.get(sl, self.device, opt.dtype)
                        x2 = self._ffn_in(w, h).reshape(-1, H)
                        y = swiglu(x2, w.get("shared.gate"), w.get("shared.up"), w.get("shared.down"))
                        y = y + out.get(sl, self.device, opt.dtype).reshape(-1, H)
                        store.put(sl, h + y.view(h.shape))
        finally:
            if out is not None:
                out.close()
        if self._ref_ffn is not None:
            self._reference_finish()
        if calibrate and opt.moe_calibration == "routed" and quantized:
            few = [e for e in range(E) if 0 < counts[e] < opt.min_expert_tokens]
            if info["zero_token_experts"] or few:
                self.warnings.append(
                    f"layer {i}: experts {info['zero_token_experts'] + few} saw fewer than {opt.min_expert_tokens} "
                    "calibration tokens: quantized with RTN + MSE clipping")

    def _expert_chunk(self, i, w, store, out, experts, especs, egrids, quantized, counts) -> None:
        cfg, opt = self.cfg, self.opt
        H, I = cfg.hidden_size, cfg.intermediate_size
        kinds = ("gate", "up", "down")
        calibrate = store is not None
        gptq_stats = calibrate and quantized and opt.method == "gptq"
        all_tokens = opt.moe_calibration == "all"

        def read(e: int) -> dict[str, torch.Tensor]:
            return {k: self.source.read_expert(i, k, e) for k in kinds}

        ranks = self.ranks
        mine = [e for e in experts if ranks.owns(e)]  # all of them in one process
        # the statistics pass (and the unquantized stream) need the whole chunk's weights; otherwise read each
        # expert just in time
        reference = calibrate and self._ref_ffn is not None
        weights = {e: read(e) for e in mine} if gptq_stats or reference else {}
        if reference:
            self._reference_experts(w, weights)
        acc_in: dict[int, HessianAccumulator] = {}
        acc_dn: dict[int, HessianAccumulator] = {}
        if gptq_stats:
            need = [e for e in mine if all_tokens or counts[e] >= max(1, opt.min_expert_tokens)]
            acc_in = {e: HessianAccumulator(H, self.device) for e in need}
            acc_dn = {e: HessianAccumulator(I, self.device) for e in need}
            if need:
                dev_w = {e: [weights[e][k].to(self.device, opt.dtype) for k in ("gate", "up")] for e in need}
                with torch.no_grad():
                    for sl in self._batches(len(store)):
                        x2 = self._ffn_in(w, store.get(sl, self.device, opt.dtype)).reshape(-1, H)
                        if all_tokens:
                            scores = torch.sigmoid(F.linear(x2, w.get("router")).float()).to(x2.dtype)
                        else:
                            idx, scale = route(cfg, w, x2)
                        for e in need:
                            if all_tokens:
                                xin = x2 * scores[:, e : e + 1]
                            else:
                                tok, slot = torch.nonzero(idx == e, as_tuple=True)
                                xin = x2[tok] * scale[tok, slot][:, None]
                            g, u = dev_w[e]
                            acc_in[e].add(xin)
                            acc_dn[e].add(F.silu(F.linear(xin, g)) * F.linear(xin, u))
                del dev_w
        runtime: dict[int, list[torch.Tensor]] = {}
        # expert-parallel: rounds of one expert per rank (round j: every rank's j-th expert of the chunk, experts
        # c0 + jN .. c0 + jN + N - 1), each written by rank 0 before the next round, so no rank keeps its results
        # past its round and rank 0 receives them one matrix at a time (in one process: one expert per round)
        share = ranks.share(experts)
        step = 1 if ranks.active else self._experts_per_loop(len(mine))
        for j in range(0, max(len(s) for s in share), step):
            sent: list[tuple] = []  # expert-parallel: what rank 0 writes for this rank's expert of the round
            group = mine[j : j + step]
            wes = {e: (weights.pop(e) if e in weights else read(e)) for e in group}
            results = (self._quantize_experts(group, wes, acc_in, acc_dn, especs, egrids, counts, calibrate)
                       if quantized else {})
            for e in group:
                we = wes.pop(e)
                if quantized:
                    mats = []
                    for k in kinds:
                        res = results[e].pop(k)
                        name = especs[k].expert_name(e)
                        if ranks.active:
                            sent.append((e, k, "q", res, self.records[name]))
                            if out is not None:
                                mats.append(self.exporter.runtime_weight(especs[k], res, egrids[k]))
                        else:
                            mats.append(self._emit(especs[k], e, res, egrids[k], runtime=out is not None))
                        del res
                    if out is not None:
                        runtime[e] = mats
                    acc_in.pop(e, None)
                    acc_dn.pop(e, None)  # free this expert's Hessians right away
                else:
                    for k in kinds:
                        if ranks.active:
                            sent.append((e, k, "t", we[k], None))
                        else:
                            self.exporter.write_tensor(TensorSpec(especs[k].expert_name(e), "experts", especs[k].shape, i), we[k])
                    if out is not None:
                        runtime[e] = [we[k] for k in kinds]
                del we
                if not ranks.active:
                    self.progress.expert_done(i, e)
            del results
            if ranks.active:
                self._write_gathered(i, sorted(s[j] for s in share if j < len(s)), especs, egrids, sent)
            del sent
        if out is None:
            return
        self._add_routed(w, store, out, {e: [t.to(self.device, opt.dtype) for t in runtime.pop(e)] for e in mine})

    def _router_aware(self, i: int, grid: Grid | None) -> bool:
        """Whether a residual writer of layer i on `grid` gets the router-aware descent (router_metric). Auto
        (router_aware None): int grids only. On q4_k_m's Q4_K writers its gain was within the noise (KLD -2.2 % on
        the test text, +0.8 % on ext) for ~40 % more GPTQ time in a layer with Q4_K down projections, so GGUF grids
        get it only when asked (--router-aware)."""
        opt = self.opt
        bits = getattr(grid, "code_bits", None)  # grids whose codes the descent can move: int, GGUF's linear ones
        wanted = opt.router_aware if opt.router_aware is not None else isinstance(grid, IntGrid)
        return bool(wanted and opt.method == "gptq" and bits and bits <= opt.router_max_bits
                    and any(self.cfg.is_moe(l) for l in range(i + 1, self.cfg.num_layers)))

    def _descends(self, spec: TensorSpec, grid: Grid | None) -> bool:
        """Whether GPTQ runs the coordinate descent on this tensor (the clock counts its work)."""
        if self.opt.gptq.cd_sweeps is not None:
            return bool(self.opt.gptq.cd_sweeps) and getattr(grid, "code_bits", None) is not None
        writer = spec.local in RESIDUAL_WRITERS or spec.local == "experts.down"
        return spec.layer is not None and writer and self._router_aware(spec.layer, grid)

    def router_metric(self, i: int, grid: Grid) -> torch.Tensor | None:
        """For a Linear of layer i that writes the residual stream (wo, the down projections): the directions of
        its output that the later MoE layers' routers read, A = [router_l * ffn_norm_l for MoE layers l > i]
        ([k, hidden]; the router scores norm(h) * ffn_norm). GPTQ's coordinate descent then also weighs
        |A dW x|^2 (quant.gptq.coordinate_descent): routing flips carry most of a quantized MoE's KL divergence
        (docs/quality.md). Only the quadratic form A^T A matters, so a tall A is cut to its top 64 singular
        directions (S V^T), which keeps the descent's per-column work small at Scout's 47 x 16 router rows.
        None: GPTQ off, --no-router-aware, a grid without the descent (fp8, more than 4 bits; GGUF's unless
        --router-aware), or no later MoE layer."""
        opt, cfg = self.opt, self.cfg
        if not self._router_aware(i, grid):
            return None
        cache = self.__dict__.setdefault("_router_metrics", {})
        if i not in cache:
            rows = [self.source.read(f"layers.{l}.router").float() * self.source.read(f"layers.{l}.ffn_norm").float()
                    for l in range(i + 1, cfg.num_layers) if cfg.is_moe(l)]
            a = torch.cat(rows) if rows else None
            if a is not None and a.shape[0] > 64:
                _, sv, vh = torch.linalg.svd(a.double(), full_matrices=False)
                a = (sv[:64, None] * vh[:64]).float()
            cache.clear()  # one layer's metric at a time (the next layer's is a sub-stack of this one)
            cache[i] = a
        a = cache[i]
        return None if a is None else a.to(self.device)

    def _experts_per_loop(self, n: int) -> int:
        """Routed experts quantized in one batched GPTQ loop: --gptq-experts, or on a GPU the whole chunk (the
        per-column work is one kernel for all of them), on a CPU one (batching saves no arithmetic there, and
        each expert in flight costs its float32 working copies)."""
        if self.opt.gptq_experts > 0:
            return self.opt.gptq_experts
        return max(1, n) if self.device.type == "cuda" else 1

    def _quantize_experts(self, experts, wes, acc_in, acc_dn, especs, egrids, counts,
                          calibrate: bool) -> dict[int, dict[str, QuantResult]]:
        """{expert: {kind: result}} for a group of routed experts: gate and up of an expert share its input Hessian
        (one GPTQ job when they share a grid), down has its own; all experts' jobs of a kind run in one batched
        loop. Experts with too few calibration tokens get RTN with MSE clipping, as before."""
        opt = self.opt
        out: dict[int, dict[str, QuantResult]] = {e: {} for e in experts}
        calibrated, starved = [], []
        for e in experts:
            if calibrate and opt.method == "gptq" and e not in acc_in:
                starved.append(e)
            else:
                calibrated.append(e)
        for e in starved:
            n = int(counts[e])
            why = ("no calibration tokens routed to this expert" if n == 0 else
                   f"only {n} calibration tokens routed (< --min-expert-tokens {opt.min_expert_tokens})")
            why += "; RTN with MSE clipping"
            for k in ("gate", "up", "down"):
                acc = (acc_dn if k == "down" else acc_in).get(e)
                out[e][k] = self._quantize(especs[k], especs[k].expert_name(e), wes[e][k], egrids[k], acc, why)
        if not calibrated:
            return out
        kinds_in = [["gate", "up"]] if repr(egrids["gate"]) == repr(egrids["up"]) else [["gate"], ["up"]]
        for kinds in kinds_in + [["down"]]:
            accs = acc_dn if kinds == ["down"] else acc_in
            layer = especs[kinds[0]].layer
            got = self._quantize_jobs([[(especs[k].expert_name(e), wes[e][k]) for k in kinds] for e in calibrated],
                                      egrids[kinds[0]], [accs.get(e) for e in calibrated],
                                      metric=self.router_metric(layer, egrids["down"]) if kinds == ["down"] else None)
            for e in calibrated:
                for k in kinds:
                    out[e][k] = got.pop(especs[k].expert_name(e))
        return out

    def _write_gathered(self, i, experts, especs, egrids, sent) -> None:
        """Expert-parallel: rank 0 writes one round's experts (one per rank) in the single-process order (expert by
        expert, gate/up/down). Params and records arrive in one gather; each peer matrix arrives point to point
        just before it is written, so rank 0 holds one of them at a time."""
        from dataclasses import replace

        from .distributed import pack, unpack

        ranks = self.ranks
        light = [(e, k, kind, replace(obj, weight=None) if kind == "q" else None, rec,
                  tuple((obj.weight if kind == "q" else obj).shape), (obj.weight if kind == "q" else obj).dtype)
                 for e, k, kind, obj, rec in sent]
        got = ranks.gather(pack(light) if not ranks.writer else b"")
        if got is None:
            for e, k, kind, obj, rec in sent:  # in order: rank 0 takes them in the same order
                ranks.send(obj.weight if kind == "q" else obj)
            return
        own = {(e, k): (kind, obj, rec) for e, k, kind, obj, rec in sent}
        peers = {(item[0], item[1]): (r, item) for r in range(1, ranks.world) for item in unpack(got[r], self.device)}
        del got
        for e in experts:
            for k in ("gate", "up", "down"):
                if (e, k) in own:
                    kind, obj, rec = own.pop((e, k))
                else:
                    r, (_, _, kind, meta, rec, shape, dtype) = peers.pop((e, k))
                    t = ranks.recv(shape, dtype, r, self.device if kind == "q" else "cpu")
                    obj = replace(meta, weight=t) if kind == "q" else t
                    del t
                if kind == "q":
                    self.records[especs[k].expert_name(e)] = rec
                    self.exporter.write_quantized(especs[k], e, obj, egrids[k])
                else:
                    self.exporter.write_tensor(TensorSpec(especs[k].expert_name(e), "experts", especs[k].shape, i), obj)
                del obj
            self.progress.expert_done(i, e)
        if own or peers:
            raise Llama4QuantError(f"layer {i}: experts {sorted(own) + sorted(peers)} reached rank 0 out of turn")

    # -- importance statistics (llama-imatrix's) ------------------------------------------------------------------
    @torch.no_grad()
    def collect_importance(self, tokens: torch.Tensor, include_output: bool = True) -> Imatrix:
        """One layer-wise forward pass of the *unquantized* model over `tokens` [N, T], observing every Linear's
        input: per canonical Linear the sum of x^2 per input column and the token count (routed experts per
        expert, over the tokens routed to them after the router scale, as llama.cpp feeds them)."""
        cfg, opt = self.cfg, self.opt
        runner = LayerwiseRunner(self.source, self.device, opt.dtype, opt.batch_size, keep_experts=False,
                                 spill_bytes=opt.spill_bytes)
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

        self.progress.status("importance statistics: forward pass of the unquantized model")
        ahead = Readahead()
        try:
            self._read_ahead(ahead, 0)
            store = runner.embed(tokens)
        except BaseException:
            ahead.close()
            raise
        try:
            self.progress.start(cfg.num_layers, int(tokens.numel()))
            clock = LayerClock(cfg.num_layers)
            for i in range(cfg.num_layers):
                if i + 1 < cfg.num_layers:
                    self._read_ahead(ahead, i + 1)
                clock.layer_start()
                self.progress.layer_start(i, 0)
                p = f"layers.{i}."

                def observer(name: str, x: torch.Tensor, p=p) -> None:
                    if name.startswith("experts."):
                        _, e, what = name.split(".")
                        add(p + ("experts.in" if what == "in" else "experts.down"), x, int(e), cfg.num_experts)
                    else:
                        add(p + name, x)

                with runner.layer(i) as w:
                    runner.forward_layer(i, w, store, observer=observer)
                self._release_source()
                self.progress.layer_done(i, clock.layer_done())
            if include_output and not cfg.tie_word_embeddings:
                norm = self.source.read("norm").to(self.device, opt.dtype)
                for sl in runner.batches(len(store)):
                    add("output", rms_norm(store.get(sl, self.device, opt.dtype), norm, cfg.rms_norm_eps))
        finally:
            ahead.close()
            store.close()
        out_s: dict[str, torch.Tensor] = {}
        out_c: dict[str, torch.Tensor] = {}
        for key, acc in sums.items():
            if key == "output":
                out_s[key], out_c[key] = acc, counts[key]
                continue
            layer, local = key.split(".", 2)[1], key.split(".", 2)[2]
            base = f"layers.{layer}."
            if local == "experts.in":
                for k in ("experts.gate", "experts.up"):
                    out_s[base + k], out_c[base + k] = acc, counts[key]
            elif local == "experts.down":
                out_s[key], out_c[key] = acc, counts[key]
            else:
                for tgt in _FEEDS.get(local, ()):
                    out_s[base + tgt], out_c[base + tgt] = acc, counts[key]
        return Imatrix(out_s, out_c)

    # -- report ------------------------------------------------------------------------------------------------------
    def _report(self, calib_info: dict | None, seconds: float) -> dict[str, Any]:
        opt = self.opt
        fallbacks = {k: r["reason"] for k, r in self.records.items() if r["method"] == "rtn" and r.get("reason")}
        losses = [r["loss"] for r in self.records.values() if r.get("loss_kind") == "hessian"]
        return {
            "method": opt.method,
            "gptq": asdict(opt.gptq) if opt.method == "gptq" else None,
            "moe_calibration": opt.moe_calibration if opt.method == "gptq" else None,
            "min_expert_tokens": opt.min_expert_tokens,
            "compute": {"device": str(self.device), "dtype": str(opt.dtype).replace("torch.", ""),
                        "batch_size": opt.batch_size},
            "calibration": calib_info,
            "tensors": self.records,
            "layers": self.layers,
            "rtn_fallbacks": fallbacks,
            "total_loss": sum(losses) if losses else None,
            "warnings": self.warnings,
            "seconds": round(seconds, 3),
            "timing": self.clock.report(),
        }


def _work(plan: list[tuple[TensorSpec, Grid | None]], calibrated: bool, descends=lambda spec, grid: False,
          cost=lambda spec: 1.0) -> tuple[list[float], float]:
    """Each decoder layer's work and the head's in layers (convert.clock); `descends(spec, grid)`: whether GPTQ
    runs the coordinate descent on that tensor; `cost(spec)`: the exporter's time per element without GPTQ."""
    layers: dict[int, float] = {}
    tail = 0.0
    for spec, grid in plan:
        if len(spec.shape) != 2:
            continue
        # without a grid a tensor is copied, or encoded by the exporter itself (GGUF's RTN): rows x cols either way
        gptq = calibrated and grid is not None
        work = tensor_work(spec.shape, spec.num_experts or 1, gptq, gptq and descends(spec, grid),
                           1.0 if gptq else cost(spec))
        if spec.layer is not None:
            layers[spec.layer] = layers.get(spec.layer, 0.0) + work
        elif spec.name == "output":
            tail += work
    works = [layers[i] for i in sorted(layers)]
    return works, tail_share(works, tail)


def router_refits(layers: list[dict[str, Any]]) -> dict[str, dict] | None:
    """{layer: its router refit record} for a report's layers (the summaries' `router_refit`), None without any."""
    return {str(l["layer"]): l["router_refit"] for l in layers if "router_refit" in l} or None


def output_energy(w: torch.Tensor, h: torch.Tensor, sample_rows: int = 512) -> float:
    """tr(W H W^T) / 2, the unquantized output energy the records' relative losses divide by. Beyond
    2 x `sample_rows` rows it is estimated from `sample_rows` of them (quant.rtn.row_sample on the diagonal part
    sum_j W_rj^2 H_jj: the 64 largest rows exactly, a ratio estimate of the rest): about 1 % on a Scout expert
    (tests/convert/test_output_energy.py) at a sixteenth of the full [rows x in x in] product."""
    rows = w.shape[0]
    if rows <= 2 * sample_rows:
        return hessian_loss(w, h)
    top, picked, scale = row_sample(w.square() @ h.diagonal().to(w), sample_rows, 64)
    return hessian_loss(w[top], h) + scale * hessian_loss(w[picked], h)


def chunk_budget(budget_bytes: int | None, device: torch.device) -> int:
    """--hessian-memory, or its default: 8 GiB on a GPU (a chunk's experts share one batched GPTQ loop there); 3 GiB
    on a CPU, where every expert in a chunk also keeps its weights and their quantized float32 values on the host
    until the chunk's output pass (Scout: 2 experts, peak RSS about 1.4 x one layer; 8 GiB took 6 experts and
    2.4 x one layer)."""
    if budget_bytes is not None:
        return budget_bytes
    return (8 << 30) if device.type == "cuda" else (3 << 30)


def expert_budget(cfg: Llama4Config, budget_bytes: int) -> int:
    """How many experts' Hessians (+ weights) one chunk holds under `budget_bytes`."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return max(1, min(cfg.num_experts, budget_bytes // ((H * H + I * I) * 4 + 6 * H * I * 4)))
