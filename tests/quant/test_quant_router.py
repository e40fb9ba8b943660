"""quant.router.RouterFit: the ridge refit of an unquantized router to a drifted input stream."""

from __future__ import annotations

import torch

from llama4_quant.quant.router import RouterFit


def _stream(n=4096, hidden=48, experts=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, hidden, generator=g) @ (torch.randn(hidden, hidden, generator=g) / hidden**0.5)
    w = torch.randn(experts, hidden, generator=g) / hidden**0.5
    return g, x_fp, w


def _direct_error(router, x_q, y):
    return float((x_q.double() @ router.double().t() - y.double()).square().sum())


def test_error_from_normal_equations_matches_direct_sum():
    g, x_fp, w = _stream()
    x_q = x_fp + 0.1 * torch.randn(x_fp.shape, generator=g)
    fit = RouterFit(x_fp.shape[1], w.shape[0])
    for part in range(4):  # in batches, as the pipeline adds them
        sl = slice(part * 1024, (part + 1) * 1024)
        fit.add(x_q[sl], x_fp[sl] @ w.t())
    assert fit.n_tokens == 4096
    other = torch.randn(w.shape, generator=g)
    for r in (w, other):
        direct = _direct_error(r, x_q, x_fp @ w.t())
        assert abs(fit.error(r) - direct) <= 1e-6 * direct


def test_no_drift_keeps_the_router():
    _, x_fp, w = _stream()
    fit = RouterFit(x_fp.shape[1], w.shape[0])
    fit.add(x_fp, x_fp @ w.t())
    torch.testing.assert_close(fit.solve(w), w, atol=1e-5, rtol=1e-4)


def test_linear_drift_is_undone_and_noise_never_makes_it_worse():
    g, x_fp, w = _stream(seed=1)
    hidden = x_fp.shape[1]
    drift = torch.eye(hidden) + 0.2 * torch.randn(hidden, hidden, generator=g) / hidden**0.5
    x_q = x_fp @ drift.t()
    fit = RouterFit(hidden, w.shape[0])
    fit.add(x_q, x_fp @ w.t())
    exact = fit.solve(w, ridge=0.0)
    # X^T X is accumulated in float32 (the shared expert's GPTQ Hessian, reused): exact up to float32 sums
    torch.testing.assert_close(exact, w @ torch.linalg.inv(drift), atol=2e-3, rtol=1e-2)
    assert fit.error(exact) < 1e-5 * fit.error(w)
    # with noise the drift is only partly predictable: the refit still lowers the error, more so with less ridge
    noisy = x_q + 0.3 * torch.randn(x_q.shape, generator=g)
    fit = RouterFit(hidden, w.shape[0])
    fit.add(noisy, x_fp @ w.t())
    errs = [fit.error(fit.solve(w, ridge=r)) for r in (0.0, 0.1, 1.0, 10.0)]
    assert errs == sorted(errs) and errs[-1] < fit.error(w)
    # a huge ridge gives the router back
    torch.testing.assert_close(fit.solve(w, ridge=1e9), w, atol=1e-5, rtol=1e-4)


def test_no_tokens_gives_the_router_back():
    _, _, w = _stream()
    fit = RouterFit(w.shape[1], w.shape[0])
    fit.add(torch.zeros(0, w.shape[1]), torch.zeros(0, w.shape[0]))
    assert torch.equal(fit.solve(w), w)
