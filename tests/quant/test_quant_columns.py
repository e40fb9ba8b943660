"""The compiled sub-block column steps (quant.columns) give GPTQ the same results as the torch loop: the same
values, bit for bit, and the same losses (to float rounding), on every affine grid, in natural (lazily fitted groups) and act-order,
batched over jobs, with the refit refine round (which keeps each column's weights as they were rounded)."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.formats.gguf.grid import BlockGrid
from llama4_quant.formats.gguf.quants import QT
from llama4_quant.quant import gptq as gptq_mod
from llama4_quant.quant.columns import affine_grid
from llama4_quant.quant.fp8 import FP8Grid
from llama4_quant.quant.gptq import GPTQConfig, GPTQJob, gptq_batch
from llama4_quant.quant.grid import IntGrid
from llama4_quant.quant.hessian import HessianAccumulator
from llama4_quant.quant.scheme import FP8Scheme, IntScheme


def _hessian(seed: int, cols: int, tokens: int = 700) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    x = x * (torch.rand(cols, generator=g) * 2 + 0.1)
    x[:, 5] = 0.0  # a dead column
    acc = HessianAccumulator(cols)
    acc.add(x)
    return acc.hessian


def _weights(seed: int, rows: tuple[int, ...], cols: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    ws = [torch.randn(r, cols, generator=g) * 0.05 for r in rows]
    ws[0][3, :40] = 0.0  # a row whose first groups are all zero: zero scales
    ws[0][7, 17] = 1.5  # an outlier
    return ws


GRIDS = {
    "q4_k": lambda: BlockGrid(QT.Q4_K),
    "q6_k": lambda: BlockGrid(QT.Q6_K),
    "q5_k refit": lambda: BlockGrid(QT.Q5_K, refit=True),
    "q8_0": lambda: BlockGrid(QT.Q8_0),
    "q4_1": lambda: BlockGrid(QT.Q4_1),
    "q3_k": lambda: BlockGrid(QT.Q3_K),
    "int4 g64": lambda: IntGrid(IntScheme(4, True, 64)),
    "int4 asym g32": lambda: IntGrid(IntScheme(4, False, 32)),
    "int8 channel": lambda: IntGrid(IntScheme(8, True, None)),
}


def _run(grid, config, jobs, compiled: bool, monkeypatch):
    monkeypatch.setattr(gptq_mod, "COMPILED_COLUMNS", compiled)
    return gptq_batch(jobs, grid, config)


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("act_order", [False, True])
def test_compiled_columns_match_the_torch_loop(name, act_order, monkeypatch):
    grid = GRIDS[name]()
    assert affine_grid(grid) is not None
    cols = 512
    refit = "refit" in name
    config = GPTQConfig(act_order=act_order, refine_fit="refit" if refit else "auto", block_size=64)
    # two jobs in one loop in natural order; act-order jobs of their own (each has its own column order: batched,
    # they take the per-job torch loop)
    jobs = [GPTQJob(_weights(s, (96, 40), cols), _hessian(s, cols), 700) for s in range(1 if act_order else 2)]
    fast = _run(grid, config, jobs, True, monkeypatch)
    slow = _run(grid, config, jobs, False, monkeypatch)
    for rf, rs in zip(fast, slow):
        for a, b in zip(rf, rs):
            assert torch.equal(a.weight, b.weight)
            assert a.record.method == b.record.method
            assert a.record.loss == pytest.approx(b.record.loss, rel=1e-6)  # the rank-1 pushes may round differently (FMA)


def test_grids_without_an_affine_rounding_keep_the_torch_loop():
    assert affine_grid(BlockGrid(QT.IQ4_NL)) is None
    assert affine_grid(BlockGrid(QT.IQ4_XS)) is None
    assert affine_grid(FP8Grid(FP8Scheme("channel"))) is None


def test_compiled_columns_are_used_on_a_cpu(monkeypatch):
    """The switch is live: the compiled kernel runs (and the torch loop's rounding does not) on a CPU float32 pass."""
    calls = {"kernel": 0}
    real = gptq_mod.round_sub_block

    def counting(*args):
        calls["kernel"] += 1
        return real(*args)

    monkeypatch.setattr(gptq_mod, "round_sub_block", counting)
    grid = BlockGrid(QT.Q4_K)
    gptq_batch([GPTQJob(_weights(0, (32,), 256), _hessian(0, 256), 700)], grid, GPTQConfig())
    assert calls["kernel"] == 256 // 16
