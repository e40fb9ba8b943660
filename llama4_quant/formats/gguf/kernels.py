"""Compiled loops (numba) of the two hot k-quant searches: ``make_qkx2/qkx3_quants`` and ``make_qx_quants``.

One block per SIMD lane: a tile of ``_TILE`` blocks of a position-major ``(n, B)`` array is copied to a small
buffer (the rows of a large array lie a power of two apart and would thrash the cache), and every inner loop
runs across the blocks of the tile, so each block's sums stay strict left-to-right float32 additions while the
compiler vectorises across blocks. No fastmath: no reassociation, no FMA contraction. About five times the
vectorised-numpy speed; the first call compiles (a few seconds), later processes load the cached machine code.

Same float32 operations in the same order as :mod:`.kquants` (and llama.cpp's C); the wrappers there are the
interface.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_TILE = 64


@nb.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _err_pass(x, w, lf, a, m, err, t, mad):
    n = x.shape[0]
    if mad:
        for i in range(n):
            for j in range(t):
                d = lf[i, j] * a[j] + m[j] - x[i, j]
                err[j] += w[i, j] * abs(d)
    else:
        for i in range(n):
            for j in range(t):
                d = lf[i, j] * a[j] + m[j] - x[i, j]
                err[j] += w[i, j] * (d * d)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def qkx_kernel(xg, wg, nmax, rmin, rdelta, nstep, v3, mad, rms_weights, scale_out, min_out, L_out):
    B, n = xg.shape
    f0 = np.float32(0.0)
    f1 = np.float32(1.0)
    magic = np.float32(12582912.0)
    fnmax = np.float32(nmax)
    T = _TILE
    mn = np.empty(T, np.float32); mx = np.empty(T, np.float32)
    sw = np.empty(T, np.float32); sx = np.empty(T, np.float32)
    live = np.empty(T, np.bool_)
    iscale = np.empty(T, np.float32); scale = np.empty(T, np.float32)
    best = np.empty(T, np.float32); bi = np.empty(T, np.float32); bs = np.empty(T, np.float32)
    sl = np.empty(T, np.float32); sl2 = np.empty(T, np.float32); sxl = np.empty(T, np.float32)
    err = np.empty(T, np.float32); ts = np.empty(T, np.float32); tm = np.empty(T, np.float32)
    dd = np.empty(T, np.float32)
    lf = np.empty((n, T), np.float32)
    x = np.empty((n, T), np.float32)
    w = np.empty((n, T), np.float32)
    for b0 in range(0, B, T):
        t = min(T, B - b0)
        for i in range(n):
            for j in range(t):
                x[i, j] = xg[b0 + j, i]
        if rms_weights:  # the reference Q4_K/Q5_K weights: sqrt(mean x^2 of the block) + |x|
            for j in range(t):
                sx[j] = x[0, j] * x[0, j]
            for i in range(1, n):
                for j in range(t):
                    sx[j] += x[i, j] * x[i, j]
            for j in range(t):
                sx[j] = np.sqrt(sx[j] / np.float32(n))
            for i in range(n):
                for j in range(t):
                    w[i, j] = sx[j] + abs(x[i, j])
        else:
            for i in range(n):
                for j in range(t):
                    w[i, j] = wg[b0 + j, i]
        for j in range(t):
            mn[j] = x[0, j]; mx[j] = x[0, j]
            sw[j] = w[0, j]; sx[j] = w[0, j] * x[0, j]
        for i in range(1, n):
            for j in range(t):
                xv = x[i, j]
                wv = w[i, j]
                if xv < mn[j]:
                    mn[j] = xv
                if xv > mx[j]:
                    mx[j] = xv
                sw[j] += wv
                sx[j] += wv * xv
        for j in range(t):
            if mn[j] > f0:
                mn[j] = f0
            deg = (mx[j] <= mn[j]) if v3 else (mx[j] == mn[j])
            live[j] = not deg
            if deg:
                mx[j] = mn[j] + f1
            iscale[j] = fnmax / (mx[j] - mn[j])
            scale[j] = f1 / iscale[j]
            bi[j] = iscale[j]; bs[j] = mn[j]
            err[j] = f0
        for i in range(n):
            for j in range(t):
                v = iscale[j] * (x[i, j] - mn[j])
                v = min(max(v, f0), fnmax)
                lf[i, j] = (v + magic) - magic
        _err_pass(x, w, lf, scale, mn, err, t, mad)
        for j in range(t):
            best[j] = err[j]
        for step in range(nstep + 1):
            num = rmin + rdelta * np.float32(step) + fnmax
            for j in range(t):
                iscale[j] = num / (mx[j] - mn[j])
                sl[j] = f0; sl2[j] = f0; sxl[j] = f0; err[j] = f0
            for i in range(n):
                for j in range(t):
                    xv = x[i, j]
                    v = iscale[j] * (xv - mn[j])
                    v = min(max(v, f0), fnmax)
                    v = (v + magic) - magic
                    lf[i, j] = v
                    wl = w[i, j] * v
                    sl[j] += wl
                    sl2[j] += wl * v
                    sxl[j] += wl * xv
            for j in range(t):
                D = sw[j] * sl2[j] - sl[j] * sl[j]
                dd[j] = D
                a = (sw[j] * sxl[j] - sx[j] * sl[j]) / D
                m = (sl2[j] * sx[j] - sl[j] * sxl[j]) / D
                if m > f0:
                    m = f0
                    a = sxl[j] / sl2[j]
                ts[j] = a; tm[j] = m
            _err_pass(x, w, lf, ts, tm, err, t, mad)
            for j in range(t):
                if dd[j] > f0 and err[j] < best[j] and live[j]:
                    bi[j] = iscale[j]; bs[j] = mn[j]; best[j] = err[j]
                    scale[j] = ts[j]; mn[j] = tm[j]
        for i in range(n):
            for j in range(t):
                if live[j]:
                    v = bi[j] * (x[i, j] - bs[j])
                    if v < f0:
                        v = f0
                    if v > fnmax:
                        v = fnmax
                    v = (v + magic) - magic
                    L_out[b0 + j, i] = np.uint8(v)
                else:
                    L_out[b0 + j, i] = 0
        for j in range(t):
            scale_out[b0 + j] = scale[j] if live[j] else f0
            min_out[b0 + j] = -mn[j]


@nb.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _qx_sums(x, w, wx, iscale, lo, hi, slx, sl2, t):
    magic = np.float32(12582912.0)
    for j in range(t):
        slx[j] = np.float32(0.0)
        sl2[j] = np.float32(0.0)
    for i in range(x.shape[0]):
        for j in range(t):
            v = min(max(x[i, j] * iscale[j], lo), hi)
            v = (v + magic) - magic
            slx[j] += wx[i, j] * v
            sl2[j] += (w[i, j] * v) * v


@nb.njit(nogil=True, cache=True, error_model="numpy")
def qx_kernel(xg, wg, nmax, scale_out, L_out):
    B, n = xg.shape
    f0 = np.float32(0.0)
    eps = np.float32(1e-15)
    magic = np.float32(12582912.0)
    fnmax = np.float32(nmax)
    lo = np.float32(-nmax)
    hi = np.float32(nmax - 1)
    tenth = np.float32(0.1)
    T = _TILE
    x = np.empty((n, T), np.float32)
    wx = np.empty((n, T), np.float32)
    w = np.empty((n, T), np.float32)
    mx = np.empty(T, np.float32)
    amax = np.empty(T, np.float32)
    iscale = np.empty(T, np.float32)
    bi = np.empty(T, np.float32)
    scale = np.empty(T, np.float32)
    best = np.empty(T, np.float32)
    slx = np.empty(T, np.float32)
    sl2 = np.empty(T, np.float32)
    for b0 in range(0, B, T):
        t = min(T, B - b0)
        for j in range(t):
            amax[j] = f0
            mx[j] = f0
        for i in range(n):
            for j in range(t):
                xv = xg[b0 + j, i]
                wv = wg[b0 + j, i]
                x[i, j] = xv
                w[i, j] = wv
                wx[i, j] = wv * xv
                ax = abs(xv)
                if ax > amax[j]:
                    amax[j] = ax
                    mx[j] = xv
        for j in range(t):
            if amax[j] < eps:
                mx[j] = np.float32(1.0)
            iscale[j] = -fnmax / mx[j]
            bi[j] = iscale[j]
        _qx_sums(x, w, wx, iscale, lo, hi, slx, sl2, t)
        for j in range(t):
            scale[j] = slx[j] / sl2[j] if sl2[j] != f0 else f0
            best[j] = scale[j] * slx[j]
        for step in range(-9, 10):
            if step == 0:
                continue
            num = -(fnmax + tenth * np.float32(step))
            for j in range(t):
                iscale[j] = num / mx[j]
            _qx_sums(x, w, wx, iscale, lo, hi, slx, sl2, t)
            for j in range(t):
                if sl2[j] > f0 and slx[j] * slx[j] > best[j] * sl2[j]:
                    bi[j] = iscale[j]
                    scale[j] = slx[j] / sl2[j]
                    best[j] = scale[j] * slx[j]
        for i in range(n):
            for j in range(t):
                if amax[j] < eps:
                    L_out[b0 + j, i] = 0
                else:
                    v = min(max(x[i, j] * bi[j], lo), hi)
                    v = (v + magic) - magic
                    L_out[b0 + j, i] = np.uint8(np.int32(v) + nmax)
        for j in range(t):
            scale_out[b0 + j] = f0 if amax[j] < eps else scale[j]


@nb.njit(nogil=True, cache=True, error_model="numpy")
def requant_kernel(x, d, dm, searched, lo, hi, offset, out):
    """The k-quants' final rounding on the stored grid: ``clamp(nearest_int((x + dm) / d), lo, hi) + offset`` per
    group of ``x`` [G, n] (block-major), the searched code where the group's scale ``d`` is 0. ``nearest_int`` is
    llama.cpp's bit trick: round half to even below 2^22 in magnitude, its low mantissa bits beyond (and for
    inf/NaN, which an overflowed fp16 scale gives)."""
    G, n = x.shape
    magic = np.float32(12582912.0)
    big = np.float32(4194304.0)
    bits = np.empty(1, np.float32)
    ibits = bits.view(np.int32)
    for g in range(G):
        if d[g] == np.float32(0.0):
            for i in range(n):
                out[g, i] = searched[g, i]
            continue
        for i in range(n):
            v = (x[g, i] + dm[g]) / d[g]
            if abs(v) < big:
                r = np.int32(((v + magic) - magic))
            else:
                bits[0] = v + magic
                r = (ibits[0] & 0x7FFFFF) - 0x400000
            r = min(max(r, lo), hi)
            out[g, i] = np.uint8(r + offset)
