"""GPTQ's router-aware coordinate descent at Scout's shapes: the compiled CPU path (quant.descent) against the
torch column loop (the GPU path), on the same GPTQ result.

    python bench/bench_descent.py [--rows 5120] [--cols 8192] [--grid q4_k|int4] [--metric 64] [--no-torch]

Random weights [rows x cols] (a down projection: 5120 x 8192), a Hessian from 4,096 correlated random tokens
(bench_gptq's), GPTQ with convert's config on the grid, then `coordinate_descent` with 2 sweeps and a random
metric of `--metric` rows (0: the plain loss), timed per path. Prints seconds, moves and the loss after each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gptq import hessian  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5120)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--grid", default="q4_k", choices=["q4_k", "int4"])
    ap.add_argument("--metric", type=int, default=64, help="metric rows (0: none)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch loop (about 50 s at the defaults)")
    args = ap.parse_args(argv)

    from llama4_quant.quant import gptq as G

    if args.grid == "q4_k":
        from llama4_quant.formats.gguf.grid import BlockGrid
        from llama4_quant.formats.gguf.quants import QT

        grid = BlockGrid(QT.Q4_K)
    else:
        from llama4_quant.quant.grid import IntGrid
        from llama4_quant.quant.scheme import make_scheme

        grid = IntGrid(make_scheme("w4a16"))
    h, _ = hessian(args.cols, 4096, 3, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g) * args.cols ** -0.5
    metric = torch.randn(args.metric, args.rows, generator=g) / 8 if args.metric else None
    res = G.gptq(w, h, grid, G.GPTQConfig(act_order=True, rtn_guard=False), 4096)

    rows = []
    for name, compiled in [("compiled (cpu)", True)] + ([] if args.no_torch else [("torch loop", False)]):
        t0 = time.perf_counter()
        q, moved = G.coordinate_descent(w, res.weight, res.params, h, grid, 2, metric, 1.0, compiled=compiled)
        seconds = time.perf_counter() - t0
        d = q - w
        rows.append({"path": name, "seconds": round(seconds, 2), "moves": moved,
                     "loss": float(((d @ h) * d).sum())})
    d0 = res.weight - w
    print(f"{args.rows} x {args.cols} {args.grid}, metric rows {args.metric}, {torch.get_num_threads()} threads; "
          f"GPTQ loss {float(((d0 @ h) * d0).sum()):.5g}")
    print(f"{'path':16} {'seconds':>8} {'moves':>9} {'plain loss':>11}")
    for r in rows:
        print(f"{r['path']:16} {r['seconds']:8.1f} {r['moves']:9d} {r['loss']:11.5g}")
    return rows


if __name__ == "__main__":
    main()
