"""Real-scale speed and memory: our GGUF/safetensors conversions vs llama.cpp's pipeline on Scout-shaped layers.

    python bench/bench_scale.py [--layers 1] [--dir /tmp/scout-bench] [--runs rtn,imatrix,llama.cpp] [--threads N]

Builds (or reuses) an HF checkpoint with Scout's real shapes (hidden 5120, 40 heads / 8 kv heads of 128, 16
experts of width 8192 plus a shared expert, vocab 202,048, untied head; random bf16 weights; multimodal layout
with fused `gate_up_proj` experts, sharded at 5 GB like Meta's upload) and `--layers` decoder layers. The
tokenizer is the shipped tiny model's (both tools pad the vocabulary to the embedding's rows).

Then runs, each in its own process (wall seconds and peak RSS from /usr/bin/time):

- ours: `llama4-quant convert SRC OUT.gguf --to gguf --scheme q4_k_m --method rtn` (and `--method imatrix`
  with `--calib-samples` x `--calib-seqlen` tokens of the shipped calibration text, `--method gptq`, `--to safetensors --scheme w4a16`
  or `fp8-dynamic` when named in `--runs`);
- llama.cpp: `convert_hf_to_gguf.py --outtype bf16` then `llama-quantize ... Q4_K_M` (all threads), and for
  `llama.cpp-imatrix` `llama-imatrix` on the same calibration tokens then `llama-quantize --imatrix`.

It checks that our rtn file holds the same tensor bytes as llama.cpp's Q4_K_M (names, types, data), and prints a
table (seconds, GB/s of bf16 input, peak RSS, peak RSS / one decoder layer's bf16 bytes) and the ratios the
performance goals name; writes bench-scale.json beside the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support/: the llama.cpp drivers

SCOUT = dict(
    hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1, vocab_size=202048,
)


def build_checkpoint(out: Path, layers: int) -> Path:
    """A Scout-shaped HF checkpoint with `layers` decoder layers (reused when its stamp matches)."""
    stamp = out / "bench-stamp.json"
    want = {"layers": layers, **SCOUT, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out
    import torch

    from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint
    from llama4_quant.tiny.trained import trained_checkpoint

    if out.exists():
        shutil.rmtree(out)
    tiny = trained_checkpoint()
    tcfg = json.loads((tiny / "config.json").read_text())["text_config"]
    ids = {k: tcfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg = text_config("scout", num_hidden_layers=layers, **SCOUT, **ids)

    def fn(name: str, shape: tuple[int, ...]) -> torch.Tensor:  # fast: one generator, bf16-sized values
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shape) == 1:
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        scale = 1.0 if name == "tok_embeddings" else shape[-1] ** -0.5
        return torch.randn(shape, generator=g).mul_(scale)

    t0 = time.perf_counter()
    write_hf_checkpoint(out, cfg, fn, layout="multimodal", max_shard_bytes=5 * 10**9)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny / f, out / f)
    stamp.write_text(json.dumps(want))
    print(f"built {out} ({_gb(_dir_bytes(out)):.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _gb(n: float) -> float:
    return n / 1e9


def layer_bf16_bytes(src: Path) -> int:
    """bf16 bytes of decoder layer 0 (every tensor named `...layers.0.`)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    total = 0
    for shard in sorted(set(index.values())):
        with safe_open(str(src / shard), "pt") as f:
            for name in f.keys():
                if ".layers.0." in name and "vision" not in name:
                    sl = f.get_slice(name)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    total += 2 * n
    return total


def evict(src: Path) -> None:
    """Drop the checkpoint's pages from the kernel's page cache (clean pages: POSIX_FADV_DONTNEED), so each run
    reads its input from disk, as the first conversion of a freshly downloaded checkpoint does."""
    for f in src.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run cmd under /usr/bin/time -v; wall seconds and peak RSS (bytes)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    row = {"seconds": round(wall, 1), "peak_rss": rss}
    timing = _timing(p.stdout)
    if timing and timing.get("eta_seconds"):
        # the progress bar's estimate after the first layer against the seconds that in fact followed
        est, actual = timing["eta_seconds"][0], timing["remaining_seconds"][0]
        row["eta_after_first_layer"] = {"estimated_s": est, "actual_s": actual,
                                        "error": round(est / actual - 1, 3) if actual > 0 else None}
        row["layer_seconds"] = timing["layer_seconds"]
    return row


def _timing(stdout: str) -> dict | None:
    """The `timing` of a `convert --json` summary (None for other commands)."""
    try:
        return json.loads(stdout[stdout.index("{"):]).get("timing")
    except ValueError:
        return None


def same_tensors(a: Path, b: Path) -> tuple[bool, str]:
    """Same tensor names, types, shapes and data bytes (metadata may differ)."""
    import numpy as np
    from gguf import GGUFReader

    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    if set(ta) != set(tb):
        return False, f"tensor names differ: {sorted(set(ta) ^ set(tb))[:6]}"
    for name in ta:
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type:
            return False, f"{name}: {x.tensor_type.name} vs {y.tensor_type.name}"
        if not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            return False, f"{name}: data differ"
    return True, f"{len(ta)} tensors identical"


def _llamacpp_imatrix(lc, bf16: Path, calib: Path, work: Path, args, env: dict, rows: dict, conv: dict) -> None:
    """llama-imatrix on the calibration text, then llama-quantize --imatrix; rows gain their timings."""
    imat = work / "llamacpp.imatrix.gguf"
    n_ctx = args.calib_seqlen
    print("llama.cpp llama-imatrix ...", flush=True)
    im = timed([lc.imatrix, "-m", bf16, "-f", calib, "-o", imat, "-c", n_ctx, "-b", n_ctx,
                "--chunks", args.calib_samples, "--output-format", "gguf", "--no-ppl",
                "-t", args.threads], env, work / "llamacpp-imatrix.log")
    print(f"  {im}\nllama.cpp llama-quantize --imatrix ...", flush=True)
    qi = work / "llamacpp-q4_k_m-imatrix.gguf"
    quant_i = timed([lc.quantize, "--imatrix", imat, bf16, qi, "Q4_K_M", str(args.threads)], env,
                    work / "llamacpp-quantize-imatrix.log")
    print(f"  {quant_i}", flush=True)
    rows["llama.cpp imatrix"] = im
    rows["llama.cpp quantize --imatrix"] = quant_i
    rows["llama.cpp imatrix total"] = {
        "seconds": round(conv["seconds"] + im["seconds"] + quant_i["seconds"], 1),
        "peak_rss": max(conv["peak_rss"], im["peak_rss"], quant_i["peak_rss"])}
    if not args.keep:
        qi.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/scout-bench")
    ap.add_argument("--runs", default="rtn,imatrix,llama.cpp,llama.cpp-imatrix",
                    help="comma list of: rtn imatrix gptq gptq-norefit w4a16 fp8 llama.cpp llama.cpp-imatrix")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the GGUF/safetensors outputs")
    ap.add_argument("--warm", action="store_true",
                    help="leave the checkpoint in the page cache between runs (default: every run starts cold)")
    args = ap.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    src = build_checkpoint(work / f"scout-{args.layers}L", args.layers)
    in_bytes = _dir_bytes(src)
    layer_bytes = layer_bf16_bytes(src)
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    calib = work / "calib.txt"
    from llama4_quant.tiny.trained import demo_texts

    calib.write_text(demo_texts()["calib"])
    cal = ["--calib", calib, "--calib-samples", args.calib_samples, "--calib-seqlen", args.calib_seqlen]
    ours = {
        "rtn": (["--to", "gguf", "--scheme", "q4_k_m", "--method", "rtn"], "gguf"),
        "imatrix": (["--to", "gguf", "--scheme", "q4_k_m", "--method", "imatrix", *cal], "gguf"),
        "gptq": (["--to", "gguf", "--scheme", "q4_k_m", "--method", "gptq", *cal], "gguf"),
        # the same without the router refit (its unquantized reference forward): the refit's cost, A/B
        "gptq-norefit": (["--to", "gguf", "--scheme", "q4_k_m", "--method", "gptq", "--no-refit-router", *cal], "gguf"),
        "w4a16": (["--to", "safetensors", "--scheme", "w4a16", "--method", "rtn"], "st"),
        "fp8": (["--to", "safetensors", "--scheme", "fp8-dynamic"], "st"),
    }
    rows: dict[str, dict] = {}
    outs: dict[str, Path] = {}
    for name in runs:
        if name not in ours:
            continue
        opts, kind = ours[name]
        out = work / (f"ours-{name}.gguf" if kind == "gguf" else f"ours-{name}")
        print(f"ours {name} ...", flush=True)
        if not args.warm:
            evict(src)
        rows[f"ours {name}"] = timed([py, "-m", "llama4_quant", "convert", src, out, *opts, "--force", "--json"],
                                     env, work / f"ours-{name}.log")
        outs[name] = out
        print(f"  {rows[f'ours {name}']}", flush=True)

    if "llama.cpp" in runs or "llama.cpp-imatrix" in runs:
        from support import llamacpp as L

        lc = L.find_llamacpp()
        if lc is None or lc.convert_hf is None:
            print(f"llama.cpp not found: {L.explain_missing()}")
        else:
            bf16 = work / "llamacpp-bf16.gguf"
            print("llama.cpp convert_hf_to_gguf.py ...", flush=True)
            if not args.warm:
                evict(src)
            # The converter refuses a tokenizer whose pre-tokenizer hash it does not know (ours is a tiny
            # Llama 4-format BPE, not Meta's); name it "llama4" and leave every tensor path as it is.
            wrap = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
                    "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'llama4'; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")
            conv = timed([py, "-c", wrap, lc.convert_hf, src, "--outfile", bf16, "--outtype", "bf16"],
                         lc.converter_env(env), work / "llamacpp-convert.log")
            print(f"  {conv}", flush=True)
            rows["llama.cpp convert"] = conv
            q = work / "llamacpp-q4_k_m.gguf"
            if "llama.cpp" in runs:  # the plain pipeline (only `llama.cpp-imatrix` named: its own quantize only)
                print("llama.cpp llama-quantize ...", flush=True)
                quant = timed([lc.quantize, bf16, q, "Q4_K_M", str(args.threads)], env,
                              work / "llamacpp-quantize.log")
                print(f"  {quant}", flush=True)
                rows["llama.cpp quantize"] = quant
                rows["llama.cpp total"] = {"seconds": round(conv["seconds"] + quant["seconds"], 1),
                                           "peak_rss": max(conv["peak_rss"], quant["peak_rss"])}
            if "llama.cpp-imatrix" in runs:  # llama-imatrix on the same tokens, then llama-quantize --imatrix
                try:
                    _llamacpp_imatrix(lc, bf16, calib, work, args, env, rows, conv)
                except SystemExit as e:  # llama.cpp 0.3.36's llama-imatrix aborts on Llama 4 models of fewer than
                    # 4 layers (no NoPE layer, which llama.cpp places at every 4th: an unused mask input)
                    lines = str(e).splitlines()
                    why = next((ln for ln in lines if "GGML_ASSERT" in ln), lines[-1])
                    print(f"  llama.cpp imatrix pipeline failed, left out: {why.strip()}", flush=True)
                    rows.pop("llama.cpp imatrix", None)
            if "rtn" in outs and q.is_file():
                ok, why = same_tensors(outs["rtn"], q)
                rows["ours rtn"]["identical_to_llama.cpp"] = ok
                print(f"ours rtn vs llama.cpp Q4_K_M: {'identical' if ok else 'DIFFERENT'} ({why})")
            if not args.keep:
                bf16.unlink(missing_ok=True)
                q.unlink(missing_ok=True)

    print(f"\ninput {_gb(in_bytes):.2f} GB bf16 ({args.layers} layer(s) + embeddings + head); "
          f"one decoder layer {_gb(layer_bytes):.2f} GB; {args.threads} threads; "
          f"{'warm' if args.warm else 'cold'} page cache at the start of each run\n")
    print(f"{'run':24} {'seconds':>8} {'GB/s in':>8} {'peak RSS GB':>12} {'RSS/layer':>10}")
    for name, r in rows.items():
        r["gb_per_s"] = round(_gb(in_bytes) / r["seconds"], 3)
        r["rss_per_layer"] = round(r["peak_rss"] / layer_bytes, 2)
        print(f"{name:24} {r['seconds']:8.1f} {r['gb_per_s']:8.3f} {_gb(r['peak_rss']):12.2f} "
              f"{r['rss_per_layer']:10.2f}")
    ratios = {}
    if "ours rtn" in rows and "llama.cpp total" in rows:
        ratios["rtn throughput vs llama.cpp convert+quantize"] = round(
            rows["llama.cpp total"]["seconds"] / rows["ours rtn"]["seconds"], 2)
    if "ours imatrix" in rows and "llama.cpp imatrix total" in rows:
        ratios["imatrix throughput vs llama.cpp convert+imatrix+quantize"] = round(
            rows["llama.cpp imatrix total"]["seconds"] / rows["ours imatrix"]["seconds"], 2)
    elif "ours imatrix" in rows and "llama.cpp total" in rows:
        ratios["imatrix throughput vs llama.cpp convert+quantize without imatrix (a lower bound)"] = round(
            rows["llama.cpp total"]["seconds"] / rows["ours imatrix"]["seconds"], 2)
    if "ours gptq" in rows and "llama.cpp total" in rows:
        ratios["gptq time / llama.cpp rtn time"] = round(
            rows["ours gptq"]["seconds"] / rows["llama.cpp total"]["seconds"], 2)
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    for name, r in rows.items():
        e = r.get("eta_after_first_layer")
        if e and e["error"] is not None:
            print(f"{name}: ETA after the first layer {e['estimated_s']:.0f} s, then took {e['actual_s']:.0f} s "
                  f"({e['error']:+.0%})")
    result = {"layers": args.layers, "input_bytes": in_bytes, "layer_bytes": layer_bytes, "threads": args.threads,
              "page_cache": "warm" if args.warm else "cold",
              "rows": rows, "ratios": ratios}
    (work / "bench-scale.json").write_text(json.dumps(result, indent=2, default=str))
    if not args.keep:
        for p in outs.values():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    main()
