"""Which files of a Llama 4 repo each `--layout` takes, and how `--include` narrows that."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

LAYOUTS = ("hf", "original", "both")

# The transformers checkpoint lives at the repo root: weights, their index, configs, tokenizer, chat templates,
# processor configs, and the licence / model card that go with the weights.
_HF_ROOT_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".md", ".tiktoken")
_HF_ROOT_PREFIXES = ("LICENSE", "LICENCE", "NOTICE")
_HF_FOLDERS = ("additional_chat_templates/",)

# Meta's own checkpoint: the `original/` folder (consolidated.NN.pth, params.json, tokenizer.model, ...). Repos that
# hold only Meta's format keep those files at the root instead.
_ORIGINAL_FOLDER = "original/"
_META_ROOT_FILES = ("params.json", "tokenizer.model")


def _is_hf_file(path: str) -> bool:
    if path.startswith(_HF_FOLDERS):
        return True
    if "/" in path:
        return False
    return path.endswith(_HF_ROOT_SUFFIXES) or path.startswith(_HF_ROOT_PREFIXES)


def _is_meta_root_file(path: str) -> bool:
    return "/" not in path and (
        path in _META_ROOT_FILES or (path.startswith("consolidated.") and path.endswith(".pth"))
    )


def layout_files(paths: Iterable[str], layout: str) -> list[str]:
    """The repo files (sorted) that ``layout`` (``hf``, ``original`` or ``both``) takes from ``paths``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    paths = sorted(set(paths))
    chosen: set[str] = set()
    if layout in ("hf", "both"):
        chosen.update(p for p in paths if _is_hf_file(p))
    if layout in ("original", "both"):
        original = [p for p in paths if p.startswith(_ORIGINAL_FOLDER)]
        if not original and any(p.endswith(".pth") and _is_meta_root_file(p) for p in paths):
            original = [p for p in paths if _is_meta_root_file(p)]
        chosen.update(original)
    return sorted(chosen)


def _normalise_pattern(pattern: str) -> str:
    # as in huggingface_hub's allow_patterns: "folder/" means everything below it
    return pattern + "*" if pattern.endswith("/") else pattern


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """fnmatch-style globs against the repo path (``*`` also crosses ``/``), or against the bare file name."""
    name = path.rsplit("/", 1)[-1]
    for pat in patterns:
        pat = _normalise_pattern(pat)
        if fnmatch.fnmatchcase(path, pat) or ("/" not in pat and fnmatch.fnmatchcase(name, pat)):
            return True
    return False


def select_files(paths: Iterable[str], layout: str = "hf", include: Sequence[str] | None = None) -> list[str]:
    """The files to download: those of ``layout``, narrowed to the ``include`` globs when any are given."""
    chosen = layout_files(paths, layout)
    if include:
        chosen = [p for p in chosen if matches_any(p, include)]
    return chosen
