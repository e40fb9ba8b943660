"""The demo tokenizer: Llama 4's format, loadable by tokenizers and transformers, exact round trips."""

from __future__ import annotations

import base64
import json

import pytest
from tokenizers import Tokenizer

from llama4_quant.tiny.corpus import corpus_splits, generate_corpus
from llama4_quant.tiny.tokenizer import CHAT_TEMPLATE, DEFAULT_NUM_SPECIAL_TOKENS, LLAMA4_SPECIAL_TOKENS, LLAMA4_SPLIT_PATTERN, MIN_NUM_SPECIAL_TOKENS, build_tokenizer, bytes_to_unicode, save_tokenizer_files, tiktoken_model_file, tokenizer_info

TRICKY = [
    "Hello world, I'm 12345 years old.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\nnewlines\n\n\nand\r\nCRLF\r\n",
    "digits 1 22 333 4444 55555 666666 1234567890 3.14159 -42 1/2 $12.50 7:30",
    "Unicode: café naïve Zürich São Paulo 北京 東京 Москва Αθήνα שלום مرحبا 🙂🚀 e\u0301 ½ → ∑",
    "Contractions: don't, I'M, they'RE, we've, she'll, it'd, O'Neil's",
    "CamelCase HTTPServer getHTTPResponse XMLHttpRequest",
    "x = 3 * 4  # 12\n    y = x / 3\t# 4.0",
    "",
    " ",
    "\n",
    "Ωμέγα never seen in training ✓ ⊕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def train_text() -> str:
    return generate_corpus(300_000, seed=123)


@pytest.fixture(scope="module")
def tok(train_text) -> Tokenizer:
    return build_tokenizer(train_text, vocab_size=512)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(tok, d, tiktoken_model=True)
    return d


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


# --- the pattern and the layout ---------------------------------------------------------------


def test_pattern_is_llama4_o200k():
    # As in Meta's llama-models models/llama4/tokenizer.py (O200K_PATTERN), transformers'
    # convert_llama4_weights_to_hf.py and llama.cpp's gpt-4o/llama4 pre-tokenizer comment.
    assert LLAMA4_SPLIT_PATTERN == (
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
        "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}|"
        " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    )


def test_special_token_table_matches_llama4_ids():
    # Real ids are 200000 + offset (facts file; llama-models tokenizer.py comments).
    expect = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|fim_prefix|>": 2,
        "<|fim_middle|>": 3,
        "<|fim_suffix|>": 4,
        "<|header_start|>": 5,
        "<|header_end|>": 6,
        "<|eom|>": 7,
        "<|eot|>": 8,
        "<|step|>": 9,
        "<|python_start|>": 16,
        "<|python_end|>": 17,
        "<|finetune_right_pad|>": 18,
        "<|image_start|>": 80,
        "<|image_end|>": 81,
        "<|tile_x_separator|>": 84,
        "<|tile_y_separator|>": 85,
        "<|image|>": 90,
        "<|patch|>": 92,
        "<|reasoning_thinking_start|>": 1142,
        "<|reasoning_thinking_end|>": 1143,
    }
    for token, offset in expect.items():
        assert LLAMA4_SPECIAL_TOKENS.index(token) == offset, token
    assert len(LLAMA4_SPECIAL_TOKENS) == 2048 == len(set(LLAMA4_SPECIAL_TOKENS))
    assert LLAMA4_SPECIAL_TOKENS[79] == "<|text_post_train_reserved_special_token_68|>"
    assert LLAMA4_SPECIAL_TOKENS[1133] == "<|vision_reserved_special_token_1047|>"
    assert LLAMA4_SPECIAL_TOKENS[-1] == "<|reserved_special_token_903|>"
    assert DEFAULT_NUM_SPECIAL_TOKENS == 93 and MIN_NUM_SPECIAL_TOKENS == 19


def test_info_and_special_placement(tok):
    info = tokenizer_info(tok)
    base = info.num_base_tokens
    assert base == 512
    assert info.vocab_size == base + DEFAULT_NUM_SPECIAL_TOKENS == tok.get_vocab_size()
    assert (info.bos_id, info.eos_id, info.eom_id, info.eot_id, info.pad_id) == (
        base, base + 1, base + 7, base + 8, base + 18,
    )
    assert (info.header_start_id, info.header_end_id) == (base + 5, base + 6)
    assert info.stop_ids == [base + 1, base + 7, base + 8]
    for i, t in enumerate(LLAMA4_SPECIAL_TOKENS[:DEFAULT_NUM_SPECIAL_TOKENS]):
        assert tok.id_to_token(base + i) == t
    # BPE ids are contiguous below the specials; the first 256 are the byte alphabet
    vocab = tok.get_vocab(with_added_tokens=False)
    assert sorted(vocab.values()) == list(range(base))
    assert {tok.id_to_token(i) for i in range(256)} == set(bytes_to_unicode().values())


def test_tokenizer_json_layout(tok_dir, tok):
    j = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert j["normalizer"] is None
    assert j["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA4_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    assert j["decoder"]["type"] == "ByteLevel"
    assert j["model"]["type"] == "BPE" and j["model"]["ignore_merges"] is True
    assert j["model"]["byte_fallback"] is False
    pp = j["post_processor"]
    assert pp["type"] == "Sequence"
    tp = [p for p in pp["processors"] if p["type"] == "TemplateProcessing"][0]
    assert tp["single"][0] == {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    assert tp["special_tokens"]["<|begin_of_text|>"]["ids"] == [tokenizer_info(tok).bos_id]
    added = j["added_tokens"]
    assert [a["content"] for a in added] == list(LLAMA4_SPECIAL_TOKENS[:DEFAULT_NUM_SPECIAL_TOKENS])
    assert all(a["special"] and not a["normalized"] for a in added)

    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["bos_token"] == "<|begin_of_text|>"
    assert cfg["eos_token"] == "<|eot|>" and cfg["pad_token"] == "<|finetune_right_pad|>"
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["added_tokens_decoder"][str(tokenizer_info(tok).eot_id)]["content"] == "<|eot|>"
    stm = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert stm["bos_token"]["content"] == "<|begin_of_text|>"
    assert stm["eos_token"]["content"] == "<|eot|>"
    assert stm["pad_token"]["content"] == "<|finetune_right_pad|>"


def test_base_model_files(tok, tmp_path):
    save_tokenizer_files(tok, tmp_path, instruct=False)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["eos_token"] == "<|end_of_text|>" and "chat_template" not in cfg
    assert not (tmp_path / "tokenizer.model").exists()


# --- loading and encoding ---------------------------------------------------------------------


def test_from_file_and_autotokenizer_agree(tok, tok_dir, hf_tok):
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    sample = generate_corpus(20_000, seed=7)
    for text in TRICKY + [sample]:
        a = raw.encode(text).ids
        assert a == tok.encode(text).ids
        assert a == hf_tok(text)["input_ids"]
        assert a == hf_tok.encode(text)
    info = tokenizer_info(tok)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (info.bos_id, info.eot_id, info.pad_id)
    assert len(hf_tok) == info.vocab_size


def test_bos_added_exactly_once(tok, hf_tok):
    bos = tokenizer_info(tok).bos_id
    for text in ["Hello there.", "", "<|begin_of_text|>Hi"]:
        ids = tok.encode(text).ids
        hf_ids = hf_tok(text)["input_ids"]
        assert ids[0] == bos and hf_ids[0] == bos
        expected = 2 if text.startswith("<|begin_of_text|>") else 1  # a literal BOS in the text is kept
        assert ids.count(bos) == expected and hf_ids.count(bos) == expected
    assert bos not in tok.encode("Hello there.", add_special_tokens=False).ids
    assert bos not in hf_tok("Hello there.", add_special_tokens=False)["input_ids"]
    pair = tok.encode("a b", "c d").ids
    assert pair.count(bos) == 2 and pair[0] == bos


def test_special_tokens_in_text_are_single_ids(tok):
    info = tokenizer_info(tok)
    ids = tok.encode("<|header_start|>user<|header_end|>\n\nHi<|eot|>", add_special_tokens=False).ids
    assert ids[0] == info.header_start_id and ids[-1] == info.eot_id
    assert info.header_end_id in ids


def test_round_trip(tok, hf_tok):
    test = corpus_splits(0)["test"]
    for text in TRICKY + [test]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text  # skip_special_tokens drops the BOS
        assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text


def test_compresses_corpus_text(tok):
    text = corpus_splits(0)["test"]
    assert len(tok.encode(text, add_special_tokens=False).ids) < len(text) / 1.8


# --- pre-tokenizer ----------------------------------------------------------------------------


def _pieces(tok, text):
    dec = {c: b for b, c in bytes_to_unicode().items()}
    return [bytes(dec[c] for c in p).decode("utf-8") for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize(
    "text,expected",
    [
        # digits: groups of at most three, never joined with a leading space
        ("I'm 12345 years", ["I'm", " ", "123", "45", " years"]),
        ("1234567", ["123", "456", "7"]),
        ("room 7b", ["room", " ", "7", "b"]),
        # contractions stick to the word, case-insensitively; a lone quote does not
        ("don't", ["don't"]),
        ("They'RE here", ["They'RE", " here"]),
        ("we'll we'd", ["we'll", " we'd"]),
        ("'tis", ["'tis"]),
        # case changes split words; all-caps runs stay together
        ("HTTPServer getHTTPResponse", ["HTTPServer", " get", "HTTPResponse"]),
        ("CamelCase", ["Camel", "Case"]),
        # whitespace: the last space of a run goes with the next word; newlines are their own piece
        ("a  b", ["a", " ", " b"]),
        ("hello\n\nworld", ["hello", "\n\n", "world"]),
        ("end.  \n  next", ["end", ".", "  \n", " ", " next"]),
        # punctuation keeps one leading space and swallows trailing newlines or slashes
        ("x = 1/2", ["x", " =", " ", "1", "/", "2"]),
        ("ok!\nNext", ["ok", "!\n", "Next"]),
        ("a //b", ["a", " //", "b"]),
        ('say: "hi"', ["say", ":", ' "', "hi", '"']),
        # one leading non-letter, non-digit, non-newline character joins a word, unless a space precedes it
        ("$100 and #tag, x#y", ["$", "100", " and", " #", "tag", ",", " x", "#y"]),
        ("café Zürich", ["café", " Zürich"]),
    ],
)
def test_pre_tokenizer_hand_checked(tok, text, expected):
    assert _pieces(tok, text) == expected
    assert "".join(expected) == text


def test_pre_tokenizer_matches_python_regex(tok):
    regex = pytest.importorskip("regex")
    pat = regex.compile(LLAMA4_SPLIT_PATTERN)
    text = generate_corpus(30_000, seed=99) + "".join(TRICKY)
    assert _pieces(tok, text) == pat.findall(text)


# --- chat template ----------------------------------------------------------------------------


def test_chat_template_renders(hf_tok, tok):
    msgs = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    out = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out == (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2 plus 2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n2 plus 2 is 4.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nAnd this?<|image|><|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    no_prompt = hf_tok.apply_chat_template(msgs[1:2], tokenize=False)
    assert no_prompt == "<|begin_of_text|><|header_start|>user<|header_end|>\n\nWhat is 2 plus 2?<|eot|>"
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    info = tokenizer_info(tok)
    assert ids[0] == info.bos_id and ids.count(info.bos_id) == 1
    assert ids.count(info.eot_id) == 4 and ids.count(info.header_start_id) == 5
    assert ids == tok.encode(out, add_special_tokens=False).ids


# --- determinism ------------------------------------------------------------------------------


def test_deterministic_bytes(train_text, tok_dir, tmp_path):
    again = build_tokenizer(train_text, vocab_size=512)
    save_tokenizer_files(again, tmp_path, tiktoken_model=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]:
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_arguments(train_text):
    full = build_tokenizer(train_text[:50_000], vocab_size=300, num_special_tokens=2048)
    info = tokenizer_info(full)
    assert info.num_base_tokens == 300 and info.vocab_size == 300 + 2048
    assert full.id_to_token(info.vocab_size - 1) == "<|reserved_special_token_903|>"
    small = build_tokenizer(train_text[:50_000], vocab_size=300, num_special_tokens=MIN_NUM_SPECIAL_TOKENS)
    assert tokenizer_info(small).pad_id == tokenizer_info(small).vocab_size - 1
    with pytest.raises(ValueError):
        build_tokenizer("abc", vocab_size=100)
    with pytest.raises(ValueError):
        build_tokenizer("abc", num_special_tokens=MIN_NUM_SPECIAL_TOKENS - 1)


# --- Meta's tokenizer.model -------------------------------------------------------------------


def _tiktoken_encode(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's byte-pair merge: repeatedly join the adjacent pair whose join has the lowest rank."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def test_tiktoken_model_file(tok, tok_dir, tmp_path):
    lines = (tok_dir / "tokenizer.model").read_text(encoding="ascii").splitlines()
    info = tokenizer_info(tok)
    assert len(lines) == info.num_base_tokens
    ranks: dict[bytes, int] = {}
    for line in lines:
        b64, rank = line.split(" ")
        ranks[base64.b64decode(b64)] = int(rank)
    assert sorted(ranks.values()) == list(range(info.num_base_tokens))
    assert {k for k, v in ranks.items() if v < 256} == {bytes([b]) for b in range(256)}
    # The ranks reproduce the HF encoding under tiktoken's merge rule (Split regex first).
    regex = pytest.importorskip("regex")
    pat = regex.compile(LLAMA4_SPLIT_PATTERN)
    text = generate_corpus(20_000, seed=5) + "".join(TRICKY)
    ids = [i for piece in pat.findall(text) for i in _tiktoken_encode(piece.encode("utf-8"), ranks)]
    assert ids == tok.encode(text, add_special_tokens=False).ids
    # same file from the standalone writer
    tiktoken_model_file(tok, tmp_path / "t.model")
    assert (tmp_path / "t.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
