"""Quality of converted models on the tiny *trained* checkpoint, scored with our own layer-wise forward on the
weights read back from the output directory (QuantizedSource: our dequantization, which the export tests pin
bit for bit to compressed-tensors'), on the fixture's held-out test.txt:

- w4a16 perplexity within a few percent of the bf16 model;
- GPTQ closer to bf16 than RTN, by mean KL divergence of the next-token distributions (more sensitive than ppl);
- fp8 within 1% (weights only: fp8-dynamic's per-token activation quantization happens in the serving runtime).
"""

from __future__ import annotations

import pytest
import torch

from support.convert import safetensors as run_convert
from llama4_quant.formats.compressed_tensors.reader import QuantizedSource
from llama4_quant.eval.evaluate import score_chunks
from llama4_quant.eval.perplexity import make_chunks
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.tokenizer import load_tokenizer

CTX, CHUNKS = 128, 12


@pytest.fixture(scope="module")
def reference(trained_model):
    tok = load_tokenizer(trained_model)
    chunks = make_chunks(tok.encode((trained_model / "test.txt").read_text()), CTX, CHUNKS, tok.bos_id)
    logp = {}
    scores = score_chunks(open_checkpoint(trained_model), chunks, on_logp=lambda k, lp: logp.__setitem__(k, lp))
    return chunks, scores.perplexity, logp


def _score(src, reference) -> tuple[float, float]:
    chunks, _, ref_logp = reference
    kl = []

    def on_logp(k, lp):
        kl.append((ref_logp[k].exp() * (ref_logp[k] - lp)).sum(-1))

    scores = score_chunks(src, chunks, on_logp=on_logp)
    return scores.perplexity, float(torch.cat(kl).mean())


@pytest.fixture(scope="module")
def results(trained_model, reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    runs = {"rtn": dict(scheme="w4a16", method="rtn"), "gptq": dict(scheme="w4a16", method="gptq"),
            "fp8": dict(scheme="fp8-dynamic", method="rtn")}
    out = {}
    for name, kw in runs.items():
        run_convert(str(trained_model), str(root / name), calib=str(trained_model / "calib.txt"), calib_samples=32,
                    calib_seqlen=256, device="cpu", **kw)
        out[name] = _score(QuantizedSource(root / name), reference)
    return out


@pytest.mark.slow
def test_w4a16_close_to_bf16_and_gptq_beats_rtn(reference, results):
    _, ppl_ref, _ = reference
    (ppl_rtn, kl_rtn), (ppl_gptq, kl_gptq) = results["rtn"], results["gptq"]
    print(f"bf16 ppl {ppl_ref:.4f} | rtn {ppl_rtn:.4f} kl {kl_rtn:.5f} | gptq {ppl_gptq:.4f} kl {kl_gptq:.5f}")
    assert ppl_rtn < ppl_ref * 1.03 and ppl_gptq < ppl_ref * 1.03
    assert kl_gptq < 0.8 * kl_rtn


@pytest.mark.slow
def test_fp8_within_one_percent(reference, results):
    _, ppl_ref, _ = reference
    ppl, kl = results["fp8"]
    assert abs(ppl / ppl_ref - 1) < 0.01
    assert kl < results["rtn"][1]
