"""Two whole-tensor passes every checkpoint read makes, as compiled loops: the NaN/Inf count and the transpose.

torch's CPU ``isfinite`` and its transposing copy of bf16 are slow (for one Scout expert matrix, 8192 x 5120:
about 440 ms and 620 ms on two cores, against 3 ms and 150 ms here), and the HF layout stores experts
transposed ([E, in, out]), so each expert matrix read pays both. The loops work on the bits (a float is not
finite when its exponent bits are all ones), so they serve bf16, f16 and f32 alike; other dtypes and
non-CPU tensors take torch's path.
"""

from __future__ import annotations

import numba as nb
import torch

# dtype -> (integer view, exponent mask)
_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}


@nb.njit(nogil=True, cache=True)
def _count_exponent_all_ones(flat, mask):
    bad = 0
    for i in range(flat.size):
        if (flat[i] & mask) == mask:
            bad += 1
    return bad


@nb.njit(nogil=True, cache=True)
def _transpose_into(a, out):
    rows, cols = a.shape
    tile = 64
    for r0 in range(0, rows, tile):
        r1 = min(rows, r0 + tile)
        for c0 in range(0, cols, tile):
            for c in range(c0, min(cols, c0 + tile)):
                for r in range(r0, r1):
                    out[c, r] = a[r, c]


def _fast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _BITS and t.numel() >= 1 << 16


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf values of a floating tensor."""
    if not t.is_floating_point():
        return 0
    if not _fast(t) or not t.is_contiguous():
        return int((~torch.isfinite(t)).sum())
    view, mask = _BITS[t.dtype]
    return int(_count_exponent_all_ones(t.view(view).numpy().reshape(-1), mask))


def transposed(t: torch.Tensor) -> torch.Tensor:
    """``t.t().contiguous()`` of a 2-D tensor (t may be any strided view)."""
    if t.dim() != 2 or not _fast(t):
        return t.t().contiguous()
    view, _ = _BITS[t.dtype]
    out = torch.empty((t.shape[1], t.shape[0]), dtype=t.dtype)
    _transpose_into(t.view(view).numpy(), out.view(view).numpy())
    return out
