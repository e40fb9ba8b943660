"""`llama4-quant eval`: perplexity by llama-perplexity's protocol, and candidates against the reference."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import Llama4QuantError
from .common import emit_json, handle_errors, progress_bar

GATE_FAILED_EXIT = 3


def _resolve(model: str) -> Path:
    from ..hub.download import resolve_model

    return Path(resolve_model(model))


def check_vocab(tokenizer_vocab: int, model_vocab: int, where) -> None:
    if tokenizer_vocab > model_vocab:
        raise Llama4QuantError(
            f"tokenizer {where} has {tokenizer_vocab} tokens but the model's vocabulary is {model_vocab}:"
            " they do not belong together"
        )


def run_eval(reference: str, candidates: list[str], data: str, ctx: int, n_chunks: int | None,
             tokenizer_path: str | None, device: str, dtype: str, batch_size: int,
             max_ppl_increase: float | None, max_kld: float | None, progress: bool | None = None,
             tokens: list[int] | None = None) -> dict:
    """The whole check, as a dict (`--json`'s shape). Also used by `convert --verify` (with `tokens`, the
    held-out calibration tokens, instead of a file)."""
    import torch

    from ..eval.compare import compare_models
    from ..eval.perplexity import make_chunks
    from ..eval.sources import open_any
    from ..model.runner import resolve_device, resolve_dtype
    from ..model.tokenizer import load_tokenizer

    ref = open_any(_resolve(reference))
    cands = [open_any(Path(c)) for c in candidates]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = load_tokenizer(tokenizer_path or ref.path, bos_id=None, total_vocab=ref.config.vocab_size)
    check_vocab(tok.vocab_size, ref.config.vocab_size, tok.path)
    if tokens is None:
        tokens = tok.encode(Path(data).read_text(encoding="utf-8", errors="replace"))
    chunks = make_chunks(tokens, ctx, n_chunks, tok.bos_id)
    with progress_bar(progress) as prog:
        task = prog.add_task("layers", total=ref.config.num_layers)
        ref_scores, cand_scores = compare_models(ref, cands, chunks, dev, dt, batch_size, names=list(candidates),
                                                 on_layer=lambda i: prog.advance(task))
    result = {"reference": {**ref_scores.summary(), "path": str(reference), "ctx": ctx,
                            "per_chunk_ppl": ref_scores.scores.per_chunk_ppl(), "running_ppl": ref_scores.scores.running_ppl()},
              "candidates": [], "data": str(data),
              "thresholds": {"max_ppl_increase_pct": max_ppl_increase, "max_kld": max_kld}}
    all_ok = True
    for c in cand_scores:
        s = c.summary(ref_scores)
        s["per_chunk_ppl"] = c.scores.per_chunk_ppl()
        s["kld_values"] = torch.cat(c.kld).tolist() if c.kld else []
        failures = []
        if max_ppl_increase is not None and s["ppl_increase_pct"] > max_ppl_increase:
            failures.append(f"ppl +{s['ppl_increase_pct']:.2f}% > {max_ppl_increase}%")
        if max_kld is not None and s["kld_mean"] > max_kld:
            failures.append(f"KLD {s['kld_mean']:.5f} > {max_kld}")
        s["passed"] = not failures
        s["failures"] = failures
        all_ok &= not failures
        result["candidates"].append(s)
    result["passed"] = all_ok
    return result


def _public(result: dict) -> dict:
    """--json output: drop the bulky per-position arrays (they go to report.json)."""
    out = {**result, "candidates": [{k: v for k, v in c.items() if k != "kld_values"} for c in result["candidates"]]}
    return out


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
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def eval_cmd(reference, candidates, data, ctx, n_chunks, max_ppl_increase, max_kld, report_dir, tokenizer_path,
             device, dtype, batch_size, as_json):
    """Perplexity of REFERENCE (checkpoint directory or Hub repo id) on --data by llama-perplexity's
    protocol (whole file tokenized with BOS; chunks of --ctx tokens each starting with BOS; the second
    half of every chunk scored) and, for each CANDIDATE (a compressed-tensors directory or a GGUF file we
    produced, read back from disk and decoded as its runtime decodes it): perplexity increase, mean and
    99th-percentile KL divergence from the reference, top-1 agreement and per-layer error.
    Exit code 3 when a candidate exceeds --max-ppl-increase or --max-kld."""
    result = run_eval(reference, list(candidates), data, ctx, n_chunks, tokenizer_path, device, dtype, batch_size,
                      max_ppl_increase, max_kld)
    if report_dir:
        from ..eval.report import write_report

        result["report"] = {k: str(v) for k, v in write_report(result, Path(report_dir)).items()}
    if as_json:
        emit_json(_public(result))
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
