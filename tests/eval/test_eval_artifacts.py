"""eval on artifacts read back from disk: a compressed-tensors output of `convert`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama4_quant.eval.perplexity import ChunkScores, make_chunks
from llama4_quant.model.tokenizer import load_tokenizer

CTX, CHUNKS = 128, 8


@pytest.fixture(scope="module")
def w4a16(trained_model, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("ct") / "w4a16"
    proc = cli("convert", str(trained_model), str(out), "--to", "safetensors", "--scheme", "w4a16", "--method", "rtn",
               "--calib", str(trained_model / "calib.txt"), "--calib-samples", "4", "--calib-seqlen", "128")
    assert proc.returncode == 0, proc.stderr
    return out


def test_eval_compressed_tensors_candidate(trained_model, w4a16, cli):
    proc = cli("eval", str(trained_model), str(w4a16), "--data", str(trained_model / "test.txt"), "--ctx", str(CTX),
               "--chunks", str(CHUNKS), "--max-ppl-increase", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)["candidates"][0]
    assert 0 < c["kld_mean"] < 0.05 and c["top1_agreement"] > 0.9
    assert all(e > 0 for e in c["layer_error"])  # every layer's experts were quantized


def test_candidate_ppl_matches_transformers_on_decompressed(trained_model, w4a16, cli):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    proc = cli("eval", str(trained_model), str(w4a16), "--data", str(trained_model / "test.txt"), "--ctx", str(CTX),
               "--chunks", str(CHUNKS), "--json")
    ours = json.loads(proc.stdout)["candidates"][0]["perplexity"]
    tok = load_tokenizer(trained_model)
    chunks = make_chunks(tok.encode((trained_model / "test.txt").read_text()), CTX, CHUNKS, tok.bos_id)
    model = transformers.AutoModelForImageTextToText.from_pretrained(w4a16, dtype=torch.float32) \
        if hasattr(transformers, "AutoModelForImageTextToText") else transformers.Llama4ForConditionalGeneration.from_pretrained(w4a16, dtype=torch.float32)
    s = ChunkScores()
    with torch.no_grad():
        for k in range(len(chunks)):
            s.add(model(input_ids=chunks[k : k + 1]).logits[0], chunks[k])
    assert ours == pytest.approx(s.perplexity, rel=5e-3)


def test_candidate_with_missing_shard(trained_model, w4a16, tmp_path, cli):
    broken = tmp_path / "broken"
    shutil.copytree(w4a16, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.unlink()
    proc = cli("eval", str(trained_model), str(broken), "--data", str(trained_model / "test.txt"), "--ctx", str(CTX),
               "--chunks", "2")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "is missing" in proc.stderr and shard.name in proc.stderr
    (broken / "llama4-quant.json").unlink()  # without its manifest, the reader still names the missing shard
    proc = cli("eval", str(trained_model), str(broken), "--data", str(trained_model / "test.txt"), "--ctx", str(CTX),
               "--chunks", "2")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "missing shard" in proc.stderr and shard.name in proc.stderr
