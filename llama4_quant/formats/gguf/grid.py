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
"""

from __future__ import annotations

import numpy as np
import torch

from . import quants as gq
from .quants import QT

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


class BlockGrid:
    """Grid of one GGML block type for `quant.gptq.gptq` / `quant.rtn.rtn`."""

    def __init__(self, qtype: QT, use_importance: bool = True):
        qtype = QT(qtype)
        if qtype not in GRID_TYPES:
            raise ValueError(f"no GPTQ grid for {qtype.name}")
        self.qtype = qtype
        self.use_importance = use_importance
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

    def quantize(self, w: torch.Tensor, params: FittedBlock, offset: int = 0) -> torch.Tensor:
        """Columns `offset..` of the group onto its grid: the float32 ops of `gguf_quants.quantize_with_params`
        + `dequantize_codes` (round half to even of (w + min) / scale, clamped; 0 where scale == 0; the nearest
        table entry for IQ4_NL/IQ4_XS/MXFP4)."""
        k = w.shape[1]
        g0, g1 = offset // self._sub, (offset + k - 1) // self._sub
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

    def quantize(self, w: torch.Tensor, params: FixedParams, offset: int = 0) -> torch.Tensor:
        return params.values[:, offset:offset + w.shape[1]].to(w.device)


def grid_for_type(qtype: QT, use_importance: bool = True):
    qtype = QT(qtype)
    return BlockGrid(qtype, use_importance) if qtype in GRID_TYPES else RefGrid(qtype)


def pack_result(weight: torch.Tensor, params: list) -> np.ndarray:
    """File bytes [rows, bytes_per_row] of a weight whose every group lies on `params` (column order)."""
    if params and isinstance(params[0], FixedParams):
        parts = [np.asarray(p.packed).reshape(p.values.shape[0], -1).view(np.uint8) for p in params]
        return np.ascontiguousarray(np.concatenate(parts, axis=1))
    p = gq.concat_params([x.params if isinstance(x, FittedBlock) else x for x in params])
    codes = gq.quantize_with_params(weight.detach().float().cpu(), p)
    return gq.pack(codes, p)
