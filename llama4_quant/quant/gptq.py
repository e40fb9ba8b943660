"""GPTQ (Frantar et al. 2022) on a pluggable grid, with the failure modes of sparse MoE calibration.

Columns are rounded one at a time onto `grid` and each rounding error is spread over the columns not
yet rounded, through the upper Cholesky factor of the inverse (damped) Hessian, in lazy blocks.

- damping: `damp` * mean(diag H) is added to the diagonal; if a Cholesky factorisation fails the
  damping is multiplied by `damp_growth` and retried up to `max_damp`, then RTN is used instead.
- dead columns (diag H == 0: the input feature was always zero) get H_jj = 1 and, by default, a
  zero weight.
- an empty Hessian (no calibration tokens) means RTN.
- act-order (desc_act) visits columns by decreasing diag H with *static groups*: every group's params
  are fitted on the original (unpermuted, not yet updated) weights before the first column is
  rounded, so the checkpoint keeps plain contiguous groups and needs no g_idx.
Without act-order, a group's params are fitted lazily on the updated weights when GPTQ reaches its
first column (static_groups=True fits them all up front instead).
- shrinkage: a Hessian estimated from n tokens for d input columns has rank <= n and, when n is not
  much larger than d (a routed expert that saw a few hundred tokens, a short calibration set), GPTQ
  fits the error feedback to the calibration tokens' own directions: its loss on them drops 10-100x
  below RTN's while its loss on other text ends up *above* RTN's. The off-diagonal part of H is
  therefore shrunk towards the diagonal, H <- (1 - a) H + a diag(H) with a = s d / (s d + n)
  (`shrink` = s: a prior worth s tokens per column of uncorrelated inputs with the same per-column
  energy): a = 0.06 for 4096 tokens into 256 columns, 0.5 when n = d. diag(H), and so the column
  importance and the damping, is unchanged. Off when n_tokens is unknown or `shrink` is 0.
- RTN guard (`rtn_guard`): the original weights are also rounded to nearest, with a plain fit of
  the grid (what an uncalibrated run writes) and on GPTQ's own grid (static groups: the params GPTQ
  rounded onto; lazy groups: a fit weighted by diag(H)), and when one of those has a lower Hessian
  loss tr(dW H dW^T)/2 on the calibration Hessian than GPTQ's result, it is kept instead (method
  "rtn", `reason` says which and both losses; ties keep GPTQ). Both losses are recorded (gptq_loss,
  rtn_loss), so a calibrated result is never worse than an uncalibrated one by the measure GPTQ
  minimises. Costs one plain fit per group and a few matrix products.
The record says which of these happened.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .grid import Grid, group_slices
from .rtn import QuantRecord, QuantResult, rtn, weight_loss


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    damp_growth: float = 10.0  # factor applied after a failed Cholesky
    max_damp: float = 1.0  # beyond this: give up and use RTN
    act_order: bool = False
    static_groups: bool = False  # forced on by act_order
    zero_dead_columns: bool = True
    use_importance: bool = True  # hand diag(H) of a group's columns to grid.fit
    shrink: float = 0.25  # prior tokens per input column towards diag(H) (see module doc); 0: off
    rtn_guard: bool = True  # keep RTN on the same grid where its Hessian loss is lower


def shrinkage(shrink: float, cols: int, n_tokens: int | None) -> float:
    """Weight `a` of diag(H) in (1 - a) H + a diag(H) for a Hessian of `n_tokens` tokens over `cols` columns."""
    if not shrink or not n_tokens or n_tokens < 0:
        return 0.0
    prior = shrink * cols
    return prior / (prior + n_tokens)


def inverse_cholesky(
    h: torch.Tensor, damp: float, growth: float, max_damp: float
) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + d * mean(diag H) * I)^-1, raising d until it works.

    Returns (factor, d), or (None, last d tried) when even `max_damp` fails.
    """
    mean_diag = h.diagonal().mean()
    d = damp
    while d <= max_damp * (1 + 1e-6):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, d
        d *= growth
    return None, d / growth


def _block_size(block: int, group: int, cols: int, static: bool) -> int:
    """Block width such that every lazily fitted group starts where its weights are up to date."""
    if static or group >= cols:
        return block
    if group <= block:
        return (block // group) * group  # groups never straddle a block
    return math.gcd(group, block)  # each group starts on a block boundary


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    config: GPTQConfig = GPTQConfig(),
    n_tokens: int | None = None,
) -> QuantResult:
    """Quantize `weight` [out, in] against `hessian` [in, in] (2/n X^T X, see hessian.py).

    n_tokens: calibration tokens behind the Hessian, if known (0 means empty -> RTN).
    Works on the device of `weight`; the Hessian is moved there.
    """
    t0 = time.perf_counter()
    w0 = weight.detach().to(torch.float32)
    rows, cols = w0.shape
    h0 = hessian.detach().to(device=w0.device, dtype=torch.float32)
    if h0.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(h0.shape)} does not match weight {tuple(w0.shape)}")

    def fallback(reason: str, damp: float | None = None) -> QuantResult:
        res = rtn(w0, grid, reason=reason)  # loss on the weights: H is empty or not trustworthy
        res.record.damp = damp
        res.record.n_tokens = n_tokens
        res.record.seconds = time.perf_counter() - t0
        return res

    diag0 = h0.diagonal()
    if n_tokens == 0 or not bool((diag0 != 0).any()):
        return fallback("empty Hessian (no calibration tokens)")
    if not bool(torch.isfinite(h0).all()):
        return fallback("non-finite Hessian")

    h = h0.clone()
    w = w0.clone()
    dead = torch.nonzero(diag0 == 0).squeeze(1)
    h[dead, dead] = 1.0
    if config.zero_dead_columns:
        w[:, dead] = 0.0
    importance = h.diagonal().clone() if config.use_importance else None
    alpha = shrinkage(config.shrink, cols, n_tokens)
    if alpha > 0:
        diag = h.diagonal().clone()
        h.mul_(1.0 - alpha)
        h.diagonal().copy_(diag)  # (1 - a) H + a diag(H): off-diagonal part scaled, diagonal kept

    group = grid.group_size or cols
    slices = group_slices(cols, group)
    params: list[Any] = [None] * len(slices)
    static = config.act_order or config.static_groups or group >= cols
    if static:
        for g, s in enumerate(slices):
            params[g] = grid.fit(w[:, s], None if importance is None else importance[s])
    static_fit = list(params)
    fitted_on = w.clone() if config.zero_dead_columns and dead.numel() else w0  # what the static params saw

    order = torch.arange(cols, device=w.device)
    if config.act_order:
        order = torch.argsort(h.diagonal(), descending=True)
        w = w[:, order]
        h = h[order][:, order]
    hinv, damp = inverse_cholesky(h, config.damp, config.damp_growth, config.max_damp)
    if hinv is None:
        return fallback(f"Cholesky failed with damping up to {damp:g} of mean diag(H)", damp)
    del h

    bs = _block_size(config.block_size, group, cols, static)
    columns = order.tolist()
    q = torch.zeros_like(w)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = columns[i1 + i]
            g, offset = divmod(c, group)
            if params[g] is None:  # lazy fit, only in natural order: c == i1 + i, offset == 0
                if i + group <= i2 - i1 or i2 == cols:
                    current = w1[:, i : i + group]
                else:  # a group wider than the block starts on a block boundary: w is up to date
                    assert i == 0
                    current = w[:, c : c + group]
                params[g] = grid.fit(current, None if importance is None else importance[c : c + group])
            col = w1[:, i : i + 1]
            qc = grid.quantize(col, params[g], offset)
            q[:, i1 + i] = qc[:, 0]
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e * hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if config.act_order:
        q = q[:, torch.argsort(order)]
    loss, kind = weight_loss(w0, q, h0)
    record = QuantRecord(
        "gptq", "act-order, static groups" if config.act_order else "", damp, loss, kind,
        dead_columns=int(dead.numel()), n_tokens=n_tokens, gptq_loss=loss, shrink=alpha or None,
    )
    result = QuantResult(q, params, record)
    if config.rtn_guard:
        result = _keep_better(result, w0, h0, grid, diag0 if config.use_importance else None,
                              (static_fit, fitted_on) if static else None)
    result.record.seconds = time.perf_counter() - t0
    return result


def rtn_candidates(
    w0: torch.Tensor,
    h0: torch.Tensor,
    grid: Grid,
    importance: torch.Tensor | None = None,
    static: tuple[list[Any], torch.Tensor] | None = None,
) -> list[tuple[str, QuantResult]]:
    """Round-to-nearest candidates for `w0` on `grid`, each with its Hessian loss against h0 in the record:

    "rtn": a plain fit, what an uncalibrated run writes;
    "rtn on the gptq grid": static = (params, weights they were fitted on: w0, or w0 with GPTQ's zeroed dead
      columns), those weights rounded onto exactly the grid GPTQ used (no second search); without `static`,
      "importance-weighted rtn": a fit weighted by `importance`.
    """
    out = [("rtn", rtn(w0, grid, hessian=h0))]
    if static is not None:
        t0 = time.perf_counter()
        static_params, fitted_on = static
        sl = group_slices(w0.shape[1], grid.group_size)
        q = torch.cat([grid.quantize(fitted_on[:, s], p, 0) for s, p in zip(sl, static_params)], dim=1)
        loss, kind = weight_loss(w0, q, h0)
        rec = QuantRecord("rtn", "", None, loss, kind, seconds=time.perf_counter() - t0)
        out.append(("rtn on the gptq grid", QuantResult(q, list(static_params), rec)))
    elif importance is not None:
        out.append(("importance-weighted rtn", rtn(w0, grid, importance=importance, hessian=h0)))
    return out


def _keep_better(result: QuantResult, w0: torch.Tensor, h0: torch.Tensor, grid: Grid,
                 importance: torch.Tensor | None, static: tuple[list[Any], torch.Tensor] | None) -> QuantResult:
    """`result` (GPTQ's), or the RTN candidate with a strictly lower Hessian loss; both losses recorded."""
    rec = result.record
    name, best = min(rtn_candidates(w0, h0, grid, importance, static), key=lambda c: c[1].record.loss)
    rec.rtn_loss = best.record.loss
    if not best.record.loss < rec.loss:
        return result
    kept = best.record
    kept.reason = f"{name} had lower Hessian loss than gptq ({kept.loss:.6g} < {rec.loss:.6g})"
    kept.damp, kept.dead_columns, kept.n_tokens = rec.damp, rec.dead_columns, rec.n_tokens
    kept.gptq_loss, kept.rtn_loss, kept.shrink = rec.gptq_loss, kept.loss, rec.shrink
    return best
