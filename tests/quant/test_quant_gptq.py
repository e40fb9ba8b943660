"""GPTQ: beats RTN, act-order with static groups, dead columns, damping retries and fallbacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llama4_quant.quant.api import quantize_linear
from llama4_quant.quant.fp8 import FP8Grid
from llama4_quant.quant.gptq import GPTQConfig, gptq
from llama4_quant.quant.hessian import HessianAccumulator
from llama4_quant.quant.grid import IntGrid
from llama4_quant.quant.rtn import rtn
from llama4_quant.quant.scheme import FP8Scheme, IntScheme
from llama4_quant.quant.grid import group_slices

OUT, IN, TOKENS = 64, 256, 1024


def _problem(
    seed: int = 0, tokens: int = TOKENS, cols: int = IN
) -> tuple[torch.Tensor, torch.Tensor, HessianAccumulator]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, cols, generator=g) * 0.05
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    feature_scale = torch.rand(cols, generator=g) * 2 + 0.1
    x = torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)
    x = x * feature_scale
    acc = HessianAccumulator(cols)
    for chunk in x.split(300):
        acc.add(chunk)
    return w, x, acc


def _output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - q) @ x.t()).norm())


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric: bool) -> None:
    w, x, acc = _problem()
    grid = IntGrid(IntScheme(4, symmetric, 128))
    base = rtn(w, grid, hessian=acc.hessian)
    res = gptq(w, acc.hessian, grid, n_tokens=acc.n_tokens)
    assert res.record.method == "gptq" and res.record.damp == 0.01 and res.record.n_tokens == TOKENS
    assert _output_error(w, res.weight, x) < 0.85 * _output_error(w, base.weight, x)
    assert res.record.loss_kind == "hessian" and res.record.loss < 0.75 * base.record.loss
    # loss is the mean squared output error per token
    assert res.record.loss == pytest.approx(_output_error(w, res.weight, x) ** 2 / TOKENS, rel=1e-3)
    q = res.finalize(grid)
    assert torch.equal(q.dequantize(), res.weight)


def test_act_order_keeps_static_contiguous_groups() -> None:
    w, x, acc = _problem(1)
    grid = IntGrid(IntScheme(4, True, 64))
    # one pass on min-max params: the static-groups mechanics (scale search and refine passes: test_quant_gptq_search)
    res = gptq(w, acc.hessian, grid, GPTQConfig(act_order=True, scale_search=False, refine=0), n_tokens=acc.n_tokens)
    plain = gptq(w, acc.hessian, grid, GPTQConfig(act_order=False, scale_search=False, refine=0),
                 n_tokens=acc.n_tokens)
    assert res.record.method == "gptq" and "act-order" in res.record.reason
    q = res.finalize(grid)
    assert q.scale.shape == (OUT, IN // 64)
    # every column sits on the grid of its own contiguous group ...
    assert torch.equal(q.dequantize(), res.weight)
    # ... whose params were fitted on the original weights, before any column moved
    for s, p in zip(group_slices(IN, 64), res.params):
        assert torch.equal(p.scale, grid.fit(w[:, s]).scale)
    assert not torch.equal(res.weight, plain.weight)
    assert _output_error(w, res.weight, x) < 0.85 * _output_error(w, rtn(w, grid).weight, x)


@pytest.mark.parametrize("group", [32, 192, None])
def test_lazy_groups_any_width(group: int | None) -> None:
    """Groups narrower than, wider than (not a multiple of) or as wide as the 128-column block:
    every column lands on its group's grid, and the lazy block width does not change the result
    beyond float noise."""
    w, x, acc = _problem(2, cols=384)
    grid = IntGrid(IntScheme(4, False, group))
    lazy = GPTQConfig(act_order=False, refine=0)
    res = gptq(w, acc.hessian, grid, lazy)
    assert torch.equal(res.finalize(grid).dequantize(), res.weight)
    ref = gptq(w, acc.hessian, grid, dataclasses.replace(lazy, block_size=group or 384))
    assert res.record.loss == pytest.approx(ref.record.loss, rel=0.02)


def test_dead_columns_zeroed() -> None:
    w, x, _ = _problem(3)
    x[:, [3, 100]] = 0.0
    acc = HessianAccumulator(IN)
    acc.add(x)
    grid = IntGrid(IntScheme(4, True, 128))
    res = gptq(w, acc.hessian, grid, n_tokens=acc.n_tokens)
    assert res.record.method == "gptq" and res.record.dead_columns == 2
    assert bool(torch.all(res.weight[:, [3, 100]] == 0))
    assert torch.isfinite(res.weight).all()
    kept = gptq(w, acc.hessian, grid, GPTQConfig(zero_dead_columns=False))
    assert bool(torch.any(kept.weight[:, 3] != 0))
    assert torch.equal(kept.finalize(grid).dequantize(), kept.weight)


def test_indefinite_hessian_falls_back_to_rtn() -> None:
    w, _, _ = _problem(4)
    g = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g))
    eig = torch.rand(IN, generator=g) + 1.0
    eig[0] = -500.0
    h = basis @ torch.diag(eig) @ basis.t()
    grid = IntGrid(IntScheme(4, True, 128))
    res = gptq(w, h, grid, n_tokens=10)
    assert res.record.method == "rtn" and "Cholesky failed" in res.record.reason
    assert res.record.damp == pytest.approx(1.0)
    assert torch.equal(res.weight, rtn(w, grid).weight)


def test_damping_retry_rescues_rank_deficient_hessian() -> None:
    w, _, acc = _problem(6, tokens=32)  # rank 32 < 256
    h = acc.hessian.clone()
    h.diagonal().sub_(0.05 * h.diagonal().mean())  # now slightly indefinite
    res = gptq(w, h, IntGrid(IntScheme(4, True, 128)))
    assert res.record.method == "gptq"
    assert res.record.damp == pytest.approx(0.1)


@pytest.mark.parametrize("n_tokens", [0, None])
def test_empty_hessian_means_rtn(n_tokens: int | None) -> None:
    w, _, _ = _problem(7)
    acc = HessianAccumulator(IN)
    acc.add(torch.empty(0, IN))
    assert acc.empty
    grid = IntGrid(IntScheme(4, True, 128))
    res = gptq(w, acc.hessian, grid, n_tokens=n_tokens)
    assert res.record.method == "rtn" and "empty" in res.record.reason
    assert torch.equal(res.weight, rtn(w, grid).weight)
    q, record = quantize_linear(w.to(torch.bfloat16), IntScheme(), hessian=acc.hessian, n_tokens=0)
    assert record.method == "rtn" and q.codes.shape == (OUT, IN)


def test_fp8_through_gptq() -> None:
    w, x, acc = _problem(8)
    for scheme in (FP8Scheme("channel"), FP8Scheme("block", block=(32, 64))):
        grid = FP8Grid(scheme)
        res = gptq(w, acc.hessian, grid, n_tokens=acc.n_tokens)
        assert _output_error(w, res.weight, x) < _output_error(w, rtn(w, grid).weight, x)
        q = res.finalize(grid)
        assert torch.equal(q.dequantize(), res.weight)


class SubBlockGrid:
    """A GGUF-like grid: 64-column super-blocks, one scale per 16-column sub-block."""

    group_size = 64

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return (w.abs().view(w.shape[0], -1, 16).amax(-1) / 7).clamp(min=1e-8)  # [out, 4]

    def quantize(self, w: torch.Tensor, params: torch.Tensor, offset: int = 0) -> torch.Tensor:
        scale = params[:, (offset + torch.arange(w.shape[1])) // 16]
        return torch.clamp(torch.round(w / scale), -8, 7) * scale


@pytest.mark.parametrize("act_order", [False, True])
def test_pluggable_subblock_grid(act_order: bool) -> None:
    w, x, acc = _problem(9)
    grid = SubBlockGrid()
    res = gptq(w, acc.hessian, grid, GPTQConfig(act_order=act_order, block_size=48))
    assert res.record.method == "gptq" and len(res.params) == IN // 64
    for s, p in zip(group_slices(IN, 64), res.params):
        assert torch.equal(grid.quantize(res.weight[:, s], p), res.weight[:, s])
    assert _output_error(w, res.weight, x) < 0.85 * _output_error(w, rtn(w, grid).weight, x)


@pytest.mark.cuda
def test_gptq_on_cuda_follows_device() -> None:
    w, x, acc = _problem(10)
    grid = IntGrid(IntScheme(4, True, 128))
    cpu = gptq(w, acc.hessian, grid, GPTQConfig(act_order=True))
    gpu = gptq(w.cuda(), acc.hessian.cuda(), grid, GPTQConfig(act_order=True))
    assert gpu.weight.is_cuda and gpu.params[0].scale.is_cuda
    assert gpu.record.loss == pytest.approx(cpu.record.loss, rel=0.05)
    q = gpu.finalize(grid)
    assert q.codes.is_cuda and torch.equal(q.dequantize(), gpu.weight)
