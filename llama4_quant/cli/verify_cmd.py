"""`llama4-quant verify ARTIFACT...`: each artifact against its manifest and its config."""

from __future__ import annotations

import click

from .common import emit_json, handle_errors


@click.command("verify")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--size-only", is_flag=True, help="Compare file sizes, not sha256 (fast on very large files).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def verify_cmd(artifacts, size_only, as_json):
    """Check ARTIFACTS (compressed-tensors directories or GGUF files written by `convert`): every file is
    present with the size and sha256 its manifest records (DIR/llama4-quant.json, OUT.gguf.llama4-quant.json),
    no unknown weight file sits beside them, and the tensors are exactly what the config implies. Exit 1 with
    one error line on the first mismatch."""
    from ..eval.sources import check_artifact

    results = [check_artifact(a, hashes=not size_only, require_manifest=True) for a in artifacts]
    if as_json:
        emit_json({"artifacts": results, "passed": True})
        return
    for r in results:
        click.echo(f"{r['path']}: OK ({r['files']} files match {r['checked']} in {r['manifest']}; "
                   f"{r['format']}, {r['layers']} layers, {r['experts']} experts: structure matches the config)")
