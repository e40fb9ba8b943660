"""The `--to gguf` branch of `llama4-quant convert` and the GGUF view of `llama4-quant inspect`
(called from convert_cmd.py / inspect_cmd.py; the work is in formats/gguf_convert.py and gguf_write.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, progress_bar, progress_enabled
from .units import human

GGUF_ONLY_OPTIONS = ("split_max_size", "imatrix_file")


def convert_gguf(model: str, out: str, *, scheme: str | None, method: str, as_json: bool, progress_cls=None,
                 verify: dict | None = None, **kwargs) -> dict:
    """Run the conversion, print the summary (text or --json), warnings on stderr; returns the summary.

    verify: convert --verify's options (eval_data, ctx, chunks, max_ppl_increase, max_kld, report_dir): the GGUF is
    scored against MODEL by our evaluator (exit 3 when a gate fails). GGUF output needs --eval-data for it."""
    from ..errors import Llama4QuantError
    from ..formats.gguf_convert import run_gguf_convert

    reads_no_calibration = method == "rtn" or (method == "imatrix" and kwargs.get("imatrix_file"))
    if verify is not None and not verify.get("eval_data") and reads_no_calibration:
        raise Llama4QuantError("--verify without calibration data needs --eval-data FILE")
    heldout: list[int] = []
    with progress_bar(progress_enabled()) as prog:
        progress = progress_cls(prog) if progress_cls is not None else None
        summary = run_gguf_convert(model, out, scheme=scheme or "q4_k_m", method=method, progress=progress,
                                   heldout_out=heldout, **kwargs)
    sidecar = write_sidecar(summary)
    if verify is not None:
        from .verify import record_verification, verify_artifact

        summary["verification"] = verify_artifact(
            model, summary["output"], heldout=heldout, device=kwargs.get("device", "auto"),
            dtype=kwargs.get("dtype", "auto"), batch_size=kwargs.get("batch_size", 4), tokenizer=kwargs.get("tokenizer"),
            **verify)
        record_verification(sidecar, summary["verification"])
    if as_json:
        emit_json(summary)
    else:
        types = ", ".join(f"{t} x{v['tensors']}" for t, v in summary["tensor_types"].items())
        files = summary["files"]
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more split files)"
        click.echo(f"wrote {where}: {summary['scheme']} via {summary['method']}, {human(summary['total_bytes'])} "
                   f"({types}), {summary['seconds']:.1f}s")
        t = summary.get("tokens_per_expert")
        if t:
            click.echo(f"tokens per expert: min {t['min']}, max {t['max']}, {t['zero_token_experts']} expert(s) with none")
    for w in summary["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if verify is not None:
        from .verify import echo_verification

        if not as_json:
            echo_verification(summary["verification"])
        if not summary["verification"]["candidates"][0]["passed"]:
            from .eval_cmd import GATE_FAILED_EXIT

            raise SystemExit(GATE_FAILED_EXIT)
    return summary


MANIFEST_SUFFIX = ".llama4-quant.json"


def write_sidecar(summary: dict) -> Path:
    """`OUT.gguf.llama4-quant.json` beside the GGUF: the run's summary, tool version and the sha256 of every file
    (the GGUF itself carries its provenance as llama4_quant.* metadata). Written after the GGUF is complete."""
    from .. import __version__
    from ..fsutil import sha256_file, write_json_atomic

    first = Path(summary["files"][0])
    manifest = {"tool": "llama4-quant", "version": __version__, **summary,
                "sha256": {Path(f).name: sha256_file(Path(f)) for f in summary["files"]}}
    path = first.with_name(first.name + MANIFEST_SUFFIX)
    write_json_atomic(path, manifest)
    summary["manifest"] = str(path)
    return path


def inspect_gguf(path: str, as_json: bool) -> dict:
    """`inspect FILE.gguf`: tensor types and sizes of a GGUF we (or llama.cpp) wrote."""
    from ..formats.gguf_write import describe_gguf

    info = describe_gguf(path)
    if as_json:
        emit_json(info)
        return info
    from rich.console import Console
    from rich.table import Table

    con = Console()
    md = info["metadata"]
    con.print(f"[bold]{path}[/bold]  {len(info['files'])} file(s), {human(info['file_bytes'])}, "
              f"{info['params']:,} params, {info['bits_per_weight']:.2f} bits/weight")
    con.print(", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in md.items()))
    r = info["llama_cpp_runs"]
    con.print(f"llama.cpp runs: {r['layers']} layers, {r['experts']} experts on layers {r['moe_layers'][:6]}"
              f"{'...' if len(r['moe_layers']) > 6 else ''}, NoPE {r['nope_layers'][:6]}, chunk {r['attention_chunk_size']}, "
              f"qk norm {r['qk_norm']}")
    t = Table(title="by type")
    for col in ("type", "tensors", "params", "bytes"):
        t.add_column(col, justify="right")
    for k, v in info["by_type"].items():
        t.add_row(k, str(v["tensors"]), f"{v['params']:,}", human(v["bytes"]))
    con.print(t)
    t = Table(title="tensors")
    for col in ("name", "type", "shape", "bytes"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    for x in info["tensors"]:
        t.add_row(x["name"], x["type"], "x".join(str(s) for s in x["shape"]), human(x["bytes"]))
    con.print(t)
    return info
