"""GGML block quantizers that write the bytes llama.cpp writes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K, IQ4_NL, IQ4_XS and MXFP4.

Quantizing
----------
``quantize(w, qtype, imatrix=None)`` takes float32 weights ``[..., cols]`` and returns uint8
``[..., cols // block_size * type_size]``, the array ``gguf.GGUFWriter.add_tensor(name, data,
raw_dtype=qtype)`` expects. ``dequantize(packed, qtype)`` decodes it (bit-identical to
``gguf.quants.dequantize``). F32/F16/BF16 pass through (``quantize`` returns what gguf-py stores).

The searches are those of llama.cpp's ``ggml-quants.c`` as ``llama-quantize`` calls them
(``quantize_<type>(src, dst, rows, cols, imatrix)``), vectorised over all blocks with the same float32
operations in the same order (see :mod:`llama4_quant.formats.gguf.kquants`):

- no imatrix: the reference quantizers (``quantize_row_q4_K_ref`` etc.): ``make_qkx2_quants`` with
  weights ``rms(sub-block) + |x|`` for Q4_K/Q5_K and with weights ``|x|`` on the absolute error for Q2_K;
  ``make_q3_quants`` (weights ``x^2``, greedy code moves) for Q3_K; ``make_qx_quants`` with weights
  ``x^2`` for Q6_K; the plain max-abs Q4_0/Q5_0/Q8_0 and min-max Q4_1/Q5_1 rounding; for IQ4_NL/IQ4_XS
  the same search as with an imatrix, weighted by ``x^2`` (``quantize_iq4_*`` have no reference path);
- with an imatrix (one importance per column): the ``quantize_row_*_impl`` paths, weights
  ``imatrix[col] * sqrt(sigma2 + x^2)`` with ``sigma2`` a mean of x^2 (``2*mean`` over the super-block for
  Q3_K/Q4_K/Q5_K and over the block for IQ4; ``mean`` over the super-block for Q2_K, over the row for
  Q4_0/Q4_1/Q5_0/Q5_1; Q6_K takes ``imatrix[col]`` alone): ``make_qkx3_quants`` + ``make_qp_quants`` for the
  sub-block scales (Q2_K/Q4_K/Q5_K), ``make_qx_quants`` for codes and scales (Q3_K), ``make_qx_quants``
  (Q4_0/Q5_0/Q6_K), ``make_qkx3_quants`` (Q4_1/Q5_1), the IQ4 scale search over the non-linear table.
  Q8_0 and MXFP4 ignore the imatrix, as llama.cpp does.

The output equals llama.cpp's for the same float32 input on builds without FMA contraction of
``ggml-quants.c`` (x86-64 default), tested against golden vectors of llama.cpp's own code for every type
and against ``llama-quantize`` end to end. (MXFP4 takes ``floor(log2f(max|x|))``; we round the float64
log2 to float32, which agrees with glibc's ``log2f`` on the floats just below powers of two, the only ones
where the floor could differ.)

The grid contract, for GPTQ
---------------------------
A block format is a per-row grid: the columns of a row fall into *groups* of ``group_size`` columns
(16 for Q2_K/Q3_K/Q6_K, 32 for the others), and group ``g`` of row ``r`` can represent exactly::

    value = float32(float32(scale[r, g] * q) - min[r, g])    for integer q in [qmin, qmax]

(``min`` is all zeros for the symmetric Q4_0/Q5_0/Q8_0/Q3_K/Q6_K; Q4_1/Q5_1 store ``m = -min`` and decode
``d*q + m``, the same number). For the non-linear IQ4_NL/IQ4_XS/MXFP4 the code is an index 0..15 into
``LEVELS[qtype]`` and ``value = float32(scale * LEVELS[qtype][q])``. ``scale`` and ``min`` are already what
the file decodes to (for Q4_K/Q5_K ``scale = fp16 d * 6-bit sc``, ``min = fp16 dmin * 6-bit m``; Q2_K the
same with 4 bits; Q3_K ``fp16 d * (6-bit sc - 32)``; Q6_K ``fp16 d * int8 sc``; IQ4_XS ``fp16 d * (6-bit sc
- 32)``; MXFP4 ``2^(e-128)``, and ``BlockParams.d`` holds the uint8 exponent ``e``), so these are the values
llama.cpp computes with. The code range is

    Q2_K: [0, 3]  Q3_K: [-4, 3]  Q4_K/Q4_1: [0, 15]  Q5_K/Q5_1: [0, 31]  Q6_K: [-32, 31]
    Q4_0: [-8, 7]  Q5_0: [-16, 15]  Q8_0: [-127, 127]  IQ4_NL/IQ4_XS/MXFP4: [0, 15] (table indices)

(Q8_0 files can also hold -128, which llama.cpp never writes; ``pack``/``unpack`` accept it.)

Group parameters are chosen jointly for a whole *param block* of ``param_block_cols`` columns (256 for
the super-block types Q2_K..Q6_K and IQ4_XS, which share ``d``/``dmin``; 32 for the others). The API:

- ``block_params(w, qtype, imatrix=None) -> BlockParams`` for ``w[rows, k * param_block_cols]``
  (numpy or torch): runs the same search as ``quantize``. GPTQ calls it when it reaches the first
  column of a param block, on the (partially updated) weights of that param block only, with the
  imatrix entries of those columns (one exception to "same as quantize": Q4_0/Q4_1/Q5_0/Q5_1's imatrix
  weights use the mean of x^2 over the columns given, which llama.cpp takes over the whole row);
- ``quantize_with_params(w, params, col_offset=0) -> codes``: ``w[rows, n]`` are columns
  ``col_offset .. col_offset+n-1`` of ``params``; returns int16 codes (numpy or torch, like ``w``),
  ``clamp(round_half_even((w + min) / scale), qmin, qmax)`` and 0 where ``scale == 0`` (every code
  then decodes to ``-min``); for the non-linear types the table entry llama.cpp's final rounding picks;
- ``dequantize_codes(codes, params, col_offset=0)``: the grid values above, same float32 ops as
  llama.cpp/gguf-py;
- ``concat_params([p0, p1, ...])`` joins param blocks along columns; ``pack(codes, params)`` returns
  the uint8 rows for the file: ``dequantize(pack(c, p), qtype) == dequantize_codes(c, p)`` exactly.

For Q2_K/Q3_K/Q4_K/Q5_K/Q6_K, ``pack(quantize_with_params(w, p), p)`` with ``p = block_params(w, ...)`` decodes
to exactly ``dequantize(quantize(w, ...))``. (Bytes can differ only in sub-blocks whose scale is 0,
where llama.cpp keeps the search's codes: all codes decode to the same value there, up to the sign
of a zero.) For Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (no imatrix), IQ4_NL and IQ4_XS, llama.cpp rounds with the
unrounded fp32 scale (and min); ``quantize_with_params`` rounds onto the stored fp16 grid instead, which
can differ by one code on near-ties. MXFP4's scale is exact, so its codes agree.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from . import kquants as kq

QT = GGMLQuantizationType
F32 = np.float32
QK_K = 256



@dataclass(frozen=True)
class _Info:
    block_size: int  # columns per stored block
    type_size: int  # bytes per stored block
    group_size: int  # columns sharing one (scale, min)
    qmin: int
    qmax: int


_INFO: dict[QT, _Info] = {
    QT.Q8_0: _Info(32, 34, 32, -127, 127),
    QT.Q4_0: _Info(32, 18, 32, -8, 7),
    QT.Q4_1: _Info(32, 20, 32, 0, 15),
    QT.Q5_0: _Info(32, 22, 32, -16, 15),
    QT.Q5_1: _Info(32, 24, 32, 0, 31),
    QT.Q2_K: _Info(QK_K, 84, 16, 0, 3),
    QT.Q3_K: _Info(QK_K, 110, 16, -4, 3),
    QT.Q4_K: _Info(QK_K, 144, 32, 0, 15),
    QT.Q5_K: _Info(QK_K, 176, 32, 0, 31),
    QT.Q6_K: _Info(QK_K, 210, 16, -32, 31),
    # non-linear: the code indexes a 16-entry table, value = scale * table[code]
    QT.IQ4_NL: _Info(32, 18, 32, 0, 15),
    QT.IQ4_XS: _Info(QK_K, 136, 32, 0, 15),
    QT.MXFP4: _Info(32, 17, 32, 0, 15),
}
_AFFINE = (QT.Q4_K, QT.Q5_K)
_AFFINE_32 = (QT.Q4_1, QT.Q5_1)  # d, m per 32: value = d*q + m
#: the value tables of the non-linear types (``dequantize_codes`` maps codes through them)
LEVELS: dict[QT, np.ndarray] = {QT.IQ4_NL: kq.IQ4NL_VALUES, QT.IQ4_XS: kq.IQ4NL_VALUES, QT.MXFP4: kq.MXFP4_VALUES}
# stored code = signed code + offset
_OFFSET = {QT.Q6_K: 32, QT.Q4_0: 8, QT.Q3_K: 4, QT.Q5_0: 16}
# types whose quantizer ignores the importance matrix (as llama.cpp's does)
_NO_IMATRIX = (QT.Q8_0, QT.MXFP4)
_PASSTHROUGH = (QT.F32, QT.F16, QT.BF16)
SUPPORTED_TYPES: tuple[QT, ...] = tuple(_INFO) + _PASSTHROUGH

# Super-blocks per work item: ~1 MiB of float32 per array keeps the searches in cache.
_CHUNK_SUPERBLOCKS = 1024


def param_block_cols(qtype: QT) -> int:
    """Columns whose group parameters are chosen together (256 for k-quants, 32 for Q4_0/Q8_0)."""
    return _info(qtype).block_size


def bytes_per_row(qtype: QT, cols: int) -> int:
    if qtype in _PASSTHROUGH:
        return cols * (4 if qtype == QT.F32 else 2)
    info = _info(qtype)
    if cols % info.block_size:
        raise ValueError(f"{qtype.name} needs a row length divisible by {info.block_size}, got {cols}")
    return cols // info.block_size * info.type_size


def _info(qtype: QT) -> _Info:
    try:
        return _INFO[QT(qtype)]
    except KeyError:
        raise ValueError(f"unsupported block type {QT(qtype).name}") from None


# ----------------------------------------------------------------------------------------------
# Grid parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockParams:
    """Per-group grids of a ``rows x cols`` matrix in one block format (see the module docstring).

    ``scale``/``min``: float32 ``[rows, cols // group_size]``, the decoded values.
    The stored fields they come from: ``d`` (float16 ``[rows, cols // block_size]``: the super-block
    scale of k-quants, the block scale of Q4_0/Q8_0), ``dmin`` (float16, Q4_K/Q5_K), ``sub_scales``
    (``[rows, n_groups]``: uint8 6-bit for Q4_K/Q5_K, int8 for Q6_K) and ``sub_mins`` (uint8 6-bit,
    Q4_K/Q5_K).
    """

    qtype: QT
    scale: np.ndarray
    min: np.ndarray
    d: np.ndarray
    dmin: np.ndarray | None = None
    sub_scales: np.ndarray | None = None
    sub_mins: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.d.shape[0])

    @property
    def cols(self) -> int:
        return int(self.d.shape[1]) * _info(self.qtype).block_size

    @property
    def group_size(self) -> int:
        return _info(self.qtype).group_size

    @property
    def qmin(self) -> int:
        return _info(self.qtype).qmin

    @property
    def qmax(self) -> int:
        return _info(self.qtype).qmax


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """``ggml_e8m0_to_fp32_half``: 2^(e-128) as float32 (subnormal for e < 2)."""
    e = np.asarray(e, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


def _make_params(
    qtype: QT,
    d: np.ndarray,
    dmin: np.ndarray | None = None,
    sc: np.ndarray | None = None,
    m: np.ndarray | None = None,
) -> BlockParams:
    """Decoded grid from stored fields (``d``/``dmin`` float16 [rows, nb], ``sc``/``m`` [rows, ng];
    for MXFP4 ``d`` is the uint8 E8M0 exponent)."""
    if qtype == QT.MXFP4:
        e = np.ascontiguousarray(d, dtype=np.uint8)
        scale = e8m0_half(e)
        return BlockParams(qtype, scale, np.zeros_like(scale), e)
    d = np.ascontiguousarray(d, dtype=np.float16)
    d32 = d.astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):  # arbitrary file bytes may hold Inf/NaN scales
        if qtype in _AFFINE or qtype == QT.Q2_K:
            assert dmin is not None and sc is not None and m is not None
            per = 8 if qtype in _AFFINE else 16
            sc = np.ascontiguousarray(sc, dtype=np.uint8)
            m = np.ascontiguousarray(m, dtype=np.uint8)
            dmin = np.ascontiguousarray(dmin, dtype=np.float16)
            scale = np.repeat(d32, per, axis=1) * sc.astype(F32)
            mins = np.repeat(dmin.astype(F32), per, axis=1) * m.astype(F32)
            return BlockParams(qtype, scale, mins, d, dmin, sc, m)
        if qtype in (QT.Q6_K, QT.Q3_K, QT.IQ4_XS):
            assert sc is not None
            per = 8 if qtype == QT.IQ4_XS else 16
            sc = np.ascontiguousarray(sc, dtype=np.int8)
            scale = np.repeat(d32, per, axis=1) * sc.astype(F32)
            return BlockParams(qtype, scale, np.zeros_like(scale), d, None, sc, None)
        if qtype in _AFFINE_32:
            assert dmin is not None
            dmin = np.ascontiguousarray(dmin, dtype=np.float16)
            return BlockParams(qtype, d32, -dmin.astype(F32), d, dmin)
    return BlockParams(qtype, d32, np.zeros_like(d32), d)


def concat_params(parts: Sequence[BlockParams]) -> BlockParams:
    """Join the params of consecutive column ranges of the same rows."""
    if not parts:
        raise ValueError("concat_params needs at least one BlockParams")
    qtype = parts[0].qtype
    if any(p.qtype != qtype or p.rows != parts[0].rows for p in parts):
        raise ValueError("concat_params: all parts must share qtype and rows")

    def cat(name: str) -> np.ndarray | None:
        arrs = [getattr(p, name) for p in parts]
        return None if arrs[0] is None else np.concatenate(arrs, axis=1)

    return BlockParams(qtype, *(cat(f) for f in ("scale", "min", "d", "dmin", "sub_scales", "sub_mins")))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Searches: float32 rows -> (params, stored codes). Stored codes are what sits in the file's
# nibbles: Q4_K 0..15, Q5_K 0..31, Q6_K 0..63 (= q + 32), Q4_0 0..15 (= q + 8), Q8_0 int8 q.
# ----------------------------------------------------------------------------------------------


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K ``scales[12]`` from 8 scales and 8 mins per super-block (uint8, C's byte logic)."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    lo_s, hi_s = sc[..., :4], sc[..., 4:]
    lo_m, hi_m = m[..., :4], m[..., 4:]
    six = np.uint8(6)
    four = np.uint8(4)
    return np.concatenate(
        [
            lo_s | ((hi_s >> four) << six),
            lo_m | ((hi_m >> four) << six),
            (hi_s & np.uint8(0xF)) | ((hi_m & np.uint8(0xF)) << four),
        ],
        axis=-1,
    )


def _unpack_k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_pack_k_scales` (``get_scale_min_k4``): 6-bit (sc, m), each [..., 8]."""
    b0, b1, b2 = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([b0 & 63, (b2 & 0xF) | ((b0 >> 6) << 4)], axis=-1)
    m = np.concatenate([b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4)], axis=-1)
    return sc.astype(np.uint8), m.astype(np.uint8)


def _search_affine_k(x: np.ndarray, qw: np.ndarray | None, qtype: QT) -> tuple[Any, ...]:
    """Q4_K/Q5_K for ``x[s, 256]`` super-blocks. Returns (d16, dmin16, sc, m, stored codes[s, 256])."""
    nmax = _info(qtype).qmax
    s = x.shape[0]
    xb = x.reshape(s * 8, 32)
    if qw is None:  # weights sqrt(mean x^2) + |x|, computed in the search loop
        if qtype == QT.Q4_K:
            scales, mins, L = kq.make_qkx_quants(xb, None, nmax, -1.0, 0.1, 20, v3=False, block_major=True)
        else:
            scales, mins, L = kq.make_qkx_quants(xb, None, nmax, -0.5, 0.1, 15, v3=False, block_major=True)
        scales = scales.reshape(s, 8)
        mins = mins.reshape(s, 8)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(kq.nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(kq.nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d16 = (max_scale / F32(63)).astype(np.float16)
        dmin16 = (max_min / F32(63)).astype(np.float16)
    else:
        xt = np.ascontiguousarray(xb.T)
        sigma2 = F32(2) * kq.superblock_sum_x2(xt, 8) / F32(QK_K)
        qwt = np.ascontiguousarray(qw.reshape(s * 8, 32).T)
        w = qwt * np.sqrt(np.repeat(sigma2, 8)[None, :] + xt * xt)
        sw = kq.seq_sum(w)
        scales, mins, L = kq.make_qkx_quants(xt, w, nmax, -0.9, 0.05, 36, v3=True)
        L = L.T
        swt = np.ascontiguousarray(sw.reshape(s, 8).T)
        d_block, ls_t = kq.make_qp_quants(np.ascontiguousarray(scales.reshape(s, 8).T), swt, 63)
        m_block, lm_t = kq.make_qp_quants(np.ascontiguousarray(mins.reshape(s, 8).T), swt, 63)
        ls, lm = ls_t.T, lm_t.T
        if qtype == QT.Q5_K:
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        d16 = d_block.astype(np.float16)
        dmin16 = m_block.astype(np.float16)
    sc, m = _unpack_k_scales(_pack_k_scales(ls, lm))
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    dm = dmin16.astype(F32)[:, None] * m.astype(F32)
    codes = kq.requantize(xb, d, dm, L, 0, nmax, 0).reshape(s, QK_K)
    return d16, dmin16, sc, m, codes


def _search_q6_k(x: np.ndarray, qw: np.ndarray | None) -> tuple[Any, ...]:
    """Q6_K for ``x[s, 256]``. Returns (d16, int8 sc[s, 16], stored codes[s, 256] in 0..63)."""
    s = x.shape[0]
    xb = x.reshape(s * 16, 16)
    scales, L = kq.make_qx_quants(xb, None if qw is None else qw.reshape(s * 16, 16), 32, block_major=True)
    scales = scales.reshape(s, 16)
    imax = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(s), imax]
    zero = np.abs(max_scale) < kq.GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d16 = np.where(zero, F32(0), F32(1) / iscale).astype(np.float16)
        sc = np.minimum(kq.nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
        sc[zero] = 0
        d = d16.astype(F32)[:, None] * sc.astype(F32)
    codes = kq.requantize(xb, d, None, L, -32, 31, 32).reshape(s, QK_K)
    codes[zero] = 0
    return d16, sc, codes


def _search_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 reference: d = max|x|/127, q = roundf(x/d) (half away from zero). x is [nb, 32]."""
    amax = np.abs(x).max(axis=1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
    v = x * inv[:, None]
    t = np.trunc(v)
    q = np.where(np.abs(v - t) >= F32(0.5), t + np.sign(v), t)
    return d.astype(np.float16), q.astype(np.int8)


def _search_q4_0(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 for ``x[nb, 32]``: reference (no imatrix) or weighted ``make_qx_quants``. (d16, stored 0..15)."""
    if qw is None:
        nb = x.shape[0]
        imax = np.argmax(np.abs(x), axis=1)
        mx = x[np.arange(nb), imax]
        d = mx / F32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, F32(0), F32(1) / d)
        stored = np.minimum(np.trunc(x * inv[:, None] + F32(8.5)).astype(np.int32), 15)
        return d.astype(np.float16), stored.astype(np.uint8)
    assert sigma2 is not None
    xt = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(qw.T) * np.sqrt(sigma2[None, :] + xt * xt)
    scale, L = kq.make_qx_quants(xt, w, 8)
    return scale.astype(np.float16), np.ascontiguousarray(L.T)


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """``sum(x^2)/n_per_row`` per row, summed left to right (Q4_0 imatrix path)."""
    return np.add.accumulate(x * x, axis=1)[:, -1] / F32(x.shape[1])


def _first_extreme(x: np.ndarray, fn: Callable[..., np.ndarray]) -> np.ndarray:
    """The first element of each row equal to its min/max (C's strict ``<``/``>`` scan keeps the first one,
    which decides the sign of a zero)."""
    return x[np.arange(x.shape[0]), fn(x, axis=1)]


def _search_legacy(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None, qtype: QT) -> tuple[Any, ...]:
    """Q4_1 / Q5_0 / Q5_1 for ``x[nb, 32]``: (d16, m16 or None, stored codes [nb, 32]).

    No imatrix: the reference rounding (``quantize_row_q4_1_ref`` ...): Q4_1/Q5_1 map [min, max] onto
    0..nmax with ``d = (max-min)/nmax`` and truncate ``(x-min)/d + 0.5``; Q5_0 like Q4_0 with
    ``d = x*/-16``. With an imatrix (weights ``imatrix[col] * sqrt(mean_row(x^2) + x^2)``): Q5_0 the
    symmetric ``make_qx_quants``, Q4_1/Q5_1 the affine ``make_qkx3_quants`` (37 tries); their codes are
    stored as searched."""
    nmax = _info(qtype).qmax
    if qw is None:
        if qtype == QT.Q5_0:
            imax = np.argmax(np.abs(x), axis=1)
            mx = x[np.arange(x.shape[0]), imax]
            d = mx / F32(-16)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, F32(0), F32(1) / d)
            stored = np.minimum(np.trunc(x * inv[:, None] + F32(16.5)).astype(np.int32), 31)
            return d.astype(np.float16), None, stored.astype(np.uint8)
        mn = _first_extreme(x, np.argmin)
        mx = _first_extreme(x, np.argmax)
        d = (mx - mn) / F32(nmax)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, F32(0), F32(1) / d)
        v = np.trunc((x - mn[:, None]) * inv[:, None] + F32(0.5)).astype(np.int32)
        stored = np.minimum(v, 15) if qtype == QT.Q4_1 else v & 0xFF
        return d.astype(np.float16), mn.astype(np.float16), stored.astype(np.uint8)
    assert sigma2 is not None
    xt = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(qw.T) * np.sqrt(sigma2[None, :] + xt * xt)
    if qtype == QT.Q5_0:
        scale, L = kq.make_qx_quants(xt, w, 16)
        return scale.astype(np.float16), None, np.ascontiguousarray(L.T)
    scale, the_min, L = kq.make_qkx_quants(xt, w, nmax, -0.9, 0.05, 36, v3=True)
    return scale.astype(np.float16), (-the_min).astype(np.float16), np.ascontiguousarray(L.T)


def _requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, searched: np.ndarray, lo: int, hi: int,
                offset: int) -> np.ndarray:
    """llama.cpp's final pass of the k-quants: ``clamp(round((x + dm) / d), lo, hi) + offset`` per group,
    keeping the search's stored codes where ``d == 0``. ``x``/``searched``: [..., g]; ``d``/``dm``: [...]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = x if dm is None else x + dm[..., None]
        lq = np.clip(kq.nearest_int(v / d[..., None]), lo, hi) + offset
    return np.where(d[..., None] != 0, lq, searched).astype(np.uint8)


def _search_q2_k(x: np.ndarray, qw: np.ndarray | None) -> tuple[Any, ...]:
    """Q2_K for ``x[s, 256]``: (d16, dmin16, 4-bit sc[s, 16], 4-bit m[s, 16], stored codes[s, 256] in 0..3).

    No imatrix (``quantize_row_q2_K_ref``): per group of 16, ``make_qkx2_quants`` with weights |x| on the
    absolute error (16 tries from -0.5 by 0.1); scales and mins on 4 bits against their maxima.
    Imatrix (``quantize_row_q2_K_impl``): weights ``imatrix * sqrt(mean(x^2) + x^2)`` (mean over the
    super-block), ``make_qkx3_quants`` (37 tries from -0.9 by 0.05), ``make_qp_quants`` for the 4-bit scales
    and mins, weighted by each group's weight sum. Then the final re-rounding on the stored grid."""
    s = x.shape[0]
    xt = np.ascontiguousarray(x.reshape(s * 16, 16).T)
    if qw is None:
        scales, mins, L = kq.make_qkx_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, v3=False, mad=True)
        scales = scales.reshape(s, 16)
        mins = mins.reshape(s, 16)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(15) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(15) / max_min, F32(0))
        ls = np.where(max_scale[:, None] > 0, kq.nearest_int(inv_scale[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, kq.nearest_int(inv_min[:, None] * mins), 0)
        d16 = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(np.float16)
        dmin16 = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(np.float16)
    else:
        sigma2 = kq.superblock_sum_x2(xt, 16) / F32(QK_K)
        qwt = np.ascontiguousarray(qw.reshape(s * 16, 16).T)
        w = qwt * np.sqrt(np.repeat(sigma2, 16)[None, :] + xt * xt)
        sw = np.ascontiguousarray(kq.seq_sum(w).reshape(s, 16).T)
        scales, mins, L = kq.make_qkx_quants(xt, w, 3, -0.9, 0.05, 36, v3=True)
        dm, ls_t = kq.make_qp_quants(np.ascontiguousarray(scales.reshape(s, 16).T), sw, 15)
        mm, lm_t = kq.make_qp_quants(np.ascontiguousarray(mins.reshape(s, 16).T), sw, 15)
        ls, lm = ls_t.T.astype(np.int32), lm_t.T.astype(np.int32)
        d16, dmin16 = dm.astype(np.float16), mm.astype(np.float16)
    byte = ((ls & 0xFF) | (lm << 4)) & 0xFF  # C stores the scale, then ORs the min into the high nibble
    sc, m = (byte & 0xF).astype(np.uint8), (byte >> 4).astype(np.uint8)
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    dm_ = dmin16.astype(F32)[:, None] * m.astype(F32)
    codes = _requantize(x.reshape(s, 16, 16), d, dm_, L.T.reshape(s, 16, 16), 0, 3, 0).reshape(s, QK_K)
    return d16, dmin16, sc, m, codes


def _search_q3_k(x: np.ndarray, qw: np.ndarray | None) -> tuple[Any, ...]:
    """Q3_K for ``x[s, 256]``: (d16, signed 6-bit sc[s, 16] (int8, -32..31), stored codes[s, 256] in 0..7).

    No imatrix (``quantize_row_q3_K_ref``): per group of 16, ``make_q3_quants`` (weights x^2, greedy code
    moves); the 16 scales go to 6 bits with ``d = -max_scale/32``. Imatrix (``quantize_row_q3_K_impl``):
    ``make_qx_quants`` with weights ``imatrix * sqrt(2*mean(x^2) + x^2)``, then the scales themselves by
    ``make_qx_quants`` (codes -32..31) weighted by each group's weight sum. Then the final re-rounding
    ``clamp(round(x / (d*sc)), -4, 3)``."""
    s = x.shape[0]
    xt = np.ascontiguousarray(x.reshape(s * 16, 16).T)
    if qw is None:
        scales, L = kq.make_q3_quants(xt, 4)
        scales = scales.reshape(s, 16)
        imax = np.argmax(np.abs(scales), axis=1)
        max_scale = scales[np.arange(s), imax]
        live = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32) / np.where(live, max_scale, F32(1))
            u = np.clip(kq.nearest_int(iscale[:, None] * scales), -32, 31) + 32
            d16 = np.where(live, F32(1) / iscale, F32(0)).astype(np.float16)
        u = np.where(live[:, None], u, 0)
    else:
        sigma2 = F32(2) * kq.superblock_sum_x2(xt, 16) / F32(QK_K)
        qwt = np.ascontiguousarray(qw.reshape(s * 16, 16).T)
        w = qwt * np.sqrt(np.repeat(sigma2, 16)[None, :] + xt * xt)
        sw = np.ascontiguousarray(kq.seq_sum(w).reshape(s, 16).T)
        scales, L = kq.make_qx_quants(xt, w, 4)
        d_block, u_t = kq.make_qx_quants(np.ascontiguousarray(scales.reshape(s, 16).T), sw, 32)
        u = u_t.T.astype(np.int32)
        d16 = d_block.astype(np.float16)
    sc = (u - 32).astype(np.int8)
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    codes = _requantize(x.reshape(s, 16, 16), d, None, L.T.reshape(s, 16, 16), -4, 3, 4).reshape(s, QK_K)
    return d16, sc, codes


def _search_iq4(x: np.ndarray, qw: np.ndarray | None) -> tuple[Any, ...]:
    """IQ4_NL (``x[nb, 32]``) or IQ4_XS (``x[s, 256]``): ``quantize_row_iq4_nl_impl`` as ``quantize_iq4_nl`` /
    ``quantize_iq4_xs`` call it (7 tries each side, with or without an imatrix).

    Weights ``imatrix * sqrt(2*mean(x^2) + x^2)`` (mean over the 32 or 256 values) or ``x^2``; per block of 32
    a scale search over the table codes (``iq4_block_search``). IQ4_NL stores that scale as the f16 ``d`` and
    rounds with it; IQ4_XS puts the 8 scales on 6 bits (``d = -max_scale/32``) and rounds each block with
    ``d*l``. Returns (d16, signed sc[s, 8] int8 or None, codes [.., 32*k] in 0..15)."""
    n_super, width = x.shape
    k = width // 32
    xt = np.ascontiguousarray(x.reshape(n_super * k, 32).T)
    sig = kq.superblock_sum_x2(xt, k) * F32(2.0 / width)
    if qw is None:
        w = xt * xt
    else:
        qwt = np.ascontiguousarray(qw.reshape(n_super * k, 32).T)
        w = qwt * np.sqrt(np.repeat(sig, k)[None, :] + xt * xt)
    scales = kq.iq4_block_search(xt, w, 7)
    xb = x.reshape(n_super, k, 32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if k == 1:
            d16 = scales.astype(np.float16)
            inv = np.where(scales != 0, F32(1) / np.where(scales != 0, scales, F32(1)), F32(0))
            codes = kq.best_index_iq4(xb[:, 0] * inv[:, None])
            return d16, None, codes
        sc2 = scales.reshape(n_super, k)
        imax = np.argmax(np.abs(sc2), axis=1)
        max_scale = sc2[np.arange(n_super), imax]
        d = -max_scale / F32(32)
        d16 = d.astype(np.float16)
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
        l = np.clip(kq.nearest_int(inv[:, None] * sc2), -32, 31)
        dl = d[:, None] * l.astype(F32)
        idl = np.where(dl != 0, F32(1) / np.where(dl != 0, dl, F32(1)), F32(0))
        codes = kq.best_index_iq4(idl[..., None] * xb).reshape(n_super, width)
    return d16, l.astype(np.int8), codes


def _search_mxfp4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 for ``x[nb, 32]`` (``quantize_row_mxfp4_ref``; the imatrix is ignored, as in llama.cpp): the E8M0
    exponent ``floor(log2(max|x|)) - 2 + 127`` and the nearest E2M1 code of each value. (e uint8, codes)."""
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        # log2f as the float64 log2 rounded to float32; only a result rounding up to an integer could change the
        # floor, and glibc's log2f agrees on every float up to 40 ulps below each power of two 2^-120..2^119
        lg = np.log2(amax.astype(np.float64)).astype(F32)
        ef = np.where(amax > 0, np.floor(lg) - F32(2) + F32(127), F32(0))
    e = (ef.astype(np.int64) & 0xFF).astype(np.uint8)
    codes = kq.best_index_mxfp4(x, e8m0_half(e)[:, None])
    return e, codes


def _search_rows(x: np.ndarray, qw: np.ndarray | None, qtype: QT) -> tuple[BlockParams, np.ndarray]:
    """Params and stored codes ([rows, cols] uint8/int8) for a 2-D float32 block of rows."""
    rows, cols = x.shape
    info = _info(qtype)
    nb = cols // info.block_size
    blocks = x.reshape(rows * nb, info.block_size)
    qblocks = None if qw is None else qw.reshape(rows * nb, info.block_size)
    if qtype in _AFFINE:
        d16, dmin16, sc, m, codes = _search_affine_k(blocks, qblocks, qtype)
        params = _make_params(qtype, d16.reshape(rows, nb), dmin16.reshape(rows, nb),
                              sc.reshape(rows, nb * 8), m.reshape(rows, nb * 8))
    elif qtype == QT.Q6_K:
        d16, sc, codes = _search_q6_k(blocks, qblocks)
        params = _make_params(qtype, d16.reshape(rows, nb), sc=sc.reshape(rows, nb * 16))
    elif qtype == QT.Q8_0:
        d16, codes = _search_q8_0(blocks)
        params = _make_params(qtype, d16.reshape(rows, nb))
    elif qtype == QT.Q2_K:
        d16, dmin16, sc, m, codes = _search_q2_k(blocks, qblocks)
        params = _make_params(qtype, d16.reshape(rows, nb), dmin16.reshape(rows, nb),
                              sc.reshape(rows, nb * 16), m.reshape(rows, nb * 16))
    elif qtype == QT.Q3_K:
        d16, sc, codes = _search_q3_k(blocks, qblocks)
        params = _make_params(qtype, d16.reshape(rows, nb), sc=sc.reshape(rows, nb * 16))
    elif qtype in (QT.IQ4_NL, QT.IQ4_XS):
        d16, sc, codes = _search_iq4(blocks, qblocks)
        params = _make_params(qtype, d16.reshape(rows, nb), sc=None if sc is None else sc.reshape(rows, nb * 8))
    elif qtype == QT.MXFP4:
        e, codes = _search_mxfp4(blocks)
        params = _make_params(qtype, e.reshape(rows, nb))
    elif qtype in (QT.Q4_1, QT.Q5_0, QT.Q5_1):
        sigma2 = None if qw is None else np.repeat(_row_sigma2(x), nb)
        d16, m16, codes = _search_legacy(blocks, qblocks, sigma2, qtype)
        params = _make_params(qtype, d16.reshape(rows, nb), None if m16 is None else m16.reshape(rows, nb))
    else:
        sigma2 = None if qw is None else np.repeat(_row_sigma2(x), nb)
        d16, codes = _search_q4_0(blocks, qblocks, sigma2)
        params = _make_params(qtype, d16.reshape(rows, nb))
    return params, codes.reshape(rows, cols)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """``[n, 32]`` codes -> 16 bytes per row: element j in the low nibble of byte j, element j+16 in the high."""
    L = L.astype(np.uint8)
    return (L[:, :16] & np.uint8(0xF)) | ((L[:, 16:] & np.uint8(0xF)) << np.uint8(4))


def _unnibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nibbles` (``[n, 16]`` bytes -> ``[n, 32]`` codes)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _qh32(L: np.ndarray) -> np.ndarray:
    """Fifth bit of the 32 codes of each row as a little-endian uint32 (bit j = element j), as 4 bytes."""
    bits = ((L.astype(np.uint32) >> np.uint32(4)) & np.uint32(1)) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)


def _unqh32(qh: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    return ((v >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _crumbs(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K ``qs[64]`` from the low 2 bits of 256 codes: byte ``32h + l`` holds elements
    ``128h + l + 32k`` at bits ``2k`` (k = 0..3)."""
    L = (L.astype(np.uint8) & np.uint8(3)).reshape(-1, 2, 4, 32)
    out = L[:, :, 0] | (L[:, :, 1] << np.uint8(2)) | (L[:, :, 2] << np.uint8(4)) | (L[:, :, 3] << np.uint8(6))
    return out.reshape(-1, 64)


def _uncrumbs(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32)
    return np.concatenate([(q >> k) & 3 for k in (0, 2, 4, 6)], axis=2).reshape(-1, QK_K)


def _pack_q3_scales(u: np.ndarray) -> np.ndarray:
    """Q3_K ``scales[12]`` from 16 six-bit values ``u`` (= signed scale + 32): low nibbles of u[0..7] and
    u[8..15] share bytes 0-7 (low, high); the top 2 bits of u[j] go to byte ``8 + j%4`` at bit ``2*(j//4)``."""
    u = u.astype(np.uint8)
    low = (u[:, :8] & np.uint8(0xF)) | ((u[:, 8:] & np.uint8(0xF)) << np.uint8(4))
    top = (u >> np.uint8(4)).reshape(-1, 4, 4)  # [n, j//4, j%4]
    high = top[:, 0] | (top[:, 1] << np.uint8(2)) | (top[:, 2] << np.uint8(4)) | (top[:, 3] << np.uint8(6))
    return np.concatenate([low, high], axis=1)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    high = np.concatenate([(b[:, 8:12] >> (2 * q)) & 3 for q in range(4)], axis=1)
    return (low | (high << 4)).astype(np.uint8)


def _pack_stored(params: BlockParams, stored: np.ndarray) -> np.ndarray:
    """Bytes [rows, bytes_per_row] from params' stored fields and stored codes [rows, cols]."""
    qtype = params.qtype
    info = _info(qtype)
    rows = params.rows
    nb = params.d.shape[1]
    n = rows * nb
    L = np.ascontiguousarray(stored).reshape(n, info.block_size)
    if qtype == QT.MXFP4:
        out = np.concatenate([params.d.reshape(n, 1).astype(np.uint8), _nibbles(L)], axis=1)
        return out.reshape(rows, nb * info.type_size)
    d = _f16_bytes(params.d)
    if qtype == QT.Q8_0:
        out = np.concatenate([d, L.astype(np.int8).view(np.uint8)], axis=1)
    elif qtype in (QT.Q4_0, QT.IQ4_NL):
        out = np.concatenate([d, _nibbles(L)], axis=1)
    elif qtype == QT.Q4_1:
        out = np.concatenate([d, _f16_bytes(params.dmin), _nibbles(L)], axis=1)
    elif qtype in (QT.Q5_0, QT.Q5_1):
        parts = [d] if qtype == QT.Q5_0 else [d, _f16_bytes(params.dmin)]
        out = np.concatenate(parts + [_qh32(L), _nibbles(L)], axis=1)
    elif qtype in _AFFINE:
        assert params.dmin is not None and params.sub_scales is not None and params.sub_mins is not None
        L = L.astype(np.uint8).reshape(n, 4, 2, 32)
        low = L & np.uint8(0xF)
        qs = (low[:, :, 0] | (low[:, :, 1] << np.uint8(4))).reshape(n, 128)
        scales = _pack_k_scales(params.sub_scales.reshape(n, 8), params.sub_mins.reshape(n, 8))
        parts = [d, _f16_bytes(params.dmin), scales]
        if qtype == QT.Q5_K:
            hi = (L >> np.uint8(4)).reshape(n, 8, 32)
            qh = np.zeros((n, 32), dtype=np.uint8)
            for k in range(8):
                qh |= hi[:, k] << np.uint8(k)
            parts.append(qh)
        parts.append(qs)
        out = np.concatenate(parts, axis=1)
    elif qtype == QT.Q2_K:
        assert params.dmin is not None and params.sub_scales is not None and params.sub_mins is not None
        scales = (params.sub_scales.reshape(n, 16) & np.uint8(0xF)) | (params.sub_mins.reshape(n, 16) << np.uint8(4))
        out = np.concatenate([scales.astype(np.uint8), _crumbs(L), d, _f16_bytes(params.dmin)], axis=1)
    elif qtype == QT.Q3_K:
        assert params.sub_scales is not None
        L = L.astype(np.uint8)
        hi = ((L >> np.uint8(2)) & np.uint8(1)).reshape(n, 8, 32)  # element 32b + l -> bit b of hmask[l]
        hmask = np.zeros((n, 32), dtype=np.uint8)
        for b in range(8):
            hmask |= hi[:, b] << np.uint8(b)
        u = params.sub_scales.reshape(n, 16).astype(np.int16) + 32
        out = np.concatenate([hmask, _crumbs(L), _pack_q3_scales(u), d], axis=1)
    elif qtype == QT.IQ4_XS:
        assert params.sub_scales is not None
        u = (params.sub_scales.reshape(n, 8).astype(np.int16) + 32).astype(np.uint16)
        scales_h = np.zeros(n, dtype=np.uint16)
        for ib in range(8):
            scales_h |= (u[:, ib] >> np.uint16(4)) << np.uint16(2 * ib)
        lo = (u & np.uint16(0xF)).astype(np.uint8)
        scales_l = lo[:, 0::2] | (lo[:, 1::2] << np.uint8(4))
        qs = _nibbles(L.reshape(n * 8, 32)).reshape(n, 128)
        out = np.concatenate([d, scales_h.astype("<u2").reshape(n, 1).view(np.uint8), scales_l, qs], axis=1)
    else:  # Q6_K
        assert params.sub_scales is not None
        L = L.astype(np.uint8).reshape(n, 2, 4, 32)
        low = L & np.uint8(0xF)
        hi = L >> np.uint8(4)
        ql = (low[:, :, 0:2] | (low[:, :, 2:4] << np.uint8(4))).reshape(n, 128)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << np.uint8(2)) | (hi[:, :, 2] << np.uint8(4))
              | (hi[:, :, 3] << np.uint8(6))).reshape(n, 64)
        scales = params.sub_scales.astype(np.int8).reshape(n, 16).view(np.uint8)
        out = np.concatenate([ql, qh, scales, d], axis=1)
    return out.reshape(rows, nb * info.type_size)


def unpack(packed: np.ndarray, qtype: QT, shape: Sequence[int] | None = None) -> tuple[np.ndarray, BlockParams]:
    """Decode file bytes ``[rows, bytes_per_row]`` (or any ``[..., bytes]``, flattened to rows) into
    (int16 codes ``[rows, cols]``, :class:`BlockParams`). Codes are signed where the type is symmetric
    (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K) and table indices 0..15 for IQ4_NL/IQ4_XS/MXFP4."""
    qtype = QT(qtype)
    info = _info(qtype)
    raw = np.ascontiguousarray(packed).view(np.uint8)
    raw = raw.reshape(-1, raw.shape[-1]) if raw.ndim else raw.reshape(1, -1)
    rows, nbytes = raw.shape
    if nbytes % info.type_size:
        raise ValueError(f"{qtype.name} row of {nbytes} bytes is not a whole number of {info.type_size}-byte blocks")
    nb = nbytes // info.type_size
    if shape is not None and int(np.prod(shape)) != rows * nb * info.block_size:
        raise ValueError(f"shape {tuple(shape)} does not match {rows} rows of {nb} {qtype.name} blocks")
    n = rows * nb
    b = raw.reshape(n, info.type_size)

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(b[:, lo:lo + 2]).view(np.float16).reshape(rows, nb)

    if qtype == QT.Q8_0:
        params = _make_params(qtype, f16(0))
        codes = b[:, 2:].view(np.int8).astype(np.int16)
    elif qtype in (QT.Q4_0, QT.IQ4_NL):
        params = _make_params(qtype, f16(0))
        codes = _unnibbles(b[:, 2:]).astype(np.int16)
    elif qtype == QT.MXFP4:
        params = _make_params(qtype, b[:, 0].reshape(rows, nb))
        codes = _unnibbles(b[:, 1:]).astype(np.int16)
    elif qtype == QT.Q4_1:
        params = _make_params(qtype, f16(0), f16(2))
        codes = _unnibbles(b[:, 4:]).astype(np.int16)
    elif qtype in (QT.Q5_0, QT.Q5_1):
        o = 2 if qtype == QT.Q5_0 else 4
        params = _make_params(qtype, f16(0), None if qtype == QT.Q5_0 else f16(2))
        codes = (_unnibbles(b[:, o + 4:]) | (_unqh32(b[:, o:o + 4]) << 4)).astype(np.int16)
    elif qtype in _AFFINE:
        sc, m = _unpack_k_scales(b[:, 4:16])
        params = _make_params(qtype, f16(0), f16(2), sc.reshape(rows, nb * 8), m.reshape(rows, nb * 8))
        qs = b[:, -128:].reshape(n, 4, 1, 32)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, QK_K).astype(np.int16)
        if qtype == QT.Q5_K:
            qh = b[:, 16:48]
            hi = np.stack([(qh >> k) & 1 for k in range(8)], axis=1).reshape(n, QK_K)
            codes |= hi.astype(np.int16) << 4
    elif qtype == QT.Q2_K:
        sc = b[:, :16]
        params = _make_params(qtype, f16(80), f16(82), (sc & 0xF).reshape(rows, nb * 16), (sc >> 4).reshape(rows, nb * 16))
        codes = _uncrumbs(b[:, 16:80]).astype(np.int16)
    elif qtype == QT.Q3_K:
        hm = b[:, :32]
        hi = np.stack([(hm >> k) & 1 for k in range(8)], axis=1).reshape(n, QK_K)
        codes = (_uncrumbs(b[:, 32:96]) | (hi << 2)).astype(np.int16)
        u = _unpack_q3_scales(b[:, 96:108])
        params = _make_params(qtype, f16(108), sc=(u.astype(np.int16) - 32).astype(np.int8).reshape(rows, nb * 16))
    elif qtype == QT.IQ4_XS:
        sh = np.ascontiguousarray(b[:, 2:4]).view("<u2").reshape(n, 1).astype(np.int32)
        sl = b[:, 4:8].astype(np.int32)
        lo = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(n, 8)
        hi = (sh >> (2 * np.arange(8))) & 3
        sc = ((lo | (hi << 4)) - 32).astype(np.int8)
        params = _make_params(qtype, f16(0), sc=sc.reshape(rows, nb * 8))
        codes = _unnibbles(b[:, 8:].reshape(n * 8, 16)).reshape(n, QK_K).astype(np.int16)
    else:  # Q6_K
        ql = b[:, :128].reshape(n, 2, 1, 64)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(n, 2, 4, 32)
        hi = np.concatenate([(qh >> k) & 3 for k in (0, 2, 4, 6)], axis=2)
        codes = (low.astype(np.int16) | (hi.astype(np.int16) << 4)).reshape(n, QK_K)
        sc = b[:, 192:208].view(np.int8)
        params = _make_params(qtype, f16(208), sc=sc.reshape(rows, nb * 16))
    codes = codes - _OFFSET.get(qtype, 0)
    return codes.reshape(rows, nb * info.block_size).astype(np.int16), params


def pack(codes: Any, params: BlockParams) -> np.ndarray:
    """File bytes ``[rows, bytes_per_row]`` (uint8) for integer ``codes[rows, cols]`` on ``params``' grid."""
    c = _to_numpy(codes).astype(np.int32)
    if c.shape != (params.rows, params.cols):
        raise ValueError(f"codes shape {c.shape} != params grid {(params.rows, params.cols)}")
    lo = -128 if params.qtype == QT.Q8_0 else params.qmin  # the file can hold -128; we never produce it
    if c.size and (c.min() < lo or c.max() > params.qmax):
        raise ValueError(f"{params.qtype.name} codes must lie in [{lo}, {params.qmax}]")
    return _pack_stored(params, c + _OFFSET.get(params.qtype, 0))


# ----------------------------------------------------------------------------------------------
# Public quantize / dequantize
# ----------------------------------------------------------------------------------------------


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor (bf16/f16 are widened: numpy has no bfloat16)
        a = a.detach()
        if a.is_floating_point():
            a = a.float()
        a = a.cpu().numpy()
    return np.asarray(a)


def _prepare(weights: Any, imatrix: Any, block: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """float32 [M, rows, cols] weights, float32 [M or 1, cols] imatrix (validated), original shape."""
    w = _to_numpy(weights)
    if w.ndim == 0:
        raise ValueError("weights must have at least one dimension")
    w = np.ascontiguousarray(w, dtype=F32)
    cols = w.shape[-1]
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the block size {block}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    w3 = w.reshape(-1, w.shape[-2] if w.ndim >= 2 else 1, cols)
    if imatrix is None:
        return w3, None, w.shape
    im = np.ascontiguousarray(_to_numpy(imatrix), dtype=F32)
    if im.shape[-1] != cols:
        raise ValueError(f"imatrix has {im.shape[-1]} entries per matrix, weights have {cols} columns")
    im = im.reshape(-1, cols)
    if im.shape[0] not in (1, w3.shape[0]):
        raise ValueError(f"imatrix shape {im.shape} does not match {w3.shape[0]} matrices")
    if not np.isfinite(im).all() or (im < 0).any():
        raise ValueError("imatrix must be finite and non-negative")
    return w3, im, w.shape


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_chunks(w3: np.ndarray, im: np.ndarray | None, qtype: QT, threads: int | None,
                sink: Callable[[int, int, int, BlockParams, np.ndarray], None]) -> None:
    """Search every (matrix, row range) chunk, in threads; ``sink(m, r0, r1, params, stored)``."""
    n_mat, rows, cols = w3.shape
    rows_per_chunk = max(1, _CHUNK_SUPERBLOCKS * QK_K // cols)
    jobs = [(m, r0, min(rows, r0 + rows_per_chunk)) for m in range(n_mat) for r0 in range(0, rows, rows_per_chunk)]

    def work(job: tuple[int, int, int]) -> None:
        m, r0, r1 = job
        x = w3[m, r0:r1]
        qw = None if im is None else np.broadcast_to(im[m if im.shape[0] > 1 else 0], x.shape)
        with np.errstate(over="ignore"):  # f16 scales of |x| > 65504 overflow to inf, as in llama.cpp
            params, stored = _search_rows(x, qw, qtype)
        sink(m, r0, r1, params, stored)

    n_threads = min(len(jobs), threads or _cpu_count())
    if n_threads <= 1:
        for job in jobs:
            work(job)
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(work, jobs))


def quantize(weights: Any, qtype: QT, imatrix: Any | None = None, *, threads: int | None = None) -> np.ndarray:
    """Quantize float weights ``[..., cols]`` to the bytes llama.cpp stores.

    Returns uint8 ``[..., bytes_per_row]`` for block types; float32 / float16 arrays for F32 / F16 and
    uint8 ``[..., 2*cols]`` for BF16 (what gguf-py hands to ``add_tensor``). ``imatrix``: per-column
    importances ``[cols]`` (or ``[n_matrices, cols]`` for a stack such as ``[experts, rows, cols]``).
    """
    qtype = QT(qtype)
    if qtype in _PASSTHROUGH:
        return _passthrough(weights, qtype)
    info = _info(qtype)
    w3, im, shape = _prepare(weights, imatrix, info.block_size)
    if qtype in _NO_IMATRIX:
        im = None
    n_mat, rows, cols = w3.shape
    out = np.empty((n_mat, rows, bytes_per_row(qtype, cols)), dtype=np.uint8)

    def sink(m: int, r0: int, r1: int, params: BlockParams, stored: np.ndarray) -> None:
        out[m, r0:r1] = _pack_stored(params, stored)

    _run_chunks(w3, im, qtype, threads, sink)
    return out.reshape(*shape[:-1], out.shape[-1])


def _passthrough(weights: Any, qtype: QT) -> np.ndarray:
    w = np.ascontiguousarray(_to_numpy(weights), dtype=F32)
    if qtype == QT.F32:
        return w
    if qtype == QT.F16:
        return w.astype(np.float16)
    n = w.view(np.uint32).astype(np.uint64)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = np.where(nan, (n & 0xFFFF0000) | (64 << 16), n)  # quiet NaNs
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16  # round to nearest even
    return n.astype(np.uint16).view(np.uint8).reshape(*w.shape[:-1], w.shape[-1] * 2)


def dequantize(packed: np.ndarray, qtype: QT, shape: Sequence[int] | None = None) -> np.ndarray:
    """float32 values of file data ``[..., bytes_per_row]`` (reshaped to ``shape`` when given)."""
    qtype = QT(qtype)
    raw = np.ascontiguousarray(packed)
    if qtype == QT.F32:
        out = raw.view(F32)
    elif qtype == QT.F16:
        out = raw.view(np.float16).astype(F32)
    elif qtype == QT.BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(F32)
    else:
        codes, params = unpack(raw, qtype)
        out = dequantize_codes(codes, params)
        out = out.reshape(*raw.shape[:-1], out.shape[-1]) if raw.ndim > 1 else out.reshape(-1)
    return out.reshape(tuple(shape)) if shape is not None else out


# ----------------------------------------------------------------------------------------------
# GPTQ-facing grid API
# ----------------------------------------------------------------------------------------------


def block_params(w: Any, qtype: QT, imatrix: Any | None = None) -> BlockParams:
    """Grid parameters llama.cpp's search picks for ``w[rows, cols]`` (cols a multiple of
    :func:`param_block_cols`); ``imatrix[cols]`` selects the importance-weighted search."""
    qtype = QT(qtype)
    info = _info(qtype)
    w3, im, shape = _prepare(w, imatrix, info.block_size)
    if len(shape) != 2:
        raise ValueError("block_params takes a 2-D [rows, cols] matrix")
    if qtype in _NO_IMATRIX:
        im = None
    parts: dict[int, BlockParams] = {}

    def sink(m: int, r0: int, r1: int, params: BlockParams, stored: np.ndarray) -> None:
        parts[r0] = params

    _run_chunks(w3, im, qtype, None, sink)
    ordered = [parts[k] for k in sorted(parts)]

    def cat(name: str) -> np.ndarray | None:
        arrs = [getattr(p, name) for p in ordered]
        return None if arrs[0] is None else np.concatenate(arrs, axis=0)

    return BlockParams(qtype, *(cat(f) for f in ("scale", "min", "d", "dmin", "sub_scales", "sub_mins")))  # type: ignore[arg-type]


def _group_cols(params: BlockParams, n: int, col_offset: int) -> np.ndarray:
    if col_offset < 0 or col_offset + n > params.cols:
        raise ValueError(f"columns {col_offset}..{col_offset + n - 1} outside the {params.cols} of params")
    return (col_offset + np.arange(n)) // params.group_size


def _grid_columns(params: BlockParams, n: int, col_offset: int, like: Any) -> tuple[Any, Any]:
    g = _group_cols(params, n, col_offset)
    s, m = params.scale[:, g], params.min[:, g]
    if hasattr(like, "detach"):
        import torch

        return torch.from_numpy(s).to(like.device), torch.from_numpy(m).to(like.device)
    return s, m


def _nearest_level(w: Any, params: BlockParams, col_offset: int) -> Any:
    """Table codes of a non-linear type, chosen as llama.cpp's final rounding does (IQ4: ``best_index_int8`` of
    ``w * (1/scale)``, the code of value 1 where ``scale == 0``; MXFP4: ``best_index_mxfp4``)."""
    x = _to_numpy(w).astype(F32)
    s, _ = _grid_columns(params, x.shape[1], col_offset, x)
    if params.qtype == QT.MXFP4:
        q = kq.best_index_mxfp4(x, s)
    else:
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(s != 0, F32(1) / np.where(s != 0, s, F32(1)), F32(0))
        q = kq.best_index_iq4(x * inv)
    out = q.astype(np.int16)
    if hasattr(w, "detach"):
        import torch

        return torch.from_numpy(out).to(w.device)
    return out


def quantize_with_params(w: Any, params: BlockParams, col_offset: int = 0) -> Any:
    """int16 codes for ``w[rows, n]`` (or one column ``w[rows]``) = columns ``col_offset..`` of
    ``params``: round half to even of ``(w + min) / scale``, clamped to ``[qmin, qmax]``; 0 where
    ``scale == 0``. For the non-linear types (IQ4_NL, IQ4_XS, MXFP4) the nearest table entry instead
    (:func:`_nearest_level`). numpy in, numpy out; torch in, torch out (same device)."""
    column = w.ndim == 1
    w2 = w.reshape(-1, 1) if column else w
    if params.qtype in LEVELS:
        out = _nearest_level(w2, params, col_offset)
        return out.reshape(-1) if column else out
    if hasattr(w2, "detach") and col_offset == 0 and w2.shape[1] == params.cols and w2.shape[1] > 1:
        return _whole_rows_codes(w2, params)
    s, m = _grid_columns(params, w2.shape[1], col_offset, w2)
    if hasattr(w2, "detach"):
        import torch

        v = (w2.float() + m) / torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(v), params.qmin, params.qmax)
        out = torch.where(s == 0, torch.zeros_like(q), q).to(torch.int16)
    else:
        v = (np.asarray(w2, dtype=F32) + m) / np.where(s == 0, F32(1), s)
        q = np.clip(np.rint(v), params.qmin, params.qmax)
        out = np.where(s == 0, 0, q).astype(np.int16)
    return out.reshape(-1) if column else out


def _whole_rows_codes(w: Any, params: BlockParams) -> Any:
    """quantize_with_params of whole rows of a torch tensor, the same numbers with each group's scale and min
    broadcast over its columns (the general path gathers them out to [rows, cols] first, and a Scout expert's
    codes took seconds), in place where it can."""
    import torch

    rows, cols = w.shape
    gs = params.group_size
    s = torch.from_numpy(params.scale).to(w.device).unsqueeze(2)  # [rows, groups, 1]
    m = torch.from_numpy(params.min).to(w.device).unsqueeze(2)
    v = w.float().reshape(rows, cols // gs, gs) + m  # a new tensor: w is not changed
    v.div_(torch.where(s == 0, torch.ones_like(s), s)).round_().clamp_(params.qmin, params.qmax)
    v.masked_fill_(s == 0, 0.0)
    return v.to(torch.int16).reshape(rows, cols)


def dequantize_codes(codes: Any, params: BlockParams, col_offset: int = 0) -> Any:
    """Grid values ``scale*q - min`` (float32, numpy or torch like ``codes``) for ``codes[rows, n]``
    (or one column ``codes[rows]``) = columns ``col_offset..`` of ``params``; ``scale*table[q]`` for the
    non-linear types."""
    column = codes.ndim == 1
    c2 = codes.reshape(-1, 1) if column else codes
    s, m = _grid_columns(params, c2.shape[1], col_offset, c2)
    table = LEVELS.get(params.qtype)
    if hasattr(c2, "detach"):
        import torch

        q = c2.float() if table is None else torch.from_numpy(table.astype(F32)).to(c2.device)[c2.long()]
        out = s * q + (-m) if params.qtype in _AFFINE_32 else s * q - m
    else:
        q = np.asarray(c2).astype(F32) if table is None else table.astype(F32)[np.asarray(c2)]
        with np.errstate(invalid="ignore", over="ignore"):
            # Q4_1/Q5_1 store m and decode d*q + m: the same number as d*q - (-m), also for a NaN m's sign bit
            out = s * q + (-m) if params.qtype in _AFFINE_32 else s * q - m
    return out.reshape(-1) if column else out
