"""Quantization algorithms: schemes, grids (int, fp8), RTN, GPTQ and the streaming Hessian."""

from .api import default_scale_dtype, make_grid, quantize_linear
from .fp8 import FP8Grid, FP8Params
from .gptq import GPTQConfig, gptq
from .grid import Grid, IntGrid, IntParams
from .hessian import ExpertHessians, HessianAccumulator
from .rtn import QuantRecord, QuantResult, rtn
from .scheme import FP8Scheme, IntScheme, QuantizedLinear, Scheme

__all__ = [
    "ExpertHessians",
    "FP8Grid",
    "FP8Params",
    "FP8Scheme",
    "GPTQConfig",
    "Grid",
    "HessianAccumulator",
    "IntGrid",
    "IntParams",
    "IntScheme",
    "QuantRecord",
    "QuantResult",
    "QuantizedLinear",
    "Scheme",
    "default_scale_dtype",
    "gptq",
    "make_grid",
    "quantize_linear",
    "rtn",
]
