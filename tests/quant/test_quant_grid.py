"""Int and fp8 grids: scales as compressed-tensors computes them, saturation, MSE clipping, RTN."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.quant.api import quantize_linear
from llama4_quant.quant.fp8 import FP8Grid
from llama4_quant.quant.grid import IntGrid
from llama4_quant.quant.rtn import rtn
from llama4_quant.quant.scheme import FP8Scheme, IntScheme
from llama4_quant.quant.grid import group_slices


def _heavy_tailed(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def test_symmetric_int4_scale_and_range() -> None:
    w = _heavy_tailed().to(torch.bfloat16)
    grid = IntGrid(IntScheme(4, True, 128))
    res = rtn(w, grid)
    q = res.finalize(grid)
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    absmax = w.float().abs().view(64, 4, 128).amax(-1)
    assert torch.equal(q.scale, (absmax / 7.5).to(torch.bfloat16).float())
    assert torch.equal(q.dequantize(), res.weight)
    assert q.zero_point is None


def test_symmetric_scale_matches_compressed_tensors() -> None:
    ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.quantization import QuantizationArgs

    w = _heavy_tailed().to(torch.bfloat16)
    for bits in (4, 8):
        args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="group", group_size=128)
        grouped = w.view(64, 4, 128)
        scale, _ = ct_helpers.calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        q, _ = quantize_linear(w, IntScheme(bits, True, 128), method="rtn")
        assert scale.dtype == torch.bfloat16
        assert torch.equal(q.scale, scale.float())


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_zero_point(bits: int) -> None:
    w = _heavy_tailed() + 0.05  # off-centre rows
    scheme = IntScheme(bits, False, 128)
    grid = IntGrid(scheme)
    res = rtn(w, grid)
    q = res.finalize(grid)
    assert q.zero_point is not None and q.zero_point.dtype == torch.int8
    assert q.zero_point.shape == q.scale.shape == (64, 4)
    assert int(q.zero_point.min()) >= scheme.qmin and int(q.zero_point.max()) <= scheme.qmax
    assert torch.equal(q.dequantize(), res.weight)
    sym = rtn(w, IntGrid(IntScheme(bits, True, 128))).weight
    assert (res.weight - w).square().sum() < (sym - w).square().sum()


def test_zero_group_and_per_channel() -> None:
    w = _heavy_tailed(8, 256)
    w[2] = 0.0
    for scheme in (IntScheme(4, True, None), IntScheme(4, False, -1)):
        grid = IntGrid(scheme)
        res = rtn(w, grid)
        q = res.finalize(grid)
        assert q.scale.shape == (8, 1)
        assert bool(torch.all(res.weight[2] == 0)) and bool(torch.all(q.scale > 0))
        assert torch.equal(q.dequantize(), res.weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clipping_never_worse(symmetric: bool) -> None:
    w = _heavy_tailed(seed=1)
    plain = rtn(w, IntGrid(IntScheme(4, symmetric, 128)))
    searched = rtn(w, IntGrid(IntScheme(4, symmetric, 128), mse=True))
    for s in group_slices(w.shape[1], 128):  # per row, per group
        e_plain = (plain.weight[:, s] - w[:, s]).square().sum(1)
        e_mse = (searched.weight[:, s] - w[:, s]).square().sum(1)
        assert bool(torch.all(e_mse <= e_plain))
    assert searched.record.loss < 0.95 * plain.record.loss  # heavy tails: clipping helps


def test_weighted_mse_clipping_never_worse_in_weighted_error() -> None:
    w = _heavy_tailed(seed=2)
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) ** 4
    plain = rtn(w, IntGrid(IntScheme(4, True, 128)))
    searched = rtn(w, IntGrid(IntScheme(4, True, 128), mse=True), importance=importance)

    def weighted(x: torch.Tensor) -> torch.Tensor:
        return ((x - w).square() * importance).view(64, 4, 128).sum(-1)

    assert bool(torch.all(weighted(searched.weight) <= weighted(plain.weight)))


def test_fp8_scales_and_saturation() -> None:
    w = _heavy_tailed(200, 384).to(torch.bfloat16)
    for strategy, shape in (("tensor", (1,)), ("channel", (200, 1)), ("block", (2, 3))):
        q, _ = quantize_linear(w, FP8Scheme(strategy), method="rtn")
        assert q.codes.dtype == torch.float8_e4m3fn and q.scale.shape == shape
        codes = q.codes.float()
        assert bool(torch.isfinite(codes).all()) and float(codes.abs().max()) <= 448.0
        if strategy == "channel":
            amax = w.float().abs().amax(1, keepdim=True)
            assert torch.equal(q.scale, (amax / 448).to(torch.bfloat16).float())
        if strategy == "block":
            blk = torch.nn.functional.pad(w.float().abs(), (0, 0, 0, 56)).view(2, 128, 3, 128).amax((1, 3))
            assert torch.equal(q.scale, (blk / 448).to(torch.bfloat16).float())
        err = (q.dequantize() - w.float()).abs() / w.float().abs().clamp(min=1e-3)
        assert float(err.median()) < 0.05


def test_fp8_saturates_instead_of_nan() -> None:
    grid = FP8Grid(FP8Scheme("channel"))
    w = torch.tensor([[1.0, -1.0, 0.5]])
    params = grid.fit(w)
    params.row_scale = params.row_scale / 4  # values now far outside +-448
    out = grid.quantize(w, params)
    assert torch.equal(out, torch.tensor([[448.0, -448.0, 448.0]]) * params.row_scale)
    assert torch.equal(grid.codes(w, params).float(), torch.tensor([[448.0, -448.0, 448.0]]))


def test_fp8_matches_compressed_tensors_fake_quant() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    w = _heavy_tailed(256, 256)
    for strategy, block in (("channel", None), ("block", [128, 128])):
        args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, block_structure=block)
        q, _ = quantize_linear(w.to(torch.bfloat16), FP8Scheme(strategy), method="rtn")
        x = q.dequantize()  # float32, on the grid: quantizing again must be the identity
        theirs = fake_quantize(x, q.scale.to(torch.bfloat16), None, args)
        assert torch.equal(theirs, x.to(torch.bfloat16))  # they dequantize in the scale dtype
        ours = FP8Grid(FP8Scheme(strategy))
        res = rtn(w, ours)
        theirs = fake_quantize(w, res.finalize(ours).scale, None, args)
        assert torch.equal(theirs.float(), res.weight)
