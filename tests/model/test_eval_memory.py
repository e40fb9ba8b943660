"""Peak memory of `eval` is one layer + activations, not the model: it must not scale with layer count."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint

pytestmark = pytest.mark.slow


def peak_anon_mb(*args: str) -> float:
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "support" / "memwatch.py"), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return int(re.search(r"PEAK_ANON_KB (\d+)", proc.stderr).group(1)) / 1024


def test_eval_peak_memory_independent_of_layers(tmp_path, tiny_with_tokenizer):
    _, data = tiny_with_tokenizer
    from llama4_quant.model.tokenizer import load_tokenizer

    tok_dir = tiny_with_tokenizer[0]
    vocab = load_tokenizer(tok_dir).vocab_size
    # ~25 MB of fp32 weights per layer (8 experts of 256x1536)
    dims = dict(hidden_size=256, intermediate_size=1536, intermediate_size_mlp=1536, num_local_experts=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    peaks = {}
    for n in (2, 12):
        tc = text_config("scout", vocab_size=vocab, num_hidden_layers=n, **dims)
        path = write_hf_checkpoint(tmp_path / f"l{n}", tc, max_shard_bytes=16 << 20)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / f).write_bytes((tok_dir / f).read_bytes())
        peaks[n] = peak_anon_mb("eval", str(path), "--data", str(data), "--ctx", "128", "--chunks", "4")
    layer_mb = 8 * 3 * 256 * 1536 * 4 / 2**20  # fp32 experts of one layer
    growth = peaks[12] - peaks[2]
    # holding the model would add 10 layers (~360 MB); allocator noise aside, we allow less than one layer
    assert growth < layer_mb, (peaks, layer_mb)
