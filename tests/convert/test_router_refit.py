"""The router refit (pipeline.refit_router, quant/router.py): GPTQ conversions refit each MoE layer's unquantized
router to the quantized stream; the router keeps its name, dtype and shape, --no-refit-router writes it as stored."""

from __future__ import annotations

import json

import pytest
import torch

from support.convert import gguf as run_gguf
from support.convert import safetensors as run_convert
from support.convert import stored_tensors
from llama4_quant.eval.sources import open_any
from llama4_quant.model.readers import open_checkpoint



def _router(tensors: dict, i: int) -> torch.Tensor:
    (key,) = [k for k in tensors if k.endswith(f"layers.{i}.feed_forward.router.weight")]
    return tensors[key]


def _kw(model):
    return dict(scheme="w4a16", method="gptq", calib=str(model / "calib.txt"), calib_samples=6, calib_seqlen=64,
                device="cpu", targets=("experts", "shared", "attn"))


def test_refit_router_written_and_recorded(tiny_mm, tmp_path):
    src = open_checkpoint(tiny_mm)
    on, _ = run_convert(str(tiny_mm), str(tmp_path / "on"), **_kw(tiny_mm))
    off, _ = run_convert(str(tiny_mm), str(tmp_path / "off"), refit_router=False, **_kw(tiny_mm))
    a, b = stored_tensors(tmp_path / "on"), stored_tensors(tmp_path / "off")
    for i in range(src.config.num_layers):
        orig = src.read(f"layers.{i}.router")
        assert torch.equal(_router(b, i), orig)  # --no-refit-router: as stored
        new = _router(a, i)
        assert new.dtype == orig.dtype and new.shape == orig.shape
        rec = on["layers"][i]["router_refit"]
        assert rec["kept"] and rec["tokens"] == 6 * 64
        # on the quantized stream the refit router is closer to the bf16 model's logits than the original
        assert rec["rel_logit_error_after"] < 0.9 * rec["rel_logit_error_before"]
        change = float((new.float() - orig.float()).norm() / orig.float().norm())
        assert 1e-3 < change < 0.5 and abs(change - rec["rel_change"]) < 1e-6
        assert "router_refit" not in off["layers"][i]
    # everything but the routers and what follows them is the same artifact
    for k in a:
        if ".layers.0." in k and ("self_attn" in k or "norm" in k):
            assert torch.equal(a[k], b[k]), k


def test_rtn_and_dense_layers_have_no_refit(tiny_dense, tmp_path):
    """A Maverick-like model (dense layer 0, MoE layer 1): only the MoE layer has a router to refit; RTN calibrates
    nothing and refits nothing."""
    m, _ = run_convert(str(tiny_dense), str(tmp_path / "gptq"), **_kw(tiny_dense))
    assert "router_refit" not in m["layers"][0] and m["layers"][1]["router_refit"]["kept"]
    r, _ = run_convert(str(tiny_dense), str(tmp_path / "rtn"), scheme="w4a16", method="rtn", device="cpu")
    assert not any("router_refit" in layer for layer in r["layers"])
    src = open_checkpoint(tiny_dense)
    assert torch.equal(_router(stored_tensors(tmp_path / "rtn"), 1), src.read("layers.1.router"))


def test_gguf_router_refit(tiny_mm, tmp_path):
    kw = dict(scheme="q4_k_m", method="gptq", calib=str(tiny_mm / "calib.txt"), calib_samples=6, calib_seqlen=64,
              device="cpu")
    run_gguf(tiny_mm, tmp_path / "on.gguf", **kw)
    run_gguf(tiny_mm, tmp_path / "off.gguf", refit_router=False, **kw)
    src = open_checkpoint(tiny_mm)
    on, off = open_any(tmp_path / "on.gguf"), open_any(tmp_path / "off.gguf")
    for i in range(src.config.num_layers):
        orig = src.read(f"layers.{i}.router").float()
        assert torch.equal(off.read(f"layers.{i}.router").float(), orig)
        new = on.read(f"layers.{i}.router").float()
        assert new.shape == orig.shape and not torch.equal(new, orig)
    summary = json.loads((tmp_path / "on.gguf.llama4-quant.json").read_text())
    refits = summary["router_refit"]
    assert set(refits) == {"0", "1"} and all(r["kept"] for r in refits.values())
