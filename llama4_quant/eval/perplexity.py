"""Perplexity by llama-perplexity's protocol, so numbers compare directly with llama.cpp's:

tokenize the whole text with BOS; cut it into chunks of `ctx` tokens (at most `n_chunks`); replace each
chunk's first token by BOS; score positions ctx/2 .. ctx-2, each predicting the next token;
ppl = exp(mean nll). llama.cpp insists on at least 2*ctx tokens; so do we.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import Llama4QuantError


def make_chunks(tokens: list[int], ctx: int, n_chunks: int | None, bos_id: int | None) -> torch.Tensor:
    if ctx < 4 or ctx % 2:
        raise Llama4QuantError(f"--ctx must be an even number >= 4, got {ctx}")
    if len(tokens) < 2 * ctx:
        raise Llama4QuantError(
            f"the data has {len(tokens)} tokens; perplexity with a context of {ctx} needs at least {2 * ctx}"
            " (as llama-perplexity): use more text or a smaller --ctx"
        )
    k = len(tokens) // ctx
    if n_chunks is not None and n_chunks > 0:
        k = min(k, n_chunks)
    chunks = torch.tensor(tokens[: k * ctx], dtype=torch.long).view(k, ctx).clone()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def first_scored(ctx: int) -> int:
    return ctx // 2


@dataclass
class ChunkScores:
    """Per-chunk negative log-likelihoods of the scored positions."""

    nll: list[torch.Tensor] = field(default_factory=list)  # each [ctx/2 - 1] float64

    def add(self, logits: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        first = first_scored(chunk.numel())
        logp = torch.log_softmax(logits[first:-1].double(), dim=-1)
        nll = -logp.gather(1, chunk[first + 1 :].to(logp.device)[:, None])[:, 0]
        self.nll.append(nll.cpu())
        return logp

    @property
    def tokens(self) -> int:
        return sum(n.numel() for n in self.nll)

    @property
    def mean_nll(self) -> float:
        return float(torch.cat(self.nll).mean()) if self.nll else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def running_ppl(self) -> list[float]:
        """llama-perplexity's printed [k]ppl estimates after each chunk."""
        out, tot, cnt = [], 0.0, 0
        for n in self.nll:
            tot += float(n.sum())
            cnt += n.numel()
            out.append(math.exp(tot / cnt))
        return out

    def per_chunk_ppl(self) -> list[float]:
        return [math.exp(float(n.mean())) for n in self.nll]
