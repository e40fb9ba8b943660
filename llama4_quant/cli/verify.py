"""`convert --verify`: the eval check run on the artifact just written, recorded next to it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import Llama4QuantError
from ..fsutil import write_json_atomic


def verify_options(fn):
    """The --verify family of convert options."""
    opts = [
        click.option("--verify", is_flag=True, help="After converting, check the artifact against MODEL (perplexity, "
                     "KLD) on --eval-data or on calibration documents the sampler did not use; record it in the manifest."),
        click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="--verify: text file to score (default: held-out calibration documents)."),
        click.option("--verify-ctx", default=512, show_default=True, help="--verify: tokens per chunk."),
        click.option("--verify-chunks", default=16, show_default=True, help="--verify: chunks to score."),
        click.option("--max-ppl-increase", type=float, default=None, help="--verify: fail (exit 3) above this percent."),
        click.option("--max-kld", type=float, default=None, help="--verify: fail (exit 3) above this mean KLD."),
        click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
                     help="--verify: also write report.json/md/html here."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def verify_artifact(model: str, artifact: str, *, eval_data: str | None, heldout: list[int], ctx: int, chunks: int,
                    max_ppl_increase: float | None, max_kld: float | None, device: str, dtype: str, batch_size: int,
                    report_dir: str | None, tokenizer: str | None = None) -> dict:
    from ..eval.report import write_report
    from .eval_cmd import _public, run_eval

    tokens = None
    data_label = eval_data
    if eval_data is None:
        if len(heldout) < 2 * ctx:
            raise Llama4QuantError(f"--verify: only {len(heldout)} calibration tokens were left out of the samples "
                                   f"(need {2 * ctx}); pass --eval-data FILE or use fewer --calib-samples")
        tokens = heldout
        data_label = f"held-out calibration tokens ({len(heldout)})"
    try:
        result = run_eval(model, [artifact], data_label, ctx, chunks, tokenizer, device, dtype, batch_size,
                          max_ppl_increase, max_kld, tokens=tokens)
    except Llama4QuantError as e:
        raise Llama4QuantError(f"--verify: {e}") from None
    if report_dir:
        result["report"] = {k: str(v) for k, v in write_report(result, Path(report_dir)).items()}
    return _public(result)


def record_verification(manifest_path: Path, verification: dict) -> None:
    """Add the verification result to a JSON manifest, atomically."""
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest["verification"] = verification
    write_json_atomic(manifest_path, manifest)


def echo_verification(v: dict) -> None:
    c = v["candidates"][0]
    verdict = "PASS" if c["passed"] else "FAIL: " + "; ".join(c["failures"])
    click.echo(f"verify: PPL {v['reference']['perplexity']:.4f} -> {c['perplexity']:.4f} ({c['ppl_increase_pct']:+.2f}%), "
               f"KLD mean {c['kld_mean']:.5f} p99 {c['kld_p99']:.5f}, top-1 {100 * c['top1_agreement']:.2f}%  {verdict}")
