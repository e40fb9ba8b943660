"""Grids: how one group of weight columns is rounded onto a fixed set of representable values.

RTN and GPTQ never look inside a grid; they only call the three members of `Grid`:

    group_size            input columns sharing one set of params (None: the whole row)
    fit(w, importance)    w: [out, group_size] current weights of one group; importance: [group_size]
                          per-column weights (diag of the Hessian) or None -> opaque params
    quantize(w, params, offset)
                          w: [out, k] columns starting at column `offset` inside the group
                          -> [out, k] dequantized values on the grid fixed by params

GPTQ calls quantize one column at a time (k == 1), in any order when act-order permutes columns,
so params must be fixed before the first column of the group is rounded and quantize must be
pure. That is all a GGUF k-quant needs: group_size 256 (one super-block), params holding the
[out, 8] sub-block scales and mins (or [out, 16] for Q6_K) plus the fp16 super-block scale, and
quantize picking the sub-block `(offset + j) // 32` for column j.

A grid that feeds a compressed-tensors checkpoint also has `finalize(weight, params)`, turning a
dequantized [out, in] weight (every group on its grid) into a `QuantizedLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from .columns import INT_SYMMETRIC, INT_ZERO_POINT, Affine
from .scheme import IntScheme, QuantizedLinear


@runtime_checkable
class Grid(Protocol):
    @property
    def group_size(self) -> int | None: ...

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Any: ...

    def quantize(self, w: torch.Tensor, params: Any, offset: int = 0) -> torch.Tensor: ...


def group_slices(cols: int, group_size: int | None) -> list[slice]:
    """Column ranges of the groups of a row of `cols` columns (the last one may be short)."""
    g = group_size or cols
    return [slice(s, min(s + g, cols)) for s in range(0, cols, g)]


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 scales to what the checkpoint can store; zeros become the dtype's eps.

    Zero scales (all-zero groups) are replaced the way compressed-tensors does, so that dividing
    by the scale is always safe and an all-zero group still dequantizes to zeros.
    """
    stored = scale.to(dtype).to(torch.float32)
    eps = torch.finfo(dtype).eps
    return torch.where(stored == 0, torch.full_like(stored, eps), stored)


@dataclass
class IntParams:
    """Params of one int group: scale [out, 1] and, asymmetric only, integer zero point [out, 1]."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None


class IntGrid:
    """Uniform int4/int8 grid, symmetric or asymmetric, with optional MSE-optimal range shrinking.

    Matches compressed-tensors (calculate_qparams): the range always includes 0;
    symmetric: scale = absmax / ((qmax - qmin) / 2) (absmax/7.5 for int4; codes in [-8, 7]);
    asymmetric: scale = (max - min) / (qmax - qmin), zero point = round(qmin - min / scale)
    clamped to [qmin, qmax]; code = clamp(round(w / scale + zp)), value = (code - zp) * scale.
    Scales are rounded to `scale_dtype` (the model dtype the checkpoint stores them in) before
    any code is computed, so the codes are the ones the stored scales reproduce.

    mse: try shrinking the range by ratios 1, ..., 1 - max_shrink (`mse_steps` of them) and keep,
    per row of the group, the one with the least squared error, weighted by the per-column
    importance when fit is given one. Ratio 1 is plain min-max, so the search is never worse.
    """

    rows_independent = True  # a row's fit and codes do not depend on the other rows (quant.gptq's sampled guard)

    def affine(self) -> Affine:
        """The grid's rounding as quant.columns' compiled GPTQ column steps read it."""
        mode = INT_SYMMETRIC if self.scheme.symmetric else INT_ZERO_POINT
        return Affine(mode, float(self.scheme.qmin), float(self.scheme.qmax), 0)

    def __init__(
        self,
        scheme: IntScheme,
        scale_dtype: torch.dtype = torch.bfloat16,
        mse: bool = False,
        mse_steps: int = 20,
        max_shrink: float = 0.2,
    ) -> None:
        self.scheme = scheme
        self.scale_dtype = scale_dtype
        self.mse = mse
        self.mse_steps = max(1, mse_steps)
        self.max_shrink = max_shrink

    @property
    def group_size(self) -> int | None:
        return self.scheme.columns_per_group

    # ---- params ----------------------------------------------------------------------------
    def params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> IntParams:
        """Params for rows whose values span [lo, hi] (each [out, 1])."""
        s = self.scheme
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        if s.symmetric:
            absmax = torch.maximum(-lo, hi)
            scale = round_scale(absmax / ((s.qmax - s.qmin) / 2), self.scale_dtype)
            return IntParams(scale)
        scale = round_scale((hi - lo) / (s.qmax - s.qmin), self.scale_dtype)
        zp = torch.clamp(torch.round(s.qmin - lo / scale), s.qmin, s.qmax)
        return IntParams(scale, zp)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> IntParams:
        w = w.to(torch.float32)
        lo = w.amin(dim=1, keepdim=True)
        hi = w.amax(dim=1, keepdim=True)
        best = self.params_from_range(lo, hi)
        if not self.mse:
            return best
        weight = None if importance is None else importance.to(w).reshape(1, -1).clamp(min=0)
        best_err = self._error(w, best, weight)
        for i in range(1, self.mse_steps):
            ratio = 1.0 - self.max_shrink * i / (self.mse_steps - 1)
            cand = self.params_from_range(lo * ratio, hi * ratio)
            err = self._error(w, cand, weight)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.scale = torch.where(better, cand.scale, best.scale)
            if best.zero_point is not None:
                best.zero_point = torch.where(better, cand.zero_point, best.zero_point)
        return best

    def _error(self, w: torch.Tensor, p: IntParams, weight: torch.Tensor | None) -> torch.Tensor:
        d2 = (self.quantize(w, p) - w).square()
        if weight is not None:
            d2 = d2 * weight
        return d2.sum(dim=1, keepdim=True)

    # ---- rounding --------------------------------------------------------------------------
    def codes(self, w: torch.Tensor, params: IntParams) -> torch.Tensor:
        """Integer codes in [qmin, qmax] (float32 holding integers)."""
        x = w.to(torch.float32) / params.scale
        if params.zero_point is not None:
            x = x + params.zero_point
        return torch.clamp(torch.round(x), self.scheme.qmin, self.scheme.qmax)

    # ---- coordinate descent on codes (quant.gptq.coordinate_descent) --------------------------------
    @property
    def code_bits(self) -> int:
        return self.scheme.bits

    def code_range(self) -> tuple[int, int]:
        return self.scheme.qmin, self.scheme.qmax

    def code_steps(self, params: IntParams, cols: int) -> torch.Tensor:
        """[out, cols]: how much one code step moves each weight of the group."""
        return params.scale.expand(params.scale.shape[0], cols)

    def from_codes(self, codes: torch.Tensor, params: IntParams) -> torch.Tensor:
        """The values integer codes of a whole group stand for (then quantize() to be exactly on the grid)."""
        return (codes if params.zero_point is None else codes - params.zero_point) * params.scale

    def column_params(self, params: IntParams, offset: int) -> IntParams:
        """Params that round one column at `offset` of the group with offset 0 (batched act-order GPTQ): the same."""
        return params

    def quantize(self, w: torch.Tensor, params: IntParams, offset: int = 0) -> torch.Tensor:
        q = self.codes(w, params)
        if params.zero_point is not None:
            q = q - params.zero_point
        return q * params.scale

    def finalize(self, weight: torch.Tensor, params: Sequence[IntParams]) -> QuantizedLinear:
        """Codes, stacked scales and zero points of a weight whose groups lie on `params`."""
        out, cols = weight.shape
        if self.group_size is not None and cols % self.group_size:
            raise ValueError(f"{cols} input columns are not a multiple of group size {self.group_size}")
        sl = group_slices(cols, self.group_size)
        if len(sl) != len(params):
            raise ValueError(f"expected {len(sl)} group params, got {len(params)}")
        codes = torch.cat([self.codes(weight[:, s], p) for s, p in zip(sl, params)], dim=1)
        scale = torch.cat([p.scale for p in params], dim=1)
        zp = None
        if not self.scheme.symmetric:
            zp = torch.cat([p.zero_point for p in params], dim=1).to(torch.int8)
        return QuantizedLinear(codes.to(torch.int8), scale, zp, self.scheme)

    def refit_scales(self, target: torch.Tensor, q: torch.Tensor, params: Sequence[IntParams],
                     hessian: torch.Tensor) -> tuple[list[IntParams], torch.Tensor, float]:
        """For the codes of `q` (every group on `params`): the scales with the least Hessian loss against `target`
        (see lsq_scales), those same codes dequantized on them, and their loss tr(dW H dW^T) / 2. GPTQ's refine
        passes call this."""
        new, loss = lsq_scales(target, q, list(params), hessian, self)
        sl = group_slices(q.shape[1], self.group_size)
        same = torch.cat([(self.codes(q[:, s], po) - (po.zero_point if po.zero_point is not None else 0)) * pn.scale
                          for s, po, pn in zip(sl, params, new)], dim=1)
        return new, same, loss


def lsq_scales(w0: torch.Tensor, q: torch.Tensor, params: list[IntParams], h: torch.Tensor,
               grid: IntGrid) -> tuple[list[IntParams], float]:
    """Int grids: for the integer codes of `q` (each group on its params), the per-row group scales that minimise
    the Hessian loss tr((W - Q S) H (W - Q S)^T) jointly over a row's groups (zero points kept): per row the
    G x G normal equations A s = b with A_gk = q_g^T H_gk q_k, b_g = q_g^T (H w)_g, solved in float64 and rounded to
    the scale dtype. A scale that comes out non-positive or non-finite keeps its old value. Also returns the loss
    tr(dW H dW^T) / 2 of the codes on the returned scales (from the same normal equations, no extra product)."""
    rows, cols = w0.shape
    gs = grid.group_size or cols
    sl = group_slices(cols, gs)
    n_g = len(sl)
    pad = n_g * gs - cols
    # codes minus zero point: q = v * scale exactly, v integer
    v = torch.cat([grid.codes(q[:, s], p) - (p.zero_point if p.zero_point is not None else 0) for s, p in
                   zip(sl, params)], dim=1)
    hh = torch.nn.functional.pad(h, (0, pad, 0, pad))
    vp = torch.nn.functional.pad(v, (0, pad))
    a = torch.empty(rows, n_g, n_g, dtype=torch.float64, device=w0.device)
    for k in range(n_g):  # A is symmetric: group k's row of blocks from its diagonal block on, mirrored
        nk = vp[:, k * gs:(k + 1) * gs] @ hh[k * gs:(k + 1) * gs, k * gs:]  # [rows, (n_g - k) * gs]
        nk.mul_(vp[:, k * gs:])
        a[:, k:, k] = nk.view(rows, n_g - k, gs).sum(-1).double()
        a[:, k, k + 1:] = a[:, k + 1:, k]
    wh = torch.nn.functional.pad(w0 @ h, (0, pad))
    b = (vp * wh).view(rows, n_g, gs).sum(-1).double()
    c = (torch.nn.functional.pad(w0, (0, pad)) * wh).sum(-1).double()  # w H w^T per row
    old = torch.cat([p.scale for p in params], dim=1).double()
    diag = a.diagonal(dim1=1, dim2=2)
    live = diag > 0
    eye = torch.eye(n_g, dtype=torch.float64, device=w0.device)
    reg = eye * (1e-9 * diag.clamp(min=0).mean(-1, keepdim=True).unsqueeze(-1) + 1e-30)
    # dead groups (all codes 0): an identity row keeps their old scale and the system solvable
    a_solve = torch.where(live.unsqueeze(-1) & live.unsqueeze(-2), a, torch.zeros_like(a)) + torch.diag_embed(
        (~live).double()) + reg
    sol = torch.linalg.solve(a_solve, torch.where(live, b, old).unsqueeze(-1)).squeeze(-1)
    ok = torch.isfinite(sol) & (sol > 0) & live
    new = torch.where(ok, sol, old).float()
    out = []
    for g, p in enumerate(params):
        scale = torch.where(ok[:, g:g + 1], round_scale(new[:, g:g + 1], grid.scale_dtype), p.scale)
        out.append(IntParams(scale, p.zero_point))
    st = torch.cat([p.scale for p in out], dim=1).double()
    loss = torch.einsum("rg,rgk,rk->r", st, a, st) - 2 * (b * st).sum(-1) + c  # |codes * s - w|_H^2 per row
    return out, float(loss.sum()) / 2
