"""Seconds and peak RSS per decoder layer of the convert pipeline, for RTN, GPTQ and FP8.

Two models:
  trained  the tiny trained fixture (llama4_quant/data/tiny-llama4; hidden 256, 4 layers, 4 experts), calibrated
           on its calib.txt (--samples x --seqlen tokens);
  scout    one synthetic MoE decoder layer with Scout's real shapes (hidden 5120, 40 heads / 8 kv heads of 128,
           experts 8192 wide, --experts of them (Scout has 16), a shared expert), random weights generated
           expert by expert on demand, calibrated on --tokens random tokens.

Each (model, method) runs in a fresh subprocess, so peak RSS belongs to that run alone; the peak is reset at
the start of every layer (/proc/self/clear_refs), so each row is that layer's own peak. The pipeline and a
discarding exporter run exactly as `convert` does (routed experts + shared experts + dense MLPs quantized;
w4a16 group 128 for RTN and GPTQ, fp8 per-channel for FP8); nothing is written.

    python bench/bench_quant.py                                 # both models, all methods
    python bench/bench_quant.py --model scout --experts 2 --tokens 1024 --threads 2   # a small machine
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

METHODS = {"rtn": ("w4a16", "rtn"), "gptq": ("w4a16", "gptq"), "fp8": ("fp8-dynamic", "rtn")}


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class SyntheticScout:
    """A one-layer WeightSource with Scout's shapes; tensors are generated when read (bf16, seeded by name)."""

    def __init__(self, experts: int, vocab: int = 4096):
        from llama4_quant.model.config import from_hf_dict
        from llama4_quant.tiny.checkpoints import hf_config, text_config

        tc = text_config("scout", vocab_size=vocab, hidden_size=5120, intermediate_size=8192,
                         intermediate_size_mlp=16384, num_hidden_layers=1, num_attention_heads=40,
                         num_key_value_heads=8, head_dim=128, num_local_experts=experts)
        self.config = from_hf_dict(hf_config(tc, "text"))
        self.path = None

    def _make(self, name: str, shape):
        import torch

        g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(shape, generator=g)).bfloat16()
        scale = 0.5 if name.endswith("router") else (1.0 if name == "tok_embeddings" else shape[-1] ** -0.5)
        return (torch.randn(shape, generator=g) * scale).bfloat16()

    def read(self, name: str):
        from llama4_quant.model.tensors import expected_shapes

        return self._make(name, expected_shapes(self.config)[name])

    def read_expert(self, layer: int, kind: str, e: int):
        H, I = self.config.hidden_size, self.config.intermediate_size
        return self._make(f"layers.{layer}.experts.{e}.{kind}", (H, I) if kind == "down" else (I, H))

    def vision_tensors(self):
        return []


class NullExporter:
    """Chooses grids like the safetensors exporter and throws the results away."""

    def __init__(self, scheme):
        self.scheme = scheme

    def prepare(self, source):
        import torch

        from llama4_quant.quant.api import make_grid

        self.grid = make_grid(self.scheme, torch.bfloat16)

    def grid_for(self, spec):
        return self.grid if spec.role in ("experts", "shared", "mlp") else None

    def begin(self, source, plan):
        pass

    def runtime_weight(self, spec, result, grid):
        import torch

        return result.finalize(grid).dequantize(torch.bfloat16)

    def write_tensor(self, spec, tensor):
        pass

    def write_quantized(self, spec, expert, result, grid):
        pass

    def end_layer(self, layer):
        pass

    def finish(self, report):
        return report

    def abort(self):
        pass


def worker(args) -> None:
    import torch

    from llama4_quant.convert.pipeline import Pipeline, PipelineOptions, Progress
    from llama4_quant.quant.scheme import make_scheme

    torch.set_num_threads(args.threads)
    scheme_name, method = METHODS[args.method]
    if args.model == "trained":
        from llama4_quant.calibration.dataset import load_calibration
        from llama4_quant.model.readers import open_checkpoint
        from llama4_quant.model.tokenizer import load_tokenizer
        import tempfile

        from llama4_quant.tiny.trained import demo_texts, trained_checkpoint

        src = open_checkpoint(trained_checkpoint())
        calib = Path(tempfile.mkdtemp(prefix="bench-")) / "calib.txt"
        calib.write_text(demo_texts()["calib"])
        tokens = load_calibration(str(calib), load_tokenizer(src.path), args.samples, args.seqlen).tokens
    else:
        src = SyntheticScout(args.experts)
        T = min(args.tokens, 512)
        tokens = torch.randint(0, src.config.vocab_size - 1, (max(1, args.tokens // T), T),
                               generator=torch.Generator().manual_seed(0))
    rows = []

    class Sink(Progress):
        def layer_start(self, layer, num_experts):
            _reset_peak()
            self.t0 = time.perf_counter()

        def layer_done(self, layer):
            rows.append({"layer": layer, "seconds": time.perf_counter() - self.t0, "peak_rss": _status()["VmHWM"]})

    opts = PipelineOptions(method=method, device=args.device, batch_size=args.batch_size)
    t0 = time.perf_counter()
    Pipeline(src, NullExporter(make_scheme(scheme_name)), opts, Sink()).run(tokens if method == "gptq" else None, {})
    print(json.dumps({"rows": rows, "total_seconds": time.perf_counter() - t0,
                      "tokens": int(tokens.numel()) if method == "gptq" else 0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["trained", "scout", "both"], default="both")
    ap.add_argument("--methods", default="rtn,gptq,fp8")
    ap.add_argument("--experts", type=int, default=16, help="routed experts in the synthetic Scout layer")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens for the synthetic Scout layer")
    ap.add_argument("--samples", type=int, default=32, help="trained fixture: calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256, help="trained fixture: tokens per sequence")
    ap.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    models = ["trained", "scout"] if args.model == "both" else [args.model]
    print(f"threads {args.threads}, device {args.device}; scout: {args.experts} experts, {args.tokens} tokens; "
          f"trained: {args.samples}x{args.seqlen} tokens")
    print(f"{'model':8s} {'method':6s} {'layer':>5s} {'seconds':>9s} {'peak RSS MiB':>13s}")
    for model in models:
        for m in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--method", m, "--experts", str(args.experts),
                   "--tokens", str(args.tokens), "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--device", args.device]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(f"{model:8s} {m:6s} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            for row in res["rows"]:
                print(f"{model:8s} {m:6s} {row['layer']:5d} {row['seconds']:9.2f} {row['peak_rss'] / 2**20:13.0f}")
            print(f"{model:8s} {m:6s} {'total':>5s} {res['total_seconds']:9.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
