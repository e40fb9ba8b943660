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

from .hessian import HessianAccumulator

RIDGE = 0.1  # relative to the mean input energy per direction: 0.01-1 all within noise on the shipped model


class RouterFit:
    """Normal equations of the refit: A = X_q^T X_q (kept as `inputs`, a HessianAccumulator: the pipeline hands the
    same matrix to the shared expert's GPTQ, which reads the same input), B = X_q^T Y and c = |Y|^2 in float64."""

    def __init__(self, hidden: int, experts: int, device: torch.device | str | None = None) -> None:
        self.inputs = HessianAccumulator(hidden, device)
        self.b = torch.zeros(hidden, experts, dtype=torch.float64, device=device)
        self.c = 0.0

    @property
    def n_tokens(self) -> int:
        return self.inputs.n_tokens

    @torch.no_grad()
    def add(self, x_q: torch.Tensor, target: torch.Tensor) -> None:
        """Router inputs of the quantized stream [..., hidden] and the unquantized model's logits [..., E] for the
        same tokens."""
        x = x_q.reshape(-1, self.b.shape[0])
        y = target.reshape(-1, self.b.shape[1]).to(self.b)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} router inputs but {y.shape[0]} target rows")
        self.inputs.add(x)
        self.b.addmm_(x.to(self.b).t(), y)
        self.c += float(y.square().sum())

    def _a(self) -> torch.Tensor:
        return self.inputs.hessian.to(self.b) * (self.n_tokens / 2)  # the accumulator keeps 2/n X^T X

    def error(self, router: torch.Tensor) -> float:
        """sum_t |router x_q,t - y_t|^2 over the tokens added, from the normal equations."""
        w = router.to(self.b).t()  # [hidden, E]
        return float((w * (self._a() @ w)).sum() - 2 * (w * self.b).sum()) + self.c

    @torch.no_grad()
    def solve(self, router: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
        """The refit router [E, hidden] (float32) for the original `router` [E, hidden]."""
        if self.n_tokens == 0:
            return router.float().clone()
        a = self._a()
        w0 = router.to(self.b).t()
        lam = ridge * float(a.diagonal().mean())
        if lam <= 0:
            lam = 1e-12 * max(1.0, float(a.diagonal().abs().max()))
        a.diagonal().add_(lam)
        w = torch.linalg.solve(a, self.b + lam * w0)
        return w.t().float().to(router.device)
