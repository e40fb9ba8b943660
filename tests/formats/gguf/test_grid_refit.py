"""BlockGrid.refit_scales (GPTQ's refine round on the k-quant grids): lower Hessian loss for GPTQ's codes, on
params that pack to bytes gguf-py decodes to exactly the returned values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as ref_dequantize

from llama4_quant.formats.gguf import quants as gq
from llama4_quant.formats.gguf.grid import BlockGrid, pack_result
from llama4_quant.quant.gptq import GPTQConfig, gptq

QT = gq.QT
REFIT_TYPES = (QT.Q4_K, QT.Q6_K, QT.Q5_K, QT.Q3_K, QT.Q2_K)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def problem(rows: int = 24, cols: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Weights with a per-row offset (so that the mins matter) and a Hessian of correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    n = 4 * cols
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    spec = torch.logspace(0, -2, cols)
    x = (torch.randn(n, cols, generator=g) * spec) @ mix + 0.3 * torch.randn(n, cols, generator=g) * spec.sqrt()
    x = x * (1 + 3 * torch.rand(cols, generator=g))
    h = 2 * x.t() @ x / n
    w = torch.randn(rows, cols, generator=g) * 0.02 + 0.01 * torch.randn(rows, 1, generator=g)
    return w, h, n


def damped(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    hd = h.clone()
    hd.diagonal().add_(damp * h.diagonal().mean())
    return hd


def hessian_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (q - w).double()
    return float(((e @ h.double()) * e).sum()) / 2


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", REFIT_TYPES, ids=lambda t: t.name)
def test_refit_lowers_the_loss_and_packs_exactly(qtype: QT) -> None:
    w, h, n = problem()
    grid = BlockGrid(qtype, refit=True)
    res = gptq(w, h, grid, GPTQConfig(act_order=True, refine=0, rtn_guard=False), n_tokens=n)
    hd = damped(h)
    q0 = res.weight.clone()
    params, q, loss = grid.refit_scales(w, res.weight, res.params, hd)
    assert torch.equal(res.weight, q0)  # the caller's result is left alone
    old = hessian_loss(w, q0, hd)
    # the returned loss is the true Hessian loss of the returned values, and it is lower
    assert loss == pytest.approx(hessian_loss(w, q, hd), rel=1e-5)
    assert loss < old * (0.999 if qtype in (QT.Q4_K, QT.Q6_K, QT.Q2_K, QT.Q3_K) else 1.0)
    # the new params pack to bytes that llama.cpp's decoder (gguf-py's) turns into exactly the returned values
    packed = pack_result(q, params)
    assert packed.shape == (w.shape[0], gq.bytes_per_row(qtype, w.shape[1]))
    assert np.array_equal(bits(ref_dequantize(packed, qtype).reshape(q.shape)), bits(q.numpy()))
    # ... and hold GPTQ's codes (a sub-block whose new scale is 0 stores code 0: every code decodes to -min there)
    new_codes, p = gq.unpack(packed, qtype)
    old_codes, _ = gq.unpack(pack_result(q0, res.params), qtype)
    live = np.repeat(p.scale != 0, p.group_size, axis=1)
    assert np.array_equal(new_codes[live], old_codes[live])
    assert (new_codes[~live] == 0).all()
    # the params are what the file stores: the 6-bit (4-bit for Q2_K) sub-scales and mins, int8 for Q6_K
    hi = {QT.Q2_K: 15, QT.Q3_K: 31, QT.Q6_K: 127}.get(qtype, 63)
    lo = {QT.Q3_K: -32, QT.Q6_K: -128}.get(qtype, 0)
    assert p.sub_scales.min() >= lo and p.sub_scales.max() <= hi
    if p.sub_mins is not None:
        assert p.sub_mins.max() <= hi
    fitted = gq.concat_params([f.params for f in params])
    assert np.array_equal(fitted.sub_scales, p.sub_scales) and np.array_equal(fitted.d.view(np.uint16),
                                                                             p.d.view(np.uint16))


@pytest.mark.parametrize("qtype", (QT.Q4_K, QT.Q6_K), ids=lambda t: t.name)
def test_gptq_refine_round_on_block_grids(qtype: QT) -> None:
    """gptq() finds refit_scales on the k-quant grid: its refine round lowers the loss, the RTN guard still holds,
    and the result packs to a file that decodes to it."""
    w, h, n = problem(rows=32, seed=1)
    grid = BlockGrid(qtype, refit=True)
    base = gptq(w, h, grid, GPTQConfig(act_order=True, refine=0), n_tokens=n)
    ref = gptq(w, h, grid, GPTQConfig(act_order=True, refine=1), n_tokens=n)
    assert "2 passes" in ref.record.reason
    assert ref.record.loss < base.record.loss
    assert ref.record.loss <= ref.record.rtn_loss
    packed = pack_result(ref.weight, ref.params)  # (BlockGrid.quantize may differ from the file in a zero's sign)
    assert np.array_equal(ref_dequantize(packed, qtype).reshape(w.shape), ref.weight.numpy())


@pytest.mark.parametrize("qtype", (QT.Q8_0, QT.Q4_0, QT.IQ4_NL, QT.IQ4_XS), ids=lambda t: t.name)
def test_other_types_return_their_inputs(qtype: QT) -> None:
    """Types without a refit hand back their params and values with the true loss; gptq's refine round then
    keeps its first pass."""
    w, h, n = problem(rows=16, cols=256)
    grid = BlockGrid(qtype, refit=True)
    res = gptq(w, h, grid, GPTQConfig(act_order=True, refine=0), n_tokens=n)
    hd = damped(h)
    params, q, loss = grid.refit_scales(w, res.weight, res.params, hd)
    assert all(a is b for a, b in zip(params, res.params)) and torch.equal(q, res.weight)
    assert loss == pytest.approx(hessian_loss(w, res.weight, hd), rel=1e-5)
    again = gptq(w, h, grid, GPTQConfig(act_order=True, refine=1), n_tokens=n)
    assert torch.equal(again.weight, res.weight)
    packed = pack_result(again.weight, again.params)
    assert np.array_equal(ref_dequantize(packed, qtype).reshape(w.shape), again.weight.numpy())


def test_off_by_default() -> None:
    """Without refit=True the grid offers no refine round: gptq() runs one pass, as before."""
    from llama4_quant.formats.gguf.grid import grid_for_type

    assert BlockGrid(QT.Q4_K).refit_scales is None and grid_for_type(QT.Q6_K).refit_scales is None
    assert callable(grid_for_type(QT.Q6_K, refit=True).refit_scales)
    w, h, n = problem(rows=16, cols=256, seed=3)
    res = gptq(w, h, BlockGrid(QT.Q4_K), GPTQConfig(act_order=True), n_tokens=n)
    assert "passes" not in res.record.reason


def test_refit_with_lazy_groups_and_zero_rows() -> None:
    """Without act-order (params fitted lazily on updated weights), with an all-zero row and a zero column block:
    still exact and never worse."""
    w, h, n = problem(rows=16, cols=512, seed=2)
    w[3] = 0
    w[:, 256:288] = 0
    grid = BlockGrid(QT.Q4_K, refit=True)
    res = gptq(w, h, grid, GPTQConfig(act_order=False, refine=0, rtn_guard=False), n_tokens=n)
    hd = damped(h)
    params, q, loss = grid.refit_scales(w, res.weight, res.params, hd)
    assert loss <= hessian_loss(w, res.weight, hd) * (1 + 1e-6)
    assert loss == pytest.approx(hessian_loss(w, q, hd), rel=1e-5)
    packed = pack_result(q, params)
    assert np.array_equal(bits(ref_dequantize(packed, QT.Q4_K).reshape(q.shape)), bits(q.numpy()))
