"""`llama4-quant download`: fetch a Llama 4 checkpoint from the Hub, resumably, and verify every file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import click

from .common import emit_json, handle_errors, progress_enabled


@click.command("download")
@click.argument("repo_id")
@click.option("--revision", default=None, metavar="REV", help="Branch, tag or commit (default: main).")
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Put the files here (default: the Hugging Face cache, $HF_HOME/hub).",
)
@click.option(
    "--layout",
    type=click.Choice(["hf", "original", "both"]),
    default="hf",
    show_default=True,
    help="hf: config, tokenizer, chat template, safetensors shards + index. "
    "original: Meta's original/ folder (consolidated .pth, params.json, tokenizer.model). both: the two.",
)
@click.option(
    "--include",
    multiple=True,
    metavar="PATTERN",
    help="Only the layout's files matching this glob (repeatable), e.g. --include '*.json' --include 'model-0000[1-2]*'.",
)
@click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="Hub token (default: $HF_TOKEN, else the `hf auth login` token). Prefer HF_TOKEN: arguments show in `ps`.",
)
@click.option("--max-workers", type=click.IntRange(1, 64), default=8, show_default=True, help="Files in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@handle_errors
def download_cmd(repo_id, revision, local_dir, layout, include, token, max_workers, as_json):
    """Download REPO_ID (org/name) from the Hugging Face Hub and verify every file against the Hub's hashes.

    Checks the free disk space first; an interrupted download resumes where it stopped (finished files are not
    fetched again). A file that fails verification is deleted and named; rerun to fetch it again.
    """
    from ..hub.download import download_model

    # huggingface_hub's own retry chatter and low-disk warning would interleave with our one-line errors
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Not enough free disk space")

    result = download_model(
        repo_id,
        revision=revision,
        local_dir=local_dir,
        layout=layout,
        include=list(include) or None,
        token=token or None,
        max_workers=max_workers,
        progress=progress_enabled(),
        log=lambda msg: click.echo(msg, err=True),
    )
    if as_json:
        emit_json(result.to_json())
    else:
        _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..hub.download import human_bytes

    n = len(result.files)
    kept = n - result.downloaded_files
    verified = sum(1 for f in result.files if f.verified)
    secs = result.seconds
    rate = f", {human_bytes(result.downloaded_bytes / secs)}/s" if result.downloaded_bytes and secs > 0 else ""
    table = Table(title=f"{result.repo_id}@{result.revision} ({result.commit[:10]})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("files", f"{n} ({result.downloaded_files} downloaded, {kept} already present)")
    table.add_row("bytes", f"{human_bytes(result.total_bytes)} ({human_bytes(result.downloaded_bytes)} downloaded)")
    table.add_row("time", f"{secs:.1f} s{rate}")
    table.add_row("verified", f"{verified}/{n} (sha256 for LFS files, git sha1 for the rest)")
    table.add_row("layout", result.layout)
    table.add_row("local dir", str(result.local_dir))
    if result.offline:
        table.add_row("note", "the Hub was unreachable; reused an earlier verified download")
    Console(soft_wrap=True).print(table)
