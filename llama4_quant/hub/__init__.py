"""Getting checkpoints from the Hugging Face Hub: `download_model` and `resolve_model`.

Imported lazily so that `import llama4_quant.hub` does not pull in huggingface_hub until something is downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .download import DownloadResult, download_model
    from .resolve import resolve_model

__all__ = ["DownloadResult", "download_model", "resolve_model"]


def __getattr__(name: str):
    if name in ("download_model", "DownloadResult"):
        from . import download

        return getattr(download, name)
    if name == "resolve_model":
        from .resolve import resolve_model

        return resolve_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
