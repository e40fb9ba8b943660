"""Refit of an unquantized MoE router to the quantized model's own stream.

The router of a Llama 4 MoE layer is kept in its source dtype by every recipe (llama.cpp's `ffn_gate_inp`,
llm-compressor's ignore list), yet its input, ffn_norm(h), is what the layers before it *as quantized* produce.
The small drift of that input flips tokens to other experts, and those flips carry most of a quantized MoE's
KL divergence (docs/quality.md). The router is a [E, hidden] matrix, so it can be refitted for free: no byte of
the file changes size, no tensor changes type.

`RouterFit` collects, over the calibration tokens, the quantized stream's router inputs x_q and the logits the
unquantized model computes on its own stream, y = router(x_fp). The refit router W' minimises

    sum_t |W' x_q,t - y_t|^2 + ridge * d * |W' - W|^2      (d: the mean of diag(X_q^T X_q))

a ridge regression pulled towards the original W, so directions the calibration text does not excite keep W.
At W' = W the objective is the unrefitted error, so W' never fits the calibration logits worse than W does.
"""

from __future__ import annotations

import torch

RIDGE = 0.1  # relative to the mean input energy per direction: 0.01-1 all within noise on the shipped model


class RouterFit:
    """Normal equations of the refit, accumulated in float64: A = X_q^T X_q, B = X_q^T Y, c = |Y|^2."""

    def __init__(self, hidden: int, experts: int, device: torch.device | str | None = None) -> None:
        self.a = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.b = torch.zeros(hidden, experts, dtype=torch.float64, device=device)
        self.c = 0.0
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x_q: torch.Tensor, target: torch.Tensor) -> None:
        """Router inputs of the quantized stream [..., hidden] and the unquantized model's logits [..., E] for the
        same tokens."""
        x = x_q.reshape(-1, self.a.shape[0]).to(self.a)
        y = target.reshape(-1, self.b.shape[1]).to(self.a)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} router inputs but {y.shape[0]} target rows")
        self.a.addmm_(x.t(), x)
        self.b.addmm_(x.t(), y)
        self.c += float(y.square().sum())
        self.n_tokens += x.shape[0]

    def error(self, router: torch.Tensor) -> float:
        """sum_t |router x_q,t - y_t|^2 over the tokens added, from the normal equations."""
        w = router.to(self.a).t()  # [hidden, E]
        return float((w * (self.a @ w)).sum() - 2 * (w * self.b).sum()) + self.c

    @torch.no_grad()
    def solve(self, router: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
        """The refit router [E, hidden] (float32) for the original `router` [E, hidden]."""
        if self.n_tokens == 0:
            return router.float().clone()
        w0 = router.to(self.a).t()
        lam = ridge * float(self.a.diagonal().mean())
        if lam <= 0:
            lam = 1e-12 * max(1.0, float(self.a.diagonal().abs().max()))
        reg = self.a.clone()
        reg.diagonal().add_(lam)
        w = torch.linalg.solve(reg, self.b + lam * w0)
        return w.t().float().to(router.device)
