"""float8_e4m3fn grid: per-tensor, per-channel or 128x128-block scales, scale = amax / 448.

Values are divided by the (stored, rounded) scale, clamped to +-448 so that nothing overflows to
NaN, and cast to float8_e4m3fn (round to nearest even), as compressed-tensors does.
As a `Grid` (see grid.py) it plugs into RTN and GPTQ: group_size is the block width for block
scales and None (whole rows) otherwise; a per-tensor scale is fitted on the whole matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .grid import group_slices, round_scale
from .scheme import FP8_MAX, FP8Scheme, QuantizedLinear


@dataclass
class FP8Params:
    """scale: stored form for this group ([1] tensor, [out, 1] channel, [row_blocks] block);
    row_scale: the same broadcast to one value per row, [out, 1] float32."""

    scale: torch.Tensor
    row_scale: torch.Tensor


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """Saturate to +-448 and round to the nearest float8_e4m3fn value (returned as float32)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


class FP8Grid:
    def __init__(self, scheme: FP8Scheme, scale_dtype: torch.dtype = torch.bfloat16) -> None:
        self.scheme = scheme
        self.scale_dtype = scale_dtype

    @property
    def group_size(self) -> int | None:
        return self.scheme.block[1] if self.scheme.strategy == "block" else None

    @property
    def rows_independent(self) -> bool:  # per-tensor and 128 x 128 block scales span rows
        return self.scheme.strategy == "channel"

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> FP8Params:
        w = w.to(torch.float32).abs()
        rows = w.shape[0]
        strategy = self.scheme.strategy
        if strategy == "tensor":
            scale = round_scale(w.amax().reshape(1) / FP8_MAX, self.scale_dtype)
            return FP8Params(scale, scale.reshape(1, 1).expand(rows, 1))
        if strategy == "channel":
            scale = round_scale(w.amax(dim=1, keepdim=True) / FP8_MAX, self.scale_dtype)
            return FP8Params(scale, scale)
        br = self.scheme.block[0]
        n_blocks = math.ceil(rows / br)
        padded = torch.nn.functional.pad(w, (0, 0, 0, n_blocks * br - rows))
        amax = padded.view(n_blocks, br, -1).amax(dim=(1, 2))
        scale = round_scale(amax / FP8_MAX, self.scale_dtype)
        return FP8Params(scale, scale.repeat_interleave(br)[:rows].unsqueeze(1))

    def codes(self, w: torch.Tensor, params: FP8Params) -> torch.Tensor:
        """float8_e4m3fn codes of w (already divided by the scale, saturated)."""
        return (w.to(torch.float32) / params.row_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def column_params(self, params: FP8Params, offset: int) -> FP8Params:
        """Params that round one column at `offset` of the group with offset 0 (batched act-order GPTQ): the same."""
        return params

    def quantize(self, w: torch.Tensor, params: FP8Params, offset: int = 0) -> torch.Tensor:
        return fp8_round(w.to(torch.float32) / params.row_scale) * params.row_scale

    def finalize(self, weight: torch.Tensor, params: Sequence[FP8Params]) -> QuantizedLinear:
        sl = group_slices(weight.shape[1], self.group_size)
        if len(sl) != len(params):
            raise ValueError(f"expected {len(sl)} group params, got {len(params)}")
        codes = torch.cat([self.codes(weight[:, s], p) for s, p in zip(sl, params)], dim=1)
        if self.scheme.strategy == "block":
            scale = torch.stack([p.scale for p in params], dim=1)  # [row_blocks, col_blocks]
        else:
            scale = params[0].scale
        return QuantizedLinear(codes, scale, None, self.scheme)
