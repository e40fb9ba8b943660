"""Expert-parallel GPTQ on one Scout-shaped MoE layer: seconds and peak memory per rank with 1 and 2 ranks.

    python bench/bench_distributed.py                                    # 16 experts, 4096 tokens, all cores
    python bench/bench_distributed.py --experts 2 --tokens 256 --threads 2 --dense keep    # this 2-core box

The layer has Scout's real shapes (hidden 5120, 40 heads / 8 kv heads of 128, experts and shared expert 8192
wide) and `--experts` routed experts (Scout has 16); random bf16 weights are generated when read
(bench_quant.SyntheticScout), calibrated on `--tokens` random tokens. Each configuration runs the convert
pipeline (`Pipeline.run`, GPTQ w4a16 group 128, results discarded) in fresh processes: 1 rank as a plain process,
N ranks under `torchrun --nproc-per-node N` (gloo on CPU), exactly the code `torchrun -m llama4_quant convert`
runs. The cores are shared fairly: `--threads T` for 1 rank, T / N threads for each of N ranks (OMP_NUM_THREADS
and torch.set_num_threads).

`--dense gptq` (the default, convert's default targets) also quantizes the shared expert, which every rank computes
identically (attention stays bf16, as in convert); `--dense keep` leaves it in bf16 too (its forward still runs),
to time the routed experts alone.
Per rank: wall seconds of the MoE layer, seconds inside GPTQ for its own experts and for the dense parts,
seconds waiting in collectives (gathers, point-to-point transfers, the output sums; waiting for a slower peer
counts here), and peak anonymous RSS of the process (RssAnon sampled every 2 ms, as tests/support/memwatch.py
does). Prints a table and the scaling, writes the JSON (`--json`, default bench-distributed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench_quant: the synthetic Scout layer and the discarding exporter


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakWatch:
    """Peak RssAnon of this process, sampled every 2 ms on a thread."""

    def __init__(self):
        self.peak = _rss_anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon())
        return self.peak


def worker(args) -> None:
    import torch
    from bench_quant import NullExporter, SyntheticScout

    from llama4_quant.convert.distributed import Ranks, from_environment, shutdown
    from llama4_quant.convert.pipeline import Pipeline, PipelineOptions, Progress
    from llama4_quant.quant.scheme import make_scheme

    watch = PeakWatch()
    torch.set_num_threads(args.threads)
    base = from_environment("cpu")
    waits = {"seconds": 0.0}

    class TimedRanks(Ranks):
        """The real collectives, timed (time blocked in them, including waiting for a slower peer)."""

        def _timed(self, name, *a):
            t0 = time.perf_counter()
            try:
                return getattr(super(), name)(*a)
            finally:
                waits["seconds"] += time.perf_counter() - t0

        def all_sum(self, t):
            return self._timed("all_sum", t)

        def gather(self, obj):
            return self._timed("gather", obj)

        def send(self, t, dst=0):
            return self._timed("send", t, dst)

        def recv(self, shape, dtype, src, device):
            return self._timed("recv", shape, dtype, src, device)

    ranks = TimedRanks(base.rank, base.world, base.comm_device)
    roles = ("experts",) if args.dense == "keep" else ("experts", "shared", "mlp")  # convert's default targets

    class Exporter(NullExporter):
        def grid_for(self, spec):
            return self.grid if spec.role in roles else None

    layer = {}

    class Sink(Progress):
        def layer_start(self, i, num_experts):
            layer["t0"] = time.perf_counter()
            layer["wait0"] = waits["seconds"]

        def layer_done(self, i):
            layer["seconds"] = time.perf_counter() - layer["t0"]
            layer["wait"] = waits["seconds"] - layer["wait0"]

    src = SyntheticScout(args.experts)
    if (args.hidden, args.width) != (5120, 8192):  # smaller shapes, for a quick check of the script itself
        from llama4_quant.model.config import from_hf_dict
        from llama4_quant.tiny.checkpoints import hf_config, text_config

        heads = max(1, args.hidden // 128)
        src.config = from_hf_dict(hf_config(text_config(
            "scout", vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.width,
            intermediate_size_mlp=2 * args.width, num_hidden_layers=1, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 5), head_dim=args.hidden // heads, num_local_experts=args.experts),
            "text"))
    T = min(args.tokens, 512)
    tokens = torch.randint(0, src.config.vocab_size - 1, (max(1, args.tokens // T), T),
                           generator=torch.Generator().manual_seed(0))
    opts = PipelineOptions(method="gptq", device="cpu", batch_size=args.batch_size)
    pipe = Pipeline(src, Exporter(make_scheme("w4a16")), opts, Sink(), ranks)
    t0 = time.perf_counter()
    pipe.run(tokens, {})
    total = time.perf_counter() - t0
    ranks.barrier()
    shutdown(ranks)
    own = [e for e in range(args.experts) if ranks.owns(e)]
    recs = pipe.records
    expert_s = sum(recs[f"layers.0.experts.{e}.{k}"]["seconds"] for e in own for k in ("gate", "up", "down"))
    dense = {n: r["seconds"] for n, r in recs.items() if ".experts." not in n}
    peak = watch.stop()
    result = {"rank": ranks.rank, "world": ranks.world, "threads": args.threads, "experts_owned": own,
              "layer_seconds": layer["seconds"], "total_seconds": total, "gptq_experts_seconds": expert_s,
              "gptq_dense_seconds": sum(dense.values()), "gptq_dense": dense, "wait_seconds": layer["wait"],
              "expert_matrix_seconds": {k: [recs[f"layers.0.experts.{e}.{k}"]["seconds"] for e in own]
                                        for k in ("gate", "up", "down")},
              "peak_rss_anon": peak}
    Path(args.result_dir, f"rank{ranks.rank}.json").write_text(json.dumps(result))


def run_config(args, n: int, threads: int) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench-dist-{n}-"))
    opts = ["--worker", "--experts", str(args.experts), "--tokens", str(args.tokens), "--threads", str(threads),
            "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--width", str(args.width),
            "--dense", args.dense, "--result-dir", str(out)]
    if n == 1:
        cmd = [sys.executable, __file__, *opts]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--master-port", str(args.port), __file__, *opts]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{n} rank(s) failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if len(rows) != n:
        raise SystemExit(f"{n} rank(s): {len(rows)} results\n{r.stderr[-3000:]}")
    for row in rows:
        row["process_wall_seconds"] = wall
    return rows


def scout_bytes() -> dict:
    """bf16 bytes of one real Scout MoE layer (16 experts), by part."""
    H, I, q, kv = 5120, 8192, 40 * 128, 8 * 128
    return {"routed_experts": 16 * 3 * H * I * 2, "shared_expert": 3 * H * I * 2,
            "attention": (2 * q * H + 2 * kv * H) * 2, "router": 16 * H * 2}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16, help="routed experts in the layer (Scout has 16)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (split across ranks)")
    ap.add_argument("--ranks", default="1,2", help="comma list of rank counts to run, --threads split across ranks")
    ap.add_argument("--configs", help="instead of --ranks: comma list of RANKSxTHREADS (threads per rank), e.g. "
                    "1x2,2x1,1x1")
    ap.add_argument("--dense", choices=["gptq", "keep"], default="gptq",
                    help="quantize the shared expert too (gptq, as convert does) or keep it in bf16")
    ap.add_argument("--hidden", type=int, default=5120, help="hidden size (Scout's by default)")
    ap.add_argument("--width", type=int, default=8192, help="expert width (Scout's by default)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--json", default="bench-distributed.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    if args.configs:
        plan = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    else:
        plan = [(n, max(1, args.threads // n)) for n in (int(x) for x in args.ranks.split(","))]
    load = os.getloadavg()
    print(f"MoE layer: hidden {args.hidden}, experts {args.width} wide, {args.experts} experts, {args.tokens} tokens, "
          f"GPTQ w4a16, dense parts {args.dense}; "
          f"load average before {load[0]:.1f}", flush=True)
    configs = {}
    for n, t in plan:
        print(f"{n} rank(s) x {t} thread(s) ...", flush=True)
        configs[f"{n}x{t}"] = run_config(args, n, t)
    hdr = (f"{'ranks':>5s} {'rank':>4s} {'thr':>3s} {'experts':>9s} {'layer s':>8s} {'gptq exp s':>10s} "
           f"{'gptq dense s':>12s} {'wait s':>7s} {'peak RssAnon':>12s}")
    print(hdr)
    for key, rows in configs.items():
        n = len(rows)
        for r in rows:
            own = ",".join(map(str, r["experts_owned"])) if len(r["experts_owned"]) <= 4 else f"{len(r['experts_owned'])}"
            print(f"{n:5d} {r['rank']:4d} {r['threads']:3d} {own:>9s} {r['layer_seconds']:8.1f} "
                  f"{r['gptq_experts_seconds']:10.1f} {r['gptq_dense_seconds']:12.1f} {r['wait_seconds']:7.1f} "
                  f"{r['peak_rss_anon'] / 2**30:9.2f} GiB")
    summary = {}
    ones = [k for k, rows in configs.items() if len(rows) == 1]
    if ones:
        one = configs[ones[0]][0]  # the first 1-rank configuration is the reference
        for key, rows in configs.items():
            n, layer = len(rows), max(r["layer_seconds"] for r in rows)
            peak = max(r["peak_rss_anon"] for r in rows)
            summary[key] = s = {"ranks": n, "threads_per_rank": rows[0]["threads"], "layer_seconds": layer,
                                "speedup": one["layer_seconds"] / layer, "max_rank_peak_rss_anon": peak,
                                "peak_vs_one": peak / one["peak_rss_anon"], "reference": ones[0]}
            print(f"{n} rank(s) x {s['threads_per_rank']} thread(s): {layer:.1f} s per MoE layer, "
                  f"{s['speedup']:.2f}x {ones[0]}; largest rank peak {peak / 2**30:.2f} GiB = "
                  f"{100 * s['peak_vs_one']:.0f}% of {ones[0]}'s")
    b = scout_bytes()
    dense = b["shared_expert"] + b["attention"] + b["router"]
    print(f"real Scout MoE layer (bf16): routed experts {b['routed_experts'] / 1e9:.2f} GB, shared expert "
          f"{b['shared_expert'] / 1e9:.2f} GB, attention {b['attention'] / 1e9:.2f} GB: the parts every rank "
          f"repeats are {100 * dense / (dense + b['routed_experts']):.1f}% of the layer")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_dir")},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load,
                          "load_after": os.getloadavg()},
              "commit": commit, "configs": configs, "summary": summary, "scout_layer_bf16_bytes": b}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
