"""`resolve_model`: turn a command's MODEL argument (a path or a Hub repo id) into a local path."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..errors import CheckpointError

# org/name, optionally @revision; the Hub's rules for names: letters, digits, '-', '_', '.', no '--' or '..'
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9_.\-]{1,96})(?:@(?P<rev>[^\s@]+))?$")


def looks_like_repo_id(model: str) -> bool:
    """``org/name`` or ``org/name@revision`` that is not an existing path."""
    m = _REPO_ID.match(model)
    if not m or ".." in m.group("repo") or "--" in m.group("repo"):
        return False
    return not Path(model).expanduser().exists()


def resolve_model(
    model: str | os.PathLike,
    token: str | None = None,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> Path:
    """Return a local path for ``model``, downloading it from the Hugging Face Hub when it is a repo id.

    Meant for the commands that take a MODEL argument (``convert``, ``inspect``, ``eval``):

    * an existing local directory or file (checkpoint folder, ``config.json``, ``params.json``, a ``.safetensors`` or
      ``.pth`` file...) is returned as is (``~`` expanded), without any network access;
    * ``org/name`` (or ``org/name@revision``) that is not an existing path is fetched with the ``hf`` layout (configs,
      tokenizer, chat template, safetensors shards + index) via `download_model` and the directory holding those files
      is returned: the snapshot folder in the Hugging Face cache, or ``local_dir`` when given. Files already
      downloaded and verified are reused without being fetched or hashed again; when the Hub cannot be reached, a
      complete verified copy from an earlier download is returned;
    * anything else raises `CheckpointError`.

    Args:
        model: a path, or a Hub repo id.
        token: Hub token; ``None`` lets huggingface_hub use ``$HF_TOKEN`` or the saved login. Never printed.
        revision: branch, tag or commit (overrides an ``@revision`` suffix); default ``main``.
        local_dir: download into this folder instead of the Hugging Face cache.
        quiet: no status line on stderr (progress bars still follow whether stderr is a terminal).

    Raises:
        CheckpointError: ``model`` is neither an existing path nor a repo id.
        llama4_quant.hub.errors.HubError (a `Llama4QuantError`): gated repo without access, repo / revision not found,
            hash mismatch, not enough disk space, network failure - each with a one-line message.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(text):
        raise CheckpointError(f"{text}: no such file or directory (and not a Hub repo id of the form org/name)")
    m = _REPO_ID.match(text)
    assert m is not None
    from .download import download_model

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    result = download_model(
        m.group("repo"),
        revision=revision or m.group("rev"),
        local_dir=local_dir,
        layout="hf",
        token=token,
        log=log,
    )
    return result.local_dir
