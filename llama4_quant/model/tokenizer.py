"""Tokenizer loading: the HF `tokenizer.json` via the `tokenizers` library."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import CheckpointError


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    path: Path
    bos_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def find_tokenizer_file(model_dir: str | Path) -> Path | None:
    d = Path(model_dir)
    if d.is_file():
        d = d.parent
    for cand in (d / "tokenizer.json", d.parent / "tokenizer.json"):
        if cand.exists():
            return cand
    return None


def load_tokenizer(path: str | Path, bos_id: int | None = None) -> LoadedTokenizer:
    """Load tokenizer.json (a file, or the directory that holds it; Meta layouts: its parent too)."""
    p = Path(path)
    f = p if p.is_file() else find_tokenizer_file(p)
    if f is None:
        raise CheckpointError(f"{path}: no tokenizer.json found (pass --tokenizer FILE)")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{f}: unreadable tokenizer.json ({str(e).splitlines()[0]})") from None
    if bos_id is None:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        cfg = f.parent / "tokenizer_config.json"
        if bos_id is None and cfg.exists():
            bos = json.loads(cfg.read_text()).get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            bos_id = tok.token_to_id(bos) if bos else None
    return LoadedTokenizer(tok, f, bos_id)
