"""Regenerate the golden vectors: llama.cpp's own quantizer output for small inputs.

Usage: ``python formats/gguf/make_golden.py /path/to/libggml-quants.so``

Writes ``golden_llamacpp.npz`` (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K; left untouched when its contents would not
change) and ``golden_llamacpp_lowbit.npz`` (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, IQ4_NL, IQ4_XS, MXFP4: the same inputs
plus cases aimed at these types' searches, and a second imatrix with zero entries).

The library is ``ggml/src/ggml-quants.c`` of a llama.cpp checkout (here: the one vendored in llama-cpp-python
0.3.36, see scripts/build_llamacpp.sh) compiled alone as a shared object the way the release build compiles
ggml-base (x86-64, no ``-march=native``, no FMA: ``gcc -O3 -DNDEBUG -fPIC -shared -I ggml/include -I ggml/src
-I ggml/src/ggml-cpu ggml-quants.c stubs.c -lm``), with ``stubs.c`` providing ``ggml_abort``,
``ggml_row_size``, ``ggml_type_name`` and ``ggml_type_size`` (the row sizes of the types above). It is a
test-time tool only; no C source is kept here. Each file stores the float32 inputs (so the tests do not depend
on numpy's random streams), the imatrix, and the bytes ``quantize_<type>(src, dst, rows, cols, imatrix)``
wrote, which is the call ``llama-quantize`` makes (``ggml_quantize_chunk``).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

TYPES = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
LOWBIT_TYPES = {"Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110),
                "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "MXFP4": (32, 17)}
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


def lowbit_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs that reach the corners of the Q2_K/Q3_K/IQ4/MXFP4 searches (ties, zero and constant groups)."""
    shape = (ROWS, COLS)
    g = rng.standard_normal(shape).astype(np.float32)
    out = {
        # values on a coarse grid: many exact ties between candidate codes and scales
        "eighth_steps": (np.round(g * 8) / np.float32(8) * np.float32(0.01)).astype(np.float32),
        "signed_zeros": np.where(rng.random(shape) < 0.5, np.float32(0), g * np.float32(0.02)).astype(np.float32),
        "bf16_weights": ((g * np.float32(0.003)).view(np.uint32) & 0xFFFF0000).view(np.float32),
    }
    out["signed_zeros"][rng.random(shape) < 0.2] = np.float32(-0.0)
    z = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    z[:, 0:16] = 0.0  # a zero Q2_K/Q3_K group
    z[:, 32:64] = 0.0  # a zero 32-block
    z[:, 64:80] = np.float32(1e-17)  # below GROUP_MAX_EPS
    z[:, 96:112] = np.float32(-0.25)  # a constant negative group
    z[:, 128:160] = np.float32(0.5)  # a constant positive block
    z[2, 256:512] = 0.0  # a zero super-block
    out["zero_groups"] = z
    # MXFP4: values on the E2M1 midpoints of a block's scale (ties between neighbouring codes)
    e = np.float32(2.0) ** rng.integers(-8, 2, size=(ROWS, COLS // 32, 1)).astype(np.float32)
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32)  # 6.0 sets the block's max
    pick = mids[rng.integers(0, 8, size=(ROWS, COLS // 32, 32))] * np.where(rng.random((ROWS, COLS // 32, 32)) < 0.5, -1, 1)
    pick[..., 0] = 6.0
    out["e2m1_midpoints"] = (pick * e).reshape(shape).astype(np.float32)
    return out


def _quantize(lib: ctypes.CDLL, tname: str, block: int, size: int, x: np.ndarray, im: np.ndarray | None) -> np.ndarray:
    low = tname.lower()
    fn = getattr(lib, f"quantize_{low[:2]}_K" if low.endswith("_k") else f"quantize_{low}")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    dst = np.zeros((ROWS, COLS // block * size), np.uint8)
    fn(x.ctypes.data, dst.ctypes.data, ROWS, COLS, None if im is None else im.ctypes.data)
    return dst


def _save(name: str, data: dict[str, np.ndarray]) -> None:
    out = Path(__file__).with_name(name)
    if out.exists():
        old = np.load(out)
        if set(old.files) == set(data) and all(np.array_equal(old[k], v) for k, v in data.items()):
            print(f"{out}: unchanged")
            return
    np.savez_compressed(out, **data)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(data)} arrays)")


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    rng = np.random.default_rng(20240405)
    data: dict[str, np.ndarray] = {}
    imatrix = (rng.gamma(0.5, 1.0, COLS) + 1e-3).astype(np.float32)
    data["imatrix"] = imatrix
    base = cases(rng)
    for name, x in base.items():
        data[f"x/{name}"] = x
        for tname, (block, size) in TYPES.items():
            for tag, im in (("none", None), ("imatrix", imatrix)):
                data[f"q/{name}/{tname}/{tag}"] = _quantize(lib, tname, block, size, x, im)
    _save("golden_llamacpp.npz", data)

    rng = np.random.default_rng(20250101)
    imatrix0 = rng.gamma(0.3, 1.0, COLS).astype(np.float32)
    imatrix0[rng.random(COLS) < 0.3] = 0.0  # columns no calibration token reached
    low: dict[str, np.ndarray] = {"imatrix": imatrix, "imatrix0": imatrix0}
    for name, x in {**base, **lowbit_cases(rng)}.items():
        low[f"x/{name}"] = x
        for tname, (block, size) in LOWBIT_TYPES.items():
            for tag, im in (("none", None), ("imatrix", imatrix), ("imatrix0", imatrix0)):
                low[f"q/{name}/{tname}/{tag}"] = _quantize(lib, tname, block, size, x, im)
    _save("golden_llamacpp_lowbit.npz", low)


if __name__ == "__main__":
    main(sys.argv[1])
