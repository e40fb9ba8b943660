"""The lower-bit GGUF types (Q2_K, Q3_K, IQ4_NL, IQ4_XS, MXFP4) and the legacy Q4_1/Q5_0/Q5_1: bytes vs llama.cpp's
own quantizers (golden vectors), decoding vs gguf-py, the grid API, and the mix rules of the schemes that use them.
The end-to-end comparison with `llama-quantize` is in test_new_types_llamacpp.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llama4_quant.formats.gguf import quants as gq
from llama4_quant.formats.gguf.mix import (
    BASE,
    FILE_TYPE,
    SCHEMES,
    fit_type,
    tensor_type,
)
from llama4_quant.formats.gguf.quants import QT

NEW_TYPES = [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS, QT.MXFP4]
LINEAR = [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K]
SUPER = (QT.Q2_K, QT.Q3_K, QT.IQ4_XS)
GOLDEN = Path(__file__).resolve().parents[3] / "formats" / "gguf" / "golden_llamacpp_lowbit.npz"


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    rows, cols = 5, 768
    g = rng.standard_normal((rows, cols)).astype(np.float32)
    mixed = g.copy()
    mixed[:, :16] = 0.0
    mixed[:, 32:48] = np.float32(1e-20)
    mixed[1, 256:512] = 3.0
    mixed[2, 512:] = -0.0
    return {
        "gauss": g * np.float32(0.02),
        "zeros": np.zeros((rows, cols), np.float32),
        "bf16": ((g * np.float32(0.01)).view(np.uint32) & 0xFFFF0000).view(np.float32),
        "huge": g * np.float32(3e4),
        "positive": np.abs(g) + np.float32(0.1),
        "mixed": mixed,
    }


CASES = _cases()


# ------------------------------------------------------------------------------------------------
# Bytes


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden vectors missing")
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_bytes_equal_llamacpp_golden(qtype: QT) -> None:
    """quantize_<type>(src, dst, rows, cols, imatrix) of llama.cpp's ggml-quants.c, byte for byte, with no imatrix
    (the reference quantizers llama-quantize uses then), an imatrix, and an imatrix with zero entries."""
    golden = np.load(GOLDEN)
    names = [k[2:] for k in golden.files if k.startswith("x/")]
    assert len(names) >= 13
    for name in names:
        x = golden[f"x/{name}"]
        for tag in ("none", "imatrix", "imatrix0"):
            want = golden[f"q/{name}/{qtype.name}/{tag}"]
            got = gq.quantize(x, qtype, None if tag == "none" else golden[tag])
            assert got.shape == want.shape and got.dtype == np.uint8
            assert np.array_equal(got, want), f"{qtype.name} {name} {tag}: bytes differ from llama.cpp"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.MXFP4], ids=lambda t: t.name)
def test_reference_bytes_equal_gguf_py(qtype: QT, name: str) -> None:
    """gguf-py's quantizers are ports of the same reference code (no imatrix)."""
    x = CASES[name]
    with np.errstate(over="ignore"):
        assert np.array_equal(gq.quantize(x, qtype), gguf.quants.quantize(x, qtype))


def test_imatrix_ignored_by_mxfp4() -> None:
    x = CASES["gauss"]
    assert np.array_equal(gq.quantize(x, QT.MXFP4, np.arange(x.shape[1], dtype=np.float32)), gq.quantize(x, QT.MXFP4))


# ------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_vs_gguf_py(qtype: QT, name: str) -> None:
    x = CASES[name]
    im = np.random.default_rng(1).random(x.shape[1]).astype(np.float32) + np.float32(0.01)
    for imx in (None, im):
        packed = gq.quantize(x, qtype, imx)
        assert packed.shape == (x.shape[0], gq.bytes_per_row(qtype, x.shape[1]))
        with np.errstate(invalid="ignore", over="ignore"):
            ref = gguf.quants.dequantize(packed, qtype)
            ours = gq.dequantize(packed, qtype)
        assert ours.shape == x.shape
        assert np.array_equal(bits(ours), bits(ref))
        if name == "zeros":
            assert not ours.any()
        if name not in ("huge",):  # f16 scales overflow there
            span = np.abs(x).max(axis=1, keepdims=True)
            assert (np.abs(ours - x) <= span * 0.75 + 1e-6).all()


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_random_bytes_decode_like_gguf_py_and_repack_identically(qtype: QT) -> None:
    """Every byte pattern is a valid encoding: decode = gguf-py's, and unpack -> pack is the identity."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (4, gq.bytes_per_row(qtype, 512)), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, qtype)
        assert np.array_equal(bits(gq.dequantize(raw, qtype)), bits(ref))
    codes, params = gq.unpack(raw, qtype)
    assert codes.min() >= params.qmin and codes.max() <= params.qmax
    assert np.array_equal(gq.pack(codes, params), raw)


def _rmse(x: np.ndarray, qtype: QT, im: np.ndarray | None = None, weight: np.ndarray | None = None) -> float:
    err = gq.dequantize(gq.quantize(x, qtype, im), qtype) - x
    w = np.ones(x.shape[1], np.float32) if weight is None else weight
    return float(np.sqrt(np.mean(w * err.astype(np.float64) ** 2)))


def test_error_ordering_on_gaussian() -> None:
    x = np.random.default_rng(5).standard_normal((32, 2048)).astype(np.float32)
    e = {t: _rmse(x, t) for t in NEW_TYPES + [QT.Q4_K, QT.Q4_0]}
    assert e[QT.Q5_1] < e[QT.Q5_0] < e[QT.IQ4_XS] < e[QT.Q3_K] < e[QT.Q2_K]
    assert e[QT.IQ4_NL] < e[QT.Q4_0] and e[QT.IQ4_XS] < e[QT.Q4_0] and e[QT.Q4_1] < e[QT.Q4_0]
    assert e[QT.Q4_K] < e[QT.Q3_K] and e[QT.MXFP4] < e[QT.Q3_K]


@pytest.mark.parametrize("qtype", [t for t in NEW_TYPES if t != QT.MXFP4], ids=lambda t: t.name)
def test_imatrix_lowers_weighted_error(qtype: QT) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    im = (rng.gamma(0.3, 1.0, 1024) + 1e-4).astype(np.float32)
    assert _rmse(x, qtype, im, weight=im) < 0.97 * _rmse(x, qtype, None, weight=im)


# ------------------------------------------------------------------------------------------------
# Grid API


@pytest.mark.parametrize("name", ["gauss", "mixed", "positive", "zeros"])
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_params_codes_pack_roundtrip(qtype: QT, name: str) -> None:
    x = CASES[name]
    im = np.random.default_rng(8).random(x.shape[1]).astype(np.float32)
    for imx in (None, im):
        p = gq.block_params(x, qtype, imx)
        assert p.scale.shape == p.min.shape == (x.shape[0], x.shape[1] // p.group_size)
        codes = gq.quantize_with_params(x, p)
        assert codes.dtype == np.int16 and codes.min() >= p.qmin and codes.max() <= p.qmax
        grid = gq.dequantize_codes(codes, p)
        packed = gq.pack(codes, p)
        assert np.array_equal(bits(gguf.quants.dequantize(packed, qtype)), bits(grid))
        ref = gq.dequantize(gq.quantize(x, qtype, imx), qtype)
        if qtype in (QT.Q2_K, QT.Q3_K):  # same search, same final rounding on the stored grid as quantize()
            assert np.array_equal(grid, ref)
        else:  # llama.cpp rounds with the unrounded (f32) scale: a near-tie may land one code away
            assert np.mean(grid == ref) > 0.98
        # params come from the same search: the stored fields equal the file's
        _, p_file = gq.unpack(gq.quantize(x, qtype, imx), qtype)
        assert np.array_equal(bits(p.scale), bits(p_file.scale)) and np.array_equal(bits(p.min), bits(p_file.min))


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_params_are_the_file_grid(qtype: QT) -> None:
    """Every code decodes from the packed file to scale*q - min (scale*table[q] for the non-linear types)."""
    x = CASES["gauss"][:2, :512]
    p = gq.block_params(x, qtype)
    table = gq.LEVELS.get(qtype)
    g = np.repeat(np.arange(x.shape[1] // p.group_size), p.group_size)
    for q in range(p.qmin, p.qmax + 1):
        codes = np.full(x.shape, q, np.int16)
        got = gguf.quants.dequantize(gq.pack(codes, p), qtype)
        v = np.float32(q) if table is None else np.float32(table[q])
        want = (p.scale[:, g] * v - p.min[:, g]).astype(np.float32)
        assert np.array_equal(bits(got), bits(want))


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_column_by_column_flow_and_torch(qtype: QT) -> None:
    """What GPTQ does: params per param block, codes column by column (numpy and torch agree), concat, pack."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((6, 512)).astype(np.float32)
    nb = gq.param_block_cols(qtype)
    parts, codes = [], np.zeros(w.shape, np.int16)
    for c0 in range(0, w.shape[1], nb):
        p = gq.block_params(w[:, c0:c0 + nb], qtype)
        for j in range(0, nb, 7):
            codes[:, c0 + j] = gq.quantize_with_params(w[:, c0 + j], p, col_offset=j)
        block = gq.quantize_with_params(w[:, c0:c0 + nb], p)
        assert np.array_equal(codes[:, c0:c0 + nb:7], block[:, ::7])
        tblock = gq.quantize_with_params(torch.from_numpy(w[:, c0:c0 + nb]), p)
        assert isinstance(tblock, torch.Tensor) and np.array_equal(tblock.numpy(), block)
        tv = gq.dequantize_codes(tblock, p)
        assert np.array_equal(bits(tv.numpy()), bits(gq.dequantize_codes(block, p)))
        codes[:, c0:c0 + nb] = block
        parts.append(p)
    full = gq.concat_params(parts)
    packed = gq.pack(codes, full)
    assert np.array_equal(bits(gq.dequantize(packed, qtype)), bits(gq.dequantize_codes(codes, full)))


def test_pack_rejects_out_of_range_codes() -> None:
    p = gq.block_params(CASES["gauss"][:, :256], QT.Q3_K)
    with pytest.raises(ValueError):
        gq.pack(np.full((5, 256), 4, np.int16), p)
    p = gq.block_params(CASES["gauss"][:, :256], QT.IQ4_XS)
    with pytest.raises(ValueError):
        gq.pack(np.full((5, 256), 16, np.int16), p)


def test_expert_stack_and_threads() -> None:
    rng = np.random.default_rng(10)
    w = rng.standard_normal((3, 4, 512)).astype(np.float32)
    im = rng.random((3, 512)).astype(np.float32)
    for qtype in (QT.Q3_K, QT.IQ4_XS, QT.Q2_K):
        stacked = gq.quantize(w, qtype, im, threads=2)
        assert stacked.shape == (3, 4, gq.bytes_per_row(qtype, 512))
        for e in range(3):
            assert np.array_equal(stacked[e], gq.quantize(w[e], qtype, im[e], threads=1))


# ------------------------------------------------------------------------------------------------
# The mixes (llama.cpp's llama_tensor_get_type for these ftypes)


def test_new_schemes_are_registered() -> None:
    want = {"iq4_xs": (QT.IQ4_XS, 30), "iq4_nl": (QT.IQ4_NL, 25), "q3_k_m": (QT.Q3_K, 12), "q3_k_s": (QT.Q3_K, 11),
            "q2_k": (QT.Q2_K, 10), "mxfp4_moe": (QT.MXFP4, 38)}
    for s, (base, ftype) in want.items():
        assert s in SCHEMES and BASE[s] == base and FILE_TYPE[s] == ftype
        assert base in gq.SUPPORTED_TYPES


def _t(scheme: str, name: str, row: int = 8192, n: int = 48, **kw) -> QT:
    return tensor_type(scheme, name, n, row, **kw)


def test_mix_q3_k_m_and_q3_k_s() -> None:
    n = 48
    for i in range(n):
        assert _t("q3_k_m", f"layers.{i}.wv") == (QT.Q5_K if i < 2 else QT.Q4_K)
        for down in ("experts.down", "shared.down", "mlp.down"):
            assert _t("q3_k_m", f"layers.{i}.{down}") == (QT.Q5_K if i < n // 16 else QT.Q4_K)
            assert _t("q3_k_s", f"layers.{i}.{down}") == QT.Q3_K
        assert _t("q3_k_m", f"layers.{i}.wo") == QT.Q4_K
        for local in ("wq", "wk", "experts.gate", "experts.up", "shared.gate", "mlp.up"):
            assert _t("q3_k_m", f"layers.{i}.{local}") == QT.Q3_K
            assert _t("q3_k_s", f"layers.{i}.{local}") == QT.Q3_K
        assert _t("q3_k_s", f"layers.{i}.wv") == QT.Q3_K and _t("q3_k_s", f"layers.{i}.wo") == QT.Q3_K
        assert _t("q3_k_m", f"layers.{i}.router") == QT.F32
    for s in ("q3_k_m", "q3_k_s"):
        assert _t(s, "output", 5120) == QT.Q6_K and _t(s, "tok_embeddings", 5120) == QT.Q3_K
        assert _t(s, "layers.3.wo", n_experts=8) == QT.Q5_K
        assert _t(s, "layers.3.wv", n_experts=8) == QT.Q8_0 and _t(s, "layers.3.wk", n_experts=8) == QT.Q8_0


def test_mix_q2_k() -> None:
    for i in range(48):
        assert _t("q2_k", f"layers.{i}.experts.down") == QT.Q3_K
        assert _t("q2_k", f"layers.{i}.shared.down") == QT.Q3_K
        assert _t("q2_k", f"layers.{i}.experts.up") == QT.Q2_K
        assert _t("q2_k", f"layers.{i}.wo") == QT.Q3_K
        assert _t("q2_k", f"layers.{i}.wv") == QT.Q4_K  # Llama 4: 40 heads / 8 KV heads
        assert _t("q2_k", f"layers.{i}.wv", n_gqa=2) == QT.Q3_K
    assert _t("q2_k", "layers.1.wo", n_experts=8) == QT.Q5_K
    assert _t("q2_k", "output", 5120) == QT.Q6_K and _t("q2_k", "tok_embeddings", 5120) == QT.Q2_K


def test_mix_iq4() -> None:
    for s in ("iq4_xs", "iq4_nl"):
        base = BASE[s]
        for i in range(48):
            down = QT.Q5_K if i < 6 else base
            assert _t(s, f"layers.{i}.experts.down") == down and _t(s, f"layers.{i}.mlp.down") == down
            assert _t(s, f"layers.{i}.experts.down", has_imatrix=True) == base  # only without an imatrix
            assert _t(s, f"layers.{i}.wv") == QT.Q5_K and _t(s, f"layers.{i}.wv", n_gqa=3) == base
            assert _t(s, f"layers.{i}.wo") == base and _t(s, f"layers.{i}.wq") == base
        assert _t(s, "layers.2.wo", n_experts=8) == QT.Q5_K and _t(s, "layers.2.wv", n_experts=8) == QT.Q8_0
        assert _t(s, "output", 5120) == QT.Q6_K and _t(s, "tok_embeddings", 5120) == base
    assert _t("iq4_xs", "output", 5152) == QT.Q8_0  # a multiple of 32 but not of 256
    assert _t("iq4_nl", "output", 5136) == QT.F16  # not even of 32: Q8_0, then F16


def test_mix_mxfp4_moe() -> None:
    s = "mxfp4_moe"
    for k in ("gate", "up", "down"):
        assert _t(s, f"layers.7.experts.{k}", n_experts=16) == QT.MXFP4
        assert _t(s, f"layers.7.experts.{k}") == QT.MXFP4
        assert _t(s, f"layers.7.experts.{k}", n_experts=1) == QT.Q8_0  # llama.cpp stores one expert 2-D
        assert _t(s, f"layers.7.shared.{k}") == QT.Q8_0 and _t(s, f"layers.6.mlp.{k}") == QT.Q8_0
    for local in ("wq", "wk", "wv", "wo"):
        assert _t(s, f"layers.0.{local}") == QT.Q8_0 and _t(s, f"layers.0.{local}", n_experts=8) == QT.Q8_0
    assert _t(s, "output", 5120) == QT.Q8_0 and _t(s, "tok_embeddings", 5120) == QT.Q8_0
    assert _t(s, "layers.0.attn_norm") == QT.F32 and _t(s, "layers.0.router") == QT.F32
    assert _t(s, "layers.0.experts.down", 80) == QT.F16  # not a multiple of 32


def test_fallbacks_when_rows_do_not_fit() -> None:
    assert fit_type(QT.Q3_K, 96) == QT.Q4_0 and fit_type(QT.Q2_K, 96) == QT.Q4_0
    assert fit_type(QT.IQ4_XS, 96) == QT.IQ4_NL and fit_type(QT.IQ4_XS, 80) == QT.F16
    for t in (QT.IQ4_NL, QT.MXFP4, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):
        assert fit_type(t, 96) == t and fit_type(t, 80) == QT.F16
    assert _t("q3_k_m", "layers.0.experts.down", 96) == QT.Q5_1  # Q5_K -> Q5_1
    assert _t("q3_k_m", "layers.9.experts.down", 96) == QT.Q5_0  # Q4_K -> Q5_0
    assert _t("q3_k_m", "layers.9.experts.up", 96) == QT.Q4_0
    assert _t("q2_k", "output", 96) == QT.Q8_0


def test_tied_embeddings_take_the_output_rule() -> None:
    assert _t("q3_k_m", "tok_embeddings", 5120, tied_embeddings=True) == QT.Q6_K
    assert _t("mxfp4_moe", "tok_embeddings", 5120, tied_embeddings=True) == QT.Q8_0
    assert _t("q4_k_m", "tok_embeddings", 5120, tied_embeddings=True) == QT.Q6_K
    assert _t("q8_0", "tok_embeddings", 5120, tied_embeddings=True) == QT.Q8_0


# ------------------------------------------------------------------------------------------------
# GPTQ grids on the new types


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_block_grid_is_the_packers_grid(qtype: QT) -> None:
    """Column-by-column rounding on the fitted grid (what GPTQ does) packs to a file that decodes to exactly those
    values; for Q2_K/Q3_K, RTN on the grid is llama.cpp's own quantization."""
    from llama4_quant.formats.gguf.grid import (
        GRID_TYPES,
        BlockGrid,
        grid_for_type,
        pack_result,
    )

    assert qtype in GRID_TYPES and isinstance(grid_for_type(qtype), BlockGrid)
    torch.manual_seed(0)
    w = torch.randn(16, 512) * 0.02
    w[3, :40] = 0.0
    imp = torch.rand(512)
    for importance in (None, imp):
        g = BlockGrid(qtype)
        params, cols = [], []
        for s in range(0, 512, g.group_size):
            p = g.fit(w[:, s:s + g.group_size], None if importance is None else importance[s:s + g.group_size])
            cols.append(torch.cat([g.quantize(w[:, s + j:s + j + 1], p, j) for j in range(g.group_size)], dim=1))
            whole = g.quantize(w[:, s:s + g.group_size], p, 0)
            assert torch.equal(whole, cols[-1])
            params.append(p)
        q = torch.cat(cols, dim=1)
        packed = pack_result(q, params)
        assert torch.equal(torch.from_numpy(gq.dequantize(packed, qtype)), q), qtype.name
        if qtype in (QT.Q2_K, QT.Q3_K) and importance is None:
            assert np.array_equal(gq.dequantize(packed, qtype), gq.dequantize(gq.quantize(w, qtype), qtype))


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """A random 64-wide model (the 32-block types only) and a calibration text."""
    from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint
    from llama4_quant.tiny.corpus import corpus_splits
    from llama4_quant.tiny.tokenizer import (
        build_tokenizer,
        save_tokenizer_files,
        tokenizer_info,
    )

    root = tmp_path_factory.mktemp("lowbit-narrow")
    tok = build_tokenizer(corpus_splits(0)["train"][:30_000], vocab_size=260)
    info = tokenizer_info(tok)
    tc = text_config("scout", vocab_size=info.vocab_size, bos_token_id=info.bos_id, eos_token_id=info.eos_id,
                     pad_token_id=info.pad_id, num_hidden_layers=2)
    path = write_hf_checkpoint(root / "narrow", tc)
    save_tokenizer_files(tok, path)
    calib = root / "calib.txt"
    calib.write_text(corpus_splits(0)["calib"][:20_000])
    return path, calib


@pytest.mark.parametrize("scheme", ["iq4_nl", "mxfp4_moe"])
def test_gptq_on_the_non_linear_grids(narrow_model, tmp_path, scheme) -> None:
    """GPTQ on IQ4_NL / MXFP4 grids: same tensor types and sizes as rtn, and the file decodes (gguf-py) to values on
    the type's grid that differ from rtn's."""
    from gguf import GGUFReader
    from support.convert import gguf as run_gguf_convert

    model, calib = narrow_model
    files = {}
    for method in ("rtn", "gptq"):
        files[method] = tmp_path / f"{method}.gguf"
        kw = dict(calib=str(calib), calib_samples=4, calib_seqlen=64) if method == "gptq" else {}
        s = run_gguf_convert(model, files[method], scheme=scheme, method=method, **kw)
        assert s["method"] == method
    rtn, gptq = ({t.name: t for t in GGUFReader(files[k]).tensors} for k in ("rtn", "gptq"))
    assert {n: t.tensor_type for n, t in rtn.items()} == {n: t.tensor_type for n, t in gptq.items()}
    base = BASE[scheme]
    changed = 0
    for n, t in gptq.items():
        if t.tensor_type != base or "token_embd" in n:
            continue
        a, b = np.asarray(t.data).view(np.uint8), np.asarray(rtn[n].data).view(np.uint8)
        assert a.shape == b.shape
        changed += not np.array_equal(a, b)
    assert changed > 0
