"""Streaming Hessian: running mean of 2/n X^T X, empty batches, merging, per-expert routing."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.quant.hessian import ExpertHessians, HessianAccumulator


def _x(tokens: int, dim: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed))


def test_streamed_equals_full_batch() -> None:
    x = _x(500)
    acc = HessianAccumulator(48)
    acc.add(x[:7].view(1, 7, 48))  # any leading shape
    acc.add(x[7:7])  # zero tokens: no-op
    acc.add(x[7:300].view(293, 1, 48))
    acc.add(x[300:])
    assert acc.n_tokens == 500
    torch.testing.assert_close(acc.hessian, 2.0 / 500 * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_empty_and_bf16_inputs() -> None:
    acc = HessianAccumulator(48)
    acc.add(torch.empty(0, 48))
    acc.add(torch.empty(3, 0, 48, dtype=torch.bfloat16))
    assert acc.empty and acc.n_tokens == 0 and not bool(acc.hessian.any())
    x = _x(10).to(torch.bfloat16)
    acc.add(x)
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian, 2.0 / 10 * x.float().t() @ x.float())
    with pytest.raises(ValueError):
        acc.add(torch.zeros(4, 47))


def test_merge_is_token_weighted() -> None:
    x = _x(90)
    a, b, empty = HessianAccumulator(48), HessianAccumulator(48), HessianAccumulator(48)
    a.add(x[:20])
    b.add(x[20:])
    a.merge(b)
    a.merge(empty)
    assert a.n_tokens == 90
    torch.testing.assert_close(a.hessian, 2.0 / 90 * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_expert_hessians_route_tokens() -> None:
    x = _x(64)
    ids = torch.tensor([0, 2] * 32)  # expert 1 and 3 get no token
    experts = ExpertHessians(4, 48)
    experts.add(x.view(8, 8, 48), ids.view(8, 8))
    assert experts.tokens_per_expert() == [32, 0, 32, 0]
    assert experts[1].empty and not bool(experts[1].hessian.any())
    x0 = x[ids == 0]
    torch.testing.assert_close(experts[0].hessian, 2.0 / 32 * x0.t() @ x0, rtol=1e-5, atol=1e-5)
