"""Calibration files that are not text (random bytes, invalid UTF-8, control characters) are refused with one
CalibrationError; UTF-8 text in any language still works."""

from __future__ import annotations

import json
import random

import pytest

from llama4_quant.calibration.dataset import load_calibration
from llama4_quant.calibration.documents import CalibrationError, iter_documents
from llama4_quant.model.tokenizer import LoadedTokenizer
from llama4_quant.tiny.corpus import generate_corpus
from llama4_quant.tiny.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> LoadedTokenizer:
    t = build_tokenizer(generate_corpus(20000, seed=5), vocab_size=300, num_special_tokens=19)
    return LoadedTokenizer(t, tmp_path_factory.mktemp("tok") / "tokenizer.json", t.token_to_id("<|begin_of_text|>"))


def ascii_noise(n: int, seed: int = 0) -> bytes:
    """Random 7-bit bytes: valid UTF-8, but a quarter of them control characters."""
    r = random.Random(seed)
    return bytes(r.randrange(128) for _ in range(n))


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Seeded random bytes that are not UTF-8 from the first byte on (0xFF never occurs in UTF-8): with unseeded
    bytes, 1 run in 256 began with a newline and moved the bad line of random.jsonl from 2 to 3."""
    return b"\xff" + random.Random(seed).randbytes(n - 1)


BINARY = {
    "random.txt": (random_bytes(20000), "not UTF-8 text"),
    "ascii_noise.txt": (ascii_noise(20000), "does not look like text"),
    "zeros.txt": (b"\0" * 5000, "does not look like text"),
    "short_noise.txt": (ascii_noise(300), "does not look like text"),
    "latin1.txt": ("caf\xe9 na\xefve r\xe9sum\xe9 ".encode("latin-1") * 50, "not UTF-8 text"),
    "random.jsonl": (b'{"text": "fine"}\n' + random_bytes(5000, 1), "random.jsonl:2: not UTF-8 text"),
    "controls.jsonl": ("\n".join(json.dumps({"text": "".join(map(chr, range(32))) * 4}) for _ in range(50)).encode(),
                       "does not look like text"),
    "random.json": (random_bytes(5000, 2), "not UTF-8 text"),
    "noise_text.json": (json.dumps([{"text": ascii_noise(2000, i).decode()} for i in range(5)]).encode(),
                        "does not look like text"),
}


@pytest.mark.parametrize("name", list(BINARY))
def test_binary_calibration_is_refused(tmp_path, tok, name):
    body, needle = BINARY[name]
    f = tmp_path / name
    f.write_bytes(body)
    with pytest.raises(CalibrationError) as e:
        list(iter_documents(f))
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(CalibrationError):
        load_calibration(str(f), tok, 2, 16)


def test_binary_file_in_a_directory_is_refused(tmp_path, tok):
    (tmp_path / "a.txt").write_text(generate_corpus(5000, seed=1))
    (tmp_path / "b.txt").write_bytes(random_bytes(5000, 3))
    with pytest.raises(CalibrationError, match="b.txt: not UTF-8 text"):
        load_calibration(str(tmp_path), tok, 2, 16)


MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Größere Übungen für Köche, déjà vu, naïve façade, ¿qué tal? ¡Olé!\n"
    "Съешь же ещё этих мягких французских булок, да выпей чаю.\n"
    "我能吞下玻璃而不伤身体。私はガラスを食べられます。유리를 먹을 수 있어요.\n"
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني. אני יכול לאכול זכוכית וזה לא מזיק לי.\n"
    "मैं काँच खा सकता हूँ। ฉันกินกระจกได้ 🦊🐶✓ ∑∫√π\tTabbed\r\nWindows line\fform feed.\n"
)


def test_utf8_text_in_any_language_works(tmp_path, tok):
    txt = tmp_path / "multi.txt"
    txt.write_text(MULTILINGUAL * 20, encoding="utf-8")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + (MULTILINGUAL * 5).encode())
    jl = tmp_path / "multi.jsonl"
    jl.write_text("\n".join(json.dumps({"text": line}, ensure_ascii=False) for line in MULTILINGUAL.splitlines()),
                  encoding="utf-8")
    js = tmp_path / "multi.json"
    js.write_text(json.dumps([{"messages": [{"role": "user", "content": MULTILINGUAL}]}]), encoding="utf-8")
    assert [d.text for d in iter_documents(txt)] == [MULTILINGUAL * 20]
    assert next(iter_documents(bom)).text.startswith("The quick")
    assert len(list(iter_documents(jl))) == len(MULTILINGUAL.splitlines())
    assert MULTILINGUAL in next(iter_documents(js)).text
    cs = load_calibration(str(txt), tok, 2, 32)
    assert cs.tokens.shape == (2, 32)


def test_a_few_stray_control_characters_are_fine(tmp_path):
    f = tmp_path / "mostly.txt"
    f.write_text(generate_corpus(20000, seed=3) + "\x00\x1b[0m\x07" * 10)
    assert len(list(iter_documents(f))) == 1


def test_cli_convert_refuses_binary_calibration(tiny_with_tokenizer, tmp_path, cli):
    path, _ = tiny_with_tokenizer
    calib = tmp_path / "calib.txt"
    calib.write_bytes(random_bytes(50000, 4))
    out = tmp_path / "out"
    proc = cli("convert", str(path), str(out), "--to", "safetensors", "--scheme", "w4a16", "--calib", str(calib),
               env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not UTF-8 text" in lines[0], proc.stderr
    assert not out.exists()
