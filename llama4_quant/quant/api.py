"""One call from a float weight (and maybe a Hessian) to a QuantizedLinear plus its record."""

from __future__ import annotations

import torch

from .fp8 import FP8Grid
from .gptq import GPTQConfig, gptq
from .grid import IntGrid
from .rtn import QuantRecord, rtn
from .scheme import FP8Scheme, IntScheme, QuantizedLinear, Scheme


def default_scale_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype compressed-tensors stores scales in: the weight's, if it is a float16/32 type."""
    if weight.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return weight.dtype
    return torch.float16


def make_grid(
    scheme: Scheme,
    scale_dtype: torch.dtype = torch.bfloat16,
    mse: bool = False,
) -> IntGrid | FP8Grid:
    if isinstance(scheme, IntScheme):
        return IntGrid(scheme, scale_dtype, mse=mse)
    if isinstance(scheme, FP8Scheme):
        if mse:
            raise ValueError("MSE clipping is only implemented for int schemes")
        return FP8Grid(scheme, scale_dtype)
    raise TypeError(f"unknown scheme {scheme!r}")


@torch.no_grad()
def quantize_linear(
    weight: torch.Tensor,
    scheme: Scheme,
    *,
    hessian: torch.Tensor | None = None,
    n_tokens: int | None = None,
    method: str = "gptq",
    gptq_config: GPTQConfig = GPTQConfig(),
    mse: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> tuple[QuantizedLinear, QuantRecord]:
    """Quantize a Linear weight [out, in] with GPTQ (when a Hessian is given) or RTN.

    method "gptq" without a Hessian, or with an empty one, gives RTN and says so in the record.
    mse: MSE-optimal clipping search in the int grid (weighted by diag(H) when there is one).
    scale_dtype: dtype the checkpoint stores scales in; default: the weight's dtype.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    grid = make_grid(scheme, scale_dtype or default_scale_dtype(weight), mse)
    if method == "gptq" and hessian is not None:
        result = gptq(weight, hessian, grid, gptq_config, n_tokens)
    else:
        reason = "no Hessian given" if method == "gptq" else ""
        importance = hessian.diagonal() if (hessian is not None and mse) else None
        result = rtn(weight, grid, importance=importance, hessian=hessian, reason=reason)
        result.record.n_tokens = n_tokens
    return result.finalize(grid), result.record
