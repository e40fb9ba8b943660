"""Round-to-nearest on any grid, and the result record RTN and GPTQ both return."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .grid import Grid, group_slices


@dataclass
class QuantRecord:
    """What actually happened to one weight, for the run report.

    method: "gptq" or "rtn" (RTN is also what GPTQ falls back to; `reason` then says why).
    damp: relative damping GPTQ ended up using (fraction of mean diag(H)); None for RTN.
    loss: with a Hessian H (= 2/n X^T X): tr(dW H dW^T) / 2, the mean over calibration tokens of
      the squared output error ||dW x||^2; without one: the plain sum of squared weight errors
      (`loss_kind` says which).
    gptq_loss, rtn_loss: GPTQ's loss and the best RTN loss on the same grid when GPTQ ran with its RTN
      guard (whichever is lower is `loss`, the other method lost); None otherwise.
    shrink: the weight of diag(H) in the shrunk Hessian GPTQ solved against (None: not shrunk).
    rtn_rows: when the RTN guard decided on a sample of rows (GPTQ's exact loss far below RTN's estimate), the
      rows RTN's loss was measured on; rtn_loss is then the estimate for the whole weight. None: all rows.
    """

    method: str
    reason: str = ""
    damp: float | None = None
    loss: float = 0.0
    loss_kind: str = "weight"  # "hessian" | "weight"
    dead_columns: int = 0
    n_tokens: int | None = None
    seconds: float = 0.0
    gptq_loss: float | None = None
    rtn_loss: float | None = None
    shrink: float | None = None
    rtn_rows: int | None = None


@dataclass
class QuantResult:
    weight: torch.Tensor  # [out, in] float32, dequantized, every group on its grid
    params: list[Any]  # grid params, one per group of input columns, in column order
    record: QuantRecord = field(default_factory=lambda: QuantRecord("rtn"))

    def finalize(self, grid: Any):
        """The grid's packed form (QuantizedLinear for the int and fp8 grids)."""
        return grid.finalize(self.weight, self.params)


def weight_loss(
    original: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor | None
) -> tuple[float, str]:
    """(loss, kind) as defined on QuantRecord."""
    delta = original.to(torch.float32) - quantized.to(torch.float32)
    if hessian is None or not bool(hessian.diagonal().any()):
        return float(delta.square().sum()), "weight"
    return hessian_loss(delta, hessian.to(device=delta.device, dtype=torch.float32)), "hessian"


def hessian_loss(delta: torch.Tensor, h: torch.Tensor, blocks: int = 4) -> float:
    """tr(D H D^T) / 2 for a symmetric H, with about half of the products of D @ H: in `blocks` column blocks,
    each block row of H from its diagonal block on (the diagonal block counted once, the ones to its right twice).
    Accumulated in float64 across blocks."""
    cols = delta.shape[1]
    step = max(256, -(-cols // blocks))
    total = 0.0
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        g = delta[:, c0:c1] @ h[c0:c1, c0:]  # [rows, cols - c0]
        g.mul_(delta[:, c0:])
        total += float(g[:, : c1 - c0].sum(dtype=torch.float64)) + 2 * float(g[:, c1 - c0:].sum(dtype=torch.float64))
    return total / 2


def row_sample(proxy: torch.Tensor, size: int, top: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A sample of rows for estimating a sum over rows whose terms roughly follow `proxy` [rows]: the `top` rows
    with the largest proxy (measured exactly: a few giant rows can hold much of the sum), and `size` - `top` of the
    others evenly spaced in proxy order (a systematic sample over the proxy's whole range). Returns (top rows,
    sampled rows, scale): the estimate is sum(top) + scale x sum(sampled), scale the ratio of the proxy's sum over
    all the other rows to its sum over the sampled ones (a ratio estimator: exact when terms are proportional to
    the proxy)."""
    order = torch.argsort(proxy, descending=True)
    first, rest = order[:top], order[top:]
    k = min(rest.numel(), size - top)
    picked = rest[((torch.arange(k, device=rest.device) + 0.5) * (rest.numel() / k)).long()]
    den = float(proxy[picked].sum())
    scale = float(proxy[rest].sum()) / den if den > 0 else rest.numel() / max(1, k)
    return first, picked, scale


@torch.no_grad()
def rtn(
    weight: torch.Tensor,
    grid: Grid,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    reason: str = "",
) -> QuantResult:
    """Round every group of `weight` [out, in] to the nearest grid point.

    importance: optional [in] per-column weights handed to grid.fit (MSE-weighted clipping);
    hessian: optional, only used to report the loss in the record.
    """
    t0 = time.perf_counter()
    w = weight.detach().to(torch.float32)
    out = torch.empty_like(w)
    params = []
    for s in group_slices(w.shape[1], grid.group_size):
        imp = None if importance is None else importance[s]
        p = grid.fit(w[:, s], imp)
        out[:, s] = grid.quantize(w[:, s], p, 0)
        params.append(p)
    loss, kind = weight_loss(w, out, hessian)
    record = QuantRecord("rtn", reason, None, loss, kind, seconds=time.perf_counter() - t0)
    return QuantResult(out, params, record)
