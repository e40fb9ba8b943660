"""Shared CLI plumbing: one-line errors, JSON output, progress bars that stay quiet off a TTY."""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import Llama4QuantError

err_console = Console(stderr=True)


def handle_errors(fn):
    """Turn our own errors (and a few common OS ones) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Llama4QuantError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                click.echo(f"error: no space left on device ({e.filename or 'output'})", err=True)
            else:
                click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            import os

            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun stops the others when a rank fails
                click.echo(f"error: rank {os.environ.get('RANK', '?')}: stopped (another rank failed or the run was "
                           "interrupted); no artifact was written", err=True)
            else:
                click.echo("error: interrupted", err=True)
            sys.exit(130)

    return wrapper


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def progress_enabled() -> bool:
    return sys.stderr.isatty()


class EtaColumn(TimeRemainingColumn):
    """Time remaining: the task's own ``eta`` field (seconds) when its owner computes one, else rich's estimate
    (which only looks at the last 30 s, too short for minutes-long layers)."""

    def render(self, task):
        eta = task.fields.get("eta")
        if eta is None:
            return super().render(task)
        from rich.text import Text

        m, sec = divmod(int(round(eta)), 60)
        h, m = divmod(m, 60)
        return Text(f"{h}:{m:02d}:{sec:02d}", style="progress.remaining")


@contextmanager
def progress_bar(enabled: bool | None = None):
    """A rich Progress on stderr; disabled (no output at all) when stderr is not a terminal."""
    if enabled is None:
        enabled = progress_enabled()
    prog = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        EtaColumn(),
        console=err_console,
        disable=not enabled,
        transient=False,
    )
    with prog:
        yield prog
