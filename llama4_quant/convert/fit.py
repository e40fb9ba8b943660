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
               context: int, reserve: int, overhead: int) -> Budget:
    """The bytes the quantizable tensors may take, from one of the three targets."""
    from .sizes import kv_cache_bytes

    fixed = sum(int(np.prod(s.full_shape)) * 4 for s in tensor_specs(cfg) if s.role in ("norm", "router"))
    n_params = sum(int(np.prod(s.full_shape)) for s in tensor_specs(cfg))
    given = [x is not None for x in (target_size, target_bpw, fit)]
    if sum(given) != 1:
        raise Llama4QuantError("give exactly one of --fit MEM, --target-size SIZE, --target-bpw BITS")
    if target_size is not None:
        total, what = target_size, f"file of at most {target_size / 1e9:.3f} GB"
    elif target_bpw is not None:
        if not 1.5 <= target_bpw <= 16:
            raise Llama4QuantError(f"--target-bpw {target_bpw}: choose between 1.5 and 16 bits per weight")
        total, what = int(target_bpw * n_params / 8) + overhead, f"{target_bpw:g} bits per weight"
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
            weight = np.ones(row, np.float32) if imp is None else np.asarray(imp, np.float32)
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


def optimise(measured: dict[str, dict[str, Any]], budget: int) -> dict[str, str]:
    """Types per tensor with the least summed error whose bytes fit `budget`."""
    hulls = {k: _hull([(c[0], c[1], t) for t, c in v["costs"].items()]) for k, v in measured.items()}
    choice = {k: 0 for k in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise Llama4QuantError(f"even the smallest types ({LADDER[0]} where it applies) need {used / 1e9:.3f} GB of "
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


def load_plan(path: str | Path, cfg: Llama4Config) -> dict[str, str]:
    """Types per tensor from a saved plan, checked against this model's tensors."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Llama4QuantError(f"{path}: not a plan file ({e})") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or not isinstance(plan.get("tensors"), dict):
        raise Llama4QuantError(f"{path}: not a llama4-quant plan (version {PLAN_VERSION})")
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
