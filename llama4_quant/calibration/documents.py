"""Calibration documents: plain text, JSONL / JSON records (a `text` field, chat `messages`, ShareGPT
`conversations`, or fields mapped by a recipe), and parquet when pyarrow is importable.

Chat records are rendered in Llama 4's prompt format, one block per message:

    <|begin_of_text|><|header_start|>ROLE<|header_end|>\\n\\nCONTENT<|eot|>...

so calibration sees the special tokens an instruct model sees at inference time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

from ..errors import Llama4QuantError

BOS = "<|begin_of_text|>"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class CalibrationError(Llama4QuantError):
    """The calibration data cannot be read, fetched or sampled."""


def pyarrow_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def render_chat(messages: Iterable[Mapping[str, Any]]) -> str:
    """Llama 4 chat format, BOS first (the tokenizer maps the markers to their special tokens)."""
    parts = [BOS]
    for m in messages:
        role = str(m.get("role", "")).strip()
        if not role:
            raise CalibrationError(f"chat message without a role: {dict(m)!r:.80}")
        content = m.get("content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image"}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        parts.append(f"<|header_start|>{role}<|header_end|>\n\n{content}<|eot|>")
    return "".join(parts)


class Document(NamedTuple):
    """One calibration document; `chat` is True for a rendered conversation (which carries its own BOS)."""

    text: str
    chat: bool


def render_record(rec: Any, where: str, fields: Mapping[str, Any] | None = None) -> Document | None:
    """One JSON record as a document; None for an empty one. `fields` is a recipe's mapping, e.g.
    {"chat": [["user", "{instruction}\\n\\n{context}"], ["assistant", "{response}"]]} or {"text": "{body}"}."""
    if isinstance(rec, str):
        return Document(rec, False) if rec.strip() else None
    if not isinstance(rec, Mapping):
        raise CalibrationError(f"{where}: expected a JSON object per record, got {type(rec).__name__}")
    if fields:
        vals = _FormatDict({k: ("" if v is None else v) for k, v in rec.items()})
        if "chat" in fields:
            msgs = [{"role": r, "content": str(t).format_map(vals).strip()} for r, t in fields["chat"]]
            return Document(render_chat(msgs), True)
        text = str(fields["text"]).format_map(vals)
        return Document(text, False) if text.strip() else None
    if isinstance(rec.get("messages"), list):
        return Document(render_chat(rec["messages"]), True) if rec["messages"] else None
    if isinstance(rec.get("conversations"), list):  # ShareGPT: {"from": "human", "value": ...}
        msgs = [{"role": _SHAREGPT_ROLES.get(str(m.get("from")), str(m.get("from"))), "content": m.get("value", "")}
                for m in rec["conversations"] if isinstance(m, Mapping)]
        return Document(render_chat(msgs), True) if msgs else None
    if isinstance(rec.get("text"), str):
        return Document(rec["text"], False) if rec["text"].strip() else None
    keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
    raise CalibrationError(f"{where}: record has no 'text', 'messages' or 'conversations' field (keys: {keys})")


class _FormatDict(dict):
    def __missing__(self, key):  # a recipe field the record lacks renders empty
        return ""


def iter_documents(path: Path, fields: Mapping[str, Any] | None = None) -> Iterator[Document]:
    """Documents of one local file, in file order."""
    suffix = path.suffix.lower()
    if suffix == ".txt" or suffix == "":
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(text, False)
        return
    if suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                doc = render_record(rec, f"{path}:{lineno}", fields)
                if doc is not None:
                    yield doc
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, Mapping):
            lists = [v for k, v in data.items() if isinstance(v, list)]
            if "messages" in data or "text" in data or "conversations" in data:
                data = [data]
            elif len(lists) == 1:
                data = lists[0]
            else:
                raise CalibrationError(f"{path}: expected a JSON list of records (or an object holding one list)")
        if not isinstance(data, list):
            raise CalibrationError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            doc = render_record(rec, f"{path}[{i}]", fields)
            if doc is not None:
                yield doc
        return
    if suffix == ".parquet":
        if not pyarrow_available():
            raise CalibrationError(f"{path}: parquet needs pyarrow (pip install pyarrow), or use a .jsonl/.txt file")
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(path))
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                doc = render_record(rec, f"{path}[row {i}]", fields)
                i += 1
                if doc is not None:
                    yield doc
        return
    raise CalibrationError(f"{path}: unsupported calibration file type {suffix!r} (use .txt, .jsonl, .json or .parquet)")


def local_files(path: Path) -> list[Path]:
    """A file, or the supported files in a directory (sorted, recursively)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise CalibrationError(f"{path}: no .txt, .jsonl, .json or .parquet files in this directory")
    return files
