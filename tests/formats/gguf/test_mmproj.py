"""formats/gguf/mmproj.py: Llama 4's mmproj layout (names, types, keys), the writer and the reader, without
llama.cpp (tests/convert/test_mmproj.py compares with llama.cpp's converter and runs llama.cpp on the file)."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

from llama4_quant.errors import CheckpointError, Llama4QuantError
from llama4_quant.formats.gguf import mmproj as mm

VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
              vision_output_dim=32, image_size=56, patch_size=14, projector_input_dim=32, projector_output_dim=32,
              pixel_shuffle_ratio=0.5, hidden_act="gelu", norm_eps=1e-5, num_channels=3)


@pytest.fixture
def vp():
    return mm.vision_params(VISION, 128)


def test_vision_params_and_defaults(vp):
    assert (vp.num_layers, vp.hidden_size, vp.num_heads, vp.scale_factor, vp.num_positions) == (3, 32, 2, 2, 17)
    # keys config.json leaves out get transformers' Llama4VisionConfig defaults (what AutoConfig fills in)
    transformers = pytest.importorskip("transformers")
    d = transformers.Llama4VisionConfig().to_dict()
    for k, v in mm.VISION_DEFAULTS.items():
        assert d[k] == v, k
    scout = mm.vision_params({"hidden_size": 1408, "image_size": 336, "vision_output_dim": 4096}, 5120)
    assert (scout.num_layers, scout.intermediate_size, scout.scale_factor) == (34, 5632, 2)


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_act="silu"), "GELU only"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(image_size="336"), "image_size must be a positive integer"),
    (dict(norm_eps=float("nan")), "norm_eps must be a positive number"),
    (dict(pixel_shuffle_ratio=2.0), "pixel_shuffle_ratio"),
    (dict(num_attention_heads=3), "not a multiple of num_attention_heads"),
    (dict(num_channels=1), "RGB"),
])
def test_vision_params_refuse(bad, match):
    with pytest.raises(CheckpointError, match=match):
        mm.vision_params({**VISION, **bad}, 128)
    with pytest.raises(CheckpointError, match="not an object"):
        mm.vision_params(None, 128)


def test_names_are_llamacpp_clip_names(vp):
    """gguf-py's own tensor map, except for the three names llama.cpp's converter special-cases (the projector,
    the position embedding's missing suffix) and `post_attention_layernorm` (see the module docstring)."""
    tm = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vp.num_layers)
    special = {"multi_modal_projector.linear_1.weight": "mm.model.fc.weight",
               "vision_model.positional_embedding_vlm": "v.position_embd.weight"}
    names = {}
    for hf in mm.expected_tensors(vp):
        ours = mm.gguf_name(hf)
        names[hf] = ours
        if hf in special:
            assert ours == special[hf]
        elif ".post_attention_layernorm." in hf:
            assert ours.split(".")[3] == "ln2" and ours.startswith("v.blk.")
        else:
            assert ours == tm.get_name(hf, try_suffixes=(".weight", ".bias")), hf
    assert len(set(names.values())) == len(names) == 10 + 16 * vp.num_layers
    with pytest.raises(KeyError):
        mm.gguf_name("vision_model.model.layers.0.mlp.fc3.weight")


@pytest.mark.parametrize("mtype, base", [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0)])
def test_tensor_types(mtype, base):
    t = lambda name, shape: mm.tensor_type(name, shape, mtype)  # noqa: E731
    assert t("v.patch_embd.weight", (32, 588)) == (T.F16 if mtype == "f16" else T.F32)
    for name, shape in (("v.class_embd", (32,)), ("v.position_embd.weight", (17, 32)), ("v.pre_ln.weight", (32,)),
                        ("v.blk.0.ln2.bias", (32,)), ("v.blk.0.attn_q.bias", (32,))):
        assert t(name, shape) == T.F32, name
    for name in ("v.blk.0.attn_q.weight", "v.blk.0.ffn_up.weight", "mm.model.fc.weight", "mm.model.mlp.1.weight"):
        assert t(name, (64, 32)) == base
    # rows that are not whole Q8_0 blocks: the converter falls back to F16
    assert t("v.blk.0.ffn_down.weight", (32, 48)) == (T.F16 if mtype == "q8_0" else base)


def _tensors(vp):
    return list(mm.expected_tensors(vp).items())


def test_plan_checks_the_tower(vp):
    plan = mm.plan_mmproj(_tensors(vp), vp, "f16")
    assert [p.name for p in plan][:2] == ["mm.model.fc.weight", "v.class_embd"]
    assert sum(p.params for p in plan) == 66848
    with pytest.raises(CheckpointError, match="lacks vision_model.model.layers.2"):
        mm.plan_mmproj([x for x in _tensors(vp) if "layers.2." not in x[0]], vp, "f16")
    with pytest.raises(CheckpointError, match="not part of Llama 4's vision tower"):
        mm.plan_mmproj(_tensors(vp) + [("vision_model.model.layers.3.mlp.fc1.weight", (128, 32))], vp, "f16")
    bad = [(n, (s[0] + 1, *s[1:]) if n.endswith("fc1.weight") else s) for n, s in _tensors(vp)]
    with pytest.raises(CheckpointError, match="has shape"):
        mm.plan_mmproj(bad, vp, "f16")
    with pytest.raises(Llama4QuantError, match="unknown mmproj type"):
        mm.plan_mmproj(_tensors(vp), vp, "q4_0")


def test_sizes(vp):
    sizes = mm.mmproj_sizes(vp)
    for mtype in mm.TYPES:
        assert sizes[mtype] == sum(p.nbytes for p in mm.plan_mmproj(_tensors(vp), vp, mtype))
    assert sizes["q8_0"] < sizes["f16"] < sizes["bf16"]  # bf16 keeps the patch embedding F32


def test_preprocessor_merge(tmp_path):
    assert mm.image_stats(mm.load_preprocessor(tmp_path)) == ([0.5] * 3, [0.5] * 3, False)
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}')
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"image_std": [0.4, 0.5, 0.6]}}')
    assert mm.image_stats(mm.load_preprocessor(tmp_path)) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], True)
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="processor_config.json: unreadable"):
        mm.load_preprocessor(tmp_path)


def _random(vp, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in mm.expected_tensors(vp).items()}


@pytest.mark.parametrize("mtype", list(mm.TYPES))
def test_write_read_back_and_describe(tmp_path, vp, mtype):
    data = _random(vp)
    plan = mm.plan_mmproj(_tensors(vp), vp, mtype)
    path = tmp_path / "mmproj.gguf"
    mm.write_mmproj_file(path, plan, lambda gw: mm.add_mmproj_metadata(
        gw, vp, mtype, image_mean=[0.5] * 3, image_std=[0.5] * 3, quantized_by="llama4-quant test"),
        lambda t: data[t.source])
    r = GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert list(f)[:3] == ["general.architecture", "general.type", "general.quantized_by"]
    assert f["general.architecture"] == "clip" and f["general.type"] == "mmproj"
    assert f["clip.projector_type"] == "llama4" and f["clip.vision.projector.scale_factor"] == 2
    assert f["clip.vision.projection_dim"] == 128 and f["clip.vision.block_count"] == 3
    assert f["general.file_type"] == mm.FILE_TYPE[mtype] and f["llama4_quant.scheme"] == mtype
    for t in r.tensors:
        p = next(x for x in plan if x.name == t.name)
        assert T(int(t.tensor_type)) == p.qtype
        want = mm.encode(data[p.source], p.qtype)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1))
    d = mm.describe_mmproj(path)
    assert d["kind"] == "mmproj" and d["projector_type"] == "llama4" and d["layers"] == 3
    assert d["params"] == sum(p.params for p in plan) and len(d["tensors"]) == len(plan)
    assert d["vision"]["image_mean"] == pytest.approx([0.5] * 3)
    assert mm.is_mmproj(path) and mm.gguf_architecture(path) == "clip"


def test_write_failure_raises(tmp_path, vp):
    plan = mm.plan_mmproj(_tensors(vp), vp, "f16")

    def data(t):
        if t.name == "v.blk.1.ffn_up.weight":
            raise RuntimeError("disk on fire")
        return np.zeros(t.shape, np.float32)

    with pytest.raises(RuntimeError, match="disk on fire"):
        mm.write_mmproj_file(tmp_path / "x.gguf", plan, lambda gw: None, data)


def test_architecture_scanner(tmp_path):
    """Skips strings, arrays of strings and scalars to reach general.architecture wherever it is."""
    p = tmp_path / "a.gguf"
    w = GGUFWriter(p, "llama4")
    w.kv_data[0].pop("general.architecture")
    w.add_token_list(["a", "bb", "ccc"] * 1000)
    w.add_array("x.floats", [1.0, 2.0])
    w.add_uint64("x.u64", 7)
    w.add_bool("x.b", True)
    w.add_string("general.architecture", "llama4")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    assert mm.gguf_architecture(p) == "llama4" and not mm.is_mmproj(p)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    assert mm.gguf_architecture(tmp_path / "junk.gguf") is None
    assert mm.gguf_architecture(tmp_path / "none.gguf") is None
    with pytest.raises(CheckpointError, match="not an mmproj GGUF"):
        mm.describe_mmproj(p)


def test_encode_is_gguf_py(vp):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    from gguf.quants import quantize

    for qt in (T.F16, T.BF16, T.Q8_0):
        assert np.array_equal(mm.encode(x, qt).view(np.uint8), np.asarray(quantize(x, qt)).view(np.uint8))
    assert math.prod(mm.encode(x, T.Q8_0).shape) == 4 * 2 * 34
