"""GGUF writer: names, shapes, types, metadata and tokenizer as llama.cpp reads them; split; atomicity.

Fast tests on tiny random checkpoints (dims multiples of 256 so the k-quants apply; a 64-wide one for the
fallback types). The trained-fixture conversions and llama.cpp itself are in tests/convert/test_gguf_convert.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from llama4_quant.errors import Llama4QuantError
from llama4_quant.formats.gguf import quants as gq
from support.convert import gguf as run_gguf_convert
from llama4_quant.formats.gguf.grid import BlockGrid, pack_result
from llama4_quant.formats.gguf.mix import FILE_TYPE, more_bits, tensor_type
from llama4_quant.formats.gguf.names import canonical_name, gguf_name
from llama4_quant.formats.gguf.writer import GGUFFileWriter
from llama4_quant.formats.gguf.mix import PlannedTensor
from llama4_quant.formats.gguf.metadata import compat_warning, llamacpp_differences, rope_freqs_tensor
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.config import from_hf_dict, rope_freq_factors
from llama4_quant.model.tensors import tensor_specs
from llama4_quant.tiny.checkpoints import hf_config, text_config, write_hf_checkpoint, write_meta_checkpoint

DIMS = dict(hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, head_dim=64, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def tok_info():
    from llama4_quant.tiny.corpus import corpus_splits
    from llama4_quant.tiny.tokenizer import build_tokenizer, tokenizer_info

    tok = build_tokenizer(corpus_splits(0)["train"][:60_000], vocab_size=300)
    return tok, tokenizer_info(tok)


def _model(root: Path, name: str, tok_info, variant: str = "scout", layout: str = "hf", **overrides) -> Path:
    from llama4_quant.tiny.tokenizer import save_tokenizer_files

    tok, info = tok_info
    tc = text_config(variant, vocab_size=info.vocab_size, bos_token_id=info.bos_id, eos_token_id=info.eos_id,
                     pad_token_id=info.pad_id, **{**DIMS, **overrides})
    if layout == "meta":
        path = write_meta_checkpoint(root / name, tc, shards=2)
        save_tokenizer_files(tok, path, tiktoken_model=True)
        (path / "tokenizer.json").unlink()
        (path / "tokenizer_config.json").unlink()
        return path
    path = write_hf_checkpoint(root / name, tc)
    save_tokenizer_files(tok, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok_info):
    root = tmp_path_factory.mktemp("gguf-models")
    return {
        "scout": _model(root, "scout", tok_info),
        "maverick": _model(root, "maverick", tok_info, "maverick"),
        "narrow": _model(root, "narrow", tok_info, hidden_size=64, intermediate_size=96, intermediate_size_mlp=192,
                         head_dim=16),
    }


def _fields(r: GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


LLAMA4_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "expert_feed_forward_length",
               "expert_count", "expert_used_count", "interleave_moe_layer_step", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length",
               "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "vocab_size")


# ------------------------------------------------------------------------------------------------
# the mix rule


def test_mix_rule_follows_llama_quantize():
    n = 48
    bumped = [i for i in range(n) if more_bits(i, n)]
    assert bumped == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47]
    for i in range(n):
        want = T.Q6_K if i in bumped else T.Q4_K
        for local in ("wv", "experts.down", "shared.down", "mlp.down"):
            assert tensor_type("q4_k_m", f"layers.{i}.{local}", n, 8192) == want
            assert tensor_type("q5_k_m", f"layers.{i}.{local}", n, 8192) == (T.Q6_K if i in bumped else T.Q5_K)
        for local in ("wq", "wk", "wo", "experts.gate", "experts.up", "shared.gate", "mlp.up"):
            assert tensor_type("q4_k_m", f"layers.{i}.{local}", n, 5120) == T.Q4_K
        assert tensor_type("q4_k_s", f"layers.{i}.experts.down", n, 8192) == (T.Q5_K if i < 6 else T.Q4_K)
        assert tensor_type("q4_k_s", f"layers.{i}.wv", n, 5120) == (T.Q5_K if i < 4 else T.Q4_K)
        assert tensor_type("q4_0", f"layers.{i}.experts.down", n, 8192, has_imatrix=True) == (T.Q4_1 if i < 6 else T.Q4_0)
        assert tensor_type("q4_0", f"layers.{i}.experts.down", n, 8192) == T.Q4_0
        for local in ("attn_norm", "ffn_norm", "router"):
            for s in ("bf16", "q4_k_m", "q8_0"):
                assert tensor_type(s, f"layers.{i}.{local}", n, 5120) == T.F32
    for s, out in (("q4_k_m", T.Q6_K), ("q4_k_s", T.Q6_K), ("q5_k_m", T.Q6_K), ("q6_k", T.Q6_K), ("q4_0", T.Q6_K),
                   ("q8_0", T.Q8_0), ("bf16", T.BF16), ("f16", T.F16)):
        assert tensor_type(s, "output", n, 5120) == out
    assert tensor_type("q4_k_m", "tok_embeddings", n, 5120) == T.Q4_K
    assert tensor_type("q4_k_m", "norm", n, 5120) == T.F32
    # Mixtral's 8-expert rule
    assert tensor_type("q4_k_m", "layers.9.wv", n, 5120, n_experts=8) == T.Q8_0
    assert tensor_type("q4_k_m", "layers.9.wk", n, 5120, n_experts=8) == T.Q8_0
    assert tensor_type("q4_k_m", "layers.9.wo", n, 5120, n_experts=8) == T.Q5_K
    assert tensor_type("q4_k_m", "layers.9.wo", n, 5120, n_experts=16) == T.Q4_K
    # rows not a multiple of the block
    assert tensor_type("q4_k_m", "layers.9.wq", n, 96) == T.Q5_0
    assert tensor_type("q5_k_m", "layers.9.wq", n, 96) == T.Q5_1
    assert tensor_type("q4_k_m", "layers.0.wv", n, 96) == T.Q8_0
    assert tensor_type("q4_k_m", "output", n, 96) == T.Q8_0
    assert tensor_type("q4_0", "layers.9.wq", n, 100) == T.F16
    assert FILE_TYPE["q4_k_m"] == 15 and FILE_TYPE["bf16"] == 32


def test_names_round_trip():
    for c in ("tok_embeddings", "norm", "output", "layers.3.wq", "layers.0.experts.down", "layers.7.shared.up",
              "layers.2.mlp.gate", "layers.1.router", "layers.1.ffn_norm"):
        assert canonical_name(gguf_name(c)) == c
    assert gguf_name("layers.3.experts.down") == "blk.3.ffn_down_exps.weight"


# ------------------------------------------------------------------------------------------------
# what a file holds


@pytest.mark.parametrize("variant,scheme", [("scout", "q4_k_m"), ("maverick", "q4_k_s"), ("narrow", "q5_k_m")])
def test_file_reads_back_with_every_key_and_tensor(models, tmp_path, variant, scheme):
    path = models[variant]
    out = tmp_path / f"{variant}.gguf"
    summary = run_gguf_convert(path, out, scheme=scheme, method="rtn")
    cfg = open_checkpoint(path).config
    r = GGUFReader(out)
    f = _fields(r)
    assert f["general.architecture"] == "llama4"
    assert f["general.file_type"] == FILE_TYPE[scheme] and f["general.quantization_version"] == 2
    assert f["general.quantized_by"].startswith("llama4-quant")
    for k in LLAMA4_KEYS:
        assert f"llama4.{k}" in f, k
    assert f["llama4.block_count"] == cfg.num_layers
    assert f["llama4.feed_forward_length"] == cfg.intermediate_size_mlp
    assert f["llama4.expert_feed_forward_length"] == cfg.intermediate_size
    assert f["llama4.expert_count"] == cfg.num_experts and f["llama4.expert_used_count"] == cfg.top_k
    assert f["llama4.interleave_moe_layer_step"] == cfg.interleave_moe_layer_step
    assert f["llama4.attention.key_length"] == cfg.head_dim == f["llama4.rope.dimension_count"]
    assert f["llama4.vocab_size"] == cfg.vocab_size
    assert abs(f["llama4.rope.freq_base"] - cfg.rope_theta) < 1e-3
    assert "llama4.attention.sliding_window" not in f
    # tokenizer
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama4"
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.token_type"]) == cfg.vocab_size
    assert f["tokenizer.ggml.bos_token_id"] == cfg.bos_token_id
    assert f["tokenizer.ggml.tokens"][cfg.bos_token_id] == "<|begin_of_text|>"
    assert f["tokenizer.ggml.tokens"][f["tokenizer.ggml.eos_token_id"]] == "<|eot|>"
    assert f["tokenizer.ggml.token_type"][cfg.bos_token_id] == 3 and f["tokenizer.ggml.token_type"][65] == 1
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert len(f["tokenizer.ggml.merges"]) > 0 and all(" " in m for m in f["tokenizer.ggml.merges"])
    assert "tokenizer.chat_template" in f
    # tensors: exactly the planned ones, llama.cpp's names, shapes (ne reversed) and types
    tensors = {t.name: t for t in r.tensors}
    expect = {gguf_name(t.name): (t.full_shape, t.name) for t in tensor_specs(cfg)}
    if cfg.rope_scaling is not None:
        expect["rope_freqs.weight"] = ((cfg.head_dim // 2,), None)
    assert set(tensors) == set(expect)
    for name, (shape, canon) in expect.items():
        t = tensors[name]
        assert tuple(int(x) for x in reversed(t.shape.tolist())) == shape, name
        want = T.F32 if canon is None else tensor_type(scheme, canon, cfg.num_layers, shape[-1], n_experts=cfg.num_experts)
        assert T(int(t.tensor_type)) == want, name
    if variant == "maverick":  # dense layers between MoE layers; 8 experts -> attn_v/attn_k Q8_0
        assert "blk.0.ffn_down.weight" in tensors and "blk.1.ffn_down_exps.weight" in tensors
        assert T(int(tensors["blk.0.attn_v.weight"].tensor_type)) == T.Q8_0
    if variant == "narrow":  # 64-wide rows: llama.cpp's fallbacks
        assert T(int(tensors["blk.1.attn_q.weight"].tensor_type)) == T.Q5_1
        assert T(int(tensors["blk.3.ffn_down_exps.weight"].tensor_type)) == T.Q8_0  # Q6_K -> Q8_0
    assert summary["total_bytes"] == out.stat().st_size


def test_rope_freqs_tokens_and_data(models, tmp_path):
    path = models["scout"]
    out = tmp_path / "s.gguf"
    run_gguf_convert(path, out, scheme="bf16")
    src = open_checkpoint(path)
    cfg = src.config
    t = _tensors(out)
    rf = np.asarray(t["rope_freqs.weight"].data)
    assert np.allclose(rf, rope_freq_factors(cfg).numpy(), rtol=3e-7, atol=0)
    assert np.array_equal(rf, rope_freqs_tensor(cfg)) and rf.max() == 8.0 and rf.min() == 1.0
    # bf16 data is the checkpoint's, exactly; routers and norms F32
    from llama4_quant.formats.gguf.reader import open_gguf

    g = open_gguf(out)
    for name in ("tok_embeddings", "layers.1.wq", "layers.2.router", "layers.0.attn_norm", "output"):
        assert torch.equal(g.read(name), src.read(name).float()), name
    for e in range(cfg.num_experts):
        assert torch.equal(g.read_expert(1, "down", e), src.read_expert(1, "down", e).float())
    # tokens are the tokenizer's vocabulary, in id order
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokens = _fields(GGUFReader(out))["tokenizer.ggml.tokens"]
    assert tokens == [tok.id_to_token(i) for i in range(cfg.vocab_size)]


def test_meta_layout_gives_the_same_file(tmp_path, tok_info):
    """Meta's consolidated.*.pth + params.json + tiktoken tokenizer.model: same tensors and vocabulary."""
    dims = dict(intermediate_size=512, intermediate_size_mlp=1024)  # widths llama-models' FFN sizing can express
    meta = _model(tmp_path, "meta", tok_info, layout="meta", **dims)
    hf = _model(tmp_path, "hf", tok_info, **dims)
    a, b = tmp_path / "meta.gguf", tmp_path / "hf.gguf"
    run_gguf_convert(meta, a, scheme="q8_0", method="rtn")
    run_gguf_convert(hf, b, scheme="q8_0", method="rtn")
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for n in ta:
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n
    fa, fb = _fields(GGUFReader(a)), _fields(GGUFReader(b))
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert fa[k] == fb[k], k
    # tiktoken has ranks, not merges: model/tokenizer.py derives every merge that builds a token, which
    # includes the trained BPE's (and orders merges by the rank of the token they make, as tiktoken does)
    assert set(fb["tokenizer.ggml.merges"]) <= set(fa["tokenizer.ggml.merges"])


# ------------------------------------------------------------------------------------------------
# llama.cpp's hard-coded llama4 settings


def test_compat_warning():
    def cfg(variant, **kw):
        return from_hf_dict(hf_config(text_config(variant, **kw)))

    assert compat_warning(cfg("scout")) is None
    w = compat_warning(cfg("chunked"))
    assert w and "attention_chunk_size 8 (llama.cpp: 8192)" in w and "floor_scale 4" in w and "attn_scale 0.5" in w
    assert "\n" not in w
    assert any("use_qk_norm False (llama.cpp: True" in d for d in llamacpp_differences(cfg("maverick")))
    assert llamacpp_differences(cfg("maverick", num_local_experts=128)) == []
    assert any("NoPE" in d for d in llamacpp_differences(cfg("scout", no_rope_layer_interval=2)))
    full = cfg("scout", attention_chunk_size=None, no_rope_layer_interval=1000)
    assert compat_warning(full) is None


def test_warning_reaches_json_and_stderr(cli, models, tmp_path, tok_info):
    path = _model(tmp_path, "chunked", tok_info, "chunked")
    r = cli("convert", str(path), str(tmp_path / "c.gguf"), "--to", "gguf", "--scheme", "q8_0", "--method", "rtn", "--json")
    assert r.returncode == 0, r.stderr
    import json

    s = json.loads(r.stdout)
    assert any("attention_chunk_size 8" in w for w in s["warnings"])
    lines = [line for line in r.stderr.splitlines() if "llama.cpp hard-codes" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    r2 = cli("inspect", str(tmp_path / "c.gguf"), "--json")
    assert r2.returncode == 0, r2.stderr
    info = json.loads(r2.stdout)
    assert info["by_type"]["Q8_0"]["tensors"] > 0 and info["metadata"]["general.file_type"] == FILE_TYPE["q8_0"]
    assert info["llama_cpp_runs"]["attention_chunk_size"] == 8192


# ------------------------------------------------------------------------------------------------
# GPTQ grid adapter


def test_block_grid_is_the_packers_grid():
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    for qt in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q8_0):
        g = BlockGrid(qt)
        params, cols = [], []
        for s in range(0, 512, g.group_size):
            p = g.fit(w[:, s:s + g.group_size])
            cols.append(torch.cat([g.quantize(w[:, s + j:s + j + 1], p, j) for j in range(g.group_size)], dim=1))
            params.append(p)
        q = torch.cat(cols, dim=1)
        packed = pack_result(q, params)
        assert torch.equal(torch.from_numpy(gq.dequantize(packed, qt)), q), qt.name
        if qt in (T.Q4_K, T.Q5_K, T.Q6_K):  # RTN on the grid decodes like llama.cpp's own quantization
            assert np.array_equal(gq.dequantize(packed, qt), gq.dequantize(gq.quantize(w, qt), qt)), qt.name


def test_ref_grid_for_fallback_types():
    from gguf.quants import quantize as ref_quantize

    from llama4_quant.formats.gguf.grid import RefGrid
    from llama4_quant.quant.rtn import rtn

    torch.manual_seed(2)
    w = torch.randn(16, 96)
    for qt in (T.Q4_1, T.Q5_0, T.Q5_1, T.F16):
        res = rtn(w, RefGrid(qt))
        assert np.array_equal(pack_result(res.weight, res.params).view(np.uint8),
                              ref_quantize(w.numpy(), qt).reshape(16, -1).view(np.uint8)), qt.name


def test_gptq_with_fallback_types(models, tmp_path):
    """64-wide model: gate/up fall back to Q5_0 (no GPTQ grid) while some ffn_down are Q8_0 (grid): still converts,
    and the file decodes to the weights the pipeline calibrated the next layers on."""
    from llama4_quant.tiny.corpus import corpus_splits

    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_splits(0)["calib"][:20_000])
    out = tmp_path / "n.gguf"
    s = run_gguf_convert(models["narrow"], out, scheme="q4_k_m", method="gptq", calib=str(calib), calib_samples=4,
                         calib_seqlen=64)
    assert s["method"] == "gptq" and s["tensor_types"]["Q5_0"]["tensors"] > 0 and "Q8_0" in s["tensor_types"]
    t = _tensors(out)
    assert T(int(t["blk.3.ffn_down_exps.weight"].tensor_type)) == T.Q8_0
    assert T(int(t["blk.3.ffn_gate_exps.weight"].tensor_type)) == T.Q5_0


def test_gptq_on_block_grid_lowers_output_error():
    """GPTQ on the Q4_K grid beats llama.cpp's RTN and its imatrix-weighted search on correlated inputs."""
    from llama4_quant.quant.gptq import GPTQConfig, gptq

    torch.manual_seed(1)
    z = torch.randn(4096, 256)
    x = (z @ (torch.randn(256, 256) / 16 + torch.eye(256))) * torch.linspace(0.2, 3, 256)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(128, 256) * 0.05
    err = lambda q: float((((q - w) @ h) * (q - w)).sum())  # noqa: E731
    rtn = err(torch.from_numpy(gq.dequantize(gq.quantize(w, T.Q4_K), T.Q4_K)))
    imat = err(torch.from_numpy(gq.dequantize(gq.quantize(w, T.Q4_K, h.diagonal().numpy()), T.Q4_K)))
    for act_order, factor in ((False, 0.95), (True, 0.7)):
        res = gptq(w, h, BlockGrid(T.Q4_K), GPTQConfig(act_order=act_order))
        packed = pack_result(res.weight, res.params)
        assert torch.equal(torch.from_numpy(gq.dequantize(packed, T.Q4_K)), res.weight)
        assert err(res.weight) < factor * min(rtn, imat), (act_order, err(res.weight), rtn, imat)


# ------------------------------------------------------------------------------------------------
# split, atomicity


def test_split_output(models, tmp_path):
    path = models["narrow"]
    single, split = tmp_path / "one.gguf", tmp_path / "many.gguf"
    run_gguf_convert(path, single, scheme="q8_0", method="rtn")
    s = run_gguf_convert(path, split, scheme="q8_0", method="rtn", split_max_size=100_000)
    files = [Path(f) for f in s["files"]]
    n = len(files)
    assert n > 2 and not split.exists()
    assert [f.name for f in files] == [f"many-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    names = []
    for k, f in enumerate(files):
        r = GGUFReader(f)
        fl = _fields(r)
        assert fl["split.no"] == k and fl["split.count"] == n
        assert fl["split.tensors.count"] == len(_tensors(single))
        assert sum(int(t.n_bytes) for t in r.tensors) <= 100_000 or len(r.tensors) == 1
        assert ("llama4.block_count" in fl) == (k == 0)  # metadata in the first split only, as gguf-split does
        names += [t.name for t in r.tensors]
    one = _tensors(single)
    assert sorted(names) == sorted(one)
    from llama4_quant.formats.gguf.reader import open_gguf

    a, b = open_gguf(files[-1]), open_gguf(single)
    for name in ("layers.3.experts.gate", "output", "layers.0.wq", "layers.2.router"):
        assert torch.equal(a.read(name), b.read(name))


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    with pytest.raises(Llama4QuantError, match="exists"):
        run_gguf_convert(models["narrow"], out, scheme="q8_0", method="rtn")
    # --force replaces only what llama4-quant wrote: a foreign file is kept
    with pytest.raises(Llama4QuantError, match="not a GGUF written by llama4-quant"):
        run_gguf_convert(models["narrow"], out, scheme="q8_0", method="rtn", force=True)
    assert out.read_bytes() == b"old"
    out.unlink()
    # --force removes an older split set of ours with the same name
    run_gguf_convert(models["narrow"], out, scheme="q8_0", method="rtn", split_max_size=100_000)
    parts = sorted(tmp_path.glob("x-*-of-*.gguf"))
    assert len(parts) > 1
    run_gguf_convert(models["narrow"], out, scheme="q8_0", method="rtn", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert not any(p.exists() for p in parts)
    run_gguf_convert(models["narrow"], out, scheme="q8_0", method="rtn", force=True)  # ours: replaced


def _no_output(d: Path, stem: str) -> None:
    left = [p.name for p in d.iterdir() if p.name.startswith(stem) and p.name.endswith(".gguf")]
    assert left == []


def test_failure_mid_write_leaves_nothing(models, tmp_path, monkeypatch):
    import llama4_quant.convert.gguf as gc

    calls = {"n": 0}
    real = gc.encode

    def flaky(w, qtype, imatrix=None):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(w, qtype, imatrix)

    monkeypatch.setattr(gc, "encode", flaky)
    with pytest.raises(OSError):
        run_gguf_convert(models["narrow"], tmp_path / "y.gguf", scheme="q8_0", method="rtn", split_max_size=100_000)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_incomplete_or_wrong_data(tmp_path):
    plan = [PlannedTensor("a.weight", None, (4, 256), T.F32), PlannedTensor("b.weight", None, (2, 3, 32), T.Q8_0, 2)]
    w = GGUFFileWriter(tmp_path / "z.gguf", plan)
    w.open(lambda gw: None)
    w.write("a.weight", np.zeros((4, 256), np.float32))
    with pytest.raises(Llama4QuantError, match="expected"):
        w.write("b.weight", np.zeros(10, np.uint8), expert=0)
    w.write("b.weight", gq.quantize(np.ones((3, 32), np.float32), T.Q8_0), expert=1)
    with pytest.raises(Llama4QuantError, match=r"never written.*b.weight\[0\]"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_refused_before_writing(models, tmp_path, monkeypatch):
    import shutil as sh

    import llama4_quant.formats.gguf.writer as gw

    monkeypatch.setattr(gw.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(Llama4QuantError, match="GiB free"):
        run_gguf_convert(models["narrow"], tmp_path / "d.gguf", scheme="q8_0", method="rtn")
    assert list(tmp_path.iterdir()) == []


def test_killed_conversion_leaves_no_complete_looking_file(models, tmp_path):
    """SIGKILL in the middle of a GPTQ conversion: no OUT (nor split part) appears; the next run cleans up."""
    calib = tmp_path / "calib.txt"
    from llama4_quant.tiny.corpus import corpus_splits

    calib.write_text(corpus_splits(0)["calib"][:20_000])
    out = tmp_path / "k.gguf"
    args = [sys.executable, "-m", "llama4_quant", "convert", str(models["narrow"]), str(out), "--to", "gguf",
            "--method", "gptq", "--calib", str(calib), "--calib-samples", "2", "--calib-seqlen", "64"]
    env = {**os.environ, "LLAMA4_QUANT_INJECT": "kill@2"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -9
    _no_output(tmp_path, "k")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".k.gguf.partial-")]  # the dead run's temp dir
    env["LLAMA4_QUANT_INJECT"] = "error@0"
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "injected failure" in r.stderr
    _no_output(tmp_path, "k")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".k.gguf")]  # stale and own temp dirs gone


def test_write_rows_in_order_and_complete(tmp_path):
    """Row blocks of a 2-D tensor: in order, each where the last ended; the tensor is done at its last row."""
    x = np.random.default_rng(0).standard_normal((10, 256)).astype(np.float32)
    plan = [PlannedTensor("e.weight", None, (10, 256), T.Q4_K)]
    w = GGUFFileWriter(tmp_path / "r.gguf", plan)
    w.open(lambda gw: None)
    w.write_rows("e.weight", 0, gq.quantize(x[:4], T.Q4_K))
    with pytest.raises(Llama4QuantError, match="out of order"):
        w.write_rows("e.weight", 6, gq.quantize(x[6:], T.Q4_K))
    with pytest.raises(Llama4QuantError, match="written twice"):
        w.write("e.weight", gq.quantize(x, T.Q4_K))
    assert w.missing() == ["e.weight"]
    w.write_rows("e.weight", 4, gq.quantize(x[4:], T.Q4_K))
    assert w.missing() == []
    (path,) = w.commit()
    (t,) = GGUFReader(path).tensors
    assert np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), gq.quantize(x, T.Q4_K).ravel())


def test_embeddings_and_head_streamed_in_row_blocks_give_the_same_file(models, tmp_path, monkeypatch):
    """The pipeline streams the embeddings and an uncalibrated head in row blocks: same bytes as one block."""
    import llama4_quant.convert.pipeline as pl

    run_gguf_convert(models["scout"], tmp_path / "whole.gguf", scheme="q4_k_m", method="rtn")
    reads = []
    real = pl.CheckpointReader.read_rows

    def spy(self, name, r0, r1):
        reads.append((name, r1 - r0))
        return real(self, name, r0, r1)

    monkeypatch.setattr(pl, "ROW_BLOCK_ELEMENTS", 256 * 7)  # 7 rows per block: a ragged last block
    monkeypatch.setattr(pl.CheckpointReader, "read_rows", spy)
    run_gguf_convert(models["scout"], tmp_path / "blocks.gguf", scheme="q4_k_m", method="rtn")
    assert {n for n, _ in reads} == {"tok_embeddings", "output"} and max(k for _, k in reads) == 7
    a, b = _tensors(tmp_path / "whole.gguf"), _tensors(tmp_path / "blocks.gguf")
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name


def test_calibrated_head_quantized_in_row_blocks(models, tmp_path, monkeypatch):
    """GPTQ of the head in row blocks against one factor (memory: one block of the table, not the whole): the file
    holds the same head up to float rounding order as one block would give, and one record covers the blocks."""
    import llama4_quant.convert.pipeline as pl
    from llama4_quant.tiny.corpus import corpus_splits

    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_splits(0)["calib"][:20_000])
    kw = dict(scheme="q4_k_m", method="gptq", calib=str(calib), calib_samples=2, calib_seqlen=64)
    run_gguf_convert(models["scout"], tmp_path / "whole.gguf", **kw)
    rows = int(_tensors(tmp_path / "whole.gguf")["output.weight"].shape[-1])
    monkeypatch.setattr(pl, "ROW_BLOCK_ELEMENTS", 256 * 64)  # 64 rows of the 256-wide head per block
    reports = []
    real = pl.Pipeline._report
    monkeypatch.setattr(pl.Pipeline, "_report", lambda self, *a: reports.append(real(self, *a)) or reports[-1])
    run_gguf_convert(models["scout"], tmp_path / "blocks.gguf", **kw)
    a, b = _tensors(tmp_path / "whole.gguf")["output.weight"], _tensors(tmp_path / "blocks.gguf")["output.weight"]
    qt = T(int(a.tensor_type))
    assert T(int(b.tensor_type)) == qt
    va = gq.dequantize(np.asarray(a.data).view(np.uint8), qt)
    vb = gq.dequantize(np.asarray(b.data).view(np.uint8), qt)
    assert va.shape == vb.shape and float(np.mean(va != vb)) < 0.01
    rec = reports[0]["tensors"]["output"]
    assert rec["row_blocks"] == -(-rows // 64) and rec["method"] == "gptq"
    assert rec["loss"] <= rec["rtn_loss"] and 0 < rec["rel_loss"] < 1
