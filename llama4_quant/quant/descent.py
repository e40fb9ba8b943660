"""Coordinate descent on the codes, compiled (numba) for CPUs: the same moves as the torch loop in
:func:`.gptq.coordinate_descent`, without its per-column Python work and dense per-block products.

The loss is L = tr(D H D^T) + lam tr(A D H D^T A^T), D = Q - W_ref, A the metric [k, rows]. Column j of a
block decides its +-1 code moves for all rows at once from G = D H and K = A G (see coordinate_descent). Two
things make it cheap on a CPU:

- G's block columns are not updated after every block by a dense [rows x 64] @ [64 x cols] product (at Scout's
  5,120 x 8,192 down projections that is four full R C^2 products per two sweeps, all of it memory traffic
  over G). They are rebuilt when a block starts, from the G of the start and the moves made so far:
  G[:, b] = G0[:, b] + sum over moves (r, j, d) of d H[j, b]. About 1 % of the codes move, so that is a small
  sparse product that stays in cache.
- K's block columns are A G[:, b], one small product per block, instead of a second running matrix.

Inside a block, G and K are kept exact move by move, as in the torch loop; the column's own decisions run as
one compiled pass over the rows (work in transposed [cols, rows] layout, so a column is contiguous).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _block_columns(g0, hc, mr, mj, md, nm, b0, b1, out):
    """out[r, c] = g0[r, b0 + c] + sum_t md[t] hc[mj[t], c] over the moves t < nm of row mr[t]; hc = h[:, b0:b1]
    as a contiguous [cols, b1 - b0] copy (its rows lie together in cache, not a whole row of h apart)."""
    rows = g0.shape[0]
    width = b1 - b0
    for r in range(rows):
        for c in range(width):
            out[r, c] = g0[r, b0 + c]
    for t in range(nm):
        r, j, d = mr[t], mj[t], md[t]
        for c in range(width):
            out[r, c] += d * hc[j, c]


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _descend_block(gb, kb, a, asq, hb, hd, step, codes, q, lam, lo, hi, b0, mr, mj, md, nm):
    """One block's columns in order. gb [rows, B] (G's block columns) and kb [k, B] (A gb) are updated in place,
    step / codes / q are the block's [B, rows] transposed slices (codes and q updated in place); the moves are
    appended to (mr, mj, md) from index nm on. Returns the new move count."""
    rows, width = gb.shape
    nk = a.shape[0]
    lin = np.empty(rows, np.float32)
    cand_r = np.empty(rows, np.int64)
    cand_d = np.empty(rows, np.float32)
    cand_g = np.empty(rows, np.float32)
    u = np.zeros(nk, np.float32)
    v = np.zeros(nk, np.float64)
    lens = np.empty(64, np.int64)
    metric = nk > 0 and lam != 0.0
    for jj in range(width):
        for r in range(rows):
            lin[r] = gb[r, jj]
        if metric:
            for k in range(nk):
                x = np.float32(lam) * kb[k, jj]
                for r in range(rows):
                    lin[r] += a[k, r] * x
        hdj = hd[jj]
        n = 0
        for r in range(rows):
            s = step[jj, r]
            quad = s * s * hdj * (np.float32(1.0) + np.float32(lam) * asq[r])
            up = 2 * s * lin[r] + quad
            down = -2 * s * lin[r] + quad
            c = codes[jj, r]
            if up < down and up < 0 and c < hi:
                cand_r[n], cand_d[n], cand_g[n] = r, s, up
                n += 1
            elif down < 0 and c > lo:
                cand_r[n], cand_d[n], cand_g[n] = r, -s, down
                n += 1
        if n == 0:
            continue
        m = n
        order = np.arange(n)
        if metric and n > 1:
            # the metric term couples the rows: moves that each help can overshoot together. Keep the most
            # helpful n, n/2, n/4, ... moves: the largest of those prefixes whose joint change is a decrease
            order = np.argsort(cand_g[:n])
            cnt = 0
            size = n
            while size > 1:
                lens[cnt] = size
                cnt += 1
                size //= 2
            p = cnt - 1  # the prefixes are tested shortest first, and the longest that passes is kept
            v[:] = 0.0
            own = 0.0
            gain = 0.0
            m = 1
            for t in range(n):
                r = cand_r[order[t]]
                d = cand_d[order[t]]
                for k in range(nk):
                    v[k] += a[k, r] * d
                own += asq[r] * d * d
                gain += cand_g[order[t]]
                if t + 1 == lens[p]:
                    joint = 0.0
                    for k in range(nk):
                        joint += v[k] * v[k]
                    if gain + lam * hdj * (joint - own) < 0:
                        m = lens[p]
                    p -= 1
                    if p < 0:
                        break
        u[:] = 0.0
        for t in range(m):
            i = order[t]
            r = cand_r[i]
            d = cand_d[i]
            q[jj, r] += d
            codes[jj, r] += 1.0 if d > 0 else -1.0
            for c in range(width):
                gb[r, c] += d * hb[jj, c]
            for k in range(nk):
                u[k] += a[k, r] * d
            mr[nm], mj[nm], md[nm] = r, b0 + jj, d
            nm += 1
        for k in range(nk):
            for c in range(width):
                kb[k, c] += u[k] * hb[jj, c]
    return nm


def descend(g: torch.Tensor, h: torch.Tensor, q: torch.Tensor, codes: torch.Tensor, step: torch.Tensor,
            metric: torch.Tensor | None, lam: float, lo: int, hi: int, sweeps: int,
            block: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """CPU coordinate descent (see the module doc and gptq.coordinate_descent): returns (q, codes, moves).
    `g` = (q - ref) h at the start; `q`, `codes`, `step` [rows, cols]; `h` [cols, cols]; `metric` [k, rows] or
    None (then `lam` is ignored)."""
    rows, cols = q.shape
    hn = h.float().contiguous().numpy()
    g0 = g.float().contiguous().numpy()
    a = (metric.float().contiguous() if metric is not None else torch.zeros(0, rows)).numpy()
    asq = (a * a).sum(0).astype(np.float32) if a.shape[0] else np.zeros(rows, np.float32)
    lam = float(lam) if a.shape[0] else 0.0
    qt = q.float().t().contiguous()  # copies: the caller's q and codes stay as they were
    ct = codes.float().t().contiguous()
    st = step.float().t().contiguous()
    qn, cn, sn = qt.numpy(), ct.numpy(), st.numpy()
    hd = np.ascontiguousarray(np.diagonal(hn))
    cap = max(1 << 16, rows * block)
    mr, mj, md = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.float32)
    nm = 0
    gb = np.empty((rows, block), np.float32)
    for _ in range(sweeps):
        n0 = nm
        for b0 in range(0, cols, block):
            b1 = min(cols, b0 + block)
            if nm + rows * (b1 - b0) > mr.shape[0]:  # room for every row of every column of the block to move
                grow = max(2 * mr.shape[0], nm + rows * (b1 - b0))
                mr, mj, md = (np.concatenate([x[:nm], np.empty(grow - nm, x.dtype)]) for x in (mr, mj, md))
            g = gb if b1 - b0 == block else np.empty((rows, b1 - b0), np.float32)  # a narrower last block
            _block_columns(g0, np.ascontiguousarray(hn[:, b0:b1]), mr, mj, md, nm, b0, b1, g)
            kb = (a @ g).astype(np.float32) if a.shape[0] else np.zeros((0, b1 - b0), np.float32)
            nm = _descend_block(g, kb, a, asq, np.ascontiguousarray(hn[b0:b1, b0:b1]), hd[b0:b1],
                                sn[b0:b1], cn[b0:b1], qn[b0:b1], lam, float(lo), float(hi), b0, mr, mj, md, nm)
        if nm == n0:
            break
    return qt.t(), ct.t(), nm
