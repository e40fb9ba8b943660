"""GGUF block quantizers: bytes vs llama.cpp (golden vectors) and gguf-py, decoding, grid API."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llama4_quant.formats.gguf import quants as gq
from llama4_quant.formats.gguf.quants import QT

BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
K_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
GOLDEN = Path(__file__).resolve().parents[3] / "formats" / "gguf" / "golden_llamacpp.npz"


def bits(a: np.ndarray) -> np.ndarray:
    """Exact comparison (tells -0.0 from 0.0, NaN payloads)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    rows, cols = 6, 1024
    out = {
        "gauss": rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.02),
        "zeros": np.zeros((rows, cols), np.float32),
        "negative_only": -np.abs(rng.standard_normal((rows, cols))).astype(np.float32) - np.float32(0.1),
        "positive_only": np.abs(rng.standard_normal((rows, cols))).astype(np.float32) + np.float32(0.1),
        "huge_1e4": rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(1e4),
        "tiny_1e-8": rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(1e-8),
        "constant_rows": np.repeat(np.array([[0.0], [1.0], [-1.0], [0.25], [-7e-3], [3e3]], np.float32), cols, 1),
    }
    outlier = np.zeros((rows, cols), np.float32)
    outlier[2, 100] = 1.0
    outlier[4, 900] = -250.0
    outlier[5] = rng.standard_normal(cols).astype(np.float32) * np.float32(1e-3)
    outlier[5, 3] = 40.0
    out["single_outlier"] = outlier
    mixed = rng.standard_normal((rows, cols)).astype(np.float32)
    mixed[:, :32] = 0.0  # an all-zero sub-block next to normal ones
    mixed[:, 256:272] *= np.float32(1e-6)  # one nearly-zero Q6_K sub-block
    mixed[1, 512:768] = 5.0  # a constant super-block
    out["mixed_blocks"] = mixed
    return out


CASES = _cases()


# ------------------------------------------------------------------------------------------------
# Bytes


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden vectors missing")
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_bytes_equal_llamacpp_golden(qtype: QT) -> None:
    golden = np.load(GOLDEN)
    imatrix = golden["imatrix"]
    names = [k[2:] for k in golden.files if k.startswith("x/")]
    assert names
    for name in names:
        x = golden[f"x/{name}"]
        for tag, im in (("none", None), ("imatrix", imatrix)):
            want = golden[f"q/{name}/{qtype.name}/{tag}"]
            got = gq.quantize(x, qtype, im)
            assert got.shape == want.shape and got.dtype == np.uint8
            assert np.array_equal(got, want), f"{qtype.name} {name} {tag}: bytes differ from llama.cpp"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_legacy_bytes_equal_gguf_py(qtype: QT, name: str) -> None:
    x = CASES[name]
    assert np.array_equal(gq.quantize(x, qtype), gguf.quants.quantize(x, qtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_passthrough_equals_gguf_py(qtype: QT) -> None:
    x = CASES["gauss"].copy()
    x[0, :4] = [np.nan, np.inf, -np.inf, 3.0e38]
    ours = gq.quantize(x, qtype)
    ref = gguf.quants.quantize(x, qtype)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint8), ref.view(np.uint8))
    assert np.array_equal(bits(gq.dequantize(ours, qtype)), bits(gguf.quants.dequantize(ref, qtype)))


# ------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_vs_gguf_py(qtype: QT, name: str) -> None:
    x = CASES[name]
    rng = np.random.default_rng(1)
    for im in (None, rng.random(x.shape[1]).astype(np.float32) + np.float32(0.01)):
        packed = gq.quantize(x, qtype, im)
        assert packed.shape == (x.shape[0], gq.bytes_per_row(qtype, x.shape[1]))
        ref = gguf.quants.dequantize(packed, qtype)
        ours = gq.dequantize(packed, qtype)
        assert ours.shape == x.shape
        assert np.array_equal(bits(ours), bits(ref))
        if name == "zeros":
            assert not ours.any()
        span = np.abs(x).max(axis=1, keepdims=True)  # loose sanity bound: no wild values
        assert (np.abs(ours - x) <= span * 0.6 + 1e-6).all()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes_vs_gguf_py(qtype: QT) -> None:
    """Arbitrary bit patterns (any scales, any codes) decode like gguf-py, NaN/Inf included."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (5, gq.bytes_per_row(qtype, 512)), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(bits(gq.dequantize(raw, qtype)), bits(ref))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_unpack_pack_roundtrip_random_bytes(qtype: QT) -> None:
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, (3, gq.bytes_per_row(qtype, 768 if qtype in K_TYPES else 96)), dtype=np.uint8)
    codes, params = gq.unpack(raw, qtype)
    assert np.array_equal(gq.pack(codes, params), raw)


# ------------------------------------------------------------------------------------------------
# Accuracy


def _rmse(x: np.ndarray, qtype: QT, im: np.ndarray | None = None, weight: np.ndarray | None = None) -> float:
    err = gq.dequantize(gq.quantize(x, qtype, im), qtype) - x
    w = np.ones(x.shape[1], np.float32) if weight is None else weight
    return float(np.sqrt(np.mean(w * err.astype(np.float64) ** 2)))


def test_error_ordering_on_gaussian() -> None:
    x = np.random.default_rng(5).standard_normal((32, 2048)).astype(np.float32)
    e = {t: _rmse(x, t) for t in BLOCK_TYPES}
    assert e[QT.Q8_0] < e[QT.Q6_K] < e[QT.Q5_K] < e[QT.Q4_K] < e[QT.Q4_0]
    # Known magnitudes for unit Gaussians (llama.cpp's own quantizers land on the same numbers).
    assert 0.07 < e[QT.Q4_K] < 0.085 and 0.035 < e[QT.Q5_K] < 0.042 and 0.015 < e[QT.Q6_K] < 0.02


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda t: t.name)
def test_imatrix_lowers_weighted_error(qtype: QT) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    im = (rng.gamma(0.3, 1.0, 1024) + 1e-4).astype(np.float32)
    assert _rmse(x, qtype, im, weight=im) < 0.97 * _rmse(x, qtype, None, weight=im)


def test_q8_0_ignores_imatrix() -> None:
    x = CASES["gauss"]
    assert np.array_equal(gq.quantize(x, QT.Q8_0, np.arange(x.shape[1], dtype=np.float32)), gq.quantize(x, QT.Q8_0))


# ------------------------------------------------------------------------------------------------
# Grid API for GPTQ


@pytest.mark.parametrize("name", ["gauss", "mixed_blocks", "single_outlier", "negative_only", "zeros"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_params_codes_pack_roundtrip(qtype: QT, name: str) -> None:
    x = CASES[name]
    im = np.random.default_rng(8).random(x.shape[1]).astype(np.float32)
    for imx in (None, im):
        p = gq.block_params(x, qtype, imx)
        assert p.scale.shape == p.min.shape == (x.shape[0], x.shape[1] // p.group_size)
        assert p.scale.dtype == np.float32
        codes = gq.quantize_with_params(x, p)
        assert codes.dtype == np.int16 and codes.min() >= p.qmin and codes.max() <= p.qmax
        grid = gq.dequantize_codes(codes, p)
        packed = gq.pack(codes, p)
        assert np.array_equal(bits(gguf.quants.dequantize(packed, qtype)), bits(grid))
        if qtype in K_TYPES:  # same search, same rounding as quantize() (zero-scale groups: +-0 may differ)
            assert np.array_equal(grid, gq.dequantize(gq.quantize(x, qtype, imx), qtype))
        # codes are the nearest grid points (up to float rounding at ties)
        alt = np.stack([gq.dequantize_codes(np.clip(codes + k, p.qmin, p.qmax).astype(np.int16), p) for k in (-1, 1)])
        assert (np.abs(grid - x) <= np.abs(alt - x).min(axis=0) * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_whole_rows_codes_on_torch_are_the_numpy_codes(qtype: QT, name: str) -> None:
    """Whole rows on a torch tensor take the broadcast path (what the packer of a GPTQ result calls): the same
    codes as numpy's gathered path, on every case (zero-scale groups, ties: values put exactly on half steps)."""
    x = CASES[name]
    p = gq.block_params(x, qtype)
    g = np.arange(x.shape[1]) // p.group_size
    halves = (np.floor((x + p.min[:, g]) / np.where(p.scale[:, g] == 0, 1, p.scale[:, g])) + 0.5)
    ties = (halves * p.scale[:, g] - p.min[:, g]).astype(np.float32)
    for w in (x, ties):
        want = gq.quantize_with_params(w, p)
        got = gq.quantize_with_params(torch.from_numpy(w), p)
        assert got.dtype == torch.int16 and np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_params_are_the_file_grid(qtype: QT) -> None:
    """Every code in [qmin, qmax] decodes from the packed file to scale*q - min."""
    x = CASES["gauss"][:2, :512]
    p = gq.block_params(x, qtype)
    for q in range(p.qmin, p.qmax + 1):
        codes = np.full(x.shape, q, np.int16)
        got = gguf.quants.dequantize(gq.pack(codes, p), qtype)
        g = np.repeat(np.arange(x.shape[1] // p.group_size), p.group_size)
        want = (p.scale[:, g] * np.float32(q) - p.min[:, g]).astype(np.float32)
        assert np.array_equal(bits(got), bits(want))
    if qtype in (QT.Q4_K, QT.Q5_K):
        assert p.sub_scales.max() <= 63 and p.sub_mins.max() <= 63
        d = np.repeat(p.d.astype(np.float32), 8, axis=1)
        assert np.array_equal(bits(p.scale), bits(d * p.sub_scales.astype(np.float32)))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_column_by_column_gptq_flow(qtype: QT) -> None:
    """Params per param block from partially updated weights, codes column by column, concat, pack."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((8, 1024)).astype(np.float32)
    nb = gq.param_block_cols(qtype)
    parts, codes = [], np.zeros(w.shape, np.int16)
    for c0 in range(0, w.shape[1], nb):
        w[:, c0:] += np.float32(0.01) * rng.standard_normal((8, w.shape[1] - c0)).astype(np.float32)
        p = gq.block_params(w[:, c0:c0 + nb], qtype)
        for j in range(nb):
            codes[:, c0 + j] = gq.quantize_with_params(w[:, c0 + j], p, col_offset=j)
        assert np.array_equal(codes[:, c0:c0 + nb], gq.quantize_with_params(w[:, c0:c0 + nb], p))
        parts.append(p)
    full = gq.concat_params(parts)
    assert full.cols == w.shape[1] and full.rows == w.shape[0]
    packed = gq.pack(codes, full)
    assert np.array_equal(bits(gq.dequantize(packed, qtype)), bits(gq.dequantize_codes(codes, full)))
    # one column of grid values, as GPTQ needs for its error feedback
    col = gq.dequantize_codes(codes[:, 300], full, col_offset=300)
    assert np.array_equal(bits(col), bits(gq.dequantize_codes(codes, full)[:, 300]))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_torch_inputs_match_numpy(qtype: QT) -> None:
    x = CASES["gauss"][:, :512]
    xb = torch.from_numpy(x).to(torch.bfloat16)
    p = gq.block_params(xb, qtype)
    p_np = gq.block_params(xb.float().numpy(), qtype)
    assert np.array_equal(bits(p.scale), bits(p_np.scale)) and np.array_equal(bits(p.min), bits(p_np.min))
    xt = torch.from_numpy(x)
    codes_t = gq.quantize_with_params(xt[:, 64:96], p, col_offset=64)
    assert isinstance(codes_t, torch.Tensor) and codes_t.dtype == torch.int16
    assert np.array_equal(codes_t.numpy(), gq.quantize_with_params(x[:, 64:96], p, col_offset=64))
    vals_t = gq.dequantize_codes(codes_t, p, col_offset=64)
    assert np.array_equal(bits(vals_t.numpy()), bits(gq.dequantize_codes(codes_t.numpy(), p, col_offset=64)))


def test_pack_rejects_out_of_range_codes() -> None:
    x = CASES["gauss"][:, :256]
    p = gq.block_params(x, QT.Q4_K)
    codes = gq.quantize_with_params(x, p)
    codes[0, 0] = 16
    with pytest.raises(ValueError):
        gq.pack(codes, p)


# ------------------------------------------------------------------------------------------------
# Shapes, stacks, validation, GGUF writer


def test_expert_stack_with_per_expert_imatrix() -> None:
    rng = np.random.default_rng(10)
    w = rng.standard_normal((3, 4, 512)).astype(np.float32)
    im = rng.random((3, 512)).astype(np.float32)
    packed = gq.quantize(w, QT.Q4_K, im)
    assert packed.shape == (3, 4, 2 * 144)
    for e in range(3):
        assert np.array_equal(packed[e], gq.quantize(w[e], QT.Q4_K, im[e]))
    assert gq.dequantize(packed, QT.Q4_K).shape == w.shape


def test_threads_do_not_change_bytes() -> None:
    x = np.random.default_rng(11).standard_normal((300, 512)).astype(np.float32)
    assert np.array_equal(gq.quantize(x, QT.Q5_K, threads=1), gq.quantize(x, QT.Q5_K, threads=3))


@pytest.mark.parametrize(
    "bad",
    [
        lambda: gq.quantize(np.zeros((2, 100), np.float32), QT.Q4_K),
        lambda: gq.quantize(np.full((2, 256), np.nan, np.float32), QT.Q6_K),
        lambda: gq.quantize(np.zeros((2, 256), np.float32), QT.Q4_K, np.ones(128, np.float32)),
        lambda: gq.quantize(np.zeros((2, 256), np.float32), QT.Q4_K, -np.ones(256, np.float32)),
        lambda: gq.quantize(np.zeros((2, 256), np.float32), QT.IQ2_XXS),  # no quantizer here
        lambda: gq.block_params(np.zeros((2, 2, 256), np.float32), QT.Q4_K),
    ],
)
def test_validation(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_gguf_writer_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama4")
    tensors = {}
    for qtype in BLOCK_TYPES + [QT.BF16]:
        x = rng.standard_normal((4, 512)).astype(np.float32)
        data = gq.quantize(x, qtype)
        tensors[f"t_{qtype.name}"] = (qtype, data)
        writer.add_tensor(f"t_{qtype.name}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        qtype, data = tensors[t.name]
        assert t.tensor_type == qtype
        assert [int(n) for n in t.shape[::-1]] == [4, 512]
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(data.shape), data.view(np.uint8))
