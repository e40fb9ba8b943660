"""Streaming GPTQ Hessian: H = 2/n * sum_t x_t x_t^T over the n tokens a Linear (or an expert) saw.

Kept as a running mean in float32 so that batches of any size (including empty ones: an expert
that no token was routed to) can be added in any order, and two accumulators of the same Linear
(different devices or calibration shards) can be merged.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    @property
    def empty(self) -> bool:
        return self.n_tokens == 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., in_features] (any leading shape, any float dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {tuple(x.shape)}")
        x = x.reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(device=self.hessian.device, dtype=torch.float32)
        total = self.n_tokens + m
        self.hessian.mul_(self.n_tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.n_tokens = total

    @torch.no_grad()
    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in another accumulator of the same Linear (token-weighted)."""
        if other.in_features != self.in_features:
            raise ValueError("cannot merge Hessians of different widths")
        if other.n_tokens == 0:
            return
        total = self.n_tokens + other.n_tokens
        self.hessian.mul_(self.n_tokens / total)
        self.hessian.add_(other.hessian.to(self.hessian.device), alpha=other.n_tokens / total)
        self.n_tokens = total


class ExpertHessians:
    """One accumulator per routed expert of a MoE layer (experts that see no token stay empty).

    Feed each expert the inputs it actually computes on: for Llama 4 that is the token *after*
    scaling by its sigmoid router weight.
    """

    def __init__(self, num_experts: int, in_features: int, device: torch.device | str | None = None) -> None:
        self.experts = [HessianAccumulator(in_features, device) for _ in range(num_experts)]

    def __getitem__(self, e: int) -> HessianAccumulator:
        return self.experts[e]

    def __len__(self) -> int:
        return len(self.experts)

    @torch.no_grad()
    def add(self, x: torch.Tensor, expert_index: torch.Tensor) -> None:
        """x: [tokens, in]; expert_index: [tokens] expert id of each token (top-1 routing)."""
        x = x.reshape(-1, x.shape[-1])
        expert_index = expert_index.reshape(-1)
        for e in torch.unique(expert_index).tolist():
            self.experts[e].add(x[expert_index == e])

    def tokens_per_expert(self) -> list[int]:
        return [acc.n_tokens for acc in self.experts]


class AsymmetricAccumulator(HessianAccumulator):
    """GPTQ statistics for asymmetric calibration (GPTAQ, Li et al. 2025): the Linear's input in the quantized
    model x_q (whose Hessian H = 2/n sum x_q x_q^T GPTQ uses) and, for the same tokens, its input in the
    unquantized model x_fp. `cross` = 2/n sum (x_fp - x_q) x_q^T [in, in] turns GPTQ's target from W x_q into the
    unquantized model's W x_fp: min ||Q x_q - W x_fp||^2 = min (Q - W*) H (Q - W*)^T + const with
    W* = W (I + cross H^-1) (see quant/gptq.py, `asym`)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, device)
        self.cross = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add_pair(self, x_q: torch.Tensor, x_fp: torch.Tensor) -> None:
        """Inputs of the same tokens [..., in] in the quantized and in the unquantized model."""
        if x_q.shape != x_fp.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(x_q.shape)} vs {tuple(x_fp.shape)}")
        xq = x_q.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        xf = x_fp.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        m = xq.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        self.cross.mul_(self.n_tokens / total)
        self.cross.addmm_((xf - xq).t(), xq, alpha=2.0 / total)
        self.add(xq)

    @torch.no_grad()
    def merge(self, other: "HessianAccumulator") -> None:
        if not isinstance(other, AsymmetricAccumulator):
            raise TypeError("cannot merge a symmetric accumulator into an asymmetric one")
        if other.n_tokens:
            total = self.n_tokens + other.n_tokens
            self.cross.mul_(self.n_tokens / total)
            self.cross.add_(other.cross.to(self.cross.device), alpha=other.n_tokens / total)
        super().merge(other)
