"""Our compressed-tensors tensors and config against the installed compressed-tensors package."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from llama4_quant.formats.compressed_tensors import config as ct_config
from llama4_quant.formats.compressed_tensors import tensors as ct_tensors
from llama4_quant.quant.api import quantize_linear
from llama4_quant.quant.scheme import FP8Scheme, IntScheme
from llama4_quant.quant.hessian import HessianAccumulator

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)

CASES = {
    "w4a16_sym_g128": IntScheme(4, True, 128),
    "w4a16_asym_g128": IntScheme(4, False, 128),
    "w8a16_channel": IntScheme(8, True, None),
    "w8a16_asym_channel": IntScheme(8, False, -1),
    "fp8_channel": FP8Scheme("channel"),
    "fp8_block": FP8Scheme("block"),
    "fp8_tensor_weight_only": FP8Scheme("tensor", dynamic_activations=False),
}


def _weight(rows: int = 200, cols: int = 384, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 5] = 0.5  # an outlier
    w[7] = 0.0  # an all-zero row
    return w.to(torch.bfloat16)


def _ct_scheme(scheme):
    cfg = ct_config.quantization_config([ct_config.ConfigGroup(["Linear"], scheme)])
    qc = QuantizationConfig.model_validate(cfg)
    return qc, qc.config_groups["group_0"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("size", [64, 20])
def test_pack_matches_compressed_tensors(bits: int, dim: int, size: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    shape = (size, 24) if dim == 0 else (24, size)
    codes = torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    ours = ct_tensors.pack_int32(codes, bits, dim)
    assert torch.equal(ours, pack_to_int32(codes, bits, packed_dim=dim))
    assert torch.equal(ct_tensors.unpack_int32(ours, bits, size, dim), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), codes)


def test_int4_nibble_layout() -> None:
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)
    word = int(ct_tensors.pack_int32(codes, 4)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 1, 8, 9, 10, 11, 12, 15]  # value + 8, element i at bits 4i..4i+3


@pytest.mark.parametrize("name", list(CASES))
def test_decompress_bit_exact(name: str) -> None:
    scheme = CASES[name]
    w = _weight()
    q, _ = quantize_linear(w, scheme, method="rtn")
    tensors = ct_tensors.linear_tensors(q, torch.bfloat16)
    _, ct_scheme = _ct_scheme(scheme)
    compressor = BaseCompressor.get_value_from_registry(ct_config.scheme_format(scheme))

    # their decompression of our tensors == our dequantization, bit for bit
    theirs = compressor.decompress(dict(tensors), ct_scheme)["weight"]
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs, q.dequantize(torch.bfloat16))

    # their compression of our (exactly representable) weights == our tensors
    state = {"weight": q.dequantize(torch.float32), "weight_scale": tensors["weight_scale"]}
    if q.zero_point is not None:
        state["weight_zero_point"] = q.zero_point
    recompressed = compressor.compress(state, ct_scheme)
    assert set(recompressed) == set(tensors)
    for key, value in tensors.items():
        assert recompressed[key].dtype == value.dtype, key
        assert torch.equal(recompressed[key].to(torch.float32), value.to(torch.float32)), key

    # and our reader inverts our writer
    back = ct_tensors.read_linear_tensors(tensors, scheme)
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("name", ["w4a16_sym_g128", "w4a16_asym_g128", "fp8_block"])
def test_model_compressor_loads_our_state_dict(name: str) -> None:
    """Names, shapes and dtypes are the ones compressed-tensors gives a compressed Linear."""
    scheme = CASES[name]
    w = _weight(136, 256)
    x = torch.randn(256, w.shape[1])
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)
    q, record = quantize_linear(w, scheme, hessian=acc.hessian, n_tokens=acc.n_tokens)
    assert record.method == "gptq"
    qc, _ = _ct_scheme(scheme)
    model = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(w.shape[1], w.shape[0], bias=False)))
    model = model.to(torch.bfloat16)
    apply_quantization_config(model, qc)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(model)
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    ours = {f"proj.{k}": v for k, v in ct_tensors.linear_tensors(q).items()}
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == expected
    model.load_state_dict(ours, strict=True)
    compressor.decompress_model(model)
    assert torch.equal(model.proj.weight.data, q.dequantize(torch.bfloat16))


def _core(args) -> dict:
    d = args.model_dump()
    return {k: d.get(k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size",
                                  "block_structure", "dynamic", "actorder")}


@pytest.mark.parametrize(
    "preset,scheme",
    [
        ("W4A16", IntScheme(4, True, 128)),
        ("W4A16_ASYM", IntScheme(4, False, 128)),
        ("W8A16", IntScheme(8, True, 128)),
        ("FP8_DYNAMIC", FP8Scheme("channel")),
        ("FP8_BLOCK", FP8Scheme("block")),
    ],
)
def test_config_matches_presets(preset: str, scheme) -> None:
    cfg = ct_config.quantization_config(
        [ct_config.ConfigGroup(["re:.*experts.*"], scheme)], ignore=["lm_head", "re:.*self_attn.*"]
    )
    assert ct_config.validate_quantization_config(cfg)
    qc = QuantizationConfig.model_validate(cfg)
    assert qc.quant_method == "compressed-tensors"
    assert qc.quantization_status == "compressed"
    assert qc.format == ct_config.scheme_format(scheme)
    assert qc.ignore == ["lm_head", "re:.*self_attn.*"]
    ours = qc.config_groups["group_0"]
    ref = preset_name_to_scheme(preset, ["re:.*experts.*"])
    assert ours.targets == ref.targets
    assert _core(ours.weights) == _core(ref.weights)
    if ref.input_activations is None:
        assert ours.input_activations is None
    else:
        assert _core(ours.input_activations) == _core(ref.input_activations)
    assert cfg["version"] and cfg["config_groups"]["group_0"]["weights"]["observer"] == "minmax"


def test_config_channel_mixed_and_actorder() -> None:
    groups = [
        ct_config.ConfigGroup(["re:.*experts.*"], IntScheme(4, True, 128), actorder=True),
        ct_config.ConfigGroup(["re:.*shared_expert.*"], FP8Scheme("channel")),
        ct_config.ConfigGroup(["re:.*mlp.*"], IntScheme(8, True, None), observer="mse"),
    ]
    cfg = ct_config.quantization_config(groups)
    qc = QuantizationConfig.model_validate(cfg)
    assert qc.format == "mixed-precision"
    g = qc.config_groups
    formats = [g[f"group_{i}"].format for i in range(3)]
    assert formats == ["pack-quantized", "float-quantized", "pack-quantized"]
    assert g["group_0"].weights.actorder == "weight"
    assert g["group_2"].weights.strategy == "channel" and g["group_2"].weights.group_size is None
    assert g["group_2"].weights.observer == "mse"
    # not mixed: no per-group format key (older compressed-tensors forbid it)
    single = ct_config.quantization_config(groups[:1])
    assert "format" not in single["config_groups"]["group_0"]


def test_unrepresentable_scale_rejected() -> None:
    q, _ = quantize_linear(_weight().float(), IntScheme(), method="rtn")  # fp32 scales
    with pytest.raises(ValueError, match="representable"):
        ct_tensors.linear_tensors(q, torch.bfloat16)
