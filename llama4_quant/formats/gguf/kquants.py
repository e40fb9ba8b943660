"""Vectorised scale searches of llama.cpp's k-quants, IQ4 and MXFP4, float32 operation for float32 operation.

Every function here works on many blocks at once. Block data is laid out *position-major*: an array of
shape ``(n, B)`` holds ``B`` blocks of ``n`` values each, so that ``a[i]`` is the i-th value of every block.
Sums over a block are then strict left-to-right float32 additions (:func:`seq_sum`), which is what the C
loops in ``ggml-quants.c`` compute; products keep the C evaluation order (``w*l*x`` is ``(w*l)*x``).
With that, the searches below give the same floats as llama.cpp's reference quantizers built without
FMA contraction (the x86-64 default), and so the same bytes.

The functions return the *search* results (sub-block scales and mins as floats, the codes the search
chose); turning them into 4/6/8-bit super-block fields is done by :mod:`llama4_quant.formats.gguf.quants`.
This module only knows numpy; the two hot searches run as compiled loops in :mod:`.kernels`.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: add 1.5*2^23 in float32, read the low mantissa bits as an int.

    Rounds half to even for |v| < 2^22; outside that range it returns the same (meaningless) values
    as the C bit trick, which callers clamp.
    """
    t = np.add(v, _MAGIC, dtype=F32)
    i = t.view(np.int32)
    i &= 0x7FFFFF
    i -= 0x400000
    return i


def _seq_sum_loop(a: np.ndarray) -> np.ndarray:
    acc = a[0].copy()
    for k in range(1, a.shape[0]):
        acc += a[k]
    return acc


def _reduce_is_sequential() -> bool:
    """numpy reduces over a non-contiguous (outer) axis row by row; check it once, cheaply."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 256)) * 10.0 ** rng.integers(-6, 6, size=(32, 256))).astype(F32)
    return bool(np.array_equal(np.add.reduce(a, axis=0), _seq_sum_loop(a)))


_REDUCE_OK = _reduce_is_sequential()


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 of a C-contiguous (n, B) array, like a C loop."""
    if _REDUCE_OK and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    return _seq_sum_loop(a)


def _round_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """In place: clamp to [lo, hi], then round half to even (== clamp(nearest_int(v)) for |v| < 2^22)."""
    np.clip(v, F32(lo), F32(hi), out=v)
    v += _MAGIC
    v -= _MAGIC
    return v


def make_qkx_quants(
    x: np.ndarray,
    w: np.ndarray | None,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    v3: bool,
    mad: bool = False,
    *,
    block_major: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted affine fit ``x ~ scale*L - the_min``, L in [0, nmax], per block of ``x`` (shape (n, B), or (B, n)
    with ``block_major``; ``L`` comes back in the same layout).

    ``v3=False`` is ``make_qkx2_quants`` (used by the reference Q4_K/Q5_K quantizers),
    ``v3=True`` is ``make_qkx3_quants`` (the imatrix path); squared error, or absolute error with ``mad=True``
    (``use_mad``: the reference Q2_K quantizer). ``w=None``: the reference Q4_K/Q5_K weights
    ``sqrt(mean(x^2)) + |x|`` per block, computed in the loop. The candidate codes are clamped before rounding,
    which equals C's round-then-clamp wherever C's ``nearest_int`` is defined (|v| < 2^22; qkx3 clamps first
    too). Returns ``(scale[B], the_min[B], L uint8)``.
    """
    from .kernels import qkx_kernel

    x = np.asarray(x, dtype=F32)
    xb = x if block_major else x.T
    nb, n = xb.shape
    wb = np.zeros((1, 1), F32) if w is None else np.asarray(w, dtype=F32)
    wb = wb if block_major or w is None else wb.T
    scale = np.empty(nb, dtype=F32)
    the_min = np.empty(nb, dtype=F32)
    L = np.empty((nb, n) if block_major else (n, nb), dtype=np.uint8)
    qkx_kernel(xb, wb, int(nmax), F32(rmin), F32(rdelta), int(nstep), bool(v3), bool(mad), w is None, scale,
               the_min, L if block_major else L.T)
    return scale, the_min, L


def make_qx_quants(x: np.ndarray, qw: np.ndarray | None, nmax: int, *, block_major: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit ``x ~ scale*l``, l in [-nmax, nmax-1], ``make_qx_quants(..., rmse_type=1, qw)``, per block
    of ``x`` ((n, B), or (B, n) with ``block_major``; ``L`` in the same layout).

    Weights are ``qw`` when given, else ``x*x``. Returns ``(scale[B], L uint8)`` with
    ``L = l + nmax`` (and L = 0 for an all-zero block, as the C code leaves it).
    """
    from .kernels import qx_kernel

    x = np.asarray(x, dtype=F32)
    w = x * x if qw is None else np.asarray(qw, dtype=F32)
    xb, wb = (x, w) if block_major else (x.T, w.T)
    nb, n = xb.shape
    scale = np.empty(nb, dtype=F32)
    L = np.empty((nb, n) if block_major else (n, nb), dtype=np.uint8)
    qx_kernel(xb, wb, int(nmax), scale, L if block_major else L.T)
    return scale, L


def requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, searched: np.ndarray, lo: int, hi: int,
               offset: int) -> np.ndarray:
    """Codes on the stored grid: ``clamp(nearest_int((x + dm) / d), lo, hi) + offset`` per group of ``x`` [G, n]
    (block-major), the searched codes [G, n] where ``d`` is 0 (see kernels.requant_kernel)."""
    from .kernels import requant_kernel

    G, n = x.shape
    out = np.empty((G, n), dtype=np.uint8)
    d = np.ascontiguousarray(d, dtype=F32).reshape(G)
    dm = np.zeros(G, F32) if dm is None else np.ascontiguousarray(dm, dtype=F32).reshape(G)
    requant_kernel(np.ascontiguousarray(x, dtype=F32), d, dm, np.ascontiguousarray(searched, dtype=np.uint8),
                   int(lo), int(hi), int(offset), out)
    return out


def make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative values ``x`` (shape (n, B)) to ``scale*L``, L in [0, nmax], weights ``w``.

    ``make_qp_quants``: used by the imatrix path to put the 8 sub-block scales (and mins) of a
    super-block on a 6-bit grid. Returns ``(scale[B], L[n, B] uint8)``.
    """
    n, nb = x.shape
    fnmax = F32(nmax)
    mx = np.maximum(np.max(x, axis=0), F32(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / mx
        L8 = (nearest_int(iscale * x) & 0xFF).astype(F32)  # stored in a uint8 array in C
        scale = F32(1) / iscale
        diff = x - scale * L8
        best = seq_sum((w * diff) * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + fnmax) / mx
            scale_is = F32(1) / iscale_is
            lf = np.minimum(nearest_int(iscale_is * x), nmax).astype(F32)
            diff = x - scale_is * lf
            mse = seq_sum((w * diff) * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)

        li = np.minimum(nearest_int(iscale * x), nmax)
        L = li & 0xFF
        lf = li.astype(F32)
        sumlx = seq_sum(wx * lf)
        suml2 = seq_sum((w * lf) * lf)
        for _ in range(5):  # a pass that changes nothing leaves the state as it was, so 5 passes always
            for i in range(n):
                wi, xi, wxi = w[i], x[i], wx[i]
                Li = L[i].astype(F32)
                slx = sumlx - wxi * Li
                sl2 = suml2 - (wi * Li) * Li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nearest_int((xi * sl2) / slx), nmax)
                ok &= new_l != L[i]
                nf = new_l.astype(F32)
                slx = slx + wxi * nf
                sl2 = sl2 + (wi * nf) * nf
                ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
                if ok.any():
                    L[i] = np.where(ok, new_l & 0xFF, L[i])
                    sumlx = np.where(ok, slx, sumlx)
                    suml2 = np.where(ok, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = L.astype(np.uint8)
    L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def superblock_sum_x2(x: np.ndarray, sub_per_super: int) -> np.ndarray:
    """Sequential sum of x^2 over each super-block; ``x`` is (n, S*sub_per_super) position-major."""
    n = x.shape[0]
    xx = (x * x).reshape(n, -1, sub_per_super)
    acc = np.zeros(xx.shape[1], dtype=F32)
    for j in range(sub_per_super):
        for i in range(n):
            acc += xx[i, :, j]
    return acc


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit ``x ~ scale*l``, l in [-nmax, nmax-1], weights ``x*x``: ``make_q3_quants(..., do_rmse=true)``
    (the reference Q3_K quantizer).

    Start from ``-nmax / max`` (max = the value of largest magnitude, first one on ties), then up to five
    greedy passes that move one code at a time to its least-squares optimum while that raises
    ``sumlx^2 / suml2``. ``x`` is (n, B) position-major; returns ``(scale[B], L[n, B] uint8)`` with
    ``L = l + nmax`` (L = 0 and scale 0 for a block whose largest magnitude is below 1e-15).
    """
    n, nb = x.shape
    ax = np.abs(x)
    imax = np.argmax(ax, axis=0)
    cols = np.arange(nb)
    amax = ax[imax, cols]
    mx = x[imax, cols]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    fnmax = F32(nmax)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -fnmax / mx
        v = x * iscale
        L = _round_clip(v, -nmax, nmax - 1).astype(np.int32)  # signed codes
        lf = L.astype(F32)
        sumlx = seq_sum(wx * lf)
        suml2 = seq_sum((w * lf) * lf)
        # A pass that changes nothing leaves the state unchanged, so running all five passes equals C's early exit.
        for _ in range(5):
            for i in range(n):
                wi, xi, wxi = w[i], x[i], wx[i]
                Li = L[i].astype(F32)
                slx = sumlx - wxi * Li
                ok = slx > 0
                sl2 = suml2 - (wi * Li) * Li
                new_l = np.clip(nearest_int((xi * sl2) / slx), -nmax, nmax - 1)
                ok &= new_l != L[i]
                nf = new_l.astype(F32)
                slx = slx + wxi * nf
                sl2 = sl2 + (wi * nf) * nf
                ok &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                if ok.any():
                    L[i] = np.where(ok, new_l, L[i])
                    sumlx = np.where(ok, slx, sumlx)
                    suml2 = np.where(ok, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    out = (L + nmax).astype(np.uint8)
    out[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, out


# ---- non-linear 4-bit grids (IQ4_NL / IQ4_XS) and MXFP4 -------------------------------------------------

IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)  # 2 x E2M1

_IQ4_F = IQ4NL_VALUES.astype(F32)
# best_index_int8 picks the lower of two neighbouring entries a < b iff fl(x - a) < fl(b - x). Wherever the two
# distances are close enough for rounding to matter they are exact (x is then near the midpoint, within a factor 2
# of the half-gap), so the rule is x < (a + b)/2: the index is the number of midpoints <= x. The midpoints are
# half-integers, so that count is a function of floor(2x): one table lookup.
_IQ4_MID = ((IQ4NL_VALUES[:-1].astype(np.int32) + IQ4NL_VALUES[1:].astype(np.int32)) / 2).astype(F32)
_IQ4_IDX2 = np.searchsorted(_IQ4_MID, (np.arange(-256, 256) / 2).astype(F32), side="right").astype(np.uint8)
_IQ4_VAL2 = _IQ4_F[_IQ4_IDX2]


def _iq4_slot(v2: np.ndarray) -> np.ndarray:
    """Index into the ``_IQ4_*2`` tables for ``v2 = 2*v``: floor, clamped to [-256, 255] (NaN -> the top, as in C)."""
    t = np.floor(v2)
    np.fmin(t, F32(255), out=t)
    np.fmax(t, F32(-256), out=t)
    return t.astype(np.intp) + 256


def best_index_iq4(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``best_index_int8(16, kvalues_iq4nl, v)``: the nearest table entry, the upper one on a tie
    (0 at or below the first entry, 15 at or above the last and for NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _IQ4_IDX2[_iq4_slot(np.asarray(v, dtype=F32) * F32(2))]


def iq4_block_search(x: np.ndarray, w: np.ndarray, ntry: int) -> np.ndarray:
    """Scale of each 32-value block of ``quantize_row_iq4_nl_impl`` (``x``, weights ``w``: (32, B)).

    Start at ``d = max/127`` (max = the value of largest magnitude), refit by weighted least squares on the
    table codes, then try ``(t - 127)/max`` for t in [-ntry, ntry]; a block whose largest magnitude is below
    1e-15 gets scale 0. Returns ``scale[B]`` (float32)."""
    nb = x.shape[1]
    ax = np.abs(x)
    imax = np.argmax(ax, axis=0)
    cols = np.arange(nb)
    amax = ax[imax, cols]
    mx = x[imax, cols]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    v0 = F32(IQ4NL_VALUES[0])
    v2 = np.empty_like(x)
    wq = np.empty_like(x)
    t = np.empty_like(x)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(x, iscale * F32(2), out=v2)  # == 2 * (x * iscale) exactly
        q = _IQ4_VAL2[_iq4_slot(v2)]
        np.multiply(w, q, out=wq)
        np.multiply(wq, x, out=t)
        sqx = seq_sum(t)
        np.multiply(wq, q, out=t)
        return sqx, seq_sum(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (-mx / v0) if ntry > 0 else (mx / v0)
        sumqx, sumq2 = sums(F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F32(itry + int(IQ4NL_VALUES[0])) / mx)
            upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            if upd.any():
                d = np.where(upd, sumqx / sumq2, d)
                best = np.where(upd, d * sumqx, best)
    return np.where(zero, F32(0), d).astype(F32)


def best_index_mxfp4(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """llama.cpp's ``best_index_mxfp4``: the first of the 16 E2M1 codes minimising ``|kvalue*e - x|`` (float32).

    A code of the other sign than ``x`` can never be strictly better than code 0 (its error is at least
    |x|), and ``-0`` (code 8) only ties with code 0, so only the 8 magnitudes need comparing."""
    ax = np.abs(x)
    mags = MXFP4_VALUES[:8].astype(F32)
    best = np.abs(F32(0) * e - ax)
    k = np.zeros(x.shape, dtype=np.uint8)
    for j in range(1, 8):
        err = np.abs(mags[j] * e - ax)
        better = err < best
        best = np.where(better, err, best)
        k[better] = j
    neg = (x < 0) & (k > 0)
    return np.where(neg, k + np.uint8(8), k).astype(np.uint8)
