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
    """tokenizer.json beside the weights, else Meta's tokenizer.model, else tokenizer.json one level up
    (the HF repo layout keeps Meta's files in original/)."""
    d = Path(model_dir)
    if d.is_file():
        d = d.parent
    for cand in (d / "tokenizer.json", d / "tokenizer.model", d.parent / "tokenizer.json"):
        if cand.exists():
            return cand
    return None


def tiktoken_to_tokenizers(path: Path, total_vocab: int | None = None) -> Tokenizer:
    """Meta's tiktoken `tokenizer.model` (base64 token, rank per line) as a byte-level BPE `Tokenizer`
    with Llama 4's pre-tokenizer and special tokens (numbered from the number of ranks on, in Meta's
    order, as many as fit in `total_vocab`)."""
    import base64

    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    from .vocab import LLAMA4_SPECIAL_TOKENS, LLAMA4_SPLIT_PATTERN, bytes_to_unicode

    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            tok_b64, rank = line.split()
            ranks[base64.b64decode(tok_b64)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: tiktoken ranks are not 0..N-1")
    enc = bytes_to_unicode()
    show = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    vocab = {show(b): r for b, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], show(left), show(right)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA4_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_special = len(LLAMA4_SPECIAL_TOKENS) if total_vocab is None else max(0, min(len(LLAMA4_SPECIAL_TOKENS), total_vocab - len(ranks)))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA4_SPECIAL_TOKENS[:n_special]])
    return tok


def load_tokenizer(path: str | Path, bos_id: int | None = None, total_vocab: int | None = None) -> LoadedTokenizer:
    """Load tokenizer.json or Meta's tokenizer.model (a file, or the directory that holds it)."""
    p = Path(path)
    f = p if p.is_file() else find_tokenizer_file(p)
    if f is None:
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model found (pass --tokenizer FILE)")
    try:
        if f.suffix == ".model":
            tok = tiktoken_to_tokenizers(f, total_vocab)
        else:
            tok = Tokenizer.from_file(str(f))
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises plain Exception subclasses
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        kind = "tokenizer.model (tiktoken)" if f.suffix == ".model" else "tokenizer.json"
        raise CheckpointError(f"{f}: not a valid {kind} file ({why}); corrupt or truncated?") from None
    if tok.get_vocab_size(with_added_tokens=True) == 0:
        raise CheckpointError(f"{f}: the tokenizer has an empty vocabulary (corrupt or placeholder file?)")
    if bos_id is None:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        cfg = f.parent / "tokenizer_config.json"
        if bos_id is None and cfg.exists():
            bos_id = _bos_from_config(cfg, tok)
    return LoadedTokenizer(tok, f, bos_id)


def _bos_from_config(path: Path, tok: Tokenizer) -> int | None:
    try:
        tc = json.loads(path.read_bytes())
    except ValueError:
        raise CheckpointError(f"{path}: not valid JSON (corrupt or truncated?)") from None
    bos = tc.get("bos_token") if isinstance(tc, dict) else None
    bos = bos.get("content") if isinstance(bos, dict) else bos
    return tok.token_to_id(bos) if isinstance(bos, str) and bos else None


def check_tokenizer(model_dir: str | Path) -> Path | None:
    """Load the tokenizer a checkpoint directory holds, if any, and return its file (None when there is none).
    For paths that only copy or export the tokenizer (RTN converts): a corrupt tokenizer.json then fails the
    command with a CheckpointError instead of being passed on."""
    f = find_tokenizer_file(model_dir)
    if f is not None:
        load_tokenizer(f)
    return f
