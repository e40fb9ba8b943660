"""A real, tiny byte-level BPE tokenizer laid out like Llama 4's, for fixtures and demos.

What a Llama 4 checkpoint carries, reproduced at small scale:

* ``tokenizer.json`` (Hugging Face layout): a byte-level BPE model trained here with the
  ``tokenizers`` library; ``ignore_merges`` on (a pre-token found whole in the vocabulary is
  emitted as one token, as tiktoken does); pre-tokenizer ``Sequence[Split(<Llama 4 regex>,
  isolated), ByteLevel(add_prefix_space=False, use_regex=False)]``; ``ByteLevel`` decoder; a
  post-processor that puts ``<|begin_of_text|>`` in front.
* ``tokenizer_config.json`` and ``special_tokens_map.json`` (with a chat template that renders
  ``<|header_start|>role<|header_end|>\\n\\ncontent<|eot|>`` turns).
* ``tokenizer.model`` (Meta's original layout): tiktoken ranks, ``base64(token bytes) rank`` a line.

Special tokens follow the BPE vocabulary in Meta's order, so every special token sits at the
same offset from the end of the BPE vocabulary as in the real model: Llama 4 has 200000 BPE
tokens, so ``<|begin_of_text|>`` is 200000 there and ``num_base_tokens + 0`` here, ``<|eot|>``
200008 there and ``num_base_tokens + 8`` here, and so on. By default only the first
``DEFAULT_NUM_SPECIAL_TOKENS`` (93: every named text and image token, through ``<|patch|>``) are
added, to keep tiny models' embeddings small; pass ``num_special_tokens=2048`` for Meta's full
reserved block.

Deterministic: the same text and arguments give byte-identical files.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers


# The vocabulary facts (split regex, special tokens, byte alphabet) live in llama4_quant/model/vocab.py.
from ..model.vocab import (  # noqa: E402  (re-exported)
    BOS_TOKEN,
    EOM_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    LLAMA4_SPECIAL_TOKENS,
    LLAMA4_SPLIT_PATTERN,
    PAD_TOKEN,
    bytes_to_unicode,
)

# Through <|patch|>: every named text and image token, at its Llama 4 offset.
DEFAULT_NUM_SPECIAL_TOKENS = LLAMA4_SPECIAL_TOKENS.index("<|patch|>") + 1  # 93
# Through <|finetune_right_pad|>: the fewest that still hold BOS, EOS, EOM, EOT, headers and pad.
MIN_NUM_SPECIAL_TOKENS = LLAMA4_SPECIAL_TOKENS.index(PAD_TOKEN) + 1  # 19

# Our own chat template in Llama 4's prompt format: BOS, then one
# <|header_start|>ROLE<|header_end|>\n\nCONTENT<|eot|> block per message (content may be a string or
# a list of {"type": "text"|"image", ...} parts), then an open assistant header when
# add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim if message['role'] == 'system' else message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids a checkpoint fixture needs for config.json / generation_config.json."""

    bos_id: int
    eos_id: int  # <|end_of_text|>
    eot_id: int
    eom_id: int
    pad_id: int
    vocab_size: int  # all tokens, special included: a model's vocab_size
    num_base_tokens: int  # BPE tokens (ids 0 .. num_base_tokens-1); the specials follow
    header_start_id: int
    header_end_id: int

    @property
    def stop_ids(self) -> list[int]:
        """Llama 4's stop tokens: end_of_text, eom, eot (generation_config eos_token_id of instruct models)."""
        return [self.eos_id, self.eom_id, self.eot_id]

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA4_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tokenizer(
    text: str,
    vocab_size: int = 512,
    *,
    num_special_tokens: int = DEFAULT_NUM_SPECIAL_TOKENS,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``text`` in Llama 4's format.

    ``vocab_size`` counts BPE tokens (the 256 byte tokens plus merges), like Llama 4's 200000; the
    trainer stops early if ``text`` runs out of pairs. ``num_special_tokens`` special tokens (a prefix
    of ``LLAMA4_SPECIAL_TOKENS``) follow. ``tokenizer_info(tok).vocab_size`` is the total.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    if not MIN_NUM_SPECIAL_TOKENS <= num_special_tokens <= len(LLAMA4_SPECIAL_TOKENS):
        raise ValueError(
            f"num_special_tokens must be in [{MIN_NUM_SPECIAL_TOKENS}, {len(LLAMA4_SPECIAL_TOKENS)}], "
            f"got {num_special_tokens}"
        )
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One item: chunking would change pre-tokens where a chunk boundary cuts a whitespace run.
    tok.train_from_iterator([text], trainer=trainer)
    tok.model.ignore_merges = True

    num_base = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens(
        [
            AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for t in LLAMA4_SPECIAL_TOKENS[:num_special_tokens]
        ]
    )
    bos_id = tok.token_to_id(BOS_TOKEN)
    assert bos_id == num_base, (bos_id, num_base)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tok


def tokenizer_info(tok: Tokenizer) -> TokenizerInfo:
    """Read the special ids (and sizes) off a tokenizer built by ``build_tokenizer`` (or a real Llama 4 one)."""

    def need(token: str) -> int:
        i = tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token}")
        return i

    return TokenizerInfo(
        bos_id=need(BOS_TOKEN),
        eos_id=need(EOS_TOKEN),
        eot_id=need(EOT_TOKEN),
        eom_id=need(EOM_TOKEN),
        pad_id=need(PAD_TOKEN),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        num_base_tokens=tok.get_vocab_size(with_added_tokens=False),
        header_start_id=need("<|header_start|>"),
        header_end_id=need("<|header_end|>"),
    )


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer_files(
    tok: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    instruct: bool = True,
    model_max_length: int = 131072,
    tiktoken_model: bool = False,
) -> TokenizerInfo:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``.

    ``instruct`` models get the chat template and ``<|eot|>`` as their EOS token, as Llama 4's
    instruct checkpoints do; base models get ``<|end_of_text|>`` and no template. With
    ``tiktoken_model`` also write Meta's ``tokenizer.model``. Returns the special ids.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = tokenizer_info(tok)
    tok.save(str(out / "tokenizer.json"), pretty=True)

    eos = EOT_TOKEN if instruct else EOS_TOKEN
    added = {
        str(i): _added_token_entry(tok.id_to_token(i)) for i in range(info.num_base_tokens, info.vocab_size)
    }
    config: dict = {
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if instruct:
        config["chat_template"] = CHAT_TEMPLATE
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": _added_token_entry(BOS_TOKEN),
            "eos_token": _added_token_entry(eos),
            "pad_token": _added_token_entry(PAD_TOKEN),
        },
    )
    if tiktoken_model:
        tiktoken_model_file(tok, out / "tokenizer.model")
    return info


def tiktoken_model_file(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write Meta's original ``tokenizer.model``: one ``base64(token bytes) rank`` line per BPE token.

    Ranks are the token ids, so the lines come in id order; special tokens are not in the file (Meta's
    loader numbers them from ``len(ranks)`` on, in ``LLAMA4_SPECIAL_TOKENS`` order).
    """
    decode = {c: b for b, c in bytes_to_unicode().items()}
    num_base = tok.get_vocab_size(with_added_tokens=False)
    lines = []
    for rank in range(num_base):
        piece = tok.id_to_token(rank)
        if piece is None:
            raise ValueError(f"BPE vocabulary has a hole at id {rank}")
        raw = bytes(decode[c] for c in piece)
        lines.append(f"{base64.b64encode(raw).decode('ascii')} {rank}\n")
    Path(path).write_text("".join(lines), encoding="ascii")
