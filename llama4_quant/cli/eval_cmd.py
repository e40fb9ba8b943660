"""`llama4-quant eval`: perplexity by llama-perplexity's protocol, and candidates against the reference."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, handle_errors, progress_bar

@click.command("eval")
@click.argument("reference")
@click.argument("candidates", nargs=-1)
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False), help="Text file to score.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk (llama-perplexity's -c).")
@click.option("--chunks", "n_chunks", default=None, type=int, help="Score at most this many chunks.")
@click.option("--max-ppl-increase", type=float, default=None, help="Fail (exit 3) if a candidate's perplexity rises more than this many percent.")
@click.option("--max-kld", type=float, default=None, help="Fail (exit 3) if a candidate's mean KL divergence exceeds this.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None, help="Write report.json, report.md and report.html (with plots) here.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(exists=True), help="tokenizer.json (default: the reference's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Compute dtype (auto: fp32 on CPU, bf16 on CUDA).")
@click.option("--batch-size", default=4, show_default=True, help="Chunks per forward batch.")
@click.option("--size-only", is_flag=True, help="Check candidates against their manifests by file size, not sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def eval_cmd(reference, candidates, data, ctx, n_chunks, max_ppl_increase, max_kld, report_dir, tokenizer_path,
             device, dtype, batch_size, size_only, as_json):
    """Perplexity of REFERENCE (checkpoint directory or Hub repo id) on --data by llama-perplexity's
    protocol (whole file tokenized with BOS; chunks of --ctx tokens each starting with BOS; the second
    half of every chunk scored) and, for each CANDIDATE (a compressed-tensors directory or a GGUF file we
    produced, read back from disk and decoded as its runtime decodes it): perplexity increase, mean and
    99th-percentile KL divergence from the reference, top-1 agreement and per-layer error.
    Exit code 3 when a candidate exceeds --max-ppl-increase or --max-kld."""
    from ..eval.run import GATE_FAILED_EXIT, public, run_eval

    with progress_bar() as prog:
        result = run_eval(reference, list(candidates), data, ctx, n_chunks, tokenizer_path, device, dtype, batch_size,
                          max_ppl_increase, max_kld, progress=prog, check_hashes=not size_only)
    if report_dir:
        from ..eval.report import write_report

        result["report"] = {k: str(v) for k, v in write_report(result, Path(report_dir)).items()}
    if as_json:
        emit_json(public(result))
    else:
        r = result["reference"]
        click.echo(f"{reference}: PPL = {r['perplexity']:.4f}  (mean nll {r['nll']:.5f}, {r['tokens']} tokens, {r['chunks']} chunks of {ctx})")
        for c in result["candidates"]:
            verdict = "PASS" if c["passed"] else "FAIL: " + "; ".join(c["failures"])
            click.echo(f"{c['path']}: PPL = {c['perplexity']:.4f} ({c['ppl_increase_pct']:+.2f}%), KLD mean {c['kld_mean']:.5f} "
                       f"p99 {c['kld_p99']:.5f}, top-1 {100 * c['top1_agreement']:.2f}%  {verdict}")
        if "report" in result:
            click.echo(f"report: {result['report']['html']}")
    if not result["passed"]:
        raise SystemExit(GATE_FAILED_EXIT)
