"""Quantization schemes as plain data, and the quantized-Linear record every format writer reads.

A scheme says *what* a weight becomes (bits, symmetry, grouping); a grid (grid.py, fp8.py) says *how*
values are rounded; RTN and GPTQ (rtn.py, gptq.py) decide *which* values are rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    import torch

from ..errors import Llama4QuantError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class IntScheme:
    """Integer weights, int4 or int8, one scale (and zero point) per row per group of input columns.

    group_size None or -1 means per-channel (one group spanning all input columns).
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 128

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"int bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, -1 or None, got {self.group_size}")

    @property
    def per_channel(self) -> bool:
        return self.group_size is None or self.group_size == -1

    @property
    def strategy(self) -> Literal["group", "channel"]:
        return "channel" if self.per_channel else "group"

    @property
    def columns_per_group(self) -> int | None:
        """Input columns sharing one scale; None = all of them."""
        return None if self.per_channel else self.group_size

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class FP8Scheme:
    """float8_e4m3fn weights with per-tensor, per-channel or [rows, cols] block scales (scale = amax/448).

    dynamic_activations: the checkpoint also asks the runtime for dynamic fp8 activation quantization
    (per token for tensor/channel, per 128-group for block: the FP8_DYNAMIC / FP8_BLOCK presets).
    """

    strategy: Literal["tensor", "channel", "block"] = "channel"
    block: tuple[int, int] = (128, 128)
    dynamic_activations: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"fp8 strategy must be tensor, channel or block, got {self.strategy}")
        if len(self.block) != 2 or min(self.block) <= 0:
            raise ValueError(f"block must be two positive ints, got {self.block}")


Scheme = Union[IntScheme, FP8Scheme]


@dataclass
class QuantizedLinear:
    """One quantized [out, in] weight: integer (or fp8) codes plus the scales needed to undo them.

    codes: int8 [out, in] holding values in [qmin, qmax] (int schemes), or float8_e4m3fn [out, in].
    scale: float32 holding values exactly representable in the checkpoint's scale dtype:
      int group/channel -> [out, n_groups] / [out, 1]; fp8 tensor -> [1]; channel -> [out, 1];
      block -> [ceil(out/rows), ceil(in/cols)].
    zero_point: int8 [out, n_groups] for asymmetric int schemes, else None.
    dequantized = (codes - zero_point) * scale, broadcast over each group / block.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scheme: Scheme

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        dtype = dtype or torch.float32
        out, cols = self.codes.shape
        x = self.codes.to(torch.float32)
        if isinstance(self.scheme, IntScheme):
            g = self.scheme.columns_per_group or cols
            x = x.view(out, -1, g)
            if self.zero_point is not None:
                x = x - self.zero_point.to(torch.float32).unsqueeze(-1)
            return (x * self.scale.to(torch.float32).unsqueeze(-1)).view(out, cols).to(dtype)
        return (x * expand_fp8_scale(self.scale, self.scheme, out, cols)).to(dtype)


def expand_fp8_scale(scale: torch.Tensor, scheme: FP8Scheme, rows: int, cols: int) -> torch.Tensor:
    """Broadcast a stored fp8 scale to a full [rows, cols] float32 matrix."""
    import torch

    scale = scale.to(torch.float32)
    if scheme.strategy == "tensor":
        return scale.reshape(1, 1).expand(rows, cols)
    if scheme.strategy == "channel":
        return scale.reshape(rows, 1).expand(rows, cols)
    br, bc = scheme.block
    full = scale.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return full[:rows, :cols]


# --scheme presets for safetensors output (compressed-tensors' W4A16, W4A16_ASYM, W8A16, FP8_DYNAMIC, FP8_BLOCK)
SCHEMES = {
    "w4a16": lambda g: IntScheme(4, True, g),
    "w4a16-asym": lambda g: IntScheme(4, False, g),
    "w8a16": lambda g: IntScheme(8, True, g),
    "fp8-dynamic": lambda g: FP8Scheme("channel"),
    "fp8-block": lambda g: FP8Scheme("block"),
}


def make_scheme(name: str, group_size: int | None = 128) -> Scheme:
    if name not in SCHEMES:
        raise Llama4QuantError(f"unknown --scheme {name!r} (choose from {', '.join(SCHEMES)})")
    if group_size is not None and group_size == 0:
        raise Llama4QuantError("--group-size must be positive or -1 (per channel)")
    return SCHEMES[name](group_size)
