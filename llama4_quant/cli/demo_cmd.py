"""`llama4-quant demo`: the whole job, offline, on the tiny trained Llama 4 that ships with the package."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import Llama4QuantError
from .common import emit_json, handle_errors


def _step(msg: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"==> {msg}", err=True)


def _run(args: list[str]) -> dict:
    """Run one of our own commands in-process with --json and return its parsed output."""
    from io import StringIO

    from .main import cli

    buf = StringIO()
    old = sys.stdout
    sys.stdout = buf
    code = 0
    try:
        cli.main([*args, "--json"], prog_name="llama4-quant", standalone_mode=False)
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.stdout = old
    text = buf.getvalue()
    try:
        out = json.loads(text)
    except json.JSONDecodeError:
        raise Llama4QuantError(f"demo step `llama4-quant {' '.join(args[:3])} ...` failed (exit {code})") from None
    out["_exit"] = code
    return out


@click.command("demo")
@click.option("--out", "out", type=click.Path(file_okay=False), default="llama4-quant-demo", show_default=True,
              help="Where to write the artifacts and the report.")
@click.option("--skip-gguf", is_flag=True, help="Only the safetensors export.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@handle_errors
def demo_cmd(out, skip_gguf, as_json):
    """Quantize the tiny trained Llama 4 that ships with the package (4 layers, 4 experts, 10 MB) with GPTQ to
    int4 safetensors (compressed-tensors) and to a q4_k_m GGUF, verify both against the original by
    perplexity and KL divergence, and write the report. Offline, CPU, under a minute."""
    from ..tiny.trained import demo_texts, trained_checkpoint

    quiet = as_json
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = trained_checkpoint()
    texts = demo_texts()
    calib, test = out / "calib.txt", out / "test.txt"
    calib.write_text(texts["calib"], encoding="utf-8")
    test.write_text(texts["test"], encoding="utf-8")
    _step(f"model: {model} (shipped); calibration text {calib}, held-out text {test}", quiet)

    st_out = out / "model-w4a16"
    _step(f"convert -> {st_out} (w4a16, GPTQ, calibration {calib.name})", quiet)
    st = _run(["convert", str(model), str(st_out), "--to", "safetensors", "--scheme", "w4a16", "--method", "gptq",
               "--calib", str(calib), "--calib-samples", "32", "--calib-seqlen", "256", "--force"])
    candidates = [str(st_out)]
    gg = None
    if not skip_gguf:
        gguf_out = out / "model-q4_k_m.gguf"
        _step(f"convert -> {gguf_out} (q4_k_m, GPTQ on the k-quant grid)", quiet)
        gg = _run(["convert", str(model), str(gguf_out), "--to", "gguf", "--scheme", "q4_k_m", "--method", "gptq",
                   "--calib", str(calib), "--calib-samples", "32", "--calib-seqlen", "256", "--force"])
        candidates.append(str(gguf_out))
    report = out / "report"
    _step(f"eval: reference vs {len(candidates)} candidates on {test.name} -> {report}", quiet)
    ev = _run(["eval", str(model), *candidates, "--data", str(test), "--ctx", "128", "--chunks", "24",
               "--max-ppl-increase", "10", "--report", str(report)])
    summary = {
        "model": str(model),
        "artifacts": candidates,
        "report": str(report / "report.html"),
        "reference_perplexity": ev["reference"]["perplexity"],
        "candidates": [{k: c[k] for k in ("path", "perplexity", "ppl_increase_pct", "kld_mean", "top1_agreement", "passed")}
                       for c in ev["candidates"]],
        "convert": {"safetensors": st, **({"gguf": gg} if gg else {})},
        "passed": ev["passed"],
        "seconds": round(time.time() - t0, 1),
    }
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"reference {model.name}: PPL {summary['reference_perplexity']:.4f}")
        for c in summary["candidates"]:
            click.echo(f"{Path(c['path']).name}: PPL {c['perplexity']:.4f} ({c['ppl_increase_pct']:+.2f}%), "
                       f"KLD {c['kld_mean']:.5f}, top-1 {100 * c['top1_agreement']:.1f}%  {'PASS' if c['passed'] else 'FAIL'}")
        click.echo(f"report: {summary['report']}  ({summary['seconds']} s)")
    if not ev["passed"]:
        raise SystemExit(3)
