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
    assert (tmp_path / "demo" / "model-w4a16" / "llama4-quant.json").exists()
    assert (tmp_path / "demo" / "model-q4_k_m.gguf").stat().st_size > 0
    assert Path(out["report"]).exists()
