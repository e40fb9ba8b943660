"""Calibration documents: plain text, JSONL / JSON records (a `text` field, chat `messages`, ShareGPT
`conversations`, or fields mapped by a recipe), and parquet when pyarrow is importable.

Chat records are rendered in Llama 4's prompt format, one block per message:

    <|begin_of_text|><|header_start|>ROLE<|header_end|>\\n\\nCONTENT<|eot|>...

so calibration sees the special tokens an instruct model sees at inference time.
"""

from __future__ import annotations

import json
import re
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


# Control characters other than tab, newlines and form feed, and U+FFFD (what undecodable bytes became
# upstream): real text in any language holds almost none, binary data read as text is full of them.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
MAX_NOT_TEXT = 0.05  # refuse a file when more than this share of its characters are such
_CHECK_AFTER = 4096  # characters read before the share is judged (and at the end of every file)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{where}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start}); "
                               "calibration data must be UTF-8 text, not binary") from None


class _TextCheck:
    """Counts characters that are not text over one file and refuses it once they dominate."""

    def __init__(self, path: Path):
        self.path, self.chars, self.bad = path, 0, 0

    def add(self, text: str) -> None:
        self.chars += len(text)
        for i in range(0, len(text), 1 << 20):  # by slices: memory stays small on a huge file
            part = text[i : i + (1 << 20)]
            self.bad += len(part) - len(_NOT_TEXT.sub("", part))
        if self.chars >= _CHECK_AFTER:
            self.judge()

    def judge(self) -> None:
        if self.chars and self.bad > MAX_NOT_TEXT * self.chars:
            raise CalibrationError(f"{self.path}: does not look like text ({self.bad} of {self.chars} characters "
                                   "are control or replacement characters); binary data or a wrong file?")


def iter_documents(path: Path, fields: Mapping[str, Any] | None = None) -> Iterator[Document]:
    """Documents of one local file, in file order. Refuses bytes that are not UTF-8 and text made mostly of
    control characters (binary data) with a CalibrationError."""
    check = _TextCheck(path)
    for doc in _file_documents(path, fields):
        check.add(doc.text)
        yield doc
    check.judge()


def _file_documents(path: Path, fields: Mapping[str, Any] | None) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt" or suffix == "":
        text = _decode(path.read_bytes(), str(path))
        if text.strip():
            yield Document(text, False)
        return
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, f"{path}:{lineno}")
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
            data = json.loads(_decode(path.read_bytes(), str(path)))
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
