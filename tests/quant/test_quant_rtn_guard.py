"""GPTQ is never worse than RTN on the same grid: the RTN guard, and the Hessian shrinkage that keeps GPTQ from
fitting the calibration tokens when there are about as few of them as input columns."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.formats.gguf.grid import BlockGrid
from llama4_quant.formats.gguf.quants import QT
from llama4_quant.quant.gptq import CLEAR_WIN, GPTQConfig, gptq, shrinkage
from llama4_quant.quant.grid import IntGrid, IntParams
from llama4_quant.quant.hessian import HessianAccumulator
from llama4_quant.quant.rtn import rtn, weight_loss
from llama4_quant.quant.scheme import IntScheme

D = 256


def _inputs(g: torch.Generator, n: int, mix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Correlated, per-column scaled, heavy-tailed per token (like an expert's down-projection input)."""
    z = torch.randn(n, D, generator=g) @ mix + 0.5 * torch.randn(n, D, generator=g)
    return z * scale * torch.exp(0.5 * torch.randn(n, 1, generator=g))


def _hessian(x: torch.Tensor) -> HessianAccumulator:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc


def _loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    return weight_loss(w, q, h)[0]


class CoarseWhenWeighted(IntGrid):
    """A valid grid whose importance-weighted fit is poor (4x the scale): GPTQ, which fits with importance, then
    loses to a plain RTN fit whatever its error feedback does."""

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> IntParams:
        p = super().fit(w, None)
        return IntParams(p.scale * 4) if importance is not None else p


@pytest.mark.parametrize("act_order", [True, False])
def test_rtn_kept_and_recorded_when_gptq_loses(act_order: bool) -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D, D, generator=g) / D**0.5
    w = torch.randn(64, D, generator=g) * 0.05
    acc = _hessian(_inputs(g, 4096, mix, torch.rand(D, generator=g) + 0.5))
    grid = CoarseWhenWeighted(IntScheme(4, True, 128))
    lost = gptq(w, acc.hessian, grid, GPTQConfig(act_order=act_order, rtn_guard=False), acc.n_tokens)
    plain = rtn(w, grid, hessian=acc.hessian)
    assert lost.record.method == "gptq" and lost.record.loss > 1.5 * plain.record.loss  # the case: GPTQ loses

    res = gptq(w, acc.hessian, grid, GPTQConfig(act_order=act_order), acc.n_tokens)
    rec = res.record
    assert rec.method == "rtn" and rec.reason.startswith("rtn had lower Hessian loss than gptq")
    assert torch.equal(res.weight, plain.weight)  # exactly what an uncalibrated run writes
    assert rec.loss == rec.rtn_loss == pytest.approx(plain.record.loss)
    assert rec.gptq_loss == pytest.approx(lost.record.loss) and rec.gptq_loss > rec.rtn_loss
    assert rec.loss_kind == "hessian" and rec.n_tokens == 4096 and rec.damp == 0.01
    assert torch.equal(res.finalize(grid).dequantize(), res.weight)  # params belong to the kept result


def test_gptq_kept_when_it_wins_and_both_losses_recorded() -> None:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(D, D, generator=g) / D**0.5
    w = torch.randn(64, D, generator=g) * 0.05
    acc = _hessian(_inputs(g, 4096, mix, torch.rand(D, generator=g) + 0.5))
    for grid in (BlockGrid(QT.Q4_K), BlockGrid(QT.Q6_K), IntGrid(IntScheme(4, True, 128))):
        res = gptq(w, acc.hessian, grid, GPTQConfig(act_order=True), acc.n_tokens)
        rec = res.record
        assert rec.method == "gptq", grid
        assert rec.loss == rec.gptq_loss < rec.rtn_loss
        plain = rtn(w, grid, hessian=acc.hessian).record.loss
        best_rtn = min(plain, rtn(w, grid, importance=acc.hessian.diagonal(), hessian=acc.hessian).record.loss)
        if rec.loss < CLEAR_WIN * plain:  # far ahead of plain RTN: the other candidates were not computed
            assert rec.rtn_loss == pytest.approx(plain, rel=1e-5)
        else:
            assert rec.rtn_loss <= best_rtn * (1 + 1e-6)  # the guard also tried GPTQ's own grid


def test_guard_is_deterministic_and_can_be_turned_off() -> None:
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(D, D, generator=g) / D**0.5
    w = torch.randn(32, D, generator=g) * 0.05
    acc = _hessian(_inputs(g, 1024, mix, torch.rand(D, generator=g) + 0.5))
    grid = BlockGrid(QT.Q4_K)
    a = gptq(w, acc.hessian, grid, GPTQConfig(act_order=True), acc.n_tokens)
    b = gptq(w, acc.hessian, grid, GPTQConfig(act_order=True), acc.n_tokens)
    assert torch.equal(a.weight, b.weight) and a.record.rtn_loss == b.record.rtn_loss
    off = gptq(w, acc.hessian, grid, GPTQConfig(act_order=True, rtn_guard=False), acc.n_tokens)
    assert off.record.rtn_loss is None and torch.equal(off.weight, a.weight)


def test_shrinkage_weight() -> None:
    assert shrinkage(1.0, 256, 4096) == pytest.approx(256 / 4352)
    assert shrinkage(1.0, 256, 256) == pytest.approx(0.5)
    assert shrinkage(0.0, 256, 10) == 0.0 and shrinkage(1.0, 256, None) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_tokens_no_longer_overfit(seed: int) -> None:
    """The root cause of GPTQ losing to RTN: a Hessian from as many tokens as input columns (n = d = 256, e.g. a
    routed expert's down projection) lets GPTQ fit those tokens' own directions. Unshrunk, its calibration loss is
    several times below RTN's while its loss on other tokens from the same distribution is above RTN's; shrunk
    towards diag(H) it beats RTN on both, and with plenty of tokens the shrinkage changes next to nothing."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g) / D**0.5
    scale = torch.rand(D, generator=g) * 2 + 0.1
    w = torch.randn(64, D, generator=g) * 0.05
    held = _hessian(_inputs(g, 16384, mix, scale)).hessian
    grid = BlockGrid(QT.Q4_K)
    for n in (256, 4096):
        cal = _hessian(_inputs(g, n, mix, scale))
        old = gptq(w, cal.hessian, grid, GPTQConfig(act_order=True, shrink=0, rtn_guard=False), n).weight
        new = gptq(w, cal.hessian, grid, GPTQConfig(act_order=True), n).weight
        base = rtn(w, grid).weight
        if n == 256:
            assert _loss(w, old, cal.hessian) < 0.4 * _loss(w, base, cal.hessian)  # looks great on its own tokens
            assert _loss(w, old, held) > 1.1 * _loss(w, base, held)  # ... and is worse than RTN on others
            assert _loss(w, new, held) < 0.9 * _loss(w, base, held)
            assert _loss(w, new, held) < 0.7 * _loss(w, old, held)
        else:
            assert _loss(w, new, held) < 0.75 * _loss(w, base, held)
            assert _loss(w, new, held) == pytest.approx(_loss(w, old, held), rel=0.05)
