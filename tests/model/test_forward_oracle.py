"""Our layer-wise forward against transformers' Llama 4 (test-only oracle), on every fixture variant."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.runner import LayerwiseRunner

transformers = pytest.importorskip("transformers")

VARIANTS = ("scout", "maverick", "chunked")


def our_logits(path, tokens, batch_size=2):
    out = {}
    with open_checkpoint(path) as r:
        LayerwiseRunner(r, batch_size=batch_size).logits(tokens, lambda n, l: out.__setitem__(n, l))
    return torch.stack([out[n] for n in range(len(tokens))])


def hf_logits(path, tokens, layout):
    cls = transformers.Llama4ForConditionalGeneration if layout == "hf" else transformers.Llama4ForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def tokens():
    # 40 tokens: past the chunked fixture's attention_chunk_size (8) and several floor_scale (4) steps
    return torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["hf", "text"])
def test_logits_match_transformers(tiny_checkpoints, tokens, variant, layout):
    path = tiny_checkpoints[(variant, layout)]
    ours = our_logits(path, tokens)
    ref = hf_logits(path, tokens, layout)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_layout_equals_hf_layout(tiny_checkpoints, tokens, variant):
    hf = our_logits(tiny_checkpoints[(variant, "hf")], tokens)
    meta = our_logits(tiny_checkpoints[(variant, "meta")], tokens)
    assert torch.equal(hf, meta)


def test_batching_does_not_change_logits(tiny_checkpoints, tokens):
    path = tiny_checkpoints[("chunked", "hf")]
    assert torch.allclose(our_logits(path, tokens, batch_size=1), our_logits(path, tokens, batch_size=3), atol=1e-5)


def test_chunking_and_temperature_matter(tiny_checkpoints, tokens):
    """The chunked fixture must actually exercise chunked attention and temperature tuning."""
    from dataclasses import replace

    path = tiny_checkpoints[("chunked", "hf")]
    with open_checkpoint(path) as r:
        base = our_logits(path, tokens)
        for change in ({"attention_chunk_size": None}, {"attn_temperature_tuning": False}):
            cfg = replace(r.config, **change)

            class Src:
                config = cfg
                read = staticmethod(r.read)
                read_expert = staticmethod(r.read_expert)

            out = {}
            LayerwiseRunner(Src()).logits(tokens, lambda n, l: out.__setitem__(n, l))
            changed = torch.stack([out[n] for n in range(len(tokens))])
            assert (changed - base).abs().max() > 1e-3, change


def test_trained_fixture_matches_transformers(trained_model):
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    ours = our_logits(trained_model, tokens)
    ref = hf_logits(trained_model, tokens, "hf")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
