"""GGML block formats as GPTQ grids (the `quant.grid.Grid` interface over `gguf_quants`' grid API).

One GPTQ group is one *param block*: a 256-column super-block for the k-quants and IQ4_XS (their 8 or 16
sub-block scales share the fp16 super-block scale, so they are chosen together), 32 columns for
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL/MXFP4. IQ4_NL, IQ4_XS and MXFP4 are non-linear: a column is rounded to the
nearest entry of the type's 16-value table times the group's scale.
`fit` runs llama.cpp's own scale search on the group's current (error-compensated)
weights, importance-weighted like `llama-quantize --imatrix` when GPTQ hands it the Hessian diagonal
(diag H = 2 * mean x^2: proportional to llama.cpp's imatrix, and the searches are invariant to a common
factor). `quantize` rounds columns onto that grid and returns the float32 values llama.cpp decodes.

`pack_result` turns a finished `QuantResult` (every column on its group's grid) into the file bytes.

`BlockGrid(qtype, refit=True).refit_scales` (GPTQ's refine round, see `quant.gptq`; off by default): with GPTQ's
codes fixed, new super-block params with a lower Hessian loss, for Q2_K/Q3_K/Q4_K/Q5_K/Q6_K (the other types return
their inputs): see `_refit_k`.
"""

from __future__ import annotations

import numpy as np
import torch

from ...quant.columns import GGUF_LINEAR, Affine
from . import quants as gq
from .quants import QT

#: refit_scales' k-quant types: (sub-block columns, sub-blocks per super-block, affine (has mins), lowest and
#: highest stored sub-scale, highest stored sub-min). The decoded grid is scale = fp16 d * sc, min = fp16 dmin * m.
_REFIT = {
    QT.Q4_K: (32, 8, True, 0, 63, 63),
    QT.Q5_K: (32, 8, True, 0, 63, 63),
    QT.Q2_K: (16, 16, True, 0, 15, 15),
    QT.Q6_K: (16, 16, False, -128, 127, 0),
    QT.Q3_K: (16, 16, False, -32, 31, 0),
}

GRID_TYPES = (QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K,
              QT.IQ4_NL, QT.IQ4_XS, QT.MXFP4)
#: non-linear grids: a code indexes a 16-entry table (value = scale * table[code])
LEVEL_TYPES = tuple(gq.LEVELS)


class FittedBlock:
    """One group's grid: the `gguf_quants.BlockParams` (for packing) and its decoded per-sub-block scale/min as
    float32 tensors on the weights' device (so GPTQ's per-column rounding never leaves the device)."""

    def __init__(self, params: gq.BlockParams, device: torch.device):
        self.params = params
        self.scale = torch.from_numpy(np.ascontiguousarray(params.scale)).to(device)
        self.min = torch.from_numpy(np.ascontiguousarray(params.min)).to(device)


def _sub_block(params, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Sub-block g's scale and min ([rows, 1]), the divisor quantize uses (1 where the scale is 0), the zero-scale
    mask and whether any is set; cached on the params object (checked against its scale tensor: a stacked copy
    shares the cache dict but not the tensor)."""
    cache = params.__dict__.setdefault("_sub_blocks", {})
    hit = cache.get(g)
    if hit is None or hit[0] is not params.scale:
        s, m = params.scale[:, g:g + 1], params.min[:, g:g + 1]
        zero = s == 0
        hit = (params.scale, s, m, torch.where(zero, torch.ones_like(s), s), zero, bool(zero.any()))
        cache[g] = hit
    return hit[1:]


_CODE_BITS = {QT.Q2_K: 2, QT.Q3_K: 3, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6, QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5,
              QT.Q5_1: 5, QT.Q8_0: 8}


class ColumnBlock:
    """One column's decoded scale and min ([rows, 1] each), as BlockGrid.quantize reads a FittedBlock."""

    def __init__(self, scale: torch.Tensor, min_: torch.Tensor):
        self.scale = scale
        self.min = min_


class BlockGrid:
    """Grid of one GGML block type for `quant.gptq.gptq` / `quant.rtn.rtn`."""

    rows_independent = True  # a row's fit and codes do not depend on the other rows (quant.gptq's sampled guard)

    def __init__(self, qtype: QT, use_importance: bool = True, refit: bool = False):
        qtype = QT(qtype)
        if qtype not in GRID_TYPES:
            raise ValueError(f"no GPTQ grid for {qtype.name}")
        self.qtype = qtype
        self.use_importance = use_importance
        self.refit = refit
        probe = gq.block_params(np.zeros((1, gq.param_block_cols(qtype)), np.float32), qtype)
        self._sub = probe.group_size  # columns per (scale, min): 32, or 16 for Q6_K
        self._qmin, self._qmax = probe.qmin, probe.qmax

    def __repr__(self) -> str:
        return f"gguf:{self.qtype.name}"

    @property
    def scheme(self) -> str:  # what the pipeline's report prints for the grid
        return f"gguf {self.qtype.name}"

    @property
    def group_size(self) -> int:
        return gq.param_block_cols(self.qtype)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> FittedBlock:
        imatrix = None
        if self.use_importance and importance is not None and self.qtype != QT.Q8_0:
            imp = importance.detach().float().cpu().clamp(min=0)
            if bool(torch.isfinite(imp).all()) and float(imp.sum()) > 0:
                imatrix = imp.numpy()
        return FittedBlock(gq.block_params(w.detach().float().cpu(), self.qtype, imatrix), w.device)

    def affine(self) -> Affine | None:
        """The affine rounding of the linear block types for GPTQ's compiled column steps (quant.columns); the
        level-table types (IQ4_NL, IQ4_XS, MXFP4) have none."""
        if self.qtype in LEVEL_TYPES:
            return None
        return Affine(GGUF_LINEAR, float(self._qmin), float(self._qmax), int(self._sub))

    def column_params(self, params: FittedBlock, offset: int) -> "ColumnBlock":
        """The scale/min of the sub-block holding column `offset`, for quantize(column, ..., 0) (batched act-order
        GPTQ picks every job's own column's params and rounds them in one call)."""
        g = offset // self._sub
        return ColumnBlock(params.scale[:, g:g + 1], params.min[:, g:g + 1])

    def quantize(self, w: torch.Tensor, params: FittedBlock, offset: int = 0) -> torch.Tensor:
        """Columns `offset..` of the group onto its grid: the float32 ops of `gguf_quants.quantize_with_params`
        + `dequantize_codes` (round half to even of (w + min) / scale, clamped; 0 where scale == 0; the nearest
        table entry for IQ4_NL/IQ4_XS/MXFP4)."""
        k = w.shape[1]
        g0, g1 = offset // self._sub, (offset + k - 1) // self._sub
        if g0 == g1 and self.qtype not in LEVEL_TYPES and self.qtype not in (QT.Q4_1, QT.Q5_1):
            # GPTQ's column loop: one sub-block, its safe divisor and zero mask made once, ops in place
            s, m, safe, zero, any_zero = _sub_block(params, g0)
            v = w.float() + m
            v.div_(safe).round_().clamp_(self._qmin, self._qmax)
            if any_zero:
                v.masked_fill_(zero, 0.0)
            return v.mul_(s).sub_(m)
        if g0 == g1:
            s, m = params.scale[:, g0:g0 + 1], params.min[:, g0:g0 + 1]
        else:
            idx = torch.div(torch.arange(offset, offset + k, device=w.device), self._sub, rounding_mode="floor")
            s, m = params.scale[:, idx], params.min[:, idx]
        if self.qtype in LEVEL_TYPES:
            return _nearest_level(w.float(), s, self.qtype)
        if self.qtype in (QT.Q4_1, QT.Q5_1):  # decoded as d*q + m (m = -min), the same number as d*q - min
            v = (w.float() + m) / torch.where(s == 0, torch.ones_like(s), s)
            q = torch.clamp(torch.round(v), self._qmin, self._qmax)
            return s * torch.where(s == 0, torch.zeros_like(q), q) + (-m)
        v = (w.float() + m) / torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(v), self._qmin, self._qmax)
        q = torch.where(s == 0, torch.zeros_like(q), q)
        return s * q - m

    def codes(self, w: torch.Tensor, params: FittedBlock, offset: int = 0) -> torch.Tensor:
        """float32 integer codes of columns `offset..` on a linear (non-table) grid, the rounding of `quantize`
        (+0.0 for a code 0, as the file's integers: s * -0.0 would flip the sign of a zero value)."""
        k = w.shape[1]
        idx = torch.div(torch.arange(offset, offset + k, device=w.device), self._sub, rounding_mode="floor")
        s, m = params.scale[:, idx], params.min[:, idx]
        v = (w.float() + m) / torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(v), self._qmin, self._qmax) + 0.0
        return torch.where(s == 0, torch.zeros_like(q), q)

    # ---- coordinate descent on codes (quant.gptq.coordinate_descent): the linear grids only ----------
    @property
    def code_bits(self) -> int | None:
        """Bits of a code, or None for the table grids (IQ4_NL/IQ4_XS/MXFP4), which offer no descent."""
        return None if self.qtype in LEVEL_TYPES else _CODE_BITS.get(self.qtype)

    def code_range(self) -> tuple[int, int]:
        return int(self._qmin), int(self._qmax)

    def code_steps(self, params: FittedBlock, cols: int) -> torch.Tensor:
        """[rows, cols]: one code step of each column of a group is its sub-block's decoded scale."""
        idx = torch.div(torch.arange(cols, device=params.scale.device), self._sub, rounding_mode="floor")
        return params.scale[:, idx]

    def from_codes(self, codes: torch.Tensor, params: FittedBlock) -> torch.Tensor:
        """The values a whole group's codes decode to (quantize's own float32 ops)."""
        idx = torch.div(torch.arange(codes.shape[1], device=codes.device), self._sub, rounding_mode="floor")
        s, m = params.scale[:, idx], params.min[:, idx]
        if self.qtype in (QT.Q4_1, QT.Q5_1):
            return s * codes + (-m)
        return s * codes - m

    @property
    def refit_scales(self):
        """GPTQ's refine-round hook (`quant.gptq` finds it by duck typing): `_refit_scales` on a grid built with
        refit=True, else None, so that gptq() runs no refine round. Off by default: on the shipped model it lowered
        every layer's calibration loss by ~4 % and the held-out layer error by 1 %, but not the KL divergence
        (docs/quality.md)."""
        return self._refit_scales if self.refit else None

    def _refit_scales(self, target: torch.Tensor, q: torch.Tensor, params: list, hessian: torch.Tensor,
                      sweeps: int = 1) -> tuple[list, torch.Tensor, float]:
        """GPTQ's refine round (`quant.gptq`): for the codes of `q` (every super-block on `params`), new params with a
        lower Hessian loss tr((target - Q) H (target - Q)^T) / 2, those same codes decoded on them (exactly the
        values the packed file decodes to) and that loss. Super-blocks are visited in order, each solved given the
        others (block Gauss-Seidel on the exact gradient, `sweeps` times); a row keeps its old params in a
        super-block unless the new ones lower its loss. Types without a refit (not Q2_K..Q6_K) return their inputs
        and the loss of `q`."""
        target = target.float()
        q = q.float().clone()  # updated block by block; the caller's stays as it was
        h = hessian.to(device=q.device, dtype=torch.float32)
        if self.qtype not in _REFIT or q.shape[1] % self.group_size or len(params) != q.shape[1] // self.group_size:
            return list(params), q, _loss(target, q, h)
        return _refit_k(self, target, q, list(params), h, max(1, sweeps))


def _loss(target: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = q - target
    return float(((e @ h) * e).double().sum()) / 2


def _refit_k(grid: BlockGrid, t: torch.Tensor, q: torch.Tensor, params: list, h: torch.Tensor,
             sweeps: int) -> tuple[list, torch.Tensor, float]:
    """Super-block by super-block (i, columns B), per row, with e = Q - T and g = e H kept up to date: the block's
    values v = Phi x are linear in x = (the sub-block scales, and mins for Q2_K/Q4_K/Q5_K) for GPTQ's codes c
    (Phi: c_j for a scale, -1 for a min), and replacing v_old by v changes the loss by
    dv.g_B + dv H_BB dv^T / 2, dv = v - v_old. Candidates for what the file stores, each mapped to (fp16 d, fp16
    dmin, integer sub-scales and mins):

    - the old integer sub-scales and mins;
    - the least-squares x (A x = Phi (v_old H_BB - g_B), A = Phi H_BB Phi^T) rounded by nearest plane
      (`_nearest_plane`) on steps d (dmin) that map its extreme to the stored maximum minus each of `SEARCH`;

    then for each, twice: the least-squares d (and dmin) for those integers, rounded to fp16, and greedy +-1
    moves of the integers that lower the loss (the same quadratic). The candidate with the lowest loss is kept
    where it beats the old params (exact decoded float32 values, exact change); g is updated with the kept dv."""
    sub, per, affine, lo, hi, mhi = _REFIT[grid.qtype]
    rows, cols = q.shape
    blk = grid.group_size
    dev = q.device
    codes = torch.cat([grid.codes(q[:, s:s + blk], p) for s, p in zip(range(0, cols, blk), params)], dim=1)
    e = q - t
    g = e @ h
    old_loss = float((g * e).double().sum()) / 2
    d16 = [torch.from_numpy(np.ascontiguousarray(p.params.d.reshape(rows))).to(dev) for p in params]
    dm16 = [torch.from_numpy(np.ascontiguousarray(p.params.dmin.reshape(rows))).to(dev) if affine else None
            for p in params]
    sc = [torch.from_numpy(np.ascontiguousarray(p.params.sub_scales.astype(np.int16))).to(dev) for p in params]
    mn = [torch.from_numpy(np.ascontiguousarray(p.params.sub_mins.astype(np.int16))).to(dev) if affine else None
          for p in params]
    gain = 0.0
    n_blocks = len(params)
    for sweep in range(sweeps):
        last = sweep == sweeps - 1
        for i in range(n_blocks):
            b = slice(i * blk, (i + 1) * blk)
            c = codes[:, b]
            hb = h[b, b]
            v_old = q[:, b]
            new = _refit_block(c, hb, v_old, g[:, b], d16[i], dm16[i], sc[i], mn[i], sub, per, affine, lo, hi, mhi)
            nd, ndm, nsc, nmn, v_new = new
            dv = v_new - v_old
            delta = (dv * g[:, b]).double().sum(1) + ((dv @ hb) * dv).double().sum(1) / 2
            ok = (delta < 0) & torch.isfinite(delta) & _exact_codes(v_new, c, nd, ndm, nsc, nmn, sub, grid)
            if not bool(ok.any()):
                continue
            gain += float(delta[ok].sum())
            d16[i] = torch.where(ok, nd, d16[i])
            sc[i] = torch.where(ok[:, None], nsc, sc[i])
            if affine:
                dm16[i] = torch.where(ok, ndm, dm16[i])
                mn[i] = torch.where(ok[:, None], nmn, mn[i])
            dvf = torch.where(ok[:, None], v_new - v_old, torch.zeros_like(v_old))
            q[:, b] = torch.where(ok[:, None], v_new, v_old)
            if last:  # only the blocks still to visit need the gradient
                if i + 1 < n_blocks:
                    g[:, (i + 1) * blk:] += dvf @ h[b, (i + 1) * blk:]
            else:
                g += dvf @ h[b, :]
    out = []
    for i in range(n_blocks):
        p = gq._make_params(grid.qtype, d16[i].cpu().numpy().reshape(rows, 1),
                            dm16[i].cpu().numpy().reshape(rows, 1) if affine else None,
                            sc[i].cpu().numpy().astype(np.uint8 if lo >= 0 else np.int8),
                            mn[i].cpu().numpy().astype(np.uint8) if affine else None)
        out.append(FittedBlock(p, dev))
    # the returned values: the codes decoded on the returned params (what the packed file decodes to)
    same = torch.cat([_decode(codes[:, i * blk:(i + 1) * blk], out[i], sub) for i in range(n_blocks)], dim=1)
    loss = _loss(t, same, h) if gain < 0 else old_loss
    return out, same, loss


def _decode(c: torch.Tensor, p: FittedBlock, sub: int) -> torch.Tensor:
    s = p.scale.repeat_interleave(sub, dim=1)
    m = p.min.repeat_interleave(sub, dim=1)
    return s * torch.where(s == 0, torch.zeros_like(c), c) - m


def _stored_values(c: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, sc: torch.Tensor,
                   mn: torch.Tensor | None, sub: int) -> torch.Tensor:
    """float32 values of codes c [rows, 256] on stored fields (fp16 d/dmin [rows], integer sc/mn [rows, per]): the
    ops of `gguf_quants._make_params` + `dequantize_codes` (scale = f32(d) * sc, min = f32(dmin) * m, s*q - m)."""
    s = (d.float()[:, None] * sc.float()).repeat_interleave(sub, dim=1)
    m = (dm.float()[:, None] * mn.float()).repeat_interleave(sub, dim=1) if dm is not None else torch.zeros_like(s)
    return s * torch.where(s == 0, torch.zeros_like(c), c) - m


def _exact_codes(v: torch.Tensor, c: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, sc: torch.Tensor,
                 mn: torch.Tensor | None, sub: int, grid: BlockGrid) -> torch.Tensor:
    """Rows whose values re-round to their codes on the new grid (what pack_result does) and are finite."""
    s = (d.float()[:, None] * sc.float()).repeat_interleave(sub, dim=1)
    m = (dm.float()[:, None] * mn.float()).repeat_interleave(sub, dim=1) if dm is not None else torch.zeros_like(s)
    r = torch.clamp(torch.round((v + m) / torch.where(s == 0, torch.ones_like(s), s)), grid._qmin, grid._qmax)
    r = torch.where(s == 0, torch.zeros_like(r), r)
    want = torch.where(s == 0, torch.zeros_like(c), c)
    return ((r == want) & torch.isfinite(v)).all(1) & torch.isfinite(s).all(1) & torch.isfinite(m).all(1)


#: refit_scales' search: the free least-squares sub-scales are rounded on steps d that map their extreme to the
#: stored maximum minus each of these (and the same for the mins), besides the old integers
SEARCH: tuple[int, ...] = (0, 1, 2, 3)


def _refit_block(c, hb, v_old, gb, d_old, dm_old, sc_old, mn_old, sub, per, affine, lo, hi, mhi):
    """One super-block's candidates (see `_refit_k`); returns the better one's (d, dmin, sc, mn, values)."""
    rows = c.shape[0]
    dt = torch.float64
    # A = Phi H_BB Phi^T from the sparsity of Phi (basis k lives on sub-block k only): N[r, k, l] =
    # sum_{j in k} c_rj H_jl, A_ss[k, k'] = sum_{l in k'} N[r, k, l] c_rl, A_sm = -sum_{l in k'} N, A_mm = block sums
    cv = c.view(rows, per, sub)
    hv = hb.view(per, sub, per * sub)
    nn = torch.einsum("rkj,kjl->rkl", cv, hv)  # [rows, per, 256]
    a_ss = (nn * c[:, None, :]).view(rows, per, per, sub).sum(-1)
    u = v_old @ hb - gb  # Phi u is the right-hand side
    r_s = (c * u).view(rows, per, sub).sum(-1)
    if affine:
        a_sm = -nn.view(rows, per, per, sub).sum(-1)
        a_mm = hb.view(per, sub, per, sub).sum((1, 3))
        a = torch.cat([torch.cat([a_ss, a_sm], 2), torch.cat([a_sm.transpose(1, 2), a_mm.expand(rows, per, per)], 2)],
                      1).to(dt)
        rhs = torch.cat([r_s, -u.view(rows, per, sub).sum(-1)], 1).to(dt)
    else:
        a, rhs = a_ss.to(dt), r_s.to(dt)
    diag = a.diagonal(dim1=1, dim2=2)
    s_old = d_old.to(dt)[:, None] * sc_old.to(dt)
    x_old = torch.cat([s_old, dm_old.to(dt)[:, None] * mn_old.to(dt)], 1) if affine else s_old
    ridge = 1e-7 * diag + 1e-12 * diag.mean(1, keepdim=True) + 1e-300
    x = torch.linalg.solve(a + torch.diag_embed(ridge), (rhs + ridge * x_old).unsqueeze(-1)).squeeze(-1)
    x = torch.where(torch.isfinite(x), x, x_old)

    _, free_d = _ints(x[:, :per], lo, hi, signed=lo < 0)
    lows, highs = [lo] * per, [hi] * per
    free_dm = None
    if affine:
        _, free_dm = _ints(x[:, per:], 0, mhi, signed=True)
        lows, highs = lows + [0] * per, highs + [mhi] * per
    # the candidates' starting points, stacked along rows: the old integers, then the free solution rounded
    # (nearest plane) on each step of the search
    big = abs(lo) if lo < 0 else hi
    pairs = [(ks, km) for ks in SEARCH for km in (SEARCH if affine else (0,))]
    k_all = len(pairs) + 1
    dd = torch.cat([d_old.to(dt)] + [(free_d * big / (big - ks)).to(torch.float16).to(dt) for ks, _ in pairs])
    ddm = torch.cat([dm_old.to(dt)] + [(free_dm * mhi / (mhi - km)).to(torch.float16).to(dt) for _, km in pairs]) \
        if affine else None
    rep = lambda t: t.repeat(k_all, *([1] * (t.dim() - 1)))
    ar, rr = rep(a), rep(rhs)
    steps = dd[:, None].expand(-1, per)
    if affine:
        steps = torch.cat([steps, ddm[:, None].expand(-1, per)], 1)
    ints = _nearest_plane(a, x, steps[rows:], lows, highs, k_all - 1)
    isc = torch.cat([sc_old.to(dt), ints[:, :per]])
    imn = torch.cat([mn_old.to(dt), ints[:, per:]]) if affine else None
    for _ in range(2):
        dd, ddm = _lsq_d(ar, rr, isc, imn, dd, ddm)
        isc, imn = _descend(ar, rr, isc, imn, dd, ddm, lo, hi, mhi)
    xx = torch.cat([dd[:, None] * isc, ddm[:, None] * imn], 1) if affine else dd[:, None] * isc
    fx = ((ar @ xx.unsqueeze(-1)).squeeze(-1) * xx).sum(1) / 2 - (rr * xx).sum(1)
    fx = torch.where(torch.isfinite(fx), fx, torch.full_like(fx, float("inf"))).view(k_all, rows)
    pick = fx.argmin(0) * rows + torch.arange(rows, device=c.device)  # first (the old integers) on ties
    d = dd[pick].to(torch.float16)
    scn = isc[pick].to(torch.int16)
    dm = mnn = None
    if affine:
        dm = ddm[pick].to(torch.float16)
        mnn = imn[pick].to(torch.int16)
    v = _stored_values(c, d, dm, scn, mnn, sub)
    return d, dm, scn, mnn, v


def _ints(x: torch.Tensor, lo: int, hi: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers in [lo, hi] and a fp16-representable step d with d * ints ~ x (rows of [rows, k]): d = the
    largest |x| over the end of the range its sign maps to (llama.cpp's mapping), rounded to fp16."""
    if not signed:
        x = x.clamp(min=0)
    amax = x.abs().argmax(1, keepdim=True)
    ext = torch.gather(x, 1, amax).squeeze(1)
    if lo < 0:  # symmetric sub-scales: the extreme maps to lo (-128 or -32), as llama.cpp does
        d = ext / lo
    else:
        d = ext / hi
    d = d.to(torch.float16).to(x.dtype)
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    safe = torch.where(d == 0, torch.ones_like(d), d)
    ints = torch.clamp(torch.round(x / safe[:, None]), lo, hi)
    return torch.where(d[:, None] == 0, torch.zeros_like(ints), ints), d


def _nearest_plane(a: torch.Tensor, x: torch.Tensor, step: torch.Tensor, lows: list, highs: list,
                   copies: int = 1) -> torch.Tensor:
    """Integers k in [lows, highs] with step * k close to x in the metric A ([rows, n, n]): coordinates rounded in
    turn, each rounding error compensated by the coordinates not yet rounded (GPTQ on the n x n system, through the
    upper Cholesky factor of A^-1). Rows whose factorisation fails are rounded to nearest. `step` may hold
    `copies` stacked sets of rows (the same a and x on other steps)."""
    rows, n = x.shape
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    diag = a.diagonal(dim1=1, dim2=2)
    ad = a + eye * (1e-6 * diag.mean(1, keepdim=True).unsqueeze(-1) + 1e-300)
    low, info = torch.linalg.cholesky_ex(ad)
    ok = info == 0
    low = torch.where(ok[:, None, None], low, eye.expand(rows, n, n))
    u, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
    ok = ok & (info2 == 0) & torch.isfinite(u).all(2).all(1)
    u = torch.where(ok[:, None, None], u, eye.expand(rows, n, n))
    lo_t = torch.tensor(lows, dtype=x.dtype, device=x.device)
    hi_t = torch.tensor(highs, dtype=x.dtype, device=x.device)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    if copies > 1:
        u = u.repeat(copies, 1, 1)
    x = x.repeat(copies, 1)
    ints = torch.zeros_like(x)
    for k in range(n):
        kk = torch.clamp(torch.round(x[:, k] / safe[:, k]), lo_t[k], hi_t[k])
        kk = torch.where(step[:, k] == 0, torch.zeros_like(kk), kk)
        ints[:, k] = kk
        err = (x[:, k] - kk * step[:, k]) / u[:, k, k]
        x[:, k + 1:] -= err[:, None] * u[:, k, k + 1:]
    return ints


def _lsq_d(a, rhs, isc, imn, d, dm):
    """Least-squares d (and dmin) for fixed integers, rounded to fp16; the previous values where that fails."""
    per = isc.shape[1]
    if imn is None:
        p = isc
        num = (rhs * p).sum(1)
        den = ((a @ p.unsqueeze(-1)).squeeze(-1) * p).sum(1)
        nd = num / torch.where(den > 0, den, torch.ones_like(den))
        nd = torch.where(den > 0, nd, d).to(torch.float16).to(d.dtype)
        return torch.where(torch.isfinite(nd), nd, d), None
    rows = isc.shape[0]
    pm = torch.zeros(rows, 2 * per, 2, dtype=a.dtype, device=a.device)
    pm[:, :per, 0] = isc
    pm[:, per:, 1] = imn
    a2 = pm.transpose(1, 2) @ a @ pm
    b2 = (pm.transpose(1, 2) @ rhs.unsqueeze(-1)).squeeze(-1)
    det = a2[:, 0, 0] * a2[:, 1, 1] - a2[:, 0, 1] * a2[:, 1, 0]
    scale = a2[:, 0, 0] * a2[:, 1, 1]
    good = (det > 1e-9 * scale) & (scale > 0)
    sdet = torch.where(good, det, torch.ones_like(det))
    y0 = (a2[:, 1, 1] * b2[:, 0] - a2[:, 0, 1] * b2[:, 1]) / sdet
    y1 = (a2[:, 0, 0] * b2[:, 1] - a2[:, 1, 0] * b2[:, 0]) / sdet
    # singular (a zero sub-scale or min vector): solve the one unknown that is there
    only_d = ~good & (a2[:, 0, 0] > 0)
    only_m = ~good & ~only_d & (a2[:, 1, 1] > 0)
    y0 = torch.where(only_d, (b2[:, 0] - a2[:, 0, 1] * dm) / torch.where(only_d, a2[:, 0, 0], torch.ones_like(det)),
                     torch.where(good, y0, d))
    y1 = torch.where(only_m, (b2[:, 1] - a2[:, 1, 0] * d) / torch.where(only_m, a2[:, 1, 1], torch.ones_like(det)),
                     torch.where(good, y1, dm))
    nd = y0.to(torch.float16).to(d.dtype)
    ndm = y1.to(torch.float16).to(d.dtype)
    return torch.where(torch.isfinite(nd), nd, d), torch.where(torch.isfinite(ndm), ndm, dm)


def _descend(a, rhs, isc, imn, d, dm, lo, hi, mhi, sweeps: int = 2):
    """Greedy +-1 moves of the integer sub-scales (and mins), coordinate by coordinate, that lower
    x A x / 2 - rhs x with x = (d * sc, dmin * m)."""
    per = isc.shape[1]
    ints = torch.cat([isc, imn], 1) if imn is not None else isc.clone()
    step = torch.cat([d[:, None].expand(-1, per), dm[:, None].expand(-1, per)], 1) if imn is not None \
        else d[:, None].expand(-1, per)
    lows = torch.tensor([lo] * per + ([0] * per if imn is not None else []), dtype=a.dtype, device=a.device)
    highs = torch.tensor([hi] * per + ([mhi] * per if imn is not None else []), dtype=a.dtype, device=a.device)
    x = step * ints
    grad = (a @ x.unsqueeze(-1)).squeeze(-1) - rhs
    diag = a.diagonal(dim1=1, dim2=2)
    cols_of = a.permute(2, 0, 1).contiguous()  # [n, rows, n]: column k of every row's A, contiguous
    for _ in range(sweeps):
        for k in range(ints.shape[1]):
            s = step[:, k]
            quad = diag[:, k] * s * s / 2
            up = grad[:, k] * s + quad
            down = -grad[:, k] * s + quad
            go_up = (up < down) & (up < 0) & (ints[:, k] < highs[k])
            go_down = ~go_up & (down < 0) & (ints[:, k] > lows[k])
            mv = torch.where(go_up, 1.0, torch.where(go_down, -1.0, 0.0)).to(a.dtype)
            ints[:, k] += mv
            grad += cols_of[k] * (mv * s)[:, None]
    if imn is not None:
        return ints[:, :per], ints[:, per:]
    return ints, None


_TABLES: dict[tuple[QT, str], torch.Tensor] = {}


def _table(qtype: QT, kind: str, device: torch.device) -> torch.Tensor:
    key = (qtype, f"{kind}@{device}")
    if key not in _TABLES:
        from . import kquants as kq

        if kind == "values":
            t = torch.from_numpy(gq.LEVELS[qtype].astype(np.float32))
        elif kind == "mids":  # IQ4: the midpoints between neighbouring entries (best_index_int8's rule)
            v = kq.IQ4NL_VALUES.astype(np.int32)
            t = torch.from_numpy(((v[:-1] + v[1:]) / 2).astype(np.float32))
        else:  # MXFP4: the 8 magnitudes
            t = torch.from_numpy(kq.MXFP4_VALUES[:8].astype(np.float32))
        _TABLES[key] = t.to(device)
    return _TABLES[key]


def _nearest_level(w: torch.Tensor, s: torch.Tensor, qtype: QT) -> torch.Tensor:
    """Values of the codes `gguf_quants.quantize_with_params` picks on a non-linear grid (same float32 ops)."""
    values = _table(qtype, "values", w.device)
    if qtype == QT.MXFP4:  # the first of the 8 magnitudes nearest to |w|, then the sign (gguf_quants' rule)
        mags = _table(qtype, "mags", w.device)
        err = (mags * s.unsqueeze(-1) - w.abs().unsqueeze(-1)).abs()
        k = torch.argmin(err, dim=-1)
        idx = torch.where((w < 0) & (k > 0), k + 8, k)
    else:
        inv = torch.where(s != 0, 1.0 / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))
        idx = torch.bucketize(w * inv, _table(qtype, "mids", w.device), right=True)
    return s * values[idx]


class FixedParams:
    """A group quantized once at fit time: its file bytes and the values they decode to."""

    def __init__(self, packed: np.ndarray, values: torch.Tensor):
        self.packed = packed
        self.values = values


class RefGrid:
    """Grid for the mix's fallback types that have no GPTQ grid here (Q4_1, Q5_0, Q5_1, F16, BF16).

    `fit` quantizes the group's current weights once with gguf-py's reference quantizer (llama.cpp's
    RTN, no importance weighting) and `quantize` returns those values: inside the group no error feedback,
    but GPTQ still carries the group's error into the columns after it. Used where a routed-expert layer mixes
    block types with fallback types (the pipeline quantizes gate/up/down of a layer all or none)."""

    def __init__(self, qtype: QT):
        from gguf import GGML_QUANT_SIZES

        self.qtype = QT(qtype)
        self._block = GGML_QUANT_SIZES[self.qtype][0]

    def __repr__(self) -> str:
        return f"gguf-ref:{self.qtype.name}"

    @property
    def scheme(self) -> str:
        return f"gguf {self.qtype.name} (reference RTN per group)"

    @property
    def group_size(self) -> int | None:
        return self._block if self._block > 1 else None

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> FixedParams:
        from gguf.quants import dequantize, quantize

        x = np.ascontiguousarray(w.detach().float().cpu().numpy())
        packed = quantize(x, self.qtype)
        values = torch.from_numpy(np.asarray(dequantize(packed, self.qtype), dtype=np.float32).reshape(x.shape))
        return FixedParams(packed, values.to(w.device))

    def column_params(self, params: FixedParams, offset: int) -> FixedParams:
        """Column `offset`'s fixed values, for quantize(column, ..., 0) (batched act-order GPTQ)."""
        return FixedParams(None, params.values[:, offset:offset + 1])

    def quantize(self, w: torch.Tensor, params: FixedParams, offset: int = 0) -> torch.Tensor:
        return params.values[:, offset:offset + w.shape[1]].to(w.device)


def grid_for_type(qtype: QT, use_importance: bool = True, refit: bool = False):
    qtype = QT(qtype)
    return BlockGrid(qtype, use_importance, refit) if qtype in GRID_TYPES else RefGrid(qtype)


def pack_result(weight: torch.Tensor, params: list) -> np.ndarray:
    """File bytes [rows, bytes_per_row] of a weight whose every group lies on `params` (column order)."""
    if params and isinstance(params[0], FixedParams):
        parts = [np.asarray(p.packed).reshape(p.values.shape[0], -1).view(np.uint8) for p in params]
        return np.ascontiguousarray(np.concatenate(parts, axis=1))
    p = gq.concat_params([x.params if isinstance(x, FittedBlock) else x for x in params])
    codes = gq.quantize_with_params(weight.detach().float().cpu(), p)
    return gq.pack(codes, p)
