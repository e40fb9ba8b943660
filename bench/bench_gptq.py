"""GPTQ algebra at Scout's real shapes: seconds, achieved FLOP rate against this machine's own fp32 matmul rate,
and a projection for a whole model.

    python bench/bench_gptq.py [--grid int4|q4_k|both] [--experts 2] [--tokens 4096] [--device cpu|cuda] [--threads N]

Random weights with Scout's shapes (gate and up 8192 x 5120 sharing one Hessian, down 5120 x 8192) and Hessians
from random correlated tokens (`--tokens` routed to each expert), then the library's own batched GPTQ
(quant.gptq.gptq_batch, convert's config: act-order, and on the int4 grid the scale search and one refine round)
on `--experts` experts, timed per stage. The matmul rate is measured in the same process: an fp32 [8192 x 5120] @ [5120 x 5120]
product, the shape GPTQ's products have.

Executed FLOPs are counted from the shapes (R rows, C columns per Hessian job, passes as GPTQ reports them):
Hessian accumulation 2 n C^2 per input, factorisation C^3 / 3 (one Cholesky: the passes work from the Hessian's
own factor), each pass R C^2 (GPTQ's error feedback), a refine round's least squares 3 R C^2, and the RTN guard's
Hessian losses (5/4 R C^2 each, R the rows it measured: 1,024 when its sample decided; guard_flops). The record's
loss comes from the pass (no product). `achieved / matmul` is the share of the machine's
matmul rate that the whole GPTQ stage reaches: the issue's bar is 40 %.

Projection: one Scout layer = 16 experts x (gate/up job + down job) + the shared expert (the same shapes) + the
attention (q/k/v: 7168 x 5120 on one Hessian, o: 5120 x 5120), at the measured seconds per job; x 48 layers for
Scout, and Maverick (128 experts, 24 of its 48 layers MoE, the others dense 16384-wide MLPs) stated the same way.
Calibration forward time is not in the projection (the pipeline benches measure it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

H, I = 5120, 8192


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, reps: int = 3) -> float:
    """fp32 FLOP/s of an [8192 x 5120] @ [5120 x 5120] product on `device`."""
    a = torch.randn(I, H, device=device)
    b = torch.randn(H, H, device=device)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return reps * 2 * I * H * H / (time.perf_counter() - t0)


def hessian(cols: int, tokens: int, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """2/n X^T X of correlated random inputs, and the seconds its accumulation took."""
    from llama4_quant.quant.hessian import HessianAccumulator

    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = (torch.randn(cols, 64, generator=g) / 8).to(device)
    scale = (torch.rand(cols, generator=g) * 2 + 0.1).to(device)
    acc = HessianAccumulator(cols, device)
    t0 = time.perf_counter()
    for n0 in range(0, tokens, 1024):
        n = min(1024, tokens - n0)
        z = torch.randn(n, 64, generator=g).to(device)
        x = (z @ mix.t() + 0.3 * torch.randn(n, cols, generator=g).to(device)) * scale
        acc.add(x)
    _sync(device)
    return acc.hessian, time.perf_counter() - t0


def grid_for(name: str, kind: str):
    if name == "int4":
        from llama4_quant.quant.grid import IntGrid
        from llama4_quant.quant.scheme import make_scheme

        return IntGrid(make_scheme("w4a16"))
    from llama4_quant.formats.gguf.grid import BlockGrid
    from llama4_quant.formats.gguf.quants import QT

    return BlockGrid(QT.Q6_K if kind == "down" else QT.Q4_K)  # q4_k_m's types for experts of its Q6_K layers


def guard_flops(rec, rows: int, cols: int) -> float:
    """The RTN guard's Hessian-loss products (5/8 of a [rows x cols x cols] product each, 2 flops a multiply-add):
    on the sampled rows (rtn_rows) when that decided; else plain RTN on all rows, and when GPTQ's win was not clear
    (below CLEAR_WIN x plain RTN's loss) the candidates on GPTQ's grid too (one, two after a refine round)."""
    from llama4_quant.quant import gptq as G

    per_row = 1.25 * cols * cols
    if getattr(rec, "rtn_rows", None):
        return rec.rtn_rows * per_row
    if rec.rtn_loss is None:
        return 0.0
    clear = rec.gptq_loss is not None and rec.gptq_loss < getattr(G, "CLEAR_WIN", 0.0) * rec.rtn_loss
    return rows * per_row * (1 if clear else 1 + (2 if "passes" in rec.reason else 1))


def _gptq_batch():
    """The library's gptq_batch, or (on a checkout from before it, for a before/after run) GPTQ weight by weight."""
    try:
        from llama4_quant.quant.gptq import GPTQJob, gptq_batch

        return GPTQJob, gptq_batch
    except ImportError:
        from llama4_quant.quant.gptq import gptq

        class Job:
            def __init__(self, weights, hessian, n_tokens):
                self.weights, self.hessian, self.n_tokens = weights, hessian, n_tokens

        def batch(jobs, grid, cfg):
            return [[gptq(w, j.hessian, grid, cfg, j.n_tokens) for w in j.weights] for j in jobs]

        return Job, batch


def run_grid(name: str, experts: int, tokens: int, device: torch.device, rate: float) -> dict:
    from llama4_quant.quant.gptq import GPTQConfig

    GPTQJob, gptq_batch = _gptq_batch()

    cfg = GPTQConfig(act_order=True)  # what `convert` runs (--act-order is its default)
    out: dict = {"grid": name, "experts": experts, "tokens_per_expert": tokens, "jobs": {}}
    for kind, rows, cols in (("gate+up", (I, I), H), ("down", (H,), I)):
        hs, ws, acc_s = [], [], 0.0
        for e in range(experts):
            h, s = hessian(cols, tokens, 7 * e + cols, device)
            hs.append(h)
            acc_s += s
            g = torch.Generator(device="cpu").manual_seed(1000 + e)
            ws.append([(torch.randn(r, cols, generator=g) * cols ** -0.5).to(device) for r in rows])
        jobs = [GPTQJob(w, h, tokens) for w, h in zip(ws, hs)]
        grid = grid_for(name, "down" if kind == "down" else "in")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        results = gptq_batch(jobs, grid, cfg)
        _sync(device)
        seconds = time.perf_counter() - t0
        r_total, c = sum(rows), cols
        passes = [r.record.reason.count("->") + 1 if "passes" in r.record.reason else 1 for rs in results for r in rs]
        n_pass = max(passes)
        refine = n_pass - 1
        flops = experts * (2 * tokens * c * c + c ** 3 / 3 + n_pass * r_total * c * c + refine * 3 * r_total * c * c)
        flops += sum(guard_flops(r.record, int(w.shape[0]), c) for rs, job in zip(results, jobs)
                     for r, w in zip(rs, job.weights))
        methods = sorted({r.record.method for rs in results for r in rs})
        row = {"seconds": round(seconds + acc_s, 2), "gptq_seconds": round(seconds, 2),
               "hessian_seconds": round(acc_s, 2), "seconds_per_expert": round((seconds + acc_s) / experts, 2),
               "passes": n_pass, "methods": methods, "gflop": round(flops / 1e9, 1),
               "achieved_gflops": round(flops / (seconds + acc_s) / 1e9, 1),
               "fraction_of_matmul": round(flops / (seconds + acc_s) / rate, 3)}
        if device.type == "cuda":
            row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["jobs"][kind] = row
        del jobs, results, hs, ws
    per_expert = sum(j["seconds_per_expert"] for j in out["jobs"].values())
    gu = out["jobs"]["gate+up"]["seconds_per_expert"]
    attention = gu * (7168 + 5120) / (2 * I)  # q/k/v + o: rows relative to the gate+up job's, same 5120 columns
    scout_layer = 17 * per_expert + attention
    out["projection"] = {
        "scout_layer_s": round(scout_layer, 1),
        "scout_48_layers_min": round(48 * scout_layer / 60, 1),
        # Maverick: 24 MoE layers of 128 experts + shared; 24 dense layers (gate/up 16384 x 5120, down 5120 x 16384)
        "maverick_min": round((24 * (129 * per_expert + attention)
                               + 24 * (2 * gu + 8 * out["jobs"]["down"]["seconds_per_expert"] + attention)) / 60, 1),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="both", choices=["int4", "q4_k", "both"])
    ap.add_argument("--experts", type=int, default=2, help="experts quantized in one batched loop")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind each expert's Hessians")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--columns", default="compiled", choices=["compiled", "torch"],
                    help="GPTQ's sub-block column steps: compiled (quant.columns, CPUs) or the torch loop")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.columns == "torch":
        from llama4_quant.quant import gptq

        gptq.COMPILED_COLUMNS = False
    rate = matmul_rate(device)
    print(f"device {device}, {torch.get_num_threads()} threads: fp32 matmul {rate / 1e9:.1f} GFLOP/s "
          f"([{I} x {H}] @ [{H} x {H}])", flush=True)
    results = {"device": str(device), "threads": torch.get_num_threads(), "matmul_gflops": round(rate / 1e9, 1),
               "grids": []}
    for name in (["int4", "q4_k"] if args.grid == "both" else [args.grid]):
        r = run_grid(name, args.experts, args.tokens, device, rate)
        results["grids"].append(r)
    print(f"\n{'grid':6} {'job':8} {'s/expert':>9} {'hessian s':>10} {'passes':>6} {'GFLOP':>8} {'GFLOP/s':>8} "
          f"{'of matmul':>9}")
    for r in results["grids"]:
        for kind, j in r["jobs"].items():
            print(f"{r['grid']:6} {kind:8} {j['seconds_per_expert']:9.1f} {j['hessian_seconds']:10.1f} "
                  f"{j['passes']:6d} {j['gflop']:8.0f} {j['achieved_gflops']:8.1f} {j['fraction_of_matmul']:9.1%}")
        p = r["projection"]
        print(f"{r['grid']:6} projection: Scout layer {p['scout_layer_s']:.0f} s, Scout 48 layers "
              f"{p['scout_48_layers_min']:.0f} min, Maverick {p['maverick_min']:.0f} min (GPTQ algebra only)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
