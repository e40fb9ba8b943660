"""Row blocks of the embeddings and head read into memory of our own, and the calibration tokens embedded one
block of the table at a time: the same numbers as reading the whole tensor."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.model import runner as runner_mod
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.runner import LayerwiseRunner


@pytest.mark.parametrize("layout", ["hf", "text", "meta"])
def test_read_rows_is_the_tensor_sliced(tiny_checkpoints, layout: str) -> None:
    with open_checkpoint(tiny_checkpoints[("scout", layout)]) as r:
        for name in ("tok_embeddings", "output"):
            whole = r.read(name)
            rows = whole.shape[0]
            for r0, r1 in ((0, 1), (3, 17), (rows - 5, rows), (0, rows), (rows - 2, rows + 10)):
                part = r.read_rows(name, r0, r1)
                assert torch.equal(part, whole[r0:r1]), (name, r0, r1)
                assert part.dtype == whole.dtype


def test_hf_rows_are_not_views_of_the_file(tiny_checkpoints) -> None:
    """pread copies: the tensor owns exactly its rows' bytes and stays valid after the reader drops its maps."""
    with open_checkpoint(tiny_checkpoints[("scout", "hf")]) as r:
        part = r.read_rows("tok_embeddings", 2, 9)
        assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
        r.release()
        again = r.read_rows("tok_embeddings", 2, 9)
        assert torch.equal(part, again)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_embed_in_blocks_is_the_whole_table_lookup(tiny_checkpoints, monkeypatch, layout: str) -> None:
    with open_checkpoint(tiny_checkpoints[("scout", layout)]) as r:
        cfg = r.config
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (3, 11), generator=g)
        tokens[0, :4] = torch.tensor([0, cfg.vocab_size - 1, 5, 5])  # the table's ends, a repeated id
        monkeypatch.setattr(runner_mod, "EMBED_BLOCK_ELEMENTS", 7 * cfg.hidden_size)  # many blocks of 7 rows
        store = LayerwiseRunner(r, batch_size=2).embed(tokens)
        want = r.read("tok_embeddings")[tokens].float()
        got = store.get(slice(0, 3), "cpu", torch.float32)
        assert torch.equal(got, want)
