"""The GPTQ paths on CUDA (marker `cuda`: skipped without a device): the same results as on the CPU, up to float
rounding order, for batched experts, shared factors, act-order and row blocks, on the int and GGUF grids."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.formats.gguf.grid import BlockGrid, pack_result
from llama4_quant.formats.gguf.quants import QT
from llama4_quant.formats.gguf import quants as gq
from llama4_quant.quant.gptq import GPTQConfig, GPTQJob, gptq_batch, gptq_rows
from llama4_quant.quant.grid import IntGrid
from llama4_quant.quant.hessian import ExpertHessians, HessianAccumulator
from llama4_quant.quant.scheme import IntScheme

pytestmark = pytest.mark.cuda


def _jobs(device: str, experts: int = 3, cols: int = 512):
    jobs = []
    for e in range(experts):
        g = torch.Generator().manual_seed(e)
        x = torch.randn(4096, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
        acc = HessianAccumulator(cols, device)
        acc.add(x.to(device))
        ws = [(torch.randn(256, cols, generator=g) * 0.05).to(device) for _ in range(2)]
        jobs.append(GPTQJob(ws, acc.hessian, acc.n_tokens))
    return jobs


@pytest.mark.parametrize("grid", [IntGrid(IntScheme(4, True, 128)), BlockGrid(QT.Q4_K)], ids=["int4", "q4_k"])
@pytest.mark.parametrize("act_order", [False, True])
def test_batched_gptq_on_cuda_matches_cpu(grid, act_order):
    cfg = GPTQConfig(act_order=act_order)
    gpu = gptq_batch(_jobs("cuda"), grid, cfg)
    cpu = gptq_batch(_jobs("cpu"), grid, cfg)
    for rg, rc in zip(gpu, cpu):
        for a, b in zip(rg, rc):
            assert a.weight.is_cuda
            assert a.record.loss == pytest.approx(b.record.loss, rel=0.02)
            assert float((a.weight.cpu() != b.weight).float().mean()) < 0.05
    if isinstance(grid, BlockGrid):  # what the file stores decodes to what GPTQ computed on the GPU
        r = gpu[0][0]
        packed = pack_result(r.weight, r.params)
        assert torch.equal(torch.from_numpy(gq.dequantize(packed, QT.Q4_K)), r.weight.cpu())


def test_row_blocks_and_expert_hessians_on_cuda():
    jobs = _jobs("cuda", experts=1)
    w = torch.cat(jobs[0].weights)
    parts = list(gptq_rows(w.split(100), jobs[0].hessian, IntGrid(IntScheme(4, True, 128)), n_tokens=4096))
    assert all(p.weight.is_cuda for p in parts) and sum(p.weight.shape[0] for p in parts) == w.shape[0]
    eh = ExpertHessians(4, 64, "cuda")
    x = torch.randn(1000, 64, device="cuda")
    idx = torch.randint(0, 4, (1000,), device="cuda")
    eh.add(x, idx)
    assert sum(eh.tokens_per_expert()) == 1000 and eh[0].hessian.is_cuda
