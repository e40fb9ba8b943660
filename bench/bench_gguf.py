"""Our q4_k_m GGUF vs llama.cpp's own q4_k_m, on the trained fixture (the numbers in docs/gguf.md).

    python bench/bench_gguf.py [OUT_DIR] [--calib-samples 128] [--calib-seqlen 2048]

Writes, from the fixture's checkpoint: our bf16 GGUF; our q4_k_m by gptq, imatrix and rtn (calibration: the fixture's
calib.txt); llama.cpp's Q4_K_M from `llama-quantize --imatrix` with an imatrix from `llama-imatrix` on the same
calib.txt (and without imatrix, which is byte-identical to our rtn). Then scores each on the fixture's test.txt,
ctx 128: perplexity by `llama-perplexity` (when llama.cpp is built, see docs/llamacpp.md) and by our evaluator, and
KL divergence / top-1 agreement against the bf16 source by our evaluator. Prints a table and writes bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support/: the llama.cpp drivers


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="gguf-bench")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--imatrix-ctx", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: robust on shared cores)")
    args = ap.parse_args(argv)

    from llama4_quant.eval.compare import compare_models
    from llama4_quant.eval.perplexity import make_chunks
    from llama4_quant.formats.gguf.reader import open_gguf
    from llama4_quant.model.readers import open_checkpoint
    from llama4_quant.model.tokenizer import load_tokenizer
    from llama4_quant.tiny.trained import demo_texts, trained_checkpoint
    from support import llamacpp as L
    from support.convert import gguf as run_gguf_convert

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = trained_checkpoint()
    calib, test = out / "calib.txt", out / "test.txt"
    for name, text in demo_texts().items():
        (out / f"{name}.txt").write_text(text)
    files: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def ours(key: str, **kw) -> None:
        t0 = time.perf_counter()
        files[key] = out / f"ours-{key}.gguf"
        run_gguf_convert(model, files[key], force=True, **kw)
        seconds[key] = round(time.perf_counter() - t0, 1)
        print(f"wrote {files[key]} ({seconds[key]} s)", flush=True)

    cal = dict(calib=str(calib), calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
    ours("bf16", scheme="bf16")
    ours("q4_k_m-gptq", scheme="q4_k_m", method="gptq", **cal)
    ours("q4_k_m-imatrix", scheme="q4_k_m", method="imatrix", **cal)
    ours("q4_k_m-rtn", scheme="q4_k_m", method="rtn")

    lc = L.find_llamacpp()
    if lc is not None:
        imat = L.run_imatrix(files["bf16"], calib, out / "llamacpp.imatrix.gguf", args.imatrix_ctx, threads=args.threads,
                             llama=lc)
        files["llama.cpp-q4_k_m-imatrix"] = L.run_quantize(files["bf16"], out / "llamacpp-q4_k_m-imatrix.gguf",
                                                           "Q4_K_M", imatrix=imat, threads=args.threads, llama=lc)
        files["llama.cpp-q4_k_m"] = L.run_quantize(files["bf16"], out / "llamacpp-q4_k_m.gguf", "Q4_K_M",
                                                   threads=args.threads, llama=lc)
    else:
        print(f"llama.cpp not found ({L.explain_missing()}): only our files")

    src = open_checkpoint(model)
    tok = load_tokenizer(model)
    chunks = make_chunks(tok.encode(test.read_text()), args.ctx, None, tok.bos_id)
    keys = [k for k in files if k != "bf16"]
    ref, cands = compare_models(src, [open_gguf(files[k]) for k in ["bf16", *keys]], chunks)
    rows = {}
    for k, c in zip(["bf16", *keys], cands):
        s = c.summary(ref)
        rows[k] = {"bytes": os.path.getsize(files[k]), "ppl_ours": s["perplexity"], "kld_mean": s["kld_mean"],
                   "top1": s["top1_agreement"], "convert_s": seconds.get(k)}
        if lc is not None:
            rows[k]["ppl_llama"] = L.run_perplexity(files[k], test, args.ctx, threads=args.threads, llama=lc)["ppl"]
    base = rows["bf16"]
    for r in rows.values():
        r["ppl_inc_ours_pct"] = 100 * (r["ppl_ours"] / base["ppl_ours"] - 1)
        if "ppl_llama" in r:
            r["ppl_inc_llama_pct"] = 100 * (r["ppl_llama"] / base["ppl_llama"] - 1)
    result = {"model": str(model), "chunks": int(chunks.shape[0]), "ctx": args.ctx, "calib": {k: str(v) for k, v in cal.items()},
              "source_ppl_ours": ref.scores.perplexity, "rows": rows}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    hdr = f"{'file':28} {'bytes':>9} {'ppl llama.cpp':>14} {'+%':>7} {'ppl ours':>9} {'+%':>7} {'KLD':>9} {'top1':>7}"
    print(hdr)
    for k, r in rows.items():
        pl = f"{r['ppl_llama']:14.4f} {r['ppl_inc_llama_pct']:7.3f}" if "ppl_llama" in r else f"{'-':>14} {'-':>7}"
        print(f"{k:28} {r['bytes']:9d} {pl} {r['ppl_ours']:9.4f} {r['ppl_inc_ours_pct']:7.3f} {r['kld_mean']:9.6f} "
              f"{r['top1']:7.4f}")
    return result


if __name__ == "__main__":
    main()
