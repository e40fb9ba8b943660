"""`--fit`, `--target-size`, `--target-bpw`: per-tensor GGUF types chosen from measured sensitivity for a budget.

1. Measure: the importance pass (mean x^2 per input column of every Linear, routed experts per expert, on the
   calibration tokens) gives each tensor's error proxy for a candidate type: sum over rows and columns of
   importance_j * (W - Q(W))_ij^2, with Q llama.cpp's importance-weighted quantizer for that type. That is the
   squared error the tensor adds to its layer's output per token (the diagonal of the GPTQ Hessian); the
   embedding table counts its rows' squared error.
2. Optimise: a multiple-choice knapsack over the lower convex hull of (bytes, error) per tensor: upgrades are
   taken in order of error saved per byte while they fit the budget (the Lagrangian greedy, optimal on the hulls),
   then any upgrade that still fits.
3. The plan (types per tensor, bytes, predicted error) is printed, saved (`OUT.plan.json`, or `--plan-out`), and
   replayable with `--plan FILE`; `--plan-only` stops there.

Budgets: `--target-size` is the whole file; `--target-bpw` is bits per weight of the tensors; `--fit MEM` is
device memory less the bf16 KV cache for `--context` tokens (the arithmetic `inspect` uses) and `--reserve`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES

from ..errors import Llama4QuantError
from ..formats.gguf import quants as gq
from ..formats.gguf.mix import type_bytes
from ..formats.gguf.quants import QT
from ..model.config import Llama4Config
from ..model.tensors import tensor_specs

# candidate types, cheapest first; those this build can encode are used
LADDER = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
PLAN_VERSION = 1
FTYPE_GUESSED = 1024  # llama.cpp's LLAMA_FTYPE_GUESSED: general.file_type of a per-tensor mix


def candidates(row_len: int) -> list[QT]:
    out = []
    for name in LADDER:
        t = getattr(QT, name, None)
        if t is not None and t in gq.SUPPORTED_TYPES and row_len % GGML_QUANT_SIZES[t][0] == 0:
            out.append(t)
    return out


@dataclass
class Budget:
    tensor_bytes: int  # what the tensors may take
    description: str


def budget_for(cfg: Llama4Config, *, target_size: int | None, target_bpw: float | None, fit: int | None,
               context: int, reserve: int, overhead: int, fixed: int | None = None, passthrough: int = 0) -> Budget:
    """The bytes the quantizable tensors may take, from one of the three targets.

    fixed: bytes of the text tensors outside the plan (default: GGUF's F32 norms and router); passthrough: bytes
    outside the text model that the output also holds (the safetensors vision tower), not counted by --target-bpw."""
    from .sizes import kv_cache_bytes

    if fixed is None:
        fixed = sum(int(np.prod(s.full_shape)) * 4 for s in tensor_specs(cfg) if s.role in ("norm", "router"))
    fixed += passthrough
    n_params = sum(int(np.prod(s.full_shape)) for s in tensor_specs(cfg))
    given = [x is not None for x in (target_size, target_bpw, fit)]
    if sum(given) != 1:
        raise Llama4QuantError("give exactly one of --fit MEM, --target-size SIZE, --target-bpw BITS")
    if target_size is not None:
        total, what = target_size, f"file of at most {target_size / 1e9:.3f} GB"
    elif target_bpw is not None:
        if not 1.5 <= target_bpw <= 16:
            raise Llama4QuantError(f"--target-bpw {target_bpw}: choose between 1.5 and 16 bits per weight")
        total, what = int(target_bpw * n_params / 8) + overhead + passthrough, f"{target_bpw:g} bits per weight"
    else:
        kv = kv_cache_bytes(cfg, context)
        total = fit - kv - reserve
        what = (f"{fit / 1e9:.1f} GB less the KV cache for {context} tokens ({kv / 1e9:.2f} GB) and "
                f"{reserve / 1e9:.2f} GB reserve")
    room = total - overhead - fixed
    if room <= 0:
        raise Llama4QuantError(f"the budget ({what}) leaves no room for the weights")
    return Budget(room, what)


def measure(source, imatrix) -> dict[str, dict[str, Any]]:
    """{canonical: {"shape", "params", "costs": {type: [bytes, error]}}} for every quantizable tensor."""
    cfg = source.config
    out: dict[str, dict[str, Any]] = {}
    specs = [s for s in tensor_specs(cfg) if s.role not in ("norm", "router")]
    for spec in specs:
        row = spec.shape[-1]
        types = candidates(row)
        if not types:
            continue
        costs = {t.name: [type_bytes(t, int(np.prod(spec.full_shape))), 0.0] for t in types}
        mats = ([(e, source.read_expert(spec.layer, spec.local.split(".")[1], e)) for e in range(spec.num_experts)]
                if spec.num_experts else [(None, source.read(spec.name))])
        for e, w in mats:
            w = w.float().numpy()
            imp = None if spec.role == "embed" or imatrix is None else imatrix.get(spec.name, e)
            # the error weighs by the expert's share of the layer's tokens (see expert_importance): on the tiny
            # model, a plan between q3_k_m and q4_k_m had KLD 0.0124 with it, 0.0203 with the per-routed-token mean
            share = imp if e is None or imp is None else expert_importance(imatrix, spec.name, e, cfg.top_k)
            weight = np.ones(row, np.float32) if share is None else np.asarray(share, np.float32)
            for t in types:
                q = gq.dequantize(gq.quantize(w, t, imp), t, w.shape)
                costs[t.name][1] += float((((w - q) ** 2) * weight).sum())
        out[spec.name] = {"shape": list(spec.full_shape), "params": int(np.prod(spec.full_shape)), "costs": costs}
    return out


def _hull(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower convex hull of (bytes, error) by increasing bytes, keeping only points that lower the error."""
    pts = sorted(points)
    keep: list[tuple[int, float, str]] = []
    for p in pts:
        if keep and p[1] >= keep[-1][1]:
            continue  # costs more, no better
        while len(keep) >= 2:
            (b1, e1, _), (b2, e2, _) = keep[-2], keep[-1]
            # drop the middle point if it lies above the segment keep[-2] -> p
            if (e2 - e1) * (p[0] - b1) >= (p[1] - e1) * (b2 - b1):
                keep.pop()
            else:
                break
        keep.append(p)
    return keep


def optimise(measured: dict[str, dict[str, Any]], budget: int, smallest: str = LADDER[0]) -> dict[str, str]:
    """Types per tensor (or schemes per safetensors unit) with the least summed error whose bytes fit `budget`."""
    hulls = {k: _hull([(c[0], c[1], t) for t, c in v["costs"].items()]) for k, v in measured.items()}
    choice = {k: 0 for k in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise Llama4QuantError(f"even the smallest types ({smallest} where it applies) need {used / 1e9:.3f} GB of "
                               f"tensors, more than the {budget / 1e9:.3f} GB the budget leaves")
    steps = []
    for k, h in hulls.items():
        for i in range(1, len(h)):
            db, de = h[i][0] - h[i - 1][0], h[i - 1][1] - h[i][1]
            steps.append((de / db if db > 0 else float("inf"), k, i, db))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    for _, k, i, db in steps:  # along each hull in order (slopes decrease along a convex hull)
        if choice[k] == i - 1 and used + db <= budget:
            choice[k] = i
            used += db
    # what is left: any single upgrade that still fits, the best error saving first
    improved = True
    while improved:
        improved = False
        best = None
        for k, h in hulls.items():
            for i in range(choice[k] + 1, len(h)):
                db = h[i][0] - h[choice[k]][0]
                if used + db <= budget:
                    gain = h[choice[k]][1] - h[i][1]
                    if best is None or gain > best[0]:
                        best = (gain, k, i, db)
        if best is not None and best[0] > 0:
            _, k, i, db = best
            choice[k], used, improved = i, used + db, True
    return {k: hulls[k][i][2] for k, i in choice.items()}


def make_plan(measured: dict, types: dict[str, str], budget: Budget) -> dict[str, Any]:
    tensors = {k: {"type": t, "bytes": measured[k]["costs"][t][0], "error": measured[k]["costs"][t][1]}
               for k, t in types.items()}
    return {"version": PLAN_VERSION, "budget": {"tensor_bytes": budget.tensor_bytes, "target": budget.description},
            "tensor_bytes": sum(v["bytes"] for v in tensors.values()),
            "predicted_error": sum(v["error"] for v in tensors.values()),
            "tensors": tensors, "groups": groups(tensors)}


def _group(name: str) -> str:
    if not name.startswith("layers."):
        return name
    local = name.split(".", 2)[2]
    return {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention"}.get(local, local.split(".")[0])


def groups(tensors: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The plan as a table: per tensor group, how many tensors get each type, bytes, predicted error."""
    rows: dict[str, dict[str, Any]] = {}
    for name, v in tensors.items():
        g = rows.setdefault(_group(name), {"group": _group(name), "types": {}, "bytes": 0, "error": 0.0})
        g["types"][v["type"]] = g["types"].get(v["type"], 0) + 1
        g["bytes"] += v["bytes"]
        g["error"] += v["error"]
    return list(rows.values())


def save_plan(plan: dict[str, Any], path: Path) -> Path:
    from ..fsutil import write_json_atomic

    write_json_atomic(path, plan)
    return path


def _read_plan(path: str | Path) -> dict:
    """A saved plan file's JSON, after checking it is one of ours in this version."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Llama4QuantError(f"{path}: not a plan file ({e})") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or not isinstance(plan.get("tensors"), dict):
        raise Llama4QuantError(f"{path}: not a llama4-quant plan (version {PLAN_VERSION})")
    return plan


def load_plan(path: str | Path, cfg: Llama4Config) -> dict[str, str]:
    """Types per tensor from a saved plan, checked against this model's tensors."""
    plan = _read_plan(path)
    if plan.get("format", "gguf") != "gguf":
        raise Llama4QuantError(f"{path}: a plan for --to {plan.get('format')}, not --to gguf")
    specs = {s.name: s for s in tensor_specs(cfg)}
    out = {}
    for name, v in plan["tensors"].items():
        t = v.get("type") if isinstance(v, dict) else None
        if name not in specs:
            raise Llama4QuantError(f"{path}: tensor {name} is not in this model (a plan for another model?)")
        if t not in {q.name for q in candidates(specs[name].shape[-1])}:
            raise Llama4QuantError(f"{path}: {name}: type {t!r} is not one this tensor can take")
        out[name] = t
    return out


def metadata_bytes(tok, n_tensors: int) -> int:
    """An upper estimate of a GGUF's bytes besides tensor data: header, keys (the tokenizer dominates), tensor
    infos and alignment padding."""
    toks = sum(len(t.encode("utf-8")) + 8 for t in tok.tokens) + 4 * len(tok.tokens)
    merges = sum(len(m.encode("utf-8")) + 8 for m in (tok.merges or []))
    template = len((tok.chat_template or "").encode("utf-8"))
    return 64 * 1024 + toks + merges + template + n_tensors * (128 + 32)


# ---- safetensors (compressed-tensors) plans -------------------------------------------------------------------
# Candidates a --to safetensors plan may choose among (--fit-schemes): the exported schemes vLLM runs for Llama 4's
# fused MoE (symmetric int4/int8 weight-only through Marlin, fp8 W8A8), and "bf16": kept as the source stores it.
ST_FIT_SCHEMES = ("w4a16", "w8a16", "fp8-dynamic", "fp8-block", "bf16")
ST_DEFAULT_SCHEMES = ("w4a16", "w8a16", "bf16")  # one format (pack-quantized) plus ignored modules

# Linears vLLM fuses into one module, which must then share one scheme: q/k/v (QKVParallelLinear), gate/up of the
# shared expert and of dense MLPs (MergedColumnParallelLinear), and every expert's gate/up/down of a layer (FusedMoE).
_UNIT_LOCAL = {"wq": "attn.qkv", "wk": "attn.qkv", "wv": "attn.qkv", "wo": "attn.o",
               "shared.gate": "shared.gate_up", "shared.up": "shared.gate_up", "shared.down": "shared.down",
               "mlp.gate": "mlp.gate_up", "mlp.up": "mlp.gate_up", "mlp.down": "mlp.down",
               "experts.gate": "experts", "experts.up": "experts", "experts.down": "experts"}


def st_unit(name: str) -> str:
    """The plan unit of a canonical Linear: the tensors that must share a scheme (`layers.3.experts`, ...)."""
    if not name.startswith("layers."):
        return name
    _, i, local = name.split(".", 2)
    return f"layers.{i}.{_UNIT_LOCAL[local]}"


def st_schemes(given: tuple[str, ...] | None) -> tuple[str, ...]:
    """--fit-schemes (comma-separated, repeatable) as candidates in ladder order; default ST_DEFAULT_SCHEMES."""
    if not given:
        return ST_DEFAULT_SCHEMES
    names = {x.strip() for g in given for x in g.split(",") if x.strip()}
    bad = sorted(names - set(ST_FIT_SCHEMES))
    if bad:
        raise Llama4QuantError(f"--fit-schemes: {bad[0]!r} is not a candidate (choose from {', '.join(ST_FIT_SCHEMES)}"
                               "; w4a16-asym is left out: vLLM's MoE kernels take symmetric int weights only)")
    return tuple(s for s in ST_FIT_SCHEMES if s in names)


def st_tensor_bytes(spec, scheme: str, group_size: int | None, model_bytes: int, stored_bytes: int) -> int:
    """Bytes of one canonical Linear (all its experts) in `scheme` as the safetensors exporter writes it."""
    from .sizes import st_linear_bytes

    per = st_linear_bytes(scheme, spec.shape, group_size, stored_bytes if scheme == "bf16" else model_bytes)
    return per * max(1, spec.num_experts)


def st_candidates(spec, schemes: tuple[str, ...], group_size: int | None) -> list[str]:
    from .sizes import st_scheme_applies

    return [s for s in schemes if st_scheme_applies(s, spec.shape, group_size)]


def expert_importance(imatrix, name: str, e: int, top_k: int) -> np.ndarray | None:
    """Routed expert e's importance per token through its layer: mean x^2 over the tokens routed to it (after the
    router scale) times its share of the layer's tokens, so that its error weighs as much as it adds to the layer's
    output on average (a dense tensor's importance is a mean over every token). An expert no calibration token
    reached gets the mean of the others' importance at the average share top_k / E."""
    s, c = imatrix.sums.get(name), imatrix.counts.get(name)
    if s is None or int(c.sum()) == 0:
        return None
    tokens = float(c.sum()) / top_k
    if int(c[e]) > 0:
        return (s[e] / tokens).float().numpy()
    seen = c > 0
    mean = (s[seen] / c[seen].unsqueeze(1).double()).mean(0)
    return (mean * (top_k / len(c))).float().numpy()


def measure_safetensors(source, imatrix, specs, schemes: tuple[str, ...], *, group_size: int | None,
                        observer: str = "minmax", device: str = "cpu") -> dict[str, dict[str, Any]]:
    """{unit: {"tensors", "params", "costs": {scheme: [bytes, error]}, "tensor_costs": {tensor: {scheme: [bytes,
    error]}}}} for the planned Linears `specs`: the error proxy of GGUF's `measure`, sum of importance_j *
    (W - Q(W))_ij^2, with Q the exporter's own grid for the scheme (round to nearest, the --observer's scales),
    dequantized to the model dtype as compressed-tensors decompresses it; "bf16" (kept as stored) costs no error.
    A unit's costs are its tensors' sums, over the schemes every one of its tensors can take."""
    import torch

    from ..formats.compressed_tensors.tensors import torch_dtype
    from ..quant.api import make_grid
    from ..quant.rtn import rtn
    from ..quant.scheme import make_scheme

    cfg = source.config
    model_dtype = torch_dtype(cfg.torch_dtype)
    model_bytes = torch.empty((), dtype=model_dtype).element_size()
    stored_bytes = torch.empty((), dtype=source.source_dtype()).element_size()
    grids = {s: make_grid(make_scheme(s, group_size), model_dtype, mse=observer == "mse") for s in schemes if s != "bf16"}
    units: dict[str, dict[str, Any]] = {}
    layer = None
    for spec in specs:
        if spec.layer != layer and hasattr(source, "release"):
            source.release()  # drop the previous layer's memory maps
            layer = spec.layer
        ok = st_candidates(spec, schemes, group_size)
        costs = {s: [st_tensor_bytes(spec, s, group_size, model_bytes, stored_bytes), 0.0] for s in ok}
        mats = ([(e, source.read_expert(spec.layer, spec.local.split(".")[1], e)) for e in range(spec.num_experts)]
                if spec.num_experts else [(None, source.read(spec.name))])
        for e, w in mats:
            w = w.to(device, torch.float32)
            imp = None if imatrix is None else (imatrix.get(spec.name) if e is None else
                                                 expert_importance(imatrix, spec.name, e, cfg.top_k))
            weight = (torch.ones(w.shape[1], device=device) if imp is None
                      else torch.as_tensor(np.asarray(imp, np.float32), device=device))
            for s in ok:
                if s == "bf16":
                    continue
                q = rtn(w, grids[s]).finalize(grids[s]).dequantize(model_dtype).to(torch.float32)
                costs[s][1] += float((((w - q) ** 2) * weight).sum())
        del mats
        u = units.setdefault(st_unit(spec.name), {"tensors": [], "params": 0, "tensor_costs": {}})
        u["tensors"].append(spec.name)
        u["params"] += int(np.prod(spec.full_shape))
        u["tensor_costs"][spec.name] = costs
    for u in units.values():
        common = [s for s in schemes if all(s in c for c in u["tensor_costs"].values())]
        if not common:
            raise Llama4QuantError(f"{u['tensors'][0]}: no candidate scheme applies to all of "
                                   f"{', '.join(u['tensors'])} (--fit-schemes {','.join(schemes)})")
        u["costs"] = {s: [sum(c[s][0] for c in u["tensor_costs"].values()),
                          sum(c[s][1] for c in u["tensor_costs"].values())] for s in common}
    return units


def make_st_plan(measured: dict, choice: dict[str, str], budget: Budget, *, group_size: int | None,
                 observer: str, schemes: tuple[str, ...]) -> dict[str, Any]:
    """The safetensors plan: the scheme per unit and per tensor, bytes and predicted error, the table by group."""
    tensors = {}
    units = {}
    for unit, s in choice.items():
        m = measured[unit]
        units[unit] = {"scheme": s, "tensors": list(m["tensors"]), "bytes": m["costs"][s][0], "error": m["costs"][s][1]}
        for t in m["tensors"]:
            tensors[t] = {"type": s, "bytes": m["tensor_costs"][t][s][0], "error": m["tensor_costs"][t][s][1]}
    return {"version": PLAN_VERSION, "format": "safetensors", "group_size": group_size, "observer": observer,
            "candidates": list(schemes),
            "budget": {"tensor_bytes": budget.tensor_bytes, "target": budget.description},
            "tensor_bytes": sum(v["bytes"] for v in tensors.values()),
            "predicted_error": sum(v["error"] for v in tensors.values()),
            "tensors": tensors, "units": units, "groups": groups(tensors)}


def load_st_plan(path: str | Path, cfg: Llama4Config, specs, group_size: int | None) -> dict[str, str]:
    """Schemes per tensor from a saved safetensors plan, checked against this model, the Linears --targets/--ignore
    select (`specs`: the plan must cover exactly those), --group-size, and the one-scheme-per-unit rule."""
    plan = _read_plan(path)
    if plan.get("format", "gguf") != "safetensors":
        raise Llama4QuantError(f"{path}: a plan for --to {plan.get('format', 'gguf')} (GGML types), not --to safetensors")
    g = None if group_size in (None, -1) else group_size
    if plan.get("group_size") != g:
        raise Llama4QuantError(f"{path}: the plan was made for --group-size {plan.get('group_size') or -1}, "
                               f"this run has {g or -1}")
    everything = {s.name for s in tensor_specs(cfg)}
    chosen = {s.name: s for s in specs}
    out: dict[str, str] = {}
    for name, v in plan["tensors"].items():
        t = v.get("type") if isinstance(v, dict) else None
        if name not in everything:
            raise Llama4QuantError(f"{path}: tensor {name} is not in this model (a plan for another model?)")
        if name not in chosen:
            raise Llama4QuantError(f"{path}: the plan sets {name}, which --targets/--ignore do not select: give the "
                                   "options the plan was made with")
        if t not in st_candidates(chosen[name], ST_FIT_SCHEMES, g):
            raise Llama4QuantError(f"{path}: {name}: scheme {t!r} is not one this tensor can take")
        out[name] = t
    missing = [n for n in chosen if n not in out]
    if missing:
        raise Llama4QuantError(f"{path}: the plan has no scheme for {missing[0]}, which --targets/--ignore select")
    by_unit: dict[str, set[str]] = {}
    for name, t in out.items():
        by_unit.setdefault(st_unit(name), set()).add(t)
    for unit, ts in by_unit.items():
        if len(ts) > 1:
            raise Llama4QuantError(f"{path}: {unit} mixes {', '.join(sorted(ts))}: vLLM runs the Linears of one fused "
                                   "module (q/k/v, gate/up, a layer's experts) with one scheme")
    return out


def st_fixed_parts(cfg: Llama4Config, planned: set[str], stored_bytes: int, vision_bytes: int, vision_tensors: int,
                   max_shard_bytes: int | None) -> dict[str, int]:
    """budget_for's overhead, fixed and passthrough for a safetensors plan of the canonical Linears `planned`: the
    text tensors outside the plan are written as stored, the vision tower passes through, and the shards' headers
    are bounded by sizes.st_overhead_bytes. --target-size counts the weight shards (model-*.safetensors)."""
    from .sizes import DEFAULT_MAX_SHARD_BYTES, st_overhead_bytes

    specs = tensor_specs(cfg)
    fixed = sum(int(np.prod(s.full_shape)) * stored_bytes for s in specs if s.name not in planned)
    everything = sum(int(np.prod(s.full_shape)) * max(stored_bytes, 2) for s in specs) + vision_bytes
    n_tensors = vision_tensors + sum(3 * max(1, s.num_experts) if s.name in planned else 1 for s in specs)
    overhead = st_overhead_bytes(everything, n_tensors, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    return {"overhead": overhead, "fixed": fixed, "passthrough": vision_bytes}


def st_budget_parts(reader, specs, max_shard_bytes: int | None) -> dict[str, int]:
    """st_fixed_parts for a checkpoint and the Linears its plan covers."""
    from .sizes import DTYPE_BYTES

    vision = reader.vision_tensors()
    vbytes = sum(int(np.prod(t.shape)) * DTYPE_BYTES.get(t.dtype, 4) for t in vision)
    stored = DTYPE_BYTES.get(str(reader.source_dtype()).removeprefix("torch."), 2)
    return st_fixed_parts(reader.config, {s.name for s in specs}, stored, vbytes, len(vision), max_shard_bytes)


# ---- what fits a budget, before converting (inspect --gpu-mem) -------------------------------------------------
FIT_COMPONENTS = ("embeddings", "attention", "routed_experts", "shared_experts", "dense_mlp", "lm_head",
                  "norms_router", "vision", "kv_cache")
_COMPONENT = {"embed": "embeddings", "attn": "attention", "experts": "routed_experts", "shared": "shared_experts",
              "mlp": "dense_mlp", "head": "lm_head", "norm": "norms_router", "router": "norms_router"}
ST_DEFAULT_ROLES = ("experts", "shared", "mlp")  # convert's default --targets (pipeline.DEFAULT_TARGETS)
ST_UNIFORM = ("w4a16", "w8a16", "fp8-dynamic", "fp8-block", "bf16")  # the uniform safetensors schemes vLLM runs


def metadata_bytes_estimate(vocab_size: int, n_tensors: int) -> int:
    """metadata_bytes without the tokenizer at hand (a preset): Llama 4's tokens and merges average under 24 and 40
    bytes with their length fields."""
    return 64 * 1024 + vocab_size * (24 + 4 + 40) + 16 * 1024 + n_tensors * (128 + 32)


def _components(items, extra: dict[str, int]) -> dict[str, int]:
    out = dict.fromkeys(FIT_COMPONENTS, 0)
    for role, b in items:
        out[_COMPONENT[role]] += int(b)
    for k, v in extra.items():
        out[k] += int(v)
    return out


def _rungs(per_tensor: list[tuple[str, int, dict[str, int]]], ladder: tuple[str, ...]) -> list[list[tuple[str, int]]]:
    """Per rung of `ladder`, (role, bytes) of every planned tensor at that candidate or, where it cannot take it,
    the nearest one above it (the largest it can take at the top)."""
    out = []
    for k, _ in enumerate(ladder):
        row = []
        for role, _, costs in per_tensor:
            up = [c for c in ladder[k:] if c in costs] or [c for c in ladder if c in costs][-1:]
            row.append((role, costs[up[0]]))
        out.append(row)
    return out


def _fit_row(budget: Budget | None, per_tensor, ladder, fixed_items, extra, overhead: int, kv: int, reserve: int,
             n_params: int) -> dict[str, Any]:
    """What `convert --fit` would do with `budget`: its tensor bytes, bits per weight, and an estimated split by
    component (interpolated between the two uniform rungs around the budget; the real split is measured)."""
    rungs = _rungs(per_tensor, ladder)
    sums = [sum(b for _, b in r) for r in rungs]
    lo_b, hi_b = sums[0], max(sums)
    planned = sum(p for _, p, _ in per_tensor)
    fixed = sum(b for _, b in fixed_items) + sum(extra.values())
    room = None if budget is None else budget.tensor_bytes
    possible = room is not None and room >= lo_b
    use = lo_b if not possible else min(room, hi_b)
    k = max([i for i, s in enumerate(sums) if s <= use] or [0])
    k2 = min(k + 1, len(sums) - 1)
    f = 0.0 if sums[k2] == sums[k] else (use - sums[k]) / (sums[k2] - sums[k])
    mix = [(role, a + f * (b - a)) for (role, a), (_, b) in zip(rungs[k], rungs[k2])]
    comps = _components([*mix, *fixed_items], {**extra, "kv_cache": kv})
    weights = use + fixed
    return {"possible": possible, "tensor_bytes": room, "min_tensor_bytes": lo_b, "max_tensor_bytes": hi_b,
            "saturated": possible and room >= hi_b, "planned_params": planned,
            "bits_per_weight": 8 * use / planned if planned else None,
            "model_bits_per_weight": 8 * (use + sum(b for _, b in fixed_items)) / n_params,
            "weights_bytes": weights, "total_bytes": weights + overhead + kv,
            "least_memory_bytes": lo_b + fixed + overhead + kv + reserve, "components": comps}


def _pick(rows: list[dict[str, Any]], gpu_mem: int) -> tuple[dict | None, dict]:
    for r in rows:
        r["fits"] = r["memory_bytes"] <= gpu_mem
    fitting = [r for r in rows if r["fits"]]
    best = max(fitting, key=lambda r: r["weights_bytes"]) if fitting else None
    return best, min(rows, key=lambda r: r["memory_bytes"])


def suggest(cfg: Llama4Config, *, gpu_mem: int, context: int, reserve: int, gguf_overhead: int,
            st_parts: dict[str, int], stored_bytes: int = 2, group_size: int | None = 128) -> dict[str, Any]:
    """For a device of `gpu_mem` bytes with a bf16 KV cache of `context` tokens and `reserve` left free: per format,
    the largest uniform scheme that fits, and what `convert --fit` would plan (the same budget arithmetic as
    convert: budget_for, the same candidates, the same byte counts). Reads no weights."""
    from ..formats.gguf.mix import SCHEMES as GGUF_SCHEMES, plan_tensors
    from .sizes import DTYPE_BYTES, kv_cache_bytes

    kv = kv_cache_bytes(cfg, context)
    specs = tensor_specs(cfg)
    n_params = sum(int(np.prod(s.full_shape)) for s in specs)
    role = {s.name: s.role for s in specs}
    model_bytes = DTYPE_BYTES.get(str(cfg.torch_dtype or "bfloat16").removeprefix("torch."), 2)  # scales' dtype

    def budget(**kw) -> Budget | None:
        try:
            return budget_for(cfg, target_size=None, target_bpw=None, fit=gpu_mem, context=context, reserve=reserve,
                              **kw)
        except Llama4QuantError:
            return None

    # GGUF: llama-quantize's mixes, and per-tensor types over LADDER
    rows = []
    for scheme in GGUF_SCHEMES:
        items = [("norm" if p.canonical is None else role[p.canonical], p.nbytes) for p in plan_tensors(cfg, scheme, True)]
        w = sum(b for _, b in items)
        rows.append({"scheme": scheme, "weights_bytes": w, "overhead_bytes": gguf_overhead,
                     "total_bytes": w + gguf_overhead + kv, "memory_bytes": w + gguf_overhead + kv + reserve,
                     "components": _components(items, {"kv_cache": kv})})
    best, least = _pick(rows, gpu_mem)
    per_tensor = []
    for s in specs:
        if s.role in ("norm", "router"):
            continue
        types = candidates(s.shape[-1])
        if types:
            n = int(np.prod(s.full_shape))
            per_tensor.append((s.role, n, {t.name: type_bytes(t, n) for t in types}))
    fixed_items = [(s.role, int(np.prod(s.full_shape)) * 4) for s in specs if s.role in ("norm", "router")]
    gguf = {"schemes": rows, "uniform": best, "smallest_uniform": {k: least[k] for k in ("scheme", "memory_bytes")},
            "fit": _fit_row(budget(overhead=gguf_overhead), per_tensor, LADDER, fixed_items, {}, gguf_overhead, kv,
                            reserve, n_params)}
    gguf["fit"]["candidates"] = [t for t in LADDER if any(t in c for _, _, c in per_tensor)]

    # safetensors: convert's default targets, one scheme per module among ST_DEFAULT_SCHEMES; the rest as stored
    planned = [s for s in specs if s.role in ST_DEFAULT_ROLES]
    names = {s.name for s in planned}
    fixed_items = [(s.role, int(np.prod(s.full_shape)) * stored_bytes) for s in specs if s.name not in names]
    extra = {"vision": st_parts["passthrough"]}
    rows = []
    for scheme in ST_UNIFORM:
        if not all(st_candidates(s, (scheme,), group_size) for s in planned):
            continue
        items = [(s.role, st_tensor_bytes(s, scheme, group_size, model_bytes, stored_bytes)) for s in planned] + fixed_items
        w = sum(b for _, b in items) + st_parts["passthrough"]
        rows.append({"scheme": scheme, "weights_bytes": w, "overhead_bytes": st_parts["overhead"],
                     "total_bytes": w + st_parts["overhead"] + kv,
                     "memory_bytes": w + st_parts["overhead"] + kv + reserve,
                     "components": _components(items, {**extra, "kv_cache": kv})})
    best, least = _pick(rows, gpu_mem)
    per_tensor = [(s.role, int(np.prod(s.full_shape)),
                   {c: st_tensor_bytes(s, c, group_size, model_bytes, stored_bytes)
                    for c in st_candidates(s, ST_DEFAULT_SCHEMES, group_size)}) for s in planned]
    st = {"schemes": rows, "uniform": best, "smallest_uniform": {k: least[k] for k in ("scheme", "memory_bytes")},
          "fit": _fit_row(budget(**st_parts) if planned else None, per_tensor, ST_DEFAULT_SCHEMES, fixed_items,
                          extra, st_parts["overhead"], kv, reserve, n_params)}
    st["fit"]["candidates"] = list(ST_DEFAULT_SCHEMES)
    return {"gpu_mem_bytes": gpu_mem, "context": context, "reserve_bytes": reserve, "kv_cache_bytes": kv,
            "gguf": gguf, "safetensors": st}


def suggest_for_reader(reader, *, gpu_mem: int, context: int, reserve: int) -> dict[str, Any]:
    """suggest() for a checkpoint on disk: its tokenizer's GGUF metadata size, its dtype and vision tower, exactly as
    convert --fit would count them."""
    from ..formats.gguf.mix import plan_tensors
    from ..formats.gguf.vocab import load_tokenizer_data
    from .sizes import DTYPE_BYTES

    cfg = reader.config
    n_gguf = len(plan_tensors(cfg, "q4_k_m", True))
    try:
        overhead = metadata_bytes(load_tokenizer_data(reader.path, cfg), n_gguf)
    except Exception:  # no readable tokenizer: convert would refuse; plan with the estimate
        overhead = metadata_bytes_estimate(cfg.vocab_size, n_gguf)
    planned = [s for s in tensor_specs(cfg) if s.role in ST_DEFAULT_ROLES]
    stored = DTYPE_BYTES.get(str(reader.source_dtype()).removeprefix("torch."), 2)
    return suggest(cfg, gpu_mem=gpu_mem, context=context, reserve=reserve, gguf_overhead=overhead,
                   st_parts=st_budget_parts(reader, planned, None), stored_bytes=stored)


def suggest_for_preset(cfg: Llama4Config, vision_params: int, vision_layers: int, *, gpu_mem: int, context: int,
                       reserve: int) -> dict[str, Any]:
    """suggest() for a preset (nothing downloaded): bf16 weights and vision tower, the tokenizer's GGUF metadata
    estimated from the vocabulary, about 17 vision tensors per vision layer."""
    from ..formats.gguf.mix import plan_tensors

    n_gguf = len(plan_tensors(cfg, "q4_k_m", True))
    planned = {s.name for s in tensor_specs(cfg) if s.role in ST_DEFAULT_ROLES}
    parts = st_fixed_parts(cfg, planned, 2, 2 * vision_params, 17 * vision_layers + 32, None)
    return suggest(cfg, gpu_mem=gpu_mem, context=context, reserve=reserve,
                   gguf_overhead=metadata_bytes_estimate(cfg.vocab_size, n_gguf), st_parts=parts)
