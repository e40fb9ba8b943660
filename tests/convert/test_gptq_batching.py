"""The pipeline's batched GPTQ: routed experts in one column loop (--gptq-experts), gate/up and q/k/v sharing a
factor, give the artifact one-at-a-time GPTQ gives, up to float rounding order."""

from __future__ import annotations

import pytest
import torch

from support.convert import safetensors as run_convert
from support.convert import stored_tensors


@pytest.mark.parametrize("scheme", ["w4a16", "fp8-dynamic"])
def test_batched_experts_give_the_same_artifact(tiny_mm, tmp_path, scheme):
    kw = dict(scheme=scheme, method="gptq", calib=str(tiny_mm / "calib.txt"), calib_samples=6, calib_seqlen=64,
              device="cpu", targets=("experts", "shared", "attn"))
    one, _ = run_convert(str(tiny_mm), str(tmp_path / "one"), gptq_experts=1, **kw)
    many, _ = run_convert(str(tiny_mm), str(tmp_path / "many"), gptq_experts=4, **kw)
    a, b = stored_tensors(tmp_path / "one"), stored_tensors(tmp_path / "many")
    assert set(a) == set(b)
    codes = [k for k in a if k.endswith(("weight_packed", "weight")) and ".experts." in k]
    assert codes, "the routed experts are in the artifact"
    differ = total = 0
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if ".experts." in k or ".self_attn." in k or ".shared_expert." in k:
            differ += int((x.view(torch.uint8) != y.view(torch.uint8)).sum()) if x.is_floating_point() else int(
                (x != y).sum())
            total += x.numel()
        else:
            assert torch.equal(x, y), k  # norms, router, embeddings: untouched by GPTQ
    assert differ <= 0.01 * total, (differ, total)


def test_router_aware_descent_on_residual_writers(tiny_mm, tmp_path, monkeypatch):
    """w4a16 GPTQ steers the error of the Linears that write the residual stream (experts' and shared down, wo)
    away from the later routers: their records say how many codes the descent moved; the last layer has no later
    router, other Linears are left alone, and --no-router-aware turns it off."""
    import llama4_quant.convert.pipeline as pl

    reports, clocks = [], []
    real = pl.Pipeline._report

    def report(self, *a):
        clocks.append(self.clock)
        reports.append(real(self, *a))
        return reports[-1]

    monkeypatch.setattr(pl.Pipeline, "_report", report)
    kw = dict(scheme="w4a16", method="gptq", calib=str(tiny_mm / "calib.txt"), calib_samples=6, calib_seqlen=64,
              device="cpu", targets=("experts", "shared", "attn"))
    run_convert(str(tiny_mm), str(tmp_path / "on"), **kw)
    run_convert(str(tiny_mm), str(tmp_path / "off"), router_aware=False, **kw)
    on, off = reports[0]["tensors"], reports[1]["tensors"]
    moved = {k for k, r in on.items() if "moved by coordinate descent" in r.get("reason", "")}
    writers = {k for k in on if k.startswith("layers.0.") and (k.endswith((".down", ".wo")) or ".down." in k)}
    assert moved and moved <= writers, (moved, writers)
    assert not any("coordinate descent" in r.get("reason", "") for r in off.values())
    assert not any(k.startswith("layers.1.") for k in moved)  # nothing routes after the last layer
    for k in writers & moved:  # never worse than RTN, with the descent too
        assert on[k]["loss"] <= on[k]["rtn_loss"] * (1 + 1e-6)
    # the time-left estimate counts the descent's work in the layers that have it (convert.clock)
    (w_on, w_off) = (c.works for c in clocks)
    assert w_off[0] == w_off[1] and w_on[1] == w_off[1] and w_on[0] > w_off[0]


def test_router_aware_descent_on_gguf_grids_only_when_asked(trained_model, tmp_path, monkeypatch):
    """q4_k_m: by default GPTQ leaves the Q4_K residual writers' codes where its pass put them (the descent's gain
    there was within the noise, for ~40 % more time); --router-aware moves them against the later routers too."""
    import llama4_quant.convert.pipeline as pl
    from support.convert import gguf as run_gguf

    reports = []
    real = pl.Pipeline._report

    def report(self, *a):
        reports.append(real(self, *a))
        return reports[-1]

    monkeypatch.setattr(pl.Pipeline, "_report", report)
    kw = dict(method="gptq", calib=str(trained_model / "calib.txt"), calib_samples=2, calib_seqlen=64, device="cpu")
    run_gguf(trained_model, tmp_path / "auto.gguf", **kw)
    run_gguf(trained_model, tmp_path / "on.gguf", router_aware=True, **kw)
    auto, on = (r["tensors"] for r in reports)
    assert not any("coordinate descent" in r.get("reason", "") for r in auto.values())
    moved = {k for k, r in on.items() if "moved by coordinate descent" in r.get("reason", "")}
    assert moved and all(k.endswith((".down", ".wo")) or ".down." in k for k in moved), moved
    assert all("Q4_K" in on[k]["grid"] for k in moved), {k: on[k]["grid"] for k in moved}
