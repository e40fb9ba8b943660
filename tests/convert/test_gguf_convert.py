"""`convert --to gguf` on the trained fixture: exactness of bf16 and rtn, GPTQ vs RTN vs imatrix, and llama.cpp itself
(`llama-perplexity`, `llama-quantize`, `llama-imatrix`, `convert_hf_to_gguf.py`; tests marked `llamacpp` skip without
a build, see docs/llamacpp.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from llama4_quant.eval.compare import compare_models
from llama4_quant.eval.evaluate import score_chunks
from llama4_quant.eval.perplexity import make_chunks
from llama4_quant.formats.gguf import quants as gq
from llama4_quant.convert.pipeline import Pipeline
from llama4_quant.formats.gguf.imatrix import load_imatrix_file
from support.convert import gguf as run_gguf_convert
from llama4_quant.formats.gguf.names import canonical_name
from llama4_quant.formats.gguf.reader import open_gguf
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.tokenizer import load_tokenizer
from support.llamacpp import find_llamacpp

LLAMA = find_llamacpp()
needs_llamacpp = pytest.mark.skipif(LLAMA is None, reason="llama.cpp tools not built (scripts/build_llamacpp.sh)")
CALIB = dict(calib_samples=16, calib_seqlen=256)  # 4096 calibration tokens: enough to separate the methods, fast


@pytest.fixture(scope="module")
def runs(trained_model, tmp_path_factory):
    """The trained fixture as bf16, and as q4_k_m by rtn, imatrix and gptq (same calibration text)."""
    d = tmp_path_factory.mktemp("gguf-trained")
    calib = str(trained_model / "calib.txt")
    out = {"dir": d, "model": trained_model, "summary": {}}
    for key, kw in (("bf16", dict(scheme="bf16")), ("rtn", dict(method="rtn")),
                    ("imatrix", dict(method="imatrix", calib=calib, **CALIB)),
                    ("gptq", dict(method="gptq", calib=calib, **CALIB))):
        out[key] = d / f"{key}.gguf"
        out["summary"][key] = run_gguf_convert(trained_model, out[key], **kw)
    return out


@pytest.fixture(scope="module")
def chunks(trained_model):
    tok = load_tokenizer(trained_model)
    return make_chunks(tok.encode((trained_model / "test.txt").read_text()), 128, 64, tok.bos_id)


def test_bf16_perplexity_equals_source(runs, chunks):
    src = score_chunks(open_checkpoint(runs["model"]), chunks).perplexity
    ours = score_chunks(open_gguf(runs["bf16"]), chunks).perplexity
    assert abs(ours / src - 1) < 1e-5, (ours, src)


def test_rtn_tensors_are_gguf_quants_of_the_weights(runs):
    src = open_checkpoint(runs["model"])
    cfg = src.config
    types = set()
    for t in GGUFReader(runs["rtn"]).tensors:
        if t.name == "rope_freqs.weight":
            continue
        canon = canonical_name(t.name)
        qt = T(int(t.tensor_type))
        if canon.split(".")[-2:-1] == ["experts"]:
            layer, kind = int(canon.split(".")[1]), canon.split(".")[-1]
            w = torch.stack([src.read_expert(layer, kind, e) for e in range(cfg.num_experts)])
        else:
            w = src.read(canon)
        want = gq.quantize(w.float(), qt)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)), t.name
        types.add(qt)
    assert {T.Q4_K, T.Q6_K, T.F32} <= types


def test_gptq_beats_rtn_and_imatrix(runs, chunks):
    ref, cands = compare_models(open_checkpoint(runs["model"]),
                                [open_gguf(runs[k]) for k in ("rtn", "imatrix", "gptq")], chunks)
    rtn, imat, gptq = (c.summary(ref) for c in cands)
    print({k: (round(c["kld_mean"], 5), round(c["ppl_increase_pct"], 3), round(c["top1_agreement"], 4))
           for k, c in (("rtn", rtn), ("imatrix", imat), ("gptq", gptq))})
    # KLD separates the methods on a tiny model; perplexity changes of 4-bit sit at the noise floor there
    # (+0.4% vs +0.5% flips with the text), so they are reported, not compared. The margin holds across retrained
    # models: GPTQ / min(RTN, imatrix) measured 0.72-0.89 on the shipped model and 5 others trained with other seeds
    # or on other machines (4096 calibration tokens), 0.75-0.92 with 256-1024 tokens; a small change of rounding
    # moves this ratio by up to ~0.1 on a model this small, so 0.95 is the bar, not 0.9. What GPTQ losing to RTN
    # looks like (1.2x with 256 tokens before the Hessian shrinkage, 1.9x in issue 11) fails it.
    assert gptq["kld_mean"] < 0.95 * min(rtn["kld_mean"], imat["kld_mean"]), (rtn, imat, gptq)
    assert gptq["top1_agreement"] > rtn["top1_agreement"] - 0.005
    sizes = {k: runs["summary"][k]["total_bytes"] for k in ("rtn", "imatrix", "gptq")}
    assert max(sizes.values()) - min(sizes.values()) < 1024  # same types: only the metadata differs


def test_gptq_summary_and_metadata(runs):
    s = runs["summary"]["gptq"]
    assert s["method"] == "gptq" and s["scheme"] == "q4_k_m" and s["format"] == "gguf"
    assert s["calibration"]["tokens"] == 16 * 256 and len(s["calibration"]["tokens_sha256"]) == 64
    assert s["tokens_per_expert"]["max"] > 0 and len(s["layer_loss"]) == 4
    assert s["quantized_tensors"] > 0
    fields = {k: f.contents() for k, f in GGUFReader(runs["gptq"]).fields.items()}
    assert fields["llama4_quant.method"] == "gptq" and fields["general.file_type"] == 15
    assert fields["llama4_quant.calibration.tokens_sha256"] == s["calibration"]["tokens_sha256"]
    assert runs["summary"]["imatrix"]["tokens_per_expert"]["max"] > 0


def test_cli_convert_to_gguf(runs, cli, tmp_path):
    out = tmp_path / "cli.gguf"
    r = cli("convert", str(runs["model"]), str(out), "--to", "gguf", "--scheme", "q4_0", "--method", "rtn", "--verify",
            "--eval-data", str(runs["model"] / "test.txt"), "--verify-ctx", "128", "--verify-chunks", "4")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: q4_0 via rtn" in r.stdout and "verify: PPL" in r.stdout and "PASS" in r.stdout
    t = {x.name: x for x in GGUFReader(out).tensors}
    assert T(int(t["blk.0.attn_q.weight"].tensor_type)) == T.Q4_0 and T(int(t["output.weight"].tensor_type)) == T.Q6_K
    r = cli("convert", str(runs["model"]), str(out), "--to", "gguf", "--scheme", "q4_0", "--method", "rtn")
    assert r.returncode == 1 and "exists" in r.stderr


# ------------------------------------------------------------------------------------------------
# llama.cpp


def _llama_ppl(path, model) -> float:
    from support.llamacpp import run_perplexity

    # one thread: ggml's OpenMP workers spin at barriers, which crawls when the 2 cores are shared
    return run_perplexity(path, model / "test.txt", 128, threads=1, llama=LLAMA, timeout=600)["ppl"]


@pytest.mark.llamacpp
@needs_llamacpp
def test_llama_perplexity_matches_our_evaluator(runs, trained_model):
    tok = load_tokenizer(trained_model)
    full = make_chunks(tok.encode((trained_model / "test.txt").read_text()), 128, None, tok.bos_id)
    for key in ("bf16", "gptq"):
        ours = score_chunks(open_gguf(runs[key]), full).perplexity
        theirs = _llama_ppl(runs[key], trained_model)
        assert abs(theirs / ours - 1) < 0.01, (key, theirs, ours)


def _converter_output(model: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on the fixture. Its pre-tokenizer detection hashes the token ids of a
    probe text, which only the real Llama 4 tokenizer reproduces: our tiny tokenizer (same pre-tokenizer regex)
    is declared `llama4` by replacing that one lookup."""
    script = LLAMA.convert_hf
    code = ("import runpy, sys\n"
            "import conversion.base as base\n"
            "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama4'\n"
            f"sys.argv = [{str(script)!r}, {str(model)!r}, '--outfile', {str(out)!r}, '--outtype', 'bf16']\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=LLAMA.converter_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.llamacpp
@needs_llamacpp
@pytest.mark.skipif(LLAMA is not None and LLAMA.convert_hf is None, reason="this llama.cpp build has no converter")
def test_same_file_as_llamacpp_converter(runs, trained_model):
    theirs = _converter_output(trained_model, runs["dir"] / "converter-bf16.gguf")
    a, b = GGUFReader(theirs), GGUFReader(runs["bf16"])
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    model_keys = lambda f: {k for k in f if k.startswith(("llama4.", "tokenizer."))}  # noqa: E731
    # add_sep_token: the converter's guess from the post-processor's *pair* template; llama.cpp ignores it for BPE
    assert model_keys(fa) - {"tokenizer.ggml.add_sep_token"} == model_keys(fb)
    for k in model_keys(fb) | {"general.architecture", "general.file_type", "general.quantization_version",
                               "general.type", "general.sampling.temp", "general.sampling.top_p"}:
        assert fa[k] == fb[k], k
    for k, f in a.fields.items():  # same value types too (uint32 vs int32 etc.)
        if k in fb and not k.startswith("GGUF."):
            assert f.types == b.fields[k].types, k
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type and list(t.shape) == list(tb[n].shape), n
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8)), n
    assert _llama_ppl(theirs, trained_model) == _llama_ppl(runs["bf16"], trained_model)


@pytest.mark.llamacpp
@needs_llamacpp
def test_rtn_is_bit_exact_with_llama_quantize(runs):
    from support.llamacpp import run_quantize

    theirs = run_quantize(runs["bf16"], runs["dir"] / "lq-q4_k_m.gguf", "Q4_K_M", threads=1, llama=LLAMA, timeout=600)
    _same_tensors(theirs, runs["rtn"])


def _same_tensors(a, b) -> None:
    ta, tb = {t.name: t for t in GGUFReader(a).tensors}, {t.name: t for t in GGUFReader(b).tensors}
    assert set(ta) == set(tb)
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type, n
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8)), n


@pytest.mark.llamacpp
@needs_llamacpp
def test_imatrix_statistic_and_quantization_match_llamacpp(runs, trained_model, tmp_path):
    """llama-imatrix's statistic is ours (same chunks), and quantizing with its file reproduces llama-quantize."""
    from support.llamacpp import run_imatrix, run_quantize

    ctx = 512
    imat = run_imatrix(runs["bf16"], trained_model / "calib.txt", tmp_path / "imatrix.gguf", ctx, chunks=24,
                       threads=1, llama=LLAMA, timeout=600)
    src = open_checkpoint(trained_model)
    theirs = load_imatrix_file(imat, src.config)
    tok = load_tokenizer(trained_model)
    ids = tok.encode((trained_model / "calib.txt").read_text())
    tokens = torch.tensor([ids[k * ctx:(k + 1) * ctx] for k in range(24)])
    tokens[:, 0] = tok.bos_id  # llama-imatrix's chunks, as llama-perplexity's: BOS first
    ours = Pipeline(src, None).collect_importance(tokens)
    assert set(theirs.sums) <= set(ours.sums)
    for k, s in theirs.sums.items():
        c_ours, c_theirs = ours.counts[k].double(), theirs.counts[k].double()
        assert torch.allclose(c_ours, c_theirs, rtol=0.02, atol=2), k  # routing ties can flip a few tokens
        mean_ours = ours.sums[k] / c_ours.clamp(min=1).unsqueeze(-1 if s.ndim > 1 else 0)
        mean_theirs = s / c_theirs.clamp(min=1).unsqueeze(-1 if s.ndim > 1 else 0)
        rel = float((mean_ours - mean_theirs).abs().max() / mean_theirs.abs().max())
        assert rel < 0.02, (k, rel)  # llama.cpp rounds activations to bf16 for bf16 weights
    # same statistics -> same bytes as llama-quantize --imatrix
    ref = run_quantize(runs["bf16"], tmp_path / "lq-imat.gguf", "Q4_K_M", imatrix=imat, threads=1, llama=LLAMA,
                       timeout=600)
    mine = tmp_path / "ours-imat.gguf"
    run_gguf_convert(trained_model, mine, scheme="q4_k_m", imatrix_file=imat)
    _same_tensors(ref, mine)


def test_summary_says_how_the_rtn_guard_decided(runs):
    """Per layer, the calibrated tensors whose RTN guard ran on a sample of rows and those it ran exactly (the
    trained model's weights have too few rows to sample); absent for uncalibrated runs."""
    guard = runs["summary"]["gptq"]["rtn_guard"]
    n_layers = len(runs["summary"]["gptq"]["timing"]["layer_seconds"])
    assert len(guard) == n_layers
    assert all(g["sampled"] == 0 and g["exact"] > 0 for g in guard), guard
    assert runs["summary"]["rtn"]["rtn_guard"] is None
