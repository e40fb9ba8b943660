"""`convert --to gguf --mmproj` / `--mmproj-only`: llama.cpp's mmproj GGUF of the vision tower (docs/gguf.md).

The fixture is a tiny multimodal checkpoint whose vision tower has 3 layers (llama.cpp's converter maps the
vision adapter's fc1/fc2 through block ids and cannot convert fewer) and an intermediate width of 4x its hidden
width (what the pixel shuffle feeds the adapter), with a preprocessor_config.json as Meta's repos have it.

Without llama.cpp: the files, the sidecar manifest, the values, atomicity, the CLI, and the image embeddings of
transformers' vision tower run on the tensors read back from our file. Marked `llamacpp` (skipped without a
build): the same keys (values, types) and tensors (names, shapes, types, bytes) as llama.cpp's own
`convert_hf_to_gguf.py --mmproj`, and, where a `llama-mtmd-debug` binary is around (build it next to the others,
or point LLAMA_MTMD_DEBUG at one), llama.cpp's image embeddings from our file against transformers'."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

from llama4_quant.errors import Llama4QuantError
from llama4_quant.formats.gguf import mmproj as mm
from llama4_quant.formats.manifest import SIDECAR_SUFFIX, check_files
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.tiny import checkpoints as ck
from support.convert import gguf as run_gguf
from support.llamacpp import find_llamacpp

LLAMA = find_llamacpp()
needs_converter = pytest.mark.skipif(LLAMA is None or LLAMA.convert_hf is None,
                                     reason="llama.cpp tools not built (scripts/build_llamacpp.sh)")

VISION = {**ck.TINY_VISION, "num_hidden_layers": 3, "intermediate_size": 128, "image_size": 56}
PREPROCESSOR = {  # Meta's Llama-4-Scout-17B-16E-Instruct preprocessor_config.json, at the fixture's image size
    "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Llama4ImageProcessorFast", "image_std": [0.5, 0.5, 0.5],
    "input_data_format": None, "max_patches": 16, "processor_class": "Llama4Processor", "resample": 2,
    "rescale_factor": 0.00392156862745098, "resize_to_max_canvas": False, "return_tensors": None,
    "size": {"height": 56, "width": 56},
}


def make_mm_fixture(root: Path, model_factory, vision: dict = VISION) -> Path:
    """The tiny multimodal checkpoint of tests/convert/conftest.py with this vision config (the shared default,
    TINY_VISION, stays as it is for the other tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "TINY_VISION", dict(vision))
        model_factory(root)
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return root


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory, model_factory) -> Path:
    return make_mm_fixture(tmp_path_factory.mktemp("mmproj") / "tiny-mm", model_factory)


@pytest.fixture(scope="module")
def text_only(tmp_path_factory, model_factory) -> Path:
    return model_factory(tmp_path_factory.mktemp("mmproj-text") / "tiny-text", layout="text")


@pytest.fixture(scope="module")
def pair(mm_model, tmp_path_factory):
    """bf16 text GGUF + default (f16) mmproj, through run_convert as the CLI calls it."""
    d = tmp_path_factory.mktemp("pair")
    out = d / "tiny.gguf"
    summary = run_gguf(mm_model, out, scheme="bf16", mmproj="")
    return {"dir": d, "out": out, "mmproj": d / "mmproj-tiny.gguf", "summary": summary}


def _hf_vision(model: Path) -> dict[str, torch.Tensor]:
    src = open_checkpoint(model)
    return {t.name: src.read_raw(t.name).float() for t in src.vision_tensors()}


def _values(t) -> np.ndarray:
    qt = T(int(t.tensor_type))
    shape = [int(x) for x in reversed(t.shape.tolist())]
    raw = np.asarray(t.data)
    if qt == T.F32:
        return np.array(raw, dtype=np.float32).reshape(shape)
    if qt == T.F16:
        return raw.astype(np.float32).reshape(shape)
    return np.asarray(dequantize(raw.view(np.uint8), qt), dtype=np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------------
# the pair: files, manifest, values


def test_pair_files_and_sidecar(pair):
    s, out, mmp = pair["summary"], pair["out"], pair["mmproj"]
    assert out.is_file() and mmp.is_file()
    assert s["files"] == [str(out), str(mmp)] and s["output"] == str(out)
    assert s["mmproj"]["path"] == str(mmp) and s["mmproj"]["type"] == "f16" and s["mmproj"]["tensors"] == 58
    assert s["mmproj"]["bytes"] == mmp.stat().st_size
    side = json.loads((out.parent / (out.name + SIDECAR_SUFFIX)).read_text())
    assert side["files"] == s["files"] and set(side["sha256"]) == {out.name, mmp.name}
    assert side["mmproj"]["vision"]["layers"] == 3
    assert check_files(out) == {"manifest": str(out.parent / (out.name + SIDECAR_SUFFIX)), "files": 2,
                                "checked": "sha256"}
    assert sorted(p.name for p in pair["dir"].iterdir()) == sorted([out.name, mmp.name, out.name + SIDECAR_SUFFIX])
    # the text GGUF is the same as without --mmproj
    assert GGUFReader(out).fields["general.architecture"].contents() == "llama4"


def test_pair_values_are_the_checkpoints(pair, mm_model):
    hf = _hf_vision(mm_model)
    r = GGUFReader(pair["mmproj"])
    names = {mm.gguf_name(k): k for k in hf}
    assert {t.name for t in r.tensors} == set(names)
    for t in r.tensors:
        want = hf[names[t.name]].numpy()
        got = _values(t)
        assert got.shape == want.shape, t.name
        if T(int(t.tensor_type)) == T.F16:
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), t.name  # f16 rounding
        else:
            assert T(int(t.tensor_type)) == T.F32 and np.array_equal(got, want), t.name
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["clip.vision.image_mean"] == [0.5] * 3 and f["clip.vision.projection_dim"] == 128
    assert f["general.sampling.temp"] == pytest.approx(0.6)


@pytest.mark.parametrize("mtype", ["bf16", "q8_0"])
def test_mmproj_types(mm_model, tmp_path, mtype):
    s = run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj=str(tmp_path / "vision.gguf"),
                 mmproj_type=mtype)
    r = GGUFReader(tmp_path / "vision.gguf")
    types = {t.name: T(int(t.tensor_type)) for t in r.tensors}
    assert types["v.patch_embd.weight"] == T.F32 and types["v.position_embd.weight"] == T.F32
    assert types["v.blk.0.attn_q.weight"] == mm.TYPES[mtype] and types["v.blk.0.ln2.weight"] == T.F32
    assert r.fields["general.file_type"].contents() == mm.FILE_TYPE[mtype]
    assert s["mmproj"]["type"] == mtype and check_files(tmp_path / "t.gguf")["files"] == 2


def test_mmproj_only(mm_model, tmp_path):
    out = tmp_path / "vision-f16.gguf"
    s = run_gguf(mm_model, out, mmproj_only=True, scheme="q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + SIDECAR_SUFFIX]
    assert s["kind"] == "mmproj" and s["files"] == [str(out)] and s["mmproj"]["type"] == "f16"
    assert any("--scheme ignored" in w for w in s["warnings"])
    assert check_files(out)["files"] == 1
    with pytest.raises(Llama4QuantError, match="exists"):
        run_gguf(mm_model, out, mmproj_only=True)
    again = run_gguf(mm_model, out, mmproj_only=True, force=True, mmproj="")  # a bare --mmproj is fine
    assert again["mmproj"]["bytes"] == s["mmproj"]["bytes"]
    with pytest.raises(Llama4QuantError, match="drop --mmproj PATH"):
        run_gguf(mm_model, out, mmproj_only=True, force=True, mmproj=str(tmp_path / "other.gguf"))


def test_option_errors(mm_model, tmp_path):
    cases = [
        (dict(to="safetensors", scheme=None, mmproj=""), "--mmproj applies to --to gguf only"),
        (dict(mmproj_type="f16"), "--mmproj-type needs --mmproj"),
        (dict(mmproj_type="q4_0", mmproj=""), "unknown --mmproj-type"),
        (dict(mmproj=str(tmp_path / "x.gguf")), "is OUT itself"),
        (dict(mmproj=str(tmp_path / "sub" / "v.gguf")), "OUT's directory"),
        (dict(mmproj=str(tmp_path / "v.bin")), "must end in .gguf"),
    ]
    from support.convert import convert

    for kw, match in cases:
        kw = {"to": "gguf", "scheme": "bf16", **kw}
        with pytest.raises(Llama4QuantError, match=match):
            convert(mm_model, tmp_path / "x.gguf", **kw)
    assert list(tmp_path.iterdir()) == []


def test_no_vision_tower_is_one_clear_error(text_only, tmp_path):
    for kw in (dict(mmproj=""), dict(mmproj_only=True)):
        with pytest.raises(Llama4QuantError, match="no vision tower to write an mmproj from"):
            run_gguf(text_only, tmp_path / "t.gguf", scheme="bf16", **kw)
    assert list(tmp_path.iterdir()) == []  # refused before the text model was converted


def test_existing_mmproj_refused_before_work(mm_model, tmp_path):
    (tmp_path / "mmproj-t.gguf").write_bytes(b"not ours")
    with pytest.raises(Llama4QuantError, match="exists"):
        run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="")
    with pytest.raises(Llama4QuantError, match="replaces only an earlier llama4-quant output"):
        run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-t.gguf"]
    (tmp_path / "mmproj-t.gguf").unlink()
    run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="")
    run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="", force=True)  # ours: replaced


# ------------------------------------------------------------------------------------------------
# atomicity


def test_failure_writing_the_mmproj_leaves_nothing(mm_model, tmp_path, monkeypatch):
    real = mm.encode

    def encode(data, qtype):
        if data.shape == (128, 32):  # the second vision layer's ffn_up... any late tensor
            raise OSError(28, "No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(mm, "encode", encode)
    with pytest.raises(OSError):
        run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="")
    assert list(tmp_path.iterdir()) == []


def test_failure_in_the_text_model_leaves_no_mmproj(mm_model, tmp_path, monkeypatch):
    from llama4_quant.convert.gguf import GGUFExporter

    def boom(self, report):
        assert any(p.name.startswith(".mmproj-t.gguf.partial-") for p in tmp_path.iterdir())  # staged already
        raise KeyboardInterrupt

    monkeypatch.setattr(GGUFExporter, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="")
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".t.gguf.partial-")] == []
    assert not any("mmproj" in p.name for p in tmp_path.iterdir())


def test_killed_run_leaves_only_a_hidden_temp_that_the_next_run_removes(mm_model, tmp_path):
    stale = tmp_path / ".mmproj-t.gguf.partial-999999999-1"
    stale.write_bytes(b"half a file")
    run_gguf(mm_model, tmp_path / "t.gguf", scheme="bf16", mmproj="")
    assert not stale.exists() and (tmp_path / "mmproj-t.gguf").is_file()


# ------------------------------------------------------------------------------------------------
# the CLI, inspect, verify


def test_cli(mm_model, text_only, tmp_path, cli):
    out = tmp_path / "c.gguf"
    r = cli("convert", str(mm_model), str(out), "--to", "gguf", "--scheme", "bf16", "--mmproj", "--mmproj-type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: bf16" in r.stdout and f"wrote {tmp_path / 'mmproj-c.gguf'}: mmproj (llama4 vision, 3 layers), q8_0" in r.stdout
    r = cli("verify", str(out))
    assert r.returncode == 0 and "2 files match sha256" in r.stdout, r.stdout + r.stderr
    r = cli("inspect", str(tmp_path / "mmproj-c.gguf"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["kind"] == "mmproj" and d["projector_type"] == "llama4" and d["vision"]["block_count"] == 3
    assert d["by_type"]["Q8_0"]["tensors"] == 21  # all 2-D weights but the patch embedding (F32)
    r = cli("inspect", str(tmp_path / "mmproj-c.gguf"))
    assert r.returncode == 0 and "mmproj" in r.stdout and "v.blk.2.ln2.weight" in r.stdout
    with open(tmp_path / "mmproj-c.gguf", "r+b") as f:  # a changed mmproj fails the pair's check
        f.seek(-1, 2)
        f.write(b"\x01")
    r = cli("verify", str(out))
    assert r.returncode != 0 and "mmproj-c.gguf does not match the sha256" in r.stderr
    # --mmproj-only
    only = tmp_path / "only.gguf"
    r = cli("convert", str(mm_model), str(only), "--to", "gguf", "--mmproj-only", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "mmproj" and only.is_file()
    # no vision tower: one line
    r = cli("convert", str(text_only), str(tmp_path / "n.gguf"), "--to", "gguf", "--scheme", "bf16", "--mmproj")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") \
        and "no vision tower" in r.stderr, r.stderr
    assert not (tmp_path / "n.gguf").exists()


def test_inspect_lists_the_vision_tower(mm_model, text_only, cli):
    r = cli("inspect", str(mm_model), "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["vision_tower"]
    hf = _hf_vision(mm_model)
    assert v["tensors"] == len(hf) and v["params"] == sum(t.numel() for t in hf.values())
    assert v["by_dtype"] == {"BF16": {"tensors": len(hf), "params": v["params"], "bytes": 2 * v["params"]}}
    assert v["layers"] == 3 and set(v["mmproj_bytes"]) == {"f16", "bf16", "q8_0"}
    r = cli("inspect", str(mm_model))
    assert "vision tower: 66,848 params (BF16" in r.stdout.replace("\n", " ")
    assert json.loads(cli("inspect", str(text_only), "--json").stdout)["vision_tower"] is None
    scout = json.loads(cli("inspect", "scout", "--json").stdout)["vision_tower"]
    assert scout["layers"] == 34 and scout["mmproj_bytes"]["f16"] < scout["bytes"] * 1.01


# ------------------------------------------------------------------------------------------------
# image embeddings: transformers' vision tower on the checkpoint vs on the tensors read back from our file


def hf_image_embeddings(vision_config: dict, tensors: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """[tokens, text width]: transformers' Llama4VisionModel + the multimodal projector (what
    Llama4ForConditionalGeneration puts in place of the image tokens) on `tensors` (HF names), float32."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    cfg = transformers.Llama4VisionConfig(**vision_config)
    model = Llama4VisionModel(cfg).float().eval()
    sd = {k[len("vision_model."):]: v.float() for k, v in tensors.items() if k.startswith("vision_model.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        feats = model(pixels.float()).last_hidden_state
        return torch.nn.functional.linear(feats.reshape(-1, feats.shape[-1]),
                                          tensors["multi_modal_projector.linear_1.weight"].float())


def mmproj_as_hf(path: Path) -> dict[str, torch.Tensor]:
    """An mmproj file's tensors under their HF names (the inverse of mm.gguf_name), dequantized."""
    r = GGUFReader(path)
    inverse = {}
    vc = r.fields
    n = int(vc["clip.vision.block_count"].contents())
    fake = mm.VisionParams(1, 1, n, 1, 3, 1, 1, 1e-5, 0.5, 1, 1, 1, 1)
    for hf in mm.expected_tensors(fake):
        inverse[mm.gguf_name(hf)] = hf
    return {inverse[t.name]: torch.from_numpy(_values(t).copy()) for t in r.tensors}


def _rainbow(size: int) -> torch.Tensor:
    """llama-mtmd-debug's `rainbow` test image, [1, 3, size, size] in [0, 1]."""
    img = torch.zeros(1, 3, size, size)
    cx = cy = size / 2.0
    max_dist = math.sqrt(cx * cx + cy * cy)
    for y in range(size):
        for x in range(size):
            dx, dy = x - cx, y - cy
            hue = math.atan2(dy, dx) / (2 * 3.14159265)
            hue += 1 if hue < 0 else 0
            sat = min(math.sqrt(dx * dx + dy * dy) / max_dist, 1.0)
            h6 = hue * 6
            i6 = int(h6)
            f = h6 - i6
            p, q, t = 1 - sat, 1 - sat * f, 1 - sat * (1 - f)
            img[0, :, y, x] = torch.tensor([(1, t, p), (q, 1, p), (p, 1, t), (p, q, 1), (t, p, 1), (1, p, q)][i6 % 6])
    return img


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_image_embeddings_of_our_file_match_the_checkpoint(pair, mm_model):
    pixels = _rainbow(VISION["image_size"])
    ref = hf_image_embeddings(VISION, _hf_vision(mm_model), pixels)
    ours = hf_image_embeddings(VISION, mmproj_as_hf(pair["mmproj"]), pixels)
    assert ref.shape == (4, 128)  # (56 / 14)^2 patches, pixel-shuffled by 2x2
    assert _close(ours, ref) < 2e-3, _close(ours, ref)  # f16 rounding of bf16 weights


# ------------------------------------------------------------------------------------------------
# llama.cpp


def _converter_mmproj(model: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py --mmproj (tests/support/llamacpp.py's run_convert_hf, plus the flag)."""
    cmd = [sys.executable, str(LLAMA.convert_hf), str(model), "--outfile", str(out), "--outtype", outtype, "--mmproj"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=LLAMA.converter_env(), timeout=600)
    assert r.returncode == 0 and out.is_file(), r.stderr[-3000:]
    return out


@pytest.mark.llamacpp
@needs_converter
@pytest.mark.parametrize("mtype", ["f16", "bf16", "q8_0"])
def test_same_file_as_llamacpp_converter(mm_model, tmp_path, mtype):
    """Same keys (values and GGUF types, in the same order) and the same tensors (names, shapes, types, bytes, in
    the same order) as llama.cpp's `convert_hf_to_gguf.py --mmproj`, but for (1) our provenance keys
    (general.quantized_by, llama4_quant.scheme) and (2) `v.blk.N.ln2`, which the pinned converter misnames
    `attn_post_norm` (formats/gguf/mmproj.py's docstring)."""
    theirs = _converter_mmproj(mm_model, tmp_path / f"theirs-{mtype}.gguf", mtype)
    ours = tmp_path / f"ours-{mtype}.gguf"
    run_gguf(mm_model, ours, mmproj_only=True, mmproj_type=mtype)
    a, b = GGUFReader(theirs), GGUFReader(ours)
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.") and k not in mm.PROVENANCE_KEYS}
    assert list(fa) == list(fb)
    for k in fa:
        assert fa[k].types == fb[k].types and fa[k].contents() == fb[k].contents(), k
    ta = [t for t in a.tensors]
    tb = [t for t in b.tensors]
    assert [t.name.replace(".attn_post_norm.", ".ln2.") for t in ta] == [t.name for t in tb]
    for x, y in zip(ta, tb):
        assert x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape), y.name
        assert np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)), y.name
    assert sum(".attn_post_norm." in t.name for t in ta) in (0, 2 * VISION["num_hidden_layers"])


def _mtmd_debug() -> Path | None:
    env = os.environ.get("LLAMA_MTMD_DEBUG")
    if env:
        return Path(env) if Path(env).is_file() else None
    for d in ([LLAMA.bin_dir] if LLAMA is not None else []):
        if (Path(d) / "llama-mtmd-debug").is_file():
            return Path(d) / "llama-mtmd-debug"
    found = shutil.which("llama-mtmd-debug")
    return Path(found) if found else None


MTMD = _mtmd_debug()


def llamacpp_image_embeddings(text: Path, mmproj: Path, size: int, tmp: Path, image: str = "rainbow") -> torch.Tensor:
    """[tokens, width] that llama.cpp's clip encoder computes from `mmproj` for llama-mtmd-debug's test image (fed
    as is, no preprocessing), dumped through MTMD_DEBUG_EMBEDDINGS."""
    dump = tmp / f"emb-{mmproj.stem}.bin"
    env = {**os.environ, "MTMD_DEBUG_EMBEDDINGS": str(dump)}
    cmd = [str(MTMD), "-m", str(text), "--mmproj", str(mmproj), "--image", image, "-n", str(size), "-t", "1",
           "--no-warmup"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and dump.is_file(), (r.stdout + r.stderr)[-3000:]
    raw = dump.read_bytes()
    n_tokens, n_embd = np.frombuffer(raw[:8], dtype=np.int32)
    return torch.from_numpy(np.frombuffer(raw[8:], dtype=np.float32).reshape(n_tokens, n_embd).copy())


def llamacpp_token_order(emb: torch.Tensor) -> torch.Tensor:
    """transformers' image tokens in llama.cpp's order: llama.cpp's pixel shuffle (tools/mtmd/models/llama4.cpp)
    leaves out the last permute of Llama4VisionPixelShuffleMLP, so its tokens walk the merged patch grid column by
    column where transformers' walk it row by row (each token's values are the same)."""
    n = math.isqrt(emb.shape[0])
    return emb.view(n, n, -1).transpose(0, 1).reshape(emb.shape)


@pytest.mark.llamacpp
@pytest.mark.skipif(MTMD is None, reason="no llama-mtmd-debug (build it with the llama.cpp tools, or set LLAMA_MTMD_DEBUG)")
def test_llamacpp_image_embeddings_match_transformers(pair, mm_model, tmp_path):
    """llama.cpp loads our mmproj with our text GGUF, and its image embeddings are transformers' (to the rounding
    of the weights and of ggml's matmul inputs); the converter's file, with `attn_post_norm` for `ln2`, computes
    another model."""
    size = VISION["image_size"]
    ref = llamacpp_token_order(hf_image_embeddings(VISION, _hf_vision(mm_model), _rainbow(size)))
    files = {"f16": pair["mmproj"]}
    for mtype in ("bf16", "q8_0"):
        files[mtype] = tmp_path / f"mmproj-{mtype}.gguf"
        run_gguf(mm_model, files[mtype], mmproj_only=True, mmproj_type=mtype)
    errs = {}
    for mtype, path in files.items():
        got = llamacpp_image_embeddings(pair["out"], path, size, tmp_path)
        assert got.shape == ref.shape == (4, 128)
        errs[mtype] = _close(got, ref)
    print(errs)  # measured: f16 4.7e-4, bf16 2.5e-3, q8_0 1.5e-2
    assert errs["f16"] < 5e-3 and errs["bf16"] < 1e-2 and errs["q8_0"] < 5e-2, errs
    if LLAMA is not None and LLAMA.convert_hf is not None:
        theirs = _converter_mmproj(mm_model, tmp_path / "mmproj-converter.gguf", "f16")
        if any(".attn_post_norm." in t.name for t in GGUFReader(theirs).tensors):
            other = _close(llamacpp_image_embeddings(pair["out"], theirs, size, tmp_path), ref)
            assert other > 20 * errs["f16"], (other, errs)  # measured: 0.44
