"""Regenerate ``golden_llamacpp.npz``: llama.cpp's own quantizer output for small inputs.

Usage: ``python formats/gguf/make_golden.py /path/to/libggml-quants.so``

The library is ``ggml/src/ggml-quants.c`` of a llama.cpp checkout compiled alone as a shared object
(x86-64, no ``-march=native``: ``gcc -O3 -fPIC -shared -I ggml/include -I ggml/src -I ggml/src/ggml-cpu
ggml-quants.c stubs.c -lm``, with ``stubs.c`` providing ``ggml_abort``, ``ggml_row_size``,
``ggml_type_name`` and ``ggml_type_size``). It is a test-time tool only; no C source is kept here.
The file stores the float32 inputs (so the test does not depend on numpy's random streams), the
imatrix, and the bytes ``quantize_<type>(src, dst, rows, cols, imatrix)`` wrote.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

TYPES = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
ROWS, COLS = 4, 512


def cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shape = (ROWS, COLS)
    gauss = rng.standard_normal(shape).astype(np.float32)
    out = {
        "gauss": gauss * np.float32(0.02),
        "student_t3": (rng.standard_t(3, shape) * 0.01).astype(np.float32),
        "bf16_values": (rng.standard_normal(shape).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32),
        "positive": np.abs(rng.standard_normal(shape)).astype(np.float32),
        "negative": -np.abs(rng.standard_normal(shape)).astype(np.float32) - np.float32(0.5),
        "tiny": rng.standard_normal(shape).astype(np.float32) * np.float32(1e-8),
        "huge": rng.standard_normal(shape).astype(np.float32) * np.float32(1e4),
        "constant_rows": np.repeat(np.array([[0.0], [-0.3], [0.7], [1e-3]], np.float32), COLS, axis=1),
    }
    outlier = gauss * np.float32(0.01)
    outlier[1, 77] = 3.0
    outlier[2, 300] = -5.0
    outlier[3] = 0.0
    outlier[3, 5] = 1.0
    out["outlier"] = outlier
    return out


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    rng = np.random.default_rng(20240405)
    data: dict[str, np.ndarray] = {}
    imatrix = (rng.gamma(0.5, 1.0, COLS) + 1e-3).astype(np.float32)
    data["imatrix"] = imatrix
    for name, x in cases(rng).items():
        data[f"x/{name}"] = x
        for tname, (block, size) in TYPES.items():
            fn = getattr(lib, f"quantize_{tname.lower()}" if tname.endswith("_0") else f"quantize_{tname[:2].lower()}_K")
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            for tag, im in (("none", None), ("imatrix", imatrix)):
                dst = np.zeros((ROWS, COLS // block * size), np.uint8)
                fn(x.ctypes.data, dst.ctypes.data, ROWS, COLS, None if im is None else im.ctypes.data)
                data[f"q/{name}/{tname}/{tag}"] = dst
    out = Path(__file__).with_name("golden_llamacpp.npz")
    np.savez_compressed(out, **data)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(data)} arrays)")


if __name__ == "__main__":
    main(sys.argv[1])
