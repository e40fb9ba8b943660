"""`llama4-quant demo`: the README's main job, end to end, offline."""

from __future__ import annotations

import json
from pathlib import Path


def test_demo_end_to_end(tmp_path, cli, trained_model):
    proc = cli("demo", "--out", str(tmp_path / "demo"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] is True
    assert len(out["candidates"]) == 2
    for c in out["candidates"]:
        assert 0 < c["kld_mean"] < 0.05 and c["top1_agreement"] > 0.9
    art = tmp_path / "demo" / "model-w4a16"
    assert (art / "llama4-quant.json").exists()
    # the artifact holds the model and its tokenizer, not the demo's texts
    assert sorted(p.name for p in art.iterdir()) == [
        "config.json", "generation_config.json", "llama4-quant.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "demo" / "model-q4_k_m.gguf").stat().st_size > 0
    assert Path(out["report"]).exists()


def test_gpu_smoke_script_skips_cleanly_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA device is present: run scripts/gpu_smoke.py itself")
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke.py"
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("skip: no CUDA device"), (r.stdout, r.stderr)
