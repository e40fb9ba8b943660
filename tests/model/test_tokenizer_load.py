"""Tokenizer loading: tokenizer.json and Meta's tiktoken tokenizer.model give the same ids."""

from __future__ import annotations

import json

from llama4_quant.model.tokenizer import load_tokenizer
from llama4_quant.tiny.checkpoints import write_meta_checkpoint
from llama4_quant.tiny.tokenizer import tiktoken_model_file


def test_tiktoken_model_matches_tokenizer_json(tiny_with_tokenizer, tmp_path):
    path, data = tiny_with_tokenizer
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tiktoken_model_file(tok, tmp_path / "tokenizer.model")
    a = load_tokenizer(path)
    b = load_tokenizer(tmp_path, total_vocab=a.vocab_size)
    text = data.read_text()[:5000] + " <|eot|> 12345 naïve"
    assert b.bos_id == a.bos_id and b.vocab_size == a.vocab_size
    assert a.encode(text) == b.encode(text)


def test_meta_layout_eval_equals_hf(tiny_with_tokenizer, tmp_path, cli):
    """Meta's layout with only tokenizer.model evaluates exactly like the HF layout of the same weights."""
    from tokenizers import Tokenizer

    path, data = tiny_with_tokenizer
    tc = json.loads((path / "config.json").read_text())["text_config"]
    meta = write_meta_checkpoint(tmp_path / "meta", tc, shards=2)
    tiktoken_model_file(Tokenizer.from_file(str(path / "tokenizer.json")), meta / "tokenizer.model")
    outs = []
    for p in (path, meta):
        proc = cli("eval", str(p), "--data", str(data), "--ctx", "64", "--chunks", "3", "--json")
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout)["reference"])
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[0]["perplexity"] == outs[1]["perplexity"]
