"""Shared fixtures: tiny Llama 4 checkpoints built by the repo's own code (session-scoped, deterministic)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/support/ importable as `support`

from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint, write_meta_checkpoint

VARIANTS = ("scout", "maverick", "chunked")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a CUDA device is, and are skipped (saying why) where none is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(variant, layout): path} for variants scout/maverick/chunked and layouts hf/text/meta, same weights."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for v in VARIANTS:
        tc = text_config(v)
        out[(v, "hf")] = write_hf_checkpoint(root / f"{v}-hf", tc)
        out[(v, "text")] = write_hf_checkpoint(root / f"{v}-text", tc, layout="text")
        out[(v, "meta")] = write_meta_checkpoint(root / f"{v}-meta", tc, shards=2)
    return out


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A copy of the shipped tiny trained checkpoint, with its corpus' calib.txt and test.txt beside the weights."""
    import shutil

    from llama4_quant.tiny.trained import demo_texts, trained_checkpoint

    out = tmp_path_factory.mktemp("trained") / "tiny-llama4"
    shutil.copytree(trained_checkpoint(), out)
    for name, text in demo_texts().items():
        (out / f"{name}.txt").write_text(text)
    return out


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `llama4-quant ARGS` in a subprocess (a real process: exit codes, stderr, memory)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "llama4_quant", *args], capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir with tokenizer files, text file): random tiny Scout-like model, real tokenizer."""
    from llama4_quant.tiny.corpus import corpus_splits
    from llama4_quant.tiny.tokenizer import build_tokenizer, save_tokenizer_files, tokenizer_info

    root = tmp_path_factory.mktemp("tok")
    splits = corpus_splits(0)
    tok = build_tokenizer(splits["train"][:200_000], vocab_size=300)
    info = tokenizer_info(tok)
    tc = text_config("chunked", vocab_size=info.vocab_size, bos_token_id=info.bos_id, eos_token_id=info.eos_id,
                     pad_token_id=info.pad_id)
    path = write_hf_checkpoint(root / "model", tc)
    save_tokenizer_files(tok, path)
    data = root / "test.txt"
    data.write_text(splits["test"][:20_000])
    return path, data
