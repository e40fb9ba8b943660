"""GPTQ's column steps inside a sub-block, compiled (numba) for CPUs.

Inside a sub-block of 16 columns, `gptq._gptq_pass` rounds one column for every row, records its errors and
pushes them into the sub-block's later columns as a rank-1 update. In torch that is about a dozen calls per column
on a few thousand floats each: at Scout's shapes (8,192-16,384 rows, 13,000 columns per expert) their dispatch,
not their arithmetic, is most of the pass outside the block products. Every one of those steps is independent
across rows, so one compiled loop per sub-block does them all, with the same float32 operations in the same
order for the rounding (so a column gets the same codes from the same values).

Only grids whose rounding is an affine formula of two per-row parameters get this (`affine_grid`):
the GGUF linear block types (code = clamp(rint((w + min) / scale)), 0 where scale == 0, value = code * scale - min)
and the int grids (code = clamp(rint(w / scale + zp)), value = (code - zp) * scale). Table grids (IQ4_NL, IQ4_XS,
MXFP4), fp8, GPUs and per-job act-order loops keep the torch loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np
import torch

GGUF_LINEAR, INT_SYMMETRIC, INT_ZERO_POINT = 0, 1, 2


@dataclass(frozen=True)
class Affine:
    """How a grid's column is rounded: `mode` (one of the constants above), the code range, and for a group's
    params the per-row tables: `tables(params)` -> (scale, second) each [k, rows] float32 (second: the min, the
    zero point, or zeros), with `index(offset)` the table row of the group's column `offset`."""

    mode: int
    qmin: float
    qmax: float
    sub: int  # columns sharing a table row inside a group (0: the whole group)

    def index(self, offset: int) -> int:
        return offset // self.sub if self.sub else 0


def affine_grid(grid) -> Affine | None:
    """The grid's affine rounding, or None when it has none (its columns keep the torch loop). A grid states its
    own through an `affine()` method (quant.grid.IntGrid, formats.gguf.grid.BlockGrid); grids without one have none."""
    describe = getattr(grid, "affine", None)
    return describe() if callable(describe) else None


def tables(affine: Affine, params) -> tuple[torch.Tensor, torch.Tensor]:
    """[k, rows] float32 scale and min / zero point of one group's (stacked) params, as the kernel reads them."""
    if affine.mode == GGUF_LINEAR:
        return params.scale.t().float(), params.min.t().float()
    scale = params.scale.t().float()
    if affine.mode == INT_ZERO_POINT:
        return scale, params.zero_point.t().float()
    return scale, torch.zeros_like(scale)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def round_sub_block(w, orig, cols, r, rdiag, s, m, prow, mode, qmin, qmax, c0, j1, j2, q, e, d, wt, keep):
    """Columns c0 + j1 .. c0 + j2 - 1 of one job's GPTQ-order weights w [C, N] (column = row of the array),
    in order: round each onto its params (table rows prow[column] of s and m, [P, N]), store the value in q [C, N]
    (and the column as it was in wt when keep), its error (w - q) * rdiag in e and its difference from the original
    column (orig[cols[column]], natural order) in d (e and d: the block's [n, N], block row = column - c0), and add
    d times the scaled factor's row r[column, later] to the sub-block's later columns."""
    n_rows = w.shape[1]
    for j in range(c0 + j1, c0 + j2):
        t = j - c0
        pr = prow[j]
        oc = cols[j]
        rd = rdiag[j]
        for n in range(n_rows):
            x = w[j, n]
            sc = s[pr, n]
            mn = m[pr, n]
            if mode == 0:
                v = (x + mn) / (sc if sc != 0.0 else np.float32(1.0))
                v = min(max(np.rint(v), qmin), qmax)
                if sc == 0.0:
                    v = np.float32(0.0)
                y = v * sc - mn
            elif mode == 1:
                v = min(max(np.rint(x / sc), qmin), qmax)
                y = v * sc
            else:
                v = min(max(np.rint(x / sc + mn), qmin), qmax)
                y = (v - mn) * sc
            if keep:
                wt[j, n] = x
            q[j, n] = y
            e[t, n] = (x - y) * rd
            d[t, n] = orig[oc, n] - y
        for k in range(j + 1, c0 + j2):
            rk = r[j, k]
            for n in range(n_rows):
                w[k, n] += rk * d[t, n]
