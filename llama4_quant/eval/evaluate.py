"""Score a model (any WeightSource) on perplexity chunks with the layer-wise runner."""

from __future__ import annotations

from typing import Callable

import torch

from ..model.forward import WeightSource
from ..model.runner import LayerwiseRunner
from .perplexity import ChunkScores


def score_chunks(
    source: WeightSource,
    chunks: torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    on_logp: Callable[[int, torch.Tensor], None] | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> ChunkScores:
    """NLL of every chunk's scored positions; `on_logp(k, logp[ctx/2-1, V])` sees the log-probs."""
    scores = ChunkScores()

    def on_logits(k: int, logits: torch.Tensor) -> None:
        logp = scores.add(logits, chunks[k])
        if on_logp:
            on_logp(k, logp)

    LayerwiseRunner(source, device, dtype, batch_size).logits(chunks, on_logits, on_layer)
    return scores
