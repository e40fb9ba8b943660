"""`convert --to gguf --scheme q3_k_m|q3_k_s|q2_k|iq4_xs|iq4_nl|mxfp4_moe` against llama.cpp itself: `--method rtn` is
`llama-quantize TYPE` of our bf16 GGUF byte for byte, and `--imatrix FILE` is `llama-quantize --imatrix FILE`
byte for byte (FILE from `llama-imatrix`). Three models: the shipped trained one, and two random ones that reach
the other branches of llama.cpp's rule: 16 layers with 4 query heads per KV head and 96-wide experts (the
Q5_0/Q5_1/Q4_0/IQ4_NL fallbacks, n/8 and n/16 layer rules, q4_0's Q4_1 with an imatrix), and a Maverick-like one
with 8 experts (attn_v/attn_k Q8_0, attn_output Q5_K) and 80-wide dense layers (F16). Skipped without a llama.cpp
build (scripts/build_llamacpp.sh)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from support.convert import gguf as run_gguf_convert
from support.llamacpp import find_llamacpp

LLAMA = find_llamacpp()
pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(LLAMA is None, reason="llama.cpp tools not built (scripts/build_llamacpp.sh)")]

LQ_NAME = {"q3_k_m": "Q3_K_M", "q3_k_s": "Q3_K_S", "q2_k": "Q2_K", "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL",
           "mxfp4_moe": "MXFP4_MOE", "q4_0": "Q4_0"}
# the types each case must show (over its rtn and imatrix files): the branches of the rule it reaches
EXPECT = {
    ("trained", "q3_k_m"): {"Q3_K", "Q4_K", "Q5_K", "Q6_K"},
    ("trained", "q3_k_s"): {"Q3_K", "Q6_K"},
    ("trained", "q2_k"): {"Q2_K", "Q3_K", "Q6_K"},
    ("trained", "iq4_xs"): {"IQ4_XS", "Q6_K"},
    ("trained", "iq4_nl"): {"IQ4_NL", "Q6_K"},
    ("trained", "mxfp4_moe"): {"MXFP4", "Q8_0"},
    ("gqa4", "q3_k_m"): {"Q3_K", "Q4_K", "Q5_K", "Q5_0", "Q5_1", "Q6_K"},
    ("gqa4", "q2_k"): {"Q2_K", "Q3_K", "Q4_K", "Q4_0"},
    ("gqa4", "iq4_xs"): {"IQ4_XS", "IQ4_NL", "Q5_K", "Q5_1"},
    ("gqa4", "q4_0"): {"Q4_0", "Q4_1", "Q6_K"},
    ("experts8", "q3_k_s"): {"Q3_K", "Q5_K", "Q8_0", "F16"},
    ("experts8", "iq4_nl"): {"IQ4_NL", "Q5_K", "Q8_0", "F16"},
    ("experts8", "mxfp4_moe"): {"MXFP4", "Q8_0", "F16"},
}
CASES = list(EXPECT)

@pytest.fixture(scope="module")
def sources(trained_model, tmp_path_factory):
    """name -> (checkpoint dir, calibration text) for the three models."""
    from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint
    from llama4_quant.tiny.corpus import corpus_splits
    from llama4_quant.tiny.tokenizer import (
        build_tokenizer,
        save_tokenizer_files,
        tokenizer_info,
    )

    root = tmp_path_factory.mktemp("lowbit-models")
    tok = build_tokenizer(corpus_splits(0)["train"][:60_000], vocab_size=300)
    info = tokenizer_info(tok)
    calib = root / "calib.txt"
    calib.write_text(corpus_splits(0)["calib"][:40_000])
    out = {"trained": (trained_model, trained_model / "calib.txt")}
    dims = {
        "gqa4": ("scout", dict(hidden_size=256, intermediate_size=96, intermediate_size_mlp=192, head_dim=32,
                               num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=16, num_local_experts=2)),
        "experts8": ("maverick", dict(hidden_size=256, intermediate_size=256, intermediate_size_mlp=80, head_dim=64,
                                      num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=8)),
    }
    for name, (variant, kw) in dims.items():
        tc = text_config(variant, vocab_size=info.vocab_size, bos_token_id=info.bos_id, eos_token_id=info.eos_id,
                         pad_token_id=info.pad_id, **kw)
        path = write_hf_checkpoint(root / name, tc)
        save_tokenizer_files(tok, path)
        out[name] = (path, calib)
    return out


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    """name -> (checkpoint, our bf16 GGUF, llama-imatrix's file for it), built on first use."""
    from support.llamacpp import run_imatrix

    root = tmp_path_factory.mktemp("lowbit-gguf")
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path, Path]:
        if name not in cache:
            model, calib = sources[name]
            bf16 = root / f"{name}-bf16.gguf"
            run_gguf_convert(model, bf16, scheme="bf16")
            imat = run_imatrix(bf16, calib, root / f"{name}-imatrix.gguf", 128, chunks=12, threads=2, llama=LLAMA,
                               timeout=600)
            cache[name] = (model, bf16, imat)
        return cache[name]

    return get


def _same_tensors(theirs: Path, ours: Path) -> dict[str, int]:
    ta, tb = {t.name: t for t in GGUFReader(theirs).tensors}, {t.name: t for t in GGUFReader(ours).tensors}
    assert set(ta) == set(tb)
    types: dict[str, int] = {}
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type, (n, t.tensor_type.name, tb[n].tensor_type.name)
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8)), n
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return types


@pytest.mark.parametrize("model,scheme", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_rtn_and_imatrix_equal_llama_quantize(prepared, tmp_path, model, scheme):
    from support.llamacpp import run_quantize

    src, bf16, imat = prepared(model)
    seen: set[str] = set()
    for tag, im in (("rtn", None), ("imatrix", imat)):
        theirs = run_quantize(bf16, tmp_path / f"lq-{tag}.gguf", LQ_NAME[scheme], imatrix=im, threads=2, llama=LLAMA,
                              timeout=600)
        ours = tmp_path / f"ours-{tag}.gguf"
        kw = dict(method="rtn") if im is None else dict(imatrix_file=im)
        summary = run_gguf_convert(src, ours, scheme=scheme, **kw)
        assert summary["method"] == ("rtn" if im is None else "imatrix")
        seen |= set(_same_tensors(theirs, ours))
    assert EXPECT[model, scheme] <= seen, seen
