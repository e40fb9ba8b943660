"""The compiled NaN/Inf count and transpose every checkpoint read uses agree with torch on every float dtype."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.model.arrays import count_nonfinite, transposed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_count_nonfinite_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(600, 300, generator=g) * 1e3).to(dtype)
    flat = a.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:17]
    for k, i in enumerate(idx.tolist()):
        flat[i] = (float("nan"), float("inf"), -float("inf"))[k % 3]
    assert count_nonfinite(a) == int((~torch.isfinite(a)).sum()) == 17
    assert count_nonfinite(a[:, :100]) == int((~torch.isfinite(a[:, :100])).sum())  # strided: torch's path
    big = torch.finfo(dtype).max
    assert count_nonfinite(torch.full((300, 300), big, dtype=dtype)) == 0  # the largest finite value is finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_transposed_equals_torch_on_views(dtype):
    w = torch.randn(1000, 2 * 700, generator=torch.Generator().manual_seed(1)).to(dtype)
    for v in (w, w[:, :700], w[:, 700:], w[3:997:2]):
        out = transposed(v)
        assert out.is_contiguous() and out.dtype == dtype
        assert torch.equal(out, v.t().contiguous())
