"""The compiled CPU coordinate descent (quant.descent) against the torch column loop it replaces on CPUs
(gptq._descend_torch, still the path on a GPU): the same moves on int and Q4_K grids, with and without the
router metric, and every code on the grid."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.formats.gguf.grid import BlockGrid
from llama4_quant.formats.gguf.quants import QT
from llama4_quant.quant import gptq as G
from llama4_quant.quant.grid import IntGrid, group_slices
from llama4_quant.quant.scheme import IntScheme


def _problem(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g))
    h = 2 / 2048 * x.t() @ x
    w = torch.randn(rows, cols, generator=g) * cols ** -0.5
    return w, h, torch.randn(12, rows, generator=g)


def _loss(w, q, h, a, lam):
    d = q - w
    plain = float(((d @ h) * d).sum())
    return plain if a is None else plain + lam * float((((a @ d) @ h) * (a @ d)).sum())


@pytest.mark.parametrize("grid", [IntGrid(IntScheme(4, True, 128)), BlockGrid(QT.Q4_K)], ids=["int4", "q4_k"])
@pytest.mark.parametrize("with_metric", [False, True])
def test_compiled_descent_makes_the_torch_loops_moves(grid, with_metric: bool) -> None:
    w, h, a = _problem(96, 512, 3)
    res = G.gptq(w, h, grid, G.GPTQConfig(act_order=True), 2048)
    metric = a if with_metric else None
    compiled = G.coordinate_descent(w, res.weight, res.params, h, grid, 2, metric, 1.0)
    loop = G.coordinate_descent(w, res.weight, res.params, h, grid, 2, metric, 1.0, compiled=False)
    (qc, mc), (ql, ml) = compiled, loop
    assert mc > 100 and abs(mc - ml) <= 0.002 * ml
    assert float((qc != ql).float().mean()) < 0.002
    # both lower the loss they descend on (with the metric: lam as coordinate_descent sets it), by the same amount
    lam = 0.0
    if with_metric:
        d = res.weight - w
        lam = float(((d @ h) * d).sum()) / float((((a @ d) @ h) * (a @ d)).sum())
    before, after_c, after_l = (_loss(w, q, h, metric, lam) for q in (res.weight, qc, ql))
    assert after_c < 0.97 * before and abs(after_c - after_l) <= 1e-4 * before
    # every code on the grid: quantizing the result again changes nothing
    for s, p in zip(group_slices(w.shape[1], grid.group_size), res.params):
        assert torch.equal(grid.quantize(qc[:, s], p), qc[:, s])


def test_no_moves_leaves_the_weights_alone() -> None:
    """Descent run until a sweep moves nothing is a fixed point: a second call (G recomputed from scratch) moves
    (nearly) nothing and does not raise the loss."""
    w, h, _ = _problem(64, 256, 5)
    grid = IntGrid(IntScheme(4, True, 128))
    res = G.gptq(w, h, grid, G.GPTQConfig(act_order=True), 2048)
    q1, m1 = G.coordinate_descent(w, res.weight, res.params, h, grid, 100)
    q2, m2 = G.coordinate_descent(w, q1, res.params, h, grid, 100)
    assert m1 > 0 and m2 <= 0.001 * m1
    assert _loss(w, q2, h, None, 0.0) <= _loss(w, q1, h, None, 0.0) * (1 + 1e-6)
