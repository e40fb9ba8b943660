"""The tokenizer as llama.cpp wants it in a GGUF: ``gpt2`` BPE model, ``llama4`` pre-tokenizer, tokens, token
types, merges, special ids and add_bos, from ``tokenizer.json`` (+ ``tokenizer_config.json``, ``config.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gguf import TokenType

from ...model.config import Llama4Config
from .errors import GGUFWriteError


@dataclass
class TokenizerData:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / pad / unk
    add_special: dict[str, bool] = field(default_factory=dict)  # bos / eos
    chat_template: str | None = None
    model: str = "gpt2"
    pre: str = "llama4"
    source: str = ""


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _tokenizer_json(model_dir: Path, cfg: Llama4Config) -> tuple[dict, Path, bool]:
    """(tokenizer.json as a dict, the file it came from, whether it is Meta's tiktoken tokenizer.model)."""
    from ...errors import CheckpointError
    from ...model.tokenizer import find_tokenizer_file, load_tokenizer

    f = model_dir if model_dir.is_file() else find_tokenizer_file(model_dir)
    if f is None:
        raise GGUFWriteError(f"{model_dir}: no tokenizer.json or tokenizer.model; a GGUF needs the tokenizer")
    if f.suffix == ".model":
        try:
            tok = load_tokenizer(f, total_vocab=cfg.vocab_size).tokenizer
        except CheckpointError as e:
            raise GGUFWriteError(str(e)) from None
        return json.loads(tok.to_str()), f, True
    try:
        load_tokenizer(f)  # a file the tokenizers library cannot load is no tokenizer to export
        return json.loads(f.read_text(encoding="utf-8")), f, False
    except CheckpointError as e:
        raise GGUFWriteError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GGUFWriteError(f"{f}: unreadable tokenizer.json ({str(e)[:200]})") from None


def load_tokenizer_data(model_dir: str | Path, cfg: Llama4Config) -> TokenizerData:
    """Read the BPE tokenizer (see module docstring) for a vocabulary of ``cfg.vocab_size`` entries.
    `model_dir`: the checkpoint directory, or a tokenizer.json / tokenizer.model file (its directory's
    tokenizer_config.json is read too).

    Meta-layout checkpoints with only tiktoken's tokenizer.model: its ranks become the BPE vocabulary and
    merges (model/tokenizer.py), the Llama 4 special tokens follow; BOS is added, EOS is ``<|eot|>``."""
    tj, src, meta = _tokenizer_json(Path(model_dir), cfg)
    d = src.parent
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFWriteError(f"{src}: not a BPE tokenizer (llama4 GGUFs need Llama 4's byte-level BPE)")
    tc_path = d / "tokenizer_config.json"
    tcfg = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() and not meta else {}
    if meta:
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>",
                "add_bos_token": True, "add_eos_token": False}

    n = cfg.vocab_size
    by_id: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        by_id[int(i)] = tok
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= n:
        raise GGUFWriteError(f"tokenizer has token id {max(by_id)} but the model's vocabulary is {n}: they do not belong together")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            special = bool(added[i].get("special")) or _looks_special(by_id[i])
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))

    merges_raw = model.get("merges") or []
    merges: list[str] = []
    for m in merges_raw:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            # llama.cpp splits merges on the space: encode literal spaces the way its converter does
            merges.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
        else:
            raise GGUFWriteError(f"{src}: unknown merges format")

    content_to_id = {a["content"]: i for i, a in sorted(added.items())}

    def token_id(entry) -> int | None:
        if isinstance(entry, dict):
            entry = entry.get("content")
        if not isinstance(entry, str):
            return None
        return content_to_id.get(entry, model["vocab"].get(entry))

    special: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        tid = token_id(tcfg.get(f"{typ}_token"))
        if tid is None:
            tid = _config_token_id(Path(model_dir), typ, cfg)
        if isinstance(tid, int) and 0 <= tid < n:
            special[typ] = tid

    add: dict[str, bool] = {}
    pp = tj.get("post_processor") or {}
    for proc in pp.get("processors", [pp]) if pp else []:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            if first is not None:
                add["bos"] = token_id(first) == special.get("bos")
            if last is not None:
                add["eos"] = token_id(last) == special.get("eos")
    for typ in ("bos", "eos"):
        if isinstance(tcfg.get(f"add_{typ}_token"), bool):
            add[typ] = tcfg[f"add_{typ}_token"]

    template = tcfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (d / "chat_template.json").is_file():
        template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if not isinstance(template, str):
        template = None
    return TokenizerData(tokens, types, merges, special, add, template, source=str(src))


def _config_token_id(model_dir: Path, typ: str, cfg: Llama4Config) -> int | None:
    v = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}.get(typ)
    return v if isinstance(v, int) else None
