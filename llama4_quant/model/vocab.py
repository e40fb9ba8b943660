"""Llama 4's vocabulary facts: the pre-tokenizer split regex, the 2048 special tokens in id order (they
follow the BPE ranks: 200000 ... 202047 in the real model), and the GPT-2 byte-level alphabet."""

from __future__ import annotations

# The pre-tokenizer regex of Llama 4 (OpenAI's "o200k" pattern). Identical, character for character,
# in Meta's llama-models (models/llama4/tokenizer.py, Tokenizer.O200K_PATTERN), in transformers'
# convert_llama4_weights_to_hf.py (O200K_PATTERN, written into tokenizer.json's Split pre-tokenizer)
# and in llama.cpp's llama-vocab.cpp (the "original regex from tokenizer.json" comment for the
# gpt-4o pre-type, which tokenizer.ggml.pre "llama4" maps to).
LLAMA4_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def _reserved(name: str, count: int, start: int) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def _llama4_special_tokens() -> tuple[str, ...]:
    """All 2048 special tokens of Llama 4 in id order (200000 ... 202047 in the real model)."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = [
        "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
        *_reserved("text_post_train", 6, 0),
        "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
        *_reserved("text_post_train", 61, 8),
    ]  # offsets 5 ... 79
    vision = [
        "<|image_start|>", "<|image_end|>",
        *_reserved("vision", 2, 0),
        "<|tile_x_separator|>", "<|tile_y_separator|>",
        *_reserved("vision", 4, 2),
        "<|image|>",
        *_reserved("vision", 1, 6),
        "<|patch|>",
        *_reserved("vision", 1041, 7),
    ]  # offsets 80 ... 1133
    reasoning = [*_reserved("reasoning", 8, 0), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning  # offsets 0 ... 1143
    fill = [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]
    return tuple(named + fill)


LLAMA4_SPECIAL_TOKENS: tuple[str, ...] = _llama4_special_tokens()

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOM_TOKEN = "<|eom|>"
EOT_TOKEN = "<|eot|>"
PAD_TOKEN = "<|finetune_right_pad|>"



def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte value to the printable character that stands for it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
