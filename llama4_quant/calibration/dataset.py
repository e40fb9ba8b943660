"""A calibration set: N token windows of T tokens from local files or a Hub dataset, drawn deterministically.

Sampling (same data + tokenizer + seed -> same tokens, recorded by hash in the manifest):
  1. documents are read in file order, then shuffled with `random.Random(seed)`;
  2. they are tokenized in that order (plain text gets BOS; rendered chats carry their own) and concatenated
     until the stream holds at least N * T tokens (or the data runs out);
  3. the stream is cut into consecutive T-token windows; when there are more than N, N of them are chosen
     with the same generator (kept in stream order); each window's first token becomes BOS.
Short data gives fewer windows (with a warning), never an error, as long as one window of 16+ tokens exists.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .documents import CalibrationError, Document, iter_documents, local_files
from .hub import HubSpec, fetch_dataset, parse_hub_spec, sha256_file

# The default calibration recipe. The same content ships as calibration/default.json at the top of the
# repository (a test keeps them equal); this copy is what an installed package uses.
DEFAULT_RECIPE: dict[str, Any] = {
    "name": "dolly-chat-v1",
    "description": (
        "databricks-dolly-15k (CC BY-SA 3.0) rendered as Llama 4 chats: user = instruction (+ context), "
        "assistant = response; documents shuffled with --seed and packed into --calib-seqlen windows"
    ),
    "dataset": "databricks/databricks-dolly-15k",
    "revision": "d72c16e4644a463b9c678c71d9440befd4594556",
    "files": {"databricks-dolly-15k.jsonl": "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec"},
    "fields": {"chat": [["user", "{instruction}\n\n{context}"], ["assistant", "{response}"]]},
    "samples": 128,
    "seqlen": 2048,
    "seed": 0,
}
MAX_TEXT_BYTES = 1 << 30  # stop reading documents beyond this much text
MAX_HELDOUT_TOKENS = 1 << 20  # cap on tokens kept aside for `convert --verify`
MIN_WINDOW = 16


def repo_recipe_path() -> Path:
    return Path(__file__).resolve().parents[2] / "calibration" / "default.json"


def default_recipe() -> dict[str, Any]:
    p = repo_recipe_path()
    if p.exists():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{p}: not valid JSON ({e.msg})") from None
    return dict(DEFAULT_RECIPE)


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # [N, T] int64
    info: dict[str, Any] = field(default_factory=dict)
    heldout: list[int] = field(default_factory=list)  # tokens no calibration sample holds (for --verify)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def _read_documents(files: list[tuple[str, Path]], fields) -> tuple[list[Document], bool]:
    docs: list[Document] = []
    size = 0
    for _, path in files:
        for d in iter_documents(path, fields):
            docs.append(d)
            size += len(d.text)
            if size > MAX_TEXT_BYTES:
                return docs, True
    return docs, False


def sample_windows(docs: list[Document], encode: Callable[[Document], list[int]], samples: int, seqlen: int,
                   seed: int, bos_id: int | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Steps 1-3 of the module docstring. Returns (tokens [n, T], stats)."""
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"need --calib-samples >= 1 and --calib-seqlen >= 2, got {samples} and {seqlen}")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    need = samples * seqlen
    stream: list[int] = []
    used = 0
    for i in order:
        stream.extend(encode(docs[i]))
        used += 1
        if len(stream) >= need:
            break
    warnings = []
    T = seqlen
    available = len(stream) // T
    if available == 0:
        if len(stream) < MIN_WINDOW:
            raise CalibrationError(f"the calibration data has only {len(stream)} tokens; need at least {MIN_WINDOW}")
        T, available = len(stream), 1
        warnings.append(f"calibration data holds only {len(stream)} tokens: using one sample of {T} tokens")
    if available > samples:
        picks = sorted(rng.sample(range(available), samples))
    else:
        picks = list(range(available))
        if available < samples:
            warnings.append(f"calibration data holds {len(stream)} tokens: {available} samples of {T} instead of {samples}")
    tokens = torch.tensor([stream[k * T : (k + 1) * T] for k in picks], dtype=torch.long)
    if bos_id is not None:
        tokens[:, 0] = bos_id
    stats = {"documents": len(docs), "documents_used": used, "stream_tokens": len(stream), "warnings": warnings,
             "heldout": _heldout(docs, order[used:], encode, stream, T, set(picks), available)}
    return tokens, stats


def _heldout(docs, unread: list[int], encode, stream: list[int], T: int, picked: set[int], available: int,
             limit: int = MAX_HELDOUT_TOKENS) -> list[int]:
    """Tokens that no calibration sample holds: documents the sampler never read, then unpicked windows."""
    out: list[int] = []
    for i in unread:
        if len(out) >= limit:
            return out[:limit]
        out.extend(encode(docs[i]))
    for k in range(available):
        if k not in picked and len(out) < limit:
            out.extend(stream[k * T : (k + 1) * T])
    return out[:limit]


def load_calibration(
    spec: str | None,
    tokenizer,
    samples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
) -> CalibrationSet:
    """Build the calibration set. `spec`: a local file or directory, a Hub dataset (see hub.py), or None for
    the default recipe. `tokenizer`: a llama4_quant.model.tokenizer.LoadedTokenizer."""
    recipe = default_recipe() if spec is None else None
    fields = None
    info: dict[str, Any] = {}
    if recipe is not None:
        samples = samples or recipe.get("samples", 128)
        seqlen = seqlen or recipe.get("seqlen", 2048)
        seed = recipe.get("seed", 0) if seed is None else seed
        files = recipe.get("files") or {}
        names = list(files) if isinstance(files, dict) else list(files)
        hspec = HubSpec(recipe["dataset"], recipe.get("revision", "main"), names[0] if len(names) == 1 else None)
        fetched = fetch_dataset(hspec, files if isinstance(files, dict) else None)
        sources = fetched.files
        fields = recipe.get("fields")
        info.update(source=f"default recipe {recipe.get('name', '?')}", kind="hub", recipe=recipe,
                    hub={"repo": hspec.repo_id, "revision": hspec.revision, "commit": fetched.commit,
                         "from_cache": fetched.offline})
    else:
        samples, seqlen, seed = samples or 128, seqlen or 2048, 0 if seed is None else seed
        path = Path(spec).expanduser()
        hspec = None if path.exists() else parse_hub_spec(spec)
        if path.exists():
            sources = [(str(p.relative_to(path)) if path.is_dir() else p.name, p) for p in local_files(path)]
            info.update(source=str(path), kind="local")
        elif hspec is None or spec.startswith((".", "/", "~")) or (
                Path(spec).suffix.lower() in (".txt", ".jsonl", ".json", ".parquet") and ":" not in spec):
            raise CalibrationError(f"calibration source {spec!r}: no such file, and not a Hub dataset id (org/name)")
        else:
            fetched = fetch_dataset(hspec)
            sources = fetched.files
            info.update(source=str(hspec), kind="hub",
                        hub={"repo": hspec.repo_id, "revision": hspec.revision, "commit": fetched.commit,
                             "from_cache": fetched.offline})
    docs, truncated = _read_documents(sources, fields)
    if not docs:
        raise CalibrationError(f"calibration source {info['source']}: no non-empty documents")
    bos = tokenizer.bos_id
    chat_ok = tokenizer.tokenizer.token_to_id("<|header_start|>") is not None

    def encode(d: Document) -> list[int]:
        return tokenizer.encode(d.text, add_bos=not d.chat)

    tokens, stats = sample_windows(docs, encode, samples, seqlen, seed, bos)
    warnings = stats.pop("warnings")
    heldout = stats.pop("heldout")
    if truncated:
        warnings.append(f"read only the first {MAX_TEXT_BYTES >> 20} MiB of text")
    if any(d.chat for d in docs) and not chat_ok:
        warnings.append("the tokenizer has no <|header_start|> token: chat markers were tokenized as text")
    info.update(
        files=[{"name": n, "sha256": sha256_file(p), "bytes": p.stat().st_size} for n, p in sources],
        samples=int(tokens.shape[0]), seqlen=int(tokens.shape[1]), requested_samples=samples,
        requested_seqlen=seqlen, seed=seed, tokens=int(tokens.numel()), tokens_sha256=tokens_sha256(tokens),
        chat_documents=sum(d.chat for d in docs), sampling="shuffle(seed) -> pack -> choose windows(seed); BOS first",
        warnings=warnings, **stats,
    )
    return CalibrationSet(tokens, info, heldout)
