"""Batched GPTQ: jobs of one layout in one column loop, weights sharing a Hessian, row blocks of a tall weight;
each weight's result is what GPTQ of that weight alone gives (up to float rounding order)."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.formats.gguf.grid import BlockGrid
from llama4_quant.formats.gguf.quants import QT
from llama4_quant.quant.fp8 import FP8Grid
from llama4_quant.quant.gptq import GPTQConfig, GPTQJob, gptq, gptq_batch, gptq_rows
from llama4_quant.quant.grid import IntGrid, group_slices
from llama4_quant.quant.hessian import HessianAccumulator
from llama4_quant.quant.rtn import hessian_loss, weight_loss
from llama4_quant.quant.scheme import FP8Scheme, IntScheme


def _hessian(seed: int, cols: int, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g))
    x = x * (torch.rand(cols, generator=g) * 2 + 0.1)
    acc = HessianAccumulator(cols)
    acc.add(x)
    return acc.hessian, x


def _weight(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(100 + seed)) * 0.05


GRIDS = {
    "int4 g64": lambda: IntGrid(IntScheme(4, True, 64)),
    "int4 asym channel": lambda: IntGrid(IntScheme(4, False, None)),
    "q4_k": lambda: BlockGrid(QT.Q4_K),
    "fp8 channel": lambda: FP8Grid(FP8Scheme("channel")),
}


def _same(a, b, rel: float = 2e-3) -> None:
    """Two GPTQ results of the same weight: the same method and loss, and almost all values identical."""
    assert a.record.method == b.record.method
    assert a.record.loss == pytest.approx(b.record.loss, rel=rel)
    assert float((a.weight != b.weight).float().mean()) < 0.01


@pytest.mark.parametrize("name", list(GRIDS))
def test_batch_of_jobs_matches_one_at_a_time(name: str) -> None:
    grid = GRIDS[name]()
    cols = 256
    jobs = []
    for e in range(3):
        h, _ = _hessian(e, cols)
        jobs.append(GPTQJob([_weight(e, 48, cols), _weight(10 + e, 48, cols)], h, 2048))
    batched = gptq_batch(jobs, grid)
    for job, res in zip(jobs, batched):
        assert len(res) == 2
        for w, r in zip(job.weights, res):
            _same(r, gptq(w, job.hessian, grid, n_tokens=2048))


def test_weights_of_different_heights_share_a_factor() -> None:
    """q, k and v of an attention read the same input: one job, one factorisation, their own results."""
    grid = IntGrid(IntScheme(4, True, 64))
    h, _ = _hessian(3, 256)
    ws = [_weight(1, 64, 256), _weight(2, 16, 256), _weight(3, 16, 256)]
    res = gptq_batch([GPTQJob(ws, h, 2048)], grid)[0]
    for w, r in zip(ws, res):
        assert r.weight.shape == w.shape
        _same(r, gptq(w, h, grid, n_tokens=2048))


def test_empty_and_failed_jobs_fall_back_without_stopping_the_batch() -> None:
    grid = IntGrid(IntScheme(4, True, 64))
    h, _ = _hessian(0, 128)
    good = GPTQJob([_weight(0, 32, 128)], h, 2048)
    empty = GPTQJob([_weight(1, 32, 128)], torch.zeros(128, 128), 0)
    res = gptq_batch([good, empty], grid)
    assert res[0][0].record.method == "gptq"
    assert res[1][0].record.method == "rtn" and "empty Hessian" in res[1][0].record.reason


@pytest.mark.parametrize("name", list(GRIDS))
def test_act_order_jobs_in_one_loop(name: str) -> None:
    """Each job visits its columns in its own order; the loop picks every job's own column params."""
    grid = GRIDS[name]()
    cfg = GPTQConfig(act_order=True)
    jobs = [GPTQJob([_weight(e, 32, 256), _weight(20 + e, 32, 256)], _hessian(e, 256)[0], 2048) for e in range(3)]
    orders = [torch.argsort(j.hessian.diagonal(), descending=True) for j in jobs]
    assert not torch.equal(orders[0], orders[1])
    for job, res in zip(jobs, gptq_batch(jobs, grid, cfg)):
        for w, r in zip(job.weights, res):
            _same(r, gptq(w, job.hessian, grid, cfg, 2048))


@pytest.mark.parametrize("name", ["int4 g64", "q4_k"])
def test_row_blocks_match_the_whole_weight(name: str) -> None:
    grid = GRIDS[name]()
    h, _ = _hessian(5, 256)
    w = _weight(5, 100, 256)
    whole = gptq(w, h, grid, n_tokens=2048)
    parts = list(gptq_rows(w.split(37), h, grid, n_tokens=2048))
    assert [p.weight.shape[0] for p in parts] == [37, 37, 26]
    q = torch.cat([p.weight for p in parts])
    assert float((q != whole.weight).float().mean()) < 0.01
    assert sum(p.record.loss for p in parts) == pytest.approx(whole.record.loss, rel=2e-3)
    for p, wb in zip(parts, w.split(37)):  # the guard decided per block: never worse than RTN on that block
        assert p.record.loss <= p.record.rtn_loss
        assert p.record.loss == pytest.approx(weight_loss(wb, p.weight, h)[0], rel=1e-5)
    for s, prm in zip(group_slices(256, grid.group_size), parts[0].params):
        assert torch.equal(grid.quantize(parts[0].weight[:, s], prm), parts[0].weight[:, s])


def test_row_blocks_with_an_empty_hessian_are_rtn() -> None:
    grid = IntGrid(IntScheme(4, True, 64))
    parts = list(gptq_rows(_weight(0, 40, 128).split(16), torch.zeros(128, 128), grid, n_tokens=0))
    assert len(parts) == 3 and all(p.record.method == "rtn" for p in parts)


@pytest.mark.parametrize("rows,cols", [(7, 300), (64, 1000), (33, 256)])
def test_hessian_loss_is_the_full_product(rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows)
    d = torch.randn(rows, cols, generator=g)
    x = torch.randn(2 * cols, cols, generator=g)
    h = x.t() @ x / cols
    full = float(((d.double() @ h.double()) * d.double()).sum()) / 2
    assert hessian_loss(d, h) == pytest.approx(full, rel=1e-5)
    assert hessian_loss(d, h, blocks=1) == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("tokens,dead", [(4096, 0), (512, 3)])
def test_recorded_loss_is_the_calibration_hessian_loss(name: str, tokens: int, dead: int) -> None:
    """The record's loss comes from GPTQ's own pass (no extra product): it is the loss on the calibration Hessian,
    shrinkage, damping and dead columns undone."""
    grid = GRIDS[name]()
    _, x = _hessian(8, 256, tokens)
    x[:, :dead] = 0
    acc = HessianAccumulator(256)
    acc.add(x)
    w = _weight(8, 64, 256)
    for act_order in (False, True):
        res = gptq(w, acc.hessian, grid, GPTQConfig(act_order=act_order, rtn_guard=False), n_tokens=tokens)
        assert res.record.method == "gptq" and res.record.dead_columns == dead
        assert res.record.loss == pytest.approx(weight_loss(w, res.weight, acc.hessian)[0], rel=1e-5)
