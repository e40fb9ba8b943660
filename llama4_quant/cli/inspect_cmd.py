"""`llama4-quant inspect`: architecture, parameter counts and memory needs of a checkpoint or preset."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import Llama4QuantError
from .common import emit_json, handle_errors
from .units import SizeType, human


def describe_model(model: str, context: int, gpu_mem: int | None, reserve: int = 10**9) -> dict:
    from ..model.config import from_hf_dict
    from ..convert import fit
    from ..convert.sizes import memory_table
    from ..model.params import param_counts
    from ..model.presets import PRESETS, vision_param_count

    if model.lower() in PRESETS:
        preset = PRESETS[model.lower()]
        cfg = from_hf_dict(preset["config"])
        vision = vision_param_count(preset["config"]["vision_config"], cfg.hidden_size)
        source = {"preset": model.lower(), "repo_id": preset["repo_id"]}
        tower = _preset_vision(preset["config"]["vision_config"], cfg.hidden_size, vision)
        fits = None if gpu_mem is None else fit.suggest_for_preset(
            cfg, vision, tower["layers"], gpu_mem=gpu_mem, context=context, reserve=reserve)
    else:
        from ..model.readers import open_checkpoint
        from ..hub.resolve import resolve_model

        if "/" not in model and not Path(model).exists():
            import difflib

            near = difflib.get_close_matches(model.lower(), list(PRESETS), n=1, cutoff=0.5)
            hint = f"did you mean the preset {near[0]!r}?" if near else f"presets: {', '.join(PRESETS)}"
            raise Llama4QuantError(f"{model}: no such checkpoint directory, and not a preset or a Hub repo id "
                                   f"(org/name); {hint}")
        path = Path(resolve_model(model))
        from ..eval.sources import is_compressed_tensors_dir, open_any
        from ..formats.manifest import check_files

        if is_compressed_tensors_dir(path):  # a converted model: check it against its manifest, read it back
            check_files(path)
            reader = open_any(path)
        else:
            reader = open_checkpoint(path)
        cfg = reader.config
        vision = sum(_numel(t.shape) for t in reader.vision_tensors())
        source = {"path": str(path), "layout": reader.layout}
        from ..convert.mmproj import vision_summary

        tower = vision_summary(reader)
        fits = None if gpu_mem is None else fit.suggest_for_reader(reader, gpu_mem=gpu_mem, context=context,
                                                                   reserve=reserve)
    arch = {
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "experts": cfg.num_experts,
        "experts_per_token": cfg.top_k,
        "expert_ffn": cfg.intermediate_size,
        "dense_ffn": cfg.intermediate_size_mlp,
        "moe_layers": list(cfg.moe_layers),
        "interleave_moe_layer_step": cfg.interleave_moe_layer_step,
        "nope_layers": list(cfg.nope_layers),
        "attention_chunk_size": cfg.attention_chunk_size,
        "qk_norm": cfg.use_qk_norm,
        "attn_temperature_tuning": cfg.attn_temperature_tuning,
        "floor_scale": cfg.floor_scale,
        "attn_scale": cfg.attn_scale,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {"rope_type": "llama3", **vars(cfg.rope_scaling)},
    }
    return {
        "source": source,
        "architecture": arch,
        "params": param_counts(cfg, vision),
        "vision_tower": tower,
        "memory": memory_table(cfg, context, gpu_mem),
        "context": context,
        "gpu_mem_bytes": gpu_mem,
        "fit": fits,
    }


def _preset_vision(vc: dict, text_hidden: int, params: int) -> dict:
    """A preset's vision tower (Meta ships it in bf16) and its mmproj file size per --mmproj-type."""
    from ..formats.gguf.mmproj import mmproj_sizes, vision_params

    vp = vision_params(vc, text_hidden)
    return {"params": params, "bytes": 2 * params, "by_dtype": {"BF16": {"params": params, "bytes": 2 * params}},
            "layers": vp.num_layers, "hidden_size": vp.hidden_size, "image_size": vp.image_size,
            "patch_size": vp.patch_size, "mmproj_bytes": mmproj_sizes(vp)}


def _vision_text(v: dict | None) -> str:
    if not v:
        return ("vision tower: none read (a text-only checkpoint, or Meta's .pth layout, which is read for the text "
                "model only): no mmproj from it")
    dtypes = ", ".join(f"{k} {human(x['bytes'])}" for k, x in v["by_dtype"].items())
    text = f"vision tower: {v['params']:,} params ({dtypes})"
    if "layers" in v:
        text += (f", {v['layers']} layers, width {v['hidden_size']}, image {v['image_size']} / patch {v['patch_size']}"
                 "; mmproj (--mmproj-type): " + ", ".join(f"{k} {human(b)}" for k, b in v["mmproj_bytes"].items()))
    elif "mmproj_error" in v:
        text += f"; no mmproj: {v['mmproj_error']}"
    return text


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@click.command("inspect")
@click.argument("model")
@click.option("--gpu-mem", type=SizeType(), default="80GB", show_default=True, help="GPU memory to plan for (80GB, 78GiB, ...).")
@click.option("--context", default=8192, show_default=True, help="Context length for the KV-cache estimate.")
@click.option("--reserve", default="1GB", show_default=True, type=SizeType(),
              help="Memory left free for the runtime's buffers when saying what fits --gpu-mem (as convert --fit).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def inspect_cmd(model, gpu_mem, context, reserve, as_json):
    """Show MODEL's architecture, parameter counts by component and the memory each export scheme
    needs (weights + bf16 KV cache for --context), and whether it fits --gpu-mem.

    MODEL is a checkpoint directory (HF or Meta layout), a Hub repo id, or a preset: scout, maverick;
    or a .gguf file (any split part): its tensor types and sizes.

    Then, per format, what fits --gpu-mem: the largest uniform scheme, and the bits per weight and size per
    component of a `convert --fit` plan for that memory (docs/fit.md)."""
    if model.endswith(".gguf"):
        inspect_gguf(model, as_json)
        return
    info = describe_model(model, context, gpu_mem, reserve)
    if as_json:
        emit_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    a, p = info["architecture"], info["params"]
    src = info["source"]
    where = (f"preset of {src['repo_id']} (nothing downloaded)" if "preset" in src
             else f"{src['path']} ({src['layout']} layout)")
    con.print(f"[bold]{model}[/bold]: {where}")
    moe = "all layers" if len(a["moe_layers"]) == a["layers"] else f"layers {a['moe_layers'][:6]}... (step {a['interleave_moe_layer_step']})"
    con.print(
        f"{a['layers']} layers, hidden {a['hidden_size']}, {a['heads']} heads / {a['kv_heads']} kv x {a['head_dim']}, "
        f"vocab {a['vocab_size']}\nMoE: {a['experts']} experts, top-{a['experts_per_token']}, width {a['expert_ffn']}, on {moe}; "
        f"dense width {a['dense_ffn']}\nNoPE layers {a['nope_layers'][:8]}{'...' if len(a['nope_layers']) > 8 else ''}; "
        f"chunk {a['attention_chunk_size']}; qk norm {a['qk_norm']}; rope theta {a['rope_theta']:g}, scaling "
        + _rope_text(a["rope_scaling"])
    )
    t = Table(title="parameters")
    t.add_column("component")
    t.add_column("params", justify="right")
    for k, v in p.items():
        t.add_row(k, f"{v / 1e9:.3f} B" if v > 1e7 else f"{v:,}")
    con.print(t)
    con.print(_vision_text(info["vision_tower"]))
    m = Table(title=f"memory (KV cache for {context} tokens, bf16; GB = 10^9 bytes)")
    for col in ("scheme", "weights", "kv cache", "total", f"fits {human(gpu_mem)}", "GPUs"):
        m.add_column(col, justify="right")
    for k, v in info["memory"].items():
        m.add_row(k, human(v["weights_bytes"]), human(v["kv_cache_bytes"]), human(v["total_bytes"]),
                  "yes" if v["fits"] else "no", str(v["gpus"]))
    con.print(m)
    if info["fit"] is not None:
        _print_fit(con, info["fit"])


_COMPONENT_LABELS = {"embeddings": "token embeddings", "attention": "attention", "routed_experts": "routed experts",
                     "shared_experts": "shared experts", "dense_mlp": "dense MLPs", "lm_head": "lm_head",
                     "norms_router": "norms + routers", "vision": "vision tower", "kv_cache": "KV cache"}


def _print_fit(con, f: dict) -> None:
    """What fits --gpu-mem: the largest uniform scheme and a --fit plan per format, by component."""
    from rich.table import Table

    cols = []
    for fmt in ("gguf", "safetensors"):
        u, p = f[fmt]["uniform"], f[fmt]["fit"]
        if u is not None:
            cols.append((f"{fmt} {u['scheme']}", u["components"], u["total_bytes"]))
        bpw = f"{p['bits_per_weight']:.2f}" if p["bits_per_weight"] is not None else "-"
        cols.append((f"{fmt} --fit ({bpw} bpw)" if p["possible"] else f"{fmt} --fit (does not fit)", p["components"],
                     p["total_bytes"]))
    t = Table(title=f"what fits {human(f['gpu_mem_bytes'])} ({f['context']}-token bf16 KV cache, "
                    f"{human(f['reserve_bytes'])} kept free)",
              caption="--fit columns: the split between the uniform rungs around the budget (convert measures the "
                      "real one)")
    t.add_column("component")
    for name, _, _ in cols:
        t.add_column(name, justify="right")
    shown = [k for k in _COMPONENT_LABELS if any(c[k] for _, c, _ in cols)]
    for k in shown:
        t.add_row(_COMPONENT_LABELS[k], *[human(c[k]) for _, c, _ in cols])
    t.add_row("total", *[human(total) for _, _, total in cols])
    con.print(t)
    mem = _size_arg(f["gpu_mem_bytes"])
    for fmt, flag in (("gguf", "--to gguf"), ("safetensors", "--to safetensors")):
        u, least, p = f[fmt]["uniform"], f[fmt]["smallest_uniform"], f[fmt]["fit"]
        if u is not None:
            line = f"{fmt}: the largest uniform scheme that fits is {u['scheme']} ({human(u['memory_bytes'])} with the reserve)"
        else:
            line = (f"{fmt}: no uniform scheme fits (the smallest, {least['scheme']}, needs "
                    f"{human(least['memory_bytes'])})")
        if not p["possible"]:
            line += (f"; no --fit plan either: its smallest candidates everywhere need "
                     f"{human(p['least_memory_bytes'])}")
        elif p["saturated"]:
            line += f"; convert {flag} --fit {mem} would keep every module at its largest candidate ({p['candidates'][-1]})"
        else:
            line += (f"; convert {flag} --fit {mem} --context {f['context']} would plan "
                     f"{human(p['tensor_bytes'])} of tensors at {p['bits_per_weight']:.2f} bits per weight "
                     f"({p['model_bits_per_weight']:.2f} over the whole text model), among "
                     f"{', '.join(p['candidates'])}")
        con.print(line)


def inspect_gguf(path: str, as_json: bool) -> dict:
    """`inspect FILE.gguf`: tensor types and sizes of a GGUF we (or llama.cpp) wrote."""
    from ..formats.gguf.mmproj import is_mmproj
    from ..formats.gguf.reader import describe_gguf
    from ..formats.manifest import check_files

    integrity = check_files(path)  # a file that no longer matches its sidecar manifest is refused
    if is_mmproj(path):
        return inspect_mmproj(path, integrity, as_json)
    info = {**describe_gguf(path), "integrity": integrity}
    if as_json:
        emit_json(info)
        return info
    from rich.console import Console

    con = Console()
    md = info["metadata"]
    con.print(f"[bold]{path}[/bold]  {len(info['files'])} file(s), {human(info['file_bytes'])}, "
              f"{info['params']:,} params, {info['bits_per_weight']:.2f} bits/weight")
    con.print(", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in md.items()))
    r = info["llama_cpp_runs"]
    con.print(f"llama.cpp runs: {r['layers']} layers, {r['experts']} experts on layers {r['moe_layers'][:6]}"
              f"{'...' if len(r['moe_layers']) > 6 else ''}, NoPE {r['nope_layers'][:6]}, chunk {r['attention_chunk_size']}, "
              f"qk norm {r['qk_norm']}")
    _print_tensor_tables(con, info)
    return info


def inspect_mmproj(path: str, integrity: dict, as_json: bool) -> dict:
    """`inspect MMPROJ.gguf`: llama.cpp's vision projector file (not a text model)."""
    from ..formats.gguf.mmproj import describe_mmproj

    info = {**describe_mmproj(path), "integrity": integrity}
    if as_json:
        emit_json(info)
        return info
    from rich.console import Console

    con = Console()
    bpw = f", {info['bits_per_weight']:.2f} bits/weight" if info["bits_per_weight"] else ""
    con.print(f"[bold]{path}[/bold]  mmproj (llama.cpp vision projector, type {info['projector_type']}; load it with "
              f"--mmproj beside a text GGUF), {human(info['file_bytes'])}, {info['params']:,} params{bpw}")
    v = info["vision"]
    con.print(f"vision encoder: {v['block_count']} layers, width {v['embedding_length']}, FFN {v['feed_forward_length']}, "
              f"{v['head_count']} heads, image {v['image_size']} / patch {v['patch_size']}, pixel-shuffle "
              f"x{v['scale_factor']}, output width {v['projection_dim']} (the text model's), image mean "
              f"{_floats(v['image_mean'])} std {_floats(v['image_std'])}")
    con.print(", ".join(f"{k.split('.', 1)[1]}={x}" for k, x in info["metadata"].items()))
    _print_tensor_tables(con, info)
    return info


def _print_tensor_tables(con, info: dict) -> None:
    """A GGUF's bytes by type, then every tensor (text GGUF and mmproj alike)."""
    from rich.table import Table

    t = Table(title="by type")
    for col in ("type", "tensors", "params", "bytes"):
        t.add_column(col, justify="right")
    for k, x in info["by_type"].items():
        t.add_row(k, str(x["tensors"]), f"{x['params']:,}", human(x["bytes"]))
    con.print(t)
    t = Table(title="tensors")
    for col in ("name", "type", "shape", "bytes"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    for x in info["tensors"]:
        t.add_row(x["name"], x["type"], "x".join(str(d) for d in x["shape"]), human(x["bytes"]))
    con.print(t)


def _size_arg(n: int) -> str:
    """A byte count as a --fit argument (80GB, 24GiB, or plain bytes)."""
    for unit, k in (("GB", 10**9), ("GiB", 1 << 30), ("MB", 10**6), ("MiB", 1 << 20)):
        if n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def _floats(xs) -> str:
    return "[" + ", ".join(f"{x:g}" for x in xs) + "]" if isinstance(xs, list) else str(xs)


def _rope_text(r: dict | None) -> str:
    if not r:
        return "none"
    return (f"{r['rope_type']} x{r['factor']:g} (low {r['low_freq_factor']:g}, high {r['high_freq_factor']:g}, "
            f"original context {r['original_max_position_embeddings']})")
