"""The output energy behind the records' relative losses, estimated from a sample of a tall weight's rows."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.convert.pipeline import output_energy
from llama4_quant.quant.rtn import hessian_loss


def _hessian(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / 12 + torch.eye(cols))
    x = x * (torch.rand(cols, generator=g) * 2 + 0.1)
    return 2 / 2048 * x.t() @ x


@pytest.mark.parametrize("kind", ["gaussian", "heavy rows", "trend", "few giant rows"])
def test_sampled_energy_is_close_to_the_full_product(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    rows, cols = 8192, 256
    w = torch.randn(rows, cols, generator=g) * 0.05
    if kind == "heavy rows":
        w *= torch.distributions.StudentT(2.0).sample((rows, 1)).abs().clamp(max=200) + 0.05
    elif kind == "trend":
        w *= torch.linspace(0.1, 3.0, rows).unsqueeze(1)
    elif kind == "few giant rows":
        w[torch.randperm(rows, generator=g)[:5]] *= 60
    h = _hessian(cols, 5)
    exact = hessian_loss(w, h)
    assert output_energy(w, h) == pytest.approx(exact, rel=0.02)


def test_short_weights_are_exact() -> None:
    w = torch.randn(1024, 128)
    h = _hessian(128, 1)
    assert output_energy(w, h) == hessian_loss(w, h)
