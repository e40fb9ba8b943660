"""The demo corpus: deterministic, fast, structured, and learnable far below uniform perplexity."""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import pytest

from llama4_quant.tiny import corpus as corpus_mod
from llama4_quant.tiny.corpus import SPLIT_SIZES, corpus_splits, generate_corpus


def test_exact_length_and_determinism():
    a = generate_corpus(50_000, seed=3)
    assert len(a) == 50_000
    assert a == generate_corpus(50_000, seed=3)
    assert a != generate_corpus(50_000, seed=4)
    # a longer request extends, never rewrites, the text of the same seed
    assert generate_corpus(80_000, seed=3)[:50_000] == a
    assert generate_corpus(0) == ""
    with pytest.raises(ValueError):
        generate_corpus(-1)


def test_pinned_prefix():
    # Pins the generator: a change here changes every fixture built from the corpus.
    assert generate_corpus(120, seed=0) == (
        "Shopping list:\n- 10 clocks\n- 6 maps\n- 11 candles\n- 4 kites\nTotal: $75.61\n\n"
        "Ivo is 82 years old. Ivo was born in 1948. Ivo"
    )


def test_fast():
    t = time.perf_counter()
    generate_corpus(2_000_000, seed=11)
    assert time.perf_counter() - t < 2.0


def test_splits_sizes_deterministic_disjoint():
    s = corpus_splits(0)
    assert set(s) == {"train", "calib", "test"}
    assert {k: len(v) for k, v in s.items()} == SPLIT_SIZES
    corpus_mod._splits.cache_clear()
    assert corpus_splits(0) == s  # recomputed, not just cached
    assert corpus_splits(1)["test"] != s["test"]
    # disjoint: no longer paragraph of test or calib occurs in train, and the splits differ
    train = s["train"]
    for name in ("test", "calib"):
        long_paras = [p for p in s[name].split("\n\n") if len(p) >= 150]
        assert len(long_paras) > 20
        assert sum(p in train for p in long_paras) == 0, name
    assert s["test"][:1000] not in train and s["calib"][:1000] not in s["test"]


def test_structure():
    text = corpus_splits(0)["train"]
    paras = text.split("\n\n")
    assert len(paras) > 5000
    for marker in (" plus ", " times ", " minus ", "Q: ", "\nA: ", "Shopping list:", "## Chapter", "Thank you"):
        assert marker in text, marker
    assert re.search(r"\d{4,}", text)  # long numbers for digit-group splitting
    assert "  " in text and "\t" in text  # whitespace runs
    rare = sum(ord(c) > 127 for c in text) / len(text)
    assert 0 < rare < 0.01  # some rare non-ASCII material, but rare
    # arithmetic facts are correct
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    facts = re.findall(r"\b(\d+) (plus|minus|times) (\d+) is (\d+)\.", text)
    assert len(facts) > 1000
    assert all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in facts)
    # named entities recur: the most common capitalised words appear hundreds of times
    names = Counter(re.findall(r"\b[A-Z][a-z]+\b", text))
    assert names.most_common(40)[-1][1] > 300


def test_learnable_by_bigram():
    """A smoothed token-bigram model from train scores test far below uniform (and below unigram)."""
    np = pytest.importorskip("numpy")
    from llama4_quant.tiny.tokenizer import build_tokenizer, tokenizer_info

    s = corpus_splits(0)
    train = s["train"][:600_000]
    tok = build_tokenizer(train, vocab_size=512)
    V = tokenizer_info(tok).vocab_size
    tr = np.concatenate([np.array(e.ids) for e in tok.encode_batch(train.split("\n\n"))])
    te = np.array(tok.encode(s["test"]).ids)
    counts = np.zeros((V, V))
    np.add.at(counts, (tr[:-1], tr[1:]), 1.0)
    probs = (counts + 0.1) / (counts.sum(1, keepdims=True) + 0.1 * V)
    ppl_bigram = math.exp(-np.log(probs[te[:-1], te[1:]]).mean())
    uni = np.bincount(tr, minlength=V) + 0.1
    ppl_unigram = math.exp(-np.log(uni[te] / uni.sum()).mean())
    assert ppl_bigram < V / 25, (ppl_bigram, V)
    assert ppl_bigram < ppl_unigram / 5, (ppl_bigram, ppl_unigram)
