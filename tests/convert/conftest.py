"""Fixtures for the convert tests: tiny random Llama 4 checkpoints whose widths are multiples of 128 (so the
group-128 schemes apply), with a real byte-level BPE tokenizer and a calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from llama4_quant.tiny.checkpoints import random_tensor_fn, text_config, write_hf_checkpoint
from llama4_quant.tiny.corpus import generate_corpus
from llama4_quant.tiny.tokenizer import build_tokenizer, save_tokenizer_files, tokenizer_info


@pytest.fixture(scope="session")
def corpus_tokenizer():
    text = generate_corpus(60000, seed=1)
    tok = build_tokenizer(text, vocab_size=320, num_special_tokens=19)
    return text, tok, tokenizer_info(tok)


def make_fixture(root: Path, corpus_tokenizer, layers: int = 2, layout: str = "multimodal", *,
                 experts: int = 4, hidden: int = 128, inter: int = 256, variant: str = "scout",
                 fn: Callable | None = None, max_shard_bytes: int = 2 << 20, dtype=torch.bfloat16,
                 **overrides) -> Path:
    text, tok, info = corpus_tokenizer
    tc = text_config(variant, vocab_size=info.vocab_size, hidden_size=hidden, intermediate_size=inter,
                     intermediate_size_mlp=2 * inter, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=hidden // 4, num_local_experts=experts,
                     bos_token_id=info.bos_id, eos_token_id=info.eos_id, pad_token_id=info.pad_id, **overrides)
    write_hf_checkpoint(root, tc, fn=fn, layout=layout, max_shard_bytes=max_shard_bytes, dtype=dtype)
    save_tokenizer_files(tok, root)
    (root / "calib.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def model_factory(corpus_tokenizer):
    """make_fixture(root, **kw) with the session's tokenizer: for tests that need their own checkpoint."""
    return lambda root, **kw: make_fixture(root, corpus_tokenizer, **kw)


@pytest.fixture(scope="session")
def tiny_mm(tmp_path_factory, corpus_tokenizer) -> Path:
    """2 MoE layers, multimodal layout (with a vision tower), hidden 128, 4 experts."""
    return make_fixture(tmp_path_factory.mktemp("cv") / "tiny-mm", corpus_tokenizer)


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory, corpus_tokenizer) -> Path:
    """Maverick-like: dense layer 0, MoE layer 1; text-only layout."""
    return make_fixture(tmp_path_factory.mktemp("cv") / "tiny-dense", corpus_tokenizer, layout="text",
                        variant="maverick", experts=4)


def dead_expert_fn(dead: int, seed: int = 0):
    """Random weights whose top-1 routers never pick expert `dead`: its router row is the mean of rows 0 and 1,
    so its logit is the mean of theirs and never the largest (write the checkpoint in float32 to keep it exact)."""
    base = random_tensor_fn(seed)

    def make(name: str, shape):
        t = base(name, shape)
        if name.endswith("router"):
            t = t.clone()
            t[dead] = (t[0] + t[1]) / 2
        return t

    return make


@pytest.fixture(scope="session")
def dead_expert_model(tmp_path_factory, corpus_tokenizer) -> Path:
    """Like tiny_mm, but no token is ever routed to expert 3 (float32 weights keep the router exact)."""
    return make_fixture(tmp_path_factory.mktemp("dead") / "m", corpus_tokenizer, fn=dead_expert_fn(3),
                        dtype=torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests run tiny matrices on shared, busy cores, where torch's thread pool only spins: 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
