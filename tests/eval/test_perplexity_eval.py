"""`llama4-quant eval`: llama-perplexity's protocol, checked against transformers' logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama4_quant.eval.perplexity import ChunkScores, make_chunks
from llama4_quant.model.tokenizer import load_tokenizer


def test_make_chunks_protocol():
    toks = list(range(100, 100 + 37))
    chunks = make_chunks(toks, ctx=8, n_chunks=None, bos_id=7)
    assert chunks.shape == (4, 8)  # 37 // 8 full chunks, remainder dropped
    assert chunks[:, 0].tolist() == [7, 7, 7, 7]  # first token of every chunk replaced by BOS
    assert chunks[1, 1:].tolist() == toks[9:16]
    assert make_chunks(toks, 8, 2, 7).shape == (2, 8)


def test_too_few_tokens_is_a_clear_error():
    from llama4_quant.errors import Llama4QuantError

    with pytest.raises(Llama4QuantError, match="at least 16"):
        make_chunks(list(range(15)), ctx=8, n_chunks=None, bos_id=1)


def test_scored_positions_are_second_half():
    ctx, V = 8, 5
    logits = torch.zeros(ctx, V)
    chunk = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    s = ChunkScores()
    s.add(logits, chunk)
    assert s.tokens == ctx // 2 - 1  # positions 4, 5, 6 predict tokens 5, 6, 7
    assert s.perplexity == pytest.approx(V)


def test_eval_matches_transformers(tiny_with_tokenizer, cli):
    transformers = pytest.importorskip("transformers")
    path, data = tiny_with_tokenizer
    proc = cli("eval", str(path), "--data", str(data), "--ctx", "64", "--chunks", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["reference"]
    assert ours["chunks"] == 6 and ours["tokens"] == 6 * 31

    tok = load_tokenizer(path)
    chunks = make_chunks(tok.encode(data.read_text()), 64, 6, tok.bos_id)
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = model(input_ids=chunks).logits
    s = ChunkScores()
    for k in range(len(chunks)):
        s.add(logits[k], chunks[k])
    assert ours["perplexity"] == pytest.approx(s.perplexity, rel=1e-3)
    assert math.isfinite(ours["nll"]) and ours["nll"] == pytest.approx(math.log(ours["perplexity"]))


def test_tokenizer_adds_bos_once(tiny_with_tokenizer):
    path, _ = tiny_with_tokenizer
    tok = load_tokenizer(path)
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]


def test_eval_wrong_vocab_is_clear(tiny_with_tokenizer, tiny_checkpoints, cli):
    """A tokenizer with more ids than the model's vocabulary: one clear line, not an index error."""
    path, data = tiny_with_tokenizer
    small = tiny_checkpoints[("scout", "hf")]  # vocab 320 < tokenizer's
    proc = cli("eval", str(small), "--data", str(data), "--ctx", "64", "--chunks", "2", "--tokenizer", str(path / "tokenizer.json"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "vocabulary" in proc.stderr
