"""`run_convert(options)`: the one conversion flow, for every output format.

    resolve MODEL (local or Hub) -> open the reader -> pick scheme and method -> refuse a bad OUT early
    -> load calibration tokens once -> [importance pass] -> Pipeline.run with the format's exporter
    -> the exporter publishes atomically -> summary (+ sidecar/manifest) -> [--verify: eval, recorded]

A format is an exporter module that provides a `Format` (see `FORMATS`): its schemes, default scheme,
methods, the options only it takes, and how to build its exporter. Adding one is one module plus one
line in `FORMATS` (docs/architecture.md).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Llama4QuantError
from .distributed import ShadowExporter, from_environment, shutdown
from .verify import VerifyOptions


@dataclass(frozen=True)
class ConvertOptions:
    model: str
    out: str
    to: str = "safetensors"
    scheme: str | None = None  # None: the format's default
    method: str = "auto"
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    tokenizer: str | None = None
    # options that only some formats take: None means "not given" (see Format.options)
    group_size: int | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    observer: str | None = None
    max_shard_size: int | None = None
    split_max_size: int | None = None
    imatrix_file: str | None = None
    # the pipeline
    moe_calibration: str = "routed"
    min_expert_tokens: int = 16
    act_order: bool = True
    damp: float = 0.01
    shrink: float = 0.25  # GPTQ Hessian shrinkage toward its diagonal (quant/gptq.py)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    hessian_memory: int | None = None  # None: 8 GiB on a GPU, 3 GiB on a CPU (pipeline.chunk_budget)
    gptq_experts: int = 0  # routed experts per batched GPTQ loop (0: auto)
    router_aware: bool | None = None  # GPTQ: coordinate descent against the later routers (pipeline.router_metric);
    #                                   None: on int grids only
    router_max_bits: int = 4  # ... on grids of at most this many bits per code
    refit_router: bool = True  # GPTQ: refit the unquantized routers to the quantized stream (quant/router.py)
    force: bool = False
    name: str | None = None  # GGUF general.name (default: the model directory's name)
    # per-tensor GGUF types / per-module safetensors schemes for a budget (convert/fit.py), or replayed from a plan
    fit: int | None = None  # device memory (bytes) the model plus KV cache for `context` must fit
    target_size: int | None = None  # file bytes
    target_bpw: float | None = None
    context: int = 8192
    reserve: int = 10**9
    plan: str | None = None  # a saved plan to replay
    plan_only: bool = False
    fit_schemes: tuple[str, ...] | None = None  # --to safetensors: candidates of a plan (fit.ST_FIT_SCHEMES)
    # --to gguf: the vision tower as llama.cpp's mmproj GGUF (convert/mmproj.py)
    mmproj: str | None = None  # None: none; "": mmproj-OUT.gguf beside OUT; else its path
    mmproj_type: str | None = None  # f16 (default), bf16, q8_0
    mmproj_only: bool = False  # write only the projector, to OUT
    verify: VerifyOptions | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def formats() -> dict[str, Any]:
    """--to NAME -> Format. The registry: one line per output format."""
    from .gguf import GGUFFormat
    from .safetensors import SafetensorsFormat

    return {"safetensors": SafetensorsFormat(), "gguf": GGUFFormat()}



def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: ConvertOptions, fmts: dict[str, Any]) -> tuple[Any, str]:
    """The Format and scheme for `o`, or one error for an option or scheme that belongs to another format."""
    if o.to not in fmts:
        raise Llama4QuantError(f"unknown --to {o.to!r} (choose from {', '.join(fmts)})")
    fmt = fmts[o.to]
    for other_name, other in fmts.items():
        if other_name == o.to:
            continue
        for opt in other.options:
            if opt not in fmt.options and getattr(o, opt) not in (None, ()):
                raise Llama4QuantError(f"{_option_flag(opt)} applies to --to {other_name} only")
    scheme = o.scheme or fmt.default_scheme
    if scheme not in fmt.schemes:
        owner = [n for n, f in fmts.items() if scheme in f.schemes]
        if owner:
            raise Llama4QuantError(f"--scheme {scheme} needs --to {owner[0]}")
        raise Llama4QuantError(f"unknown --scheme {scheme!r} for --to {o.to} (choose from {', '.join(fmt.schemes)})")
    if o.method not in ("auto", *fmt.methods):
        raise Llama4QuantError(f"--to {o.to}: --method must be one of {', '.join(fmt.methods)} or auto")
    return fmt, scheme


def _load_calibration(o: ConvertOptions, reader) -> tuple[Any, dict, list[int]]:
    from ..calibration.dataset import load_calibration
    from ..model.tokenizer import load_tokenizer

    tok = load_tokenizer(o.tokenizer or reader.path, total_vocab=reader.config.vocab_size)
    cs = load_calibration(o.calib, tok, o.calib_samples, o.calib_seqlen, o.seed)
    return cs.tokens, cs.info, list(cs.heldout)


def run_convert(o: ConvertOptions, progress=None, source=None) -> dict[str, Any]:
    """Convert o.model into o.out; returns the `--json` summary (with "verification" under --verify). Under
    torchrun, ranks other than 0 return {"rank": r, "world": n} (rank 0 writes and summarises)."""
    from . import mmproj as mmp

    t0 = time.perf_counter()
    fmt, scheme = check_options(o, formats())
    mmp.check_options(o)
    if o.mmproj_only:
        return mmp.run_mmproj_only(o, source)
    method = fmt.resolve_method(scheme, o)
    warnings: list[str] = list(fmt.option_warnings(scheme, o))
    if o.verify is not None and o.verify.eval_data is None and not fmt.reads_calibration(method, o):
        raise Llama4QuantError("--verify without calibration data needs --eval-data FILE (this method reads no "
                               "calibration text)")
    exporter = fmt.exporter(o, scheme, method)  # refuses an existing OUT before any expensive work
    mmproj = mmp.output_for(o)  # and an existing mmproj file
    ranks = from_environment(o.device)  # torchrun: expert-parallel (convert/distributed.py)
    try:
        return _run(o, fmt, scheme, method, warnings, exporter, ranks, progress, source, t0, mmproj)
    finally:
        if mmproj is not None:
            mmproj.abort()  # no-op once published
        shutdown(ranks)


def _run(o: ConvertOptions, fmt, scheme: str, method: str, warnings: list[str], exporter, ranks, progress, source,
         t0: float, mmproj=None) -> dict[str, Any]:
    from ..calibration.documents import CalibrationError
    from ..hub.resolve import resolve_model
    from ..model.readers import open_checkpoint
    from ..model.runner import resolve_device, resolve_dtype
    from ..quant.gptq import GPTQConfig
    from .pipeline import Pipeline, PipelineOptions

    reader = source if source is not None else open_checkpoint(Path(resolve_model(o.model)))
    src_dir, out_path = Path(reader.path).resolve(), Path(exporter.artifact).resolve()
    if out_path == src_dir or out_path in src_dir.parents:
        raise Llama4QuantError(f"OUT {o.out} is the source checkpoint or contains it: choose another path")

    from ..model.tokenizer import check_tokenizer, load_tokenizer

    # every artifact carries the tokenizer: a corrupt one fails here, not in the user's runtime
    load_tokenizer(o.tokenizer) if o.tokenizer else check_tokenizer(reader.path)
    if mmproj is not None and ranks.writer:
        mmproj.stage(reader)  # written and read back under a temp name now; published after the text GGUF
    tokens = info = None
    heldout: list[int] = []
    if fmt.reads_calibration(method, o):
        try:
            tokens, info, heldout = _load_calibration(o, reader)
            warnings += [f"calibration: {w}" for w in info.get("warnings", [])]
        except (CalibrationError, Llama4QuantError) as e:
            if method != "auto" or o.calib is not None:
                raise
            warnings.append(f"no calibration data ({e}); falling back to --method rtn")
            method = "rtn"
    elif o.calib is not None:
        warnings.append(f"--method {method} uses no calibration data: --calib ignored")
    method = fmt.final_method(method, scheme)

    dev = resolve_device(o.device)
    popts = PipelineOptions(method="gptq" if method == "gptq" else "rtn",
                            gptq=GPTQConfig(damp=o.damp, act_order=o.act_order, shrink=o.shrink),
                            moe_calibration=o.moe_calibration, min_expert_tokens=o.min_expert_tokens, device=dev,
                            dtype=resolve_dtype(o.dtype, dev), batch_size=o.batch_size,
                            hessian_budget_bytes=o.hessian_memory, gptq_experts=o.gptq_experts,
                            router_aware=o.router_aware, router_max_bits=o.router_max_bits,
                            refit_router=o.refit_router)
    fmt.configure(exporter, o, method, info, is_hub_id=source is None and _is_hub_id(o.model))
    if ranks.active and method != "gptq":
        raise Llama4QuantError(f"--method {method} has no calibration to share out: run it in one process "
                               "(torchrun is for GPTQ, whose per-expert work it splits across ranks)")
    if not ranks.writer:
        exporter, progress = ShadowExporter(exporter), None
    pipe = Pipeline(reader, exporter, popts, progress, ranks)
    pipe.warnings.extend(warnings)
    planned = _plan_types(o, reader, exporter, pipe, tokens, method)
    if planned is not None and o.plan_only:
        return planned
    if method == "imatrix":
        exporter.prepare(reader)  # fail fast (tokenizer, destination) before the forward pass
        if o.imatrix_file is not None:
            from ..formats.gguf.imatrix import load_imatrix_file

            exporter.imatrix = load_imatrix_file(o.imatrix_file, reader.config)
            info = {"source": f"imatrix file {o.imatrix_file}"}
        elif exporter.imatrix is None:
            exporter.imatrix = pipe.collect_importance(tokens)
    manifest = pipe.run(tokens if method == "gptq" else None, info)
    ranks.barrier()
    if not ranks.writer:
        return {"rank": ranks.rank, "world": ranks.world}
    summary = exporter.summary(manifest, time.perf_counter() - t0)
    if mmproj is not None:
        from .mmproj import add_to_sidecar

        mmproj.commit()
        summary = add_to_sidecar(summary, mmproj)
    if ranks.active:
        summary["ranks"] = ranks.world
    if planned is not None:
        summary["plan"] = {k: planned["plan"][k] for k in ("file", "tensor_bytes", "predicted_error", "budget")}
        if o.to == "safetensors":  # the budget is the weight shards' (model-*.safetensors)
            summary["plan"]["weights_bytes"] = sum(p.stat().st_size for p in Path(summary["output"]).glob(
                "model-*.safetensors"))
        size = summary["plan"].get("weights_bytes", summary["total_bytes"])
        if o.target_size is not None and size > o.target_size:
            raise Llama4QuantError(f"the file came out at {size} bytes, over --target-size "
                                   f"{o.target_size}: the size estimate is wrong, please report it")
    if o.verify is not None:
        from .verify import record_verification, verify_artifact

        summary["verification"] = verify_artifact(o.model, summary["output"], o.verify, heldout=heldout,
                                                  device=o.device, dtype=o.dtype, batch_size=o.batch_size,
                                                  tokenizer=o.tokenizer)
        record_verification(exporter.manifest_path(summary), summary["verification"])
    return summary


def _plan_types(o: ConvertOptions, reader, exporter, pipe, tokens, method: str) -> dict[str, Any] | None:
    """--fit / --target-size / --target-bpw: measure, optimise, save the plan and give the exporter its types;
    --plan FILE: replay one. None when neither is asked for."""
    targets = (o.fit, o.target_size, o.target_bpw)
    if o.plan is None and all(t is None for t in targets):
        if o.plan_only:
            raise Llama4QuantError("--plan-only needs --fit, --target-size or --target-bpw")
        return None
    if o.to == "safetensors":
        return _plan_schemes(o, reader, exporter, pipe, tokens)
    if o.to != "gguf":
        raise Llama4QuantError("--fit/--target-size/--target-bpw/--plan need --to gguf or --to safetensors")
    from . import fit

    cfg = reader.config
    if o.plan is not None:
        if any(t is not None for t in targets):
            raise Llama4QuantError("--plan replays a saved plan: give it without --fit/--target-size/--target-bpw")
        exporter.type_overrides = fit.load_plan(o.plan, cfg)
        return {"plan": {"file": str(o.plan), "tensor_bytes": None, "predicted_error": None, "budget": None}}
    if tokens is None:
        raise Llama4QuantError("--fit needs calibration data to measure each tensor's sensitivity (--calib FILE)")
    exporter.prepare(reader)  # tokenizer (for the metadata size) and destination checks before any work
    overhead = fit.metadata_bytes(exporter.tok, len(exporter.plan))
    budget = fit.budget_for(cfg, target_size=o.target_size, target_bpw=o.target_bpw, fit=o.fit, context=o.context,
                            reserve=o.reserve, overhead=overhead)
    importance = pipe.collect_importance(tokens)
    if method == "imatrix":
        exporter.imatrix = importance
    measured = fit.measure(reader, importance)
    plan = fit.make_plan(measured, fit.optimise(measured, budget.tensor_bytes), budget)
    path = Path(str(o.out) + ".plan.json")
    plan["file"] = str(fit.save_plan(plan, path))
    exporter.type_overrides = {k: v["type"] for k, v in plan["tensors"].items()}
    exporter.writer = None  # the plan changes the file layout: prepare again with the new types
    exporter.source = None
    return {"plan": plan, "format": "gguf", "plan_only": o.plan_only, "output": None, "warnings": []}


def _plan_schemes(o: ConvertOptions, reader, exporter, pipe, tokens) -> dict[str, Any]:
    """--to safetensors: one scheme per vLLM-fused unit (a layer's experts, q/k/v, gate/up, ...) among --fit-schemes,
    for the Linears --targets/--ignore select; or replayed from --plan FILE."""
    from ..model.tensors import tensor_specs
    from . import fit

    cfg = reader.config
    targets = (o.fit, o.target_size, o.target_bpw)
    exporter = getattr(exporter, "real", exporter)  # torchrun ranks > 0 hold a ShadowExporter around the real one
    exporter.prepare(reader)
    specs = [s for s in tensor_specs(cfg) if exporter.selected(s)]
    if not specs:
        raise Llama4QuantError("nothing to plan: --targets/--ignore leave no Linear selected")
    warnings = []
    if o.scheme is not None:
        warnings.append(f"--scheme {o.scheme} is not used: the plan chooses a scheme per module")
    exporter.scheme_name = "mixed"
    if o.plan is not None:
        if any(t is not None for t in targets):
            raise Llama4QuantError("--plan replays a saved plan: give it without --fit/--target-size/--target-bpw")
        if o.fit_schemes:
            warnings.append("--fit-schemes is not used: --plan replays the saved schemes")
        exporter.scheme_overrides = pipe.ranks.broadcast(fit.load_st_plan(o.plan, cfg, specs, exporter.group_size))
        pipe.warnings.extend(warnings)
        return {"plan": {"file": str(o.plan), "tensor_bytes": None, "predicted_error": None, "budget": None}}
    if tokens is None:
        raise Llama4QuantError("--fit needs calibration data to measure each module's sensitivity (--calib FILE)")
    schemes = fit.st_schemes(o.fit_schemes)
    budget = fit.budget_for(cfg, target_size=o.target_size, target_bpw=o.target_bpw, fit=o.fit, context=o.context,
                            reserve=o.reserve, **fit.st_budget_parts(reader, specs, o.max_shard_size))
    importance = pipe.collect_importance(tokens, include_output=any(s.role == "head" for s in specs))
    measured = fit.measure_safetensors(reader, importance, specs, schemes, group_size=exporter.group_size,
                                       observer=exporter.observer, device=str(pipe.device))
    choice = fit.optimise(measured, budget.tensor_bytes, smallest=schemes[0])
    plan = pipe.ranks.broadcast(fit.make_st_plan(measured, choice, budget, group_size=exporter.group_size,
                                                 observer=exporter.observer, schemes=schemes))  # rank 0's, everywhere
    path = Path(str(o.out) + ".plan.json")
    plan["file"] = str(fit.save_plan(plan, path) if pipe.ranks.writer else path)
    exporter.scheme_overrides = {k: v["type"] for k, v in plan["tensors"].items()}
    pipe.warnings.extend(warnings)
    return {"plan": plan, "format": "safetensors", "plan_only": o.plan_only, "output": None, "warnings": warnings}


def _is_hub_id(model: str) -> bool:
    return not Path(str(model)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) is not None

