"""The manifest (hashes, choices, calibration, tokens per expert), the --json summary, and experts that no
calibration token reaches."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from llama4_quant import __version__
from support.convert import safetensors as run_convert
from llama4_quant.formats.compressed_tensors.reader import QuantizedSource


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_json_summary_and_manifest_hashes(cli, tiny_mm, tmp_path):
    out = tmp_path / "out"
    r = cli("convert", str(tiny_mm), str(out), "--calib", str(tiny_mm / "calib.txt"), "--calib-samples", "6",
            "--calib-seqlen", "64", "--seed", "3", "--max-shard-size", "300KB", "--json",
            env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and summary["scheme"] == "w4a16" and summary["method"] == "gptq"
    assert summary["calibration"]["samples"] == 6 and summary["calibration"]["seed"] == 3
    assert summary["shards"] > 1 and summary["tokens_per_expert"]["min"] >= 0
    assert len(summary["layer_loss"]) == 2 and all(x > 0 for x in summary["layer_loss"])

    m = json.loads((out / "llama4-quant.json").read_text())
    assert m["tool"] == {"name": "llama4-quant", "version": __version__}
    files = m["output"]["files"]
    on_disk = {p.name for p in out.iterdir()} - {"llama4-quant.json"}
    assert set(files) == on_disk
    for name, info in files.items():
        assert info["sha256"] == _sha(out / name) and info["bytes"] == (out / name).stat().st_size, name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= set(files)
    cal = m["calibration"]
    assert cal["files"] == [{"name": "calib.txt", "sha256": _sha(tiny_mm / "calib.txt"),
                             "bytes": (tiny_mm / "calib.txt").stat().st_size}]
    assert len(cal["tokens_sha256"]) == 64 and cal["seqlen"] == 64
    assert m["source"]["config_sha256"] == _sha(tiny_mm / "config.json")
    rec = m["tensors"]["language_model.model.layers.1.feed_forward.experts.2.up_proj"]
    assert rec["method"] == "gptq" and rec["loss_kind"] == "hessian" and 0 < rec["rel_loss"] < 1
    assert rec["canonical"] == "layers.1.experts.2.up"
    layer = m["layers"][1]
    assert sum(layer["tokens_per_expert"]) == 6 * 64 and layer["loss"] > 0
    assert m["per_module"]["language_model.model.layers.0.self_attn.q_proj"] == "unquantized"
    assert m["per_module"]["language_model.model.layers.0.feed_forward.experts.*.gate_proj"] == "w4a16"
    assert m["scheme"]["quantization_config"] == json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_expert_without_tokens(dead_expert_model, tmp_path, mode):
    out = tmp_path / mode
    manifest, summary = run_convert(str(dead_expert_model), str(out), calib=str(dead_expert_model / "calib.txt"),
                                    calib_samples=6, calib_seqlen=64, moe_calibration=mode, device="cpu",)
    for layer in manifest["layers"]:
        assert layer["tokens_per_expert"][3] == 0 and layer["zero_token_experts"] == [3]
    assert summary["tokens_per_expert"]["zero_token_experts"] == 2
    recs = manifest["tensors"]
    dead = recs["language_model.model.layers.0.feed_forward.experts.3.down_proj"]
    live = recs["language_model.model.layers.0.feed_forward.experts.0.down_proj"]
    assert live["method"] == "gptq"
    if mode == "routed":
        assert dead["method"] == "rtn" and "no calibration tokens" in dead["reason"] and "MSE" in dead["reason"]
        assert dead["grid"].endswith("+mse")
        assert any("RTN + MSE" in w for w in manifest["warnings"])
        assert "experts.3.gate" in manifest["layers"][0]["rtn_fallbacks"]
    else:  # statistics from every token: GPTQ for everyone
        assert dead["method"] == "gptq" and dead["n_tokens"] == 6 * 64
    w = QuantizedSource(out).read_expert(0, "down", 3)
    assert torch.isfinite(w).all() and w.abs().sum() > 0
