"""Quality at equal size: ours vs llm-compressor and llama.cpp on the shipped tiny trained Llama 4 (docs/quality.md).

    python bench/quality.py [OUT_DIR] [--only ROW,ROW] [--gptq KEY=VALUE ...] [--tag NAME] [--no-peers]

Every row is quantized from the shipped model (llama4_quant/data/tiny-llama4) with the *same calibration tokens*
(the corpus' calib split, `--calib-samples` x `--calib-seqlen`, sampled once by our calibration loader and handed to
every tool) and scored on the *same held-out tokens* (the test split, chunks of `--ctx`, the llama-perplexity
protocol) by our evaluator (llama4_quant/eval/compare.py) against the bf16 source, on the decompressed weights:
mean KLD of the next-token distribution, perplexity change, top-1 agreement.

Rows:
  ours w4a16/w8a16 (gptq, rtn), fp8-dynamic (rtn, gptq)      compressed-tensors safetensors, default targets
                                                           (routed + shared experts; attention, router, lm_head,
                                                           vision unquantized: llm-compressor's Llama 4 recipe)
  llmc w4a16/w8a16 gptq, fp8-dynamic                       llm-compressor oneshot (GPTQModifier W4A16/W8A16 group
                                                           128 / QuantizationModifier FP8_DYNAMIC, its Llama 4 ignore
                                                           list) in its own venv (scripts/setup_llmcompressor.sh)
  ours q4_k_m (gptq, imatrix, rtn)                          GGUF
  llama.cpp q4_k_m (+imatrix)                              llama-imatrix on the same calibration text (see
                                                           below) + llama-quantize

llama-imatrix reads text, not tokens: it is given the calibration text the windows are cut from (the windows cover
nearly all of it), in chunks of its own `--imatrix-ctx`. Ratios printed at the end are the goals of issue #12:
  w4a16: ours gptq KLD / llm-compressor GPTQ W4A16 KLD (goal <= 0.75); q4_k_m: ours gptq KLD / llama.cpp
  Q4_K_M+imatrix KLD at the same file size (goal <= 0.5); w8a16 and fp8: ours / llm-compressor (goal <= 1).

`bytes` is the tensor payload (safetensors headers left out: our writer pads them to 256 KiB); w8a16 rows are per
channel on both sides (llm-compressor's W8A16 preset), so each pair compares the same bits.

`--gptq KEY=VALUE` overrides a `quant.gptq.GPTQConfig` field for our gptq rows and `--convert KEY=VALUE` a
`convert.run.ConvertOptions` field (a candidate; `--tag` names it, rows become e.g. `ours w4a16 gptq [tag]`), `--only` restricts rows (substring match), artifacts are cached in
OUT_DIR and reused unless `--fresh`. Writes OUT_DIR/quality.json (merged with earlier runs' rows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support/: the llama.cpp drivers and run_convert wrappers

LLMC_VENV = Path(os.environ.get("LLAMA4_QUANT_CACHE", Path.home() / ".cache" / "llama4-quant")) / "llmcompressor-venv"
LLMC_IGNORE = ["re:.*lm_head", "re:.*self_attn", "re:.*router", "re:.*vision_model.*", "re:.*multi_modal_projector.*",
               "Llama4TextAttention"]

# runs inside llm-compressor's venv: argv = model_dir tokens.json out_dir scheme
LLMC_SCRIPT = r'''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoTokenizer, Llama4ForConditionalGeneration
from llmcompressor import oneshot

model_dir, tokens_file, out_dir, scheme = sys.argv[1:5]
ignore = json.loads(sys.argv[5])
torch.manual_seed(0)
rows = json.load(open(tokens_file))
ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
model = Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the data is tokenised already; oneshot wants a processor
if scheme == "FP8_DYNAMIC":
    from llmcompressor.modifiers.quantization import QuantizationModifier
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
else:
    try:
        from llmcompressor.modifiers.gptq import GPTQModifier
    except ImportError:
        from llmcompressor.modifiers.quantization import GPTQModifier
    recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore)
def collate(batch):
    return {k: torch.tensor([b[k] for b in batch]) for k in batch[0]}
t0 = time.time()
oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, max_seq_length=len(rows[0]), num_calibration_samples=len(rows),
        data_collator=collate, sequential_targets=["Llama4TextMLP"])
secs = time.time() - t0
model.save_pretrained(out_dir, save_compressed=True)
import os
from safetensors import safe_open
if not os.path.exists(out_dir + "/model.safetensors.index.json"):  # one shard: our reader wants the index
    with safe_open(out_dir + "/model.safetensors", "pt") as f:
        json.dump({"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}},
                  open(out_dir + "/model.safetensors.index.json", "w"))
import importlib.metadata as md
json.dump({"seconds": secs, "versions": {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers",
           "torch")}}, open(out_dir + "/llmc-run.json", "w"))
'''


def parse_convert(text: str) -> tuple[str, object]:
    from llama4_quant.convert.run import ConvertOptions

    key, _, val = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(ConvertOptions)}
    if key not in fields:
        raise SystemExit(f"--convert {key}: not a ConvertOptions field")
    default = fields[key].default
    if isinstance(default, bool):
        return key, val.lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        if isinstance(default, kind):
            return key, kind(val)
    return key, val


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data (safetensors: without the headers, which our writer pads to 256 KiB); file size else."""
    import struct

    if path.is_file():
        return path.stat().st_size
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            head = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__")
    return total


def parse_override(text: str) -> tuple[str, object]:
    from llama4_quant.quant.gptq import GPTQConfig

    key, _, val = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(GPTQConfig)}
    if key not in fields:
        raise SystemExit(f"--gptq {key}: not a GPTQConfig field ({', '.join(fields)})")
    default = getattr(GPTQConfig(), key)
    if isinstance(default, bool):
        return key, val.lower() in ("1", "true", "yes", "on")
    if isinstance(default, (int, float)) or default is None:
        for kind in (int, float):
            try:
                return key, kind(val)
            except ValueError:
                pass
    return key, None if val.lower() == "none" else val


@contextlib.contextmanager
def gptq_defaults(overrides: dict):
    """run_convert builds GPTQConfig(damp=, act_order=, shrink=): other fields take the class defaults, which are
    swapped here for the candidate's (bench only; the library's defaults are what the bench without --gptq runs)."""
    import llama4_quant.quant.gptq as G

    if not overrides:
        yield
        return
    orig = G.GPTQConfig
    passed = {k: v for k, v in overrides.items() if k in ("damp", "act_order", "shrink")}
    rest = {k: v for k, v in overrides.items() if k not in passed}

    def patched(*a, **kw):
        kw.update(passed)
        return dataclasses.replace(orig(*a, **kw), **rest)

    G.GPTQConfig = patched
    try:
        yield
    finally:
        G.GPTQConfig = orig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="quality-bench")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--imatrix-ctx", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--extra-test", type=int, default=0, metavar="N",
                    help="also score on N more test splits of the corpus generator (the `KLD ext` column)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch, llm-compressor and llama.cpp (1: on shared cores more threads than free "
                         "cores make torch's OpenMP spin: 50x slower)")
    ap.add_argument("--only", default="", help="comma-separated substrings of row names to run")
    ap.add_argument("--gptq", action="append", default=[], metavar="KEY=VALUE", help="GPTQConfig override (candidate)")
    ap.add_argument("--convert", action="append", default=[], metavar="KEY=VALUE",
                    help="ConvertOptions override for our gptq rows (e.g. moe_calibration=all): part of the candidate")
    ap.add_argument("--tag", default="", help="suffix for the candidate's rows")
    ap.add_argument("--no-peers", action="store_true", help="skip llm-compressor and llama.cpp")
    ap.add_argument("--fresh", action="store_true", help="rebuild cached artifacts")
    ap.add_argument("--rescore", action="store_true",
                    help="also score every artifact quality.json lists (earlier candidates), all on the same chunks")
    ap.add_argument("--llmc-venv", default=str(LLMC_VENV))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from support import llamacpp as L
    from support.convert import convert

    from llama4_quant.calibration.dataset import load_calibration
    from llama4_quant.eval.compare import compare_models
    from llama4_quant.eval.perplexity import make_chunks
    from llama4_quant.eval.sources import open_any
    from llama4_quant.model.readers import open_checkpoint
    from llama4_quant.model.tokenizer import load_tokenizer
    from llama4_quant.tiny.trained import demo_texts, trained_checkpoint

    overrides = dict(parse_override(t) for t in args.gptq)
    copts = dict(parse_convert(t) for t in args.convert)
    cand = args.gptq + args.convert
    tag = f" [{args.tag or ','.join(cand)}]" if cand or args.tag else ""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = trained_checkpoint()
    texts = demo_texts()
    for name, text in texts.items():
        (out / f"{name}.txt").write_text(text)
    tok = load_tokenizer(model)
    src = open_checkpoint(model)
    cs = load_calibration(str(out / "calib.txt"), tok, args.calib_samples, args.calib_seqlen, 0)
    calib_tokens = cs.tokens  # [N, T], BOS first: the same windows for every tool
    tokens_json = out / "calib-tokens.json"
    tokens_json.write_text(json.dumps(calib_tokens.tolist()))
    calib_text = out / "calib.txt"  # llama-imatrix tokenises text itself: the text the windows are cut from
    print(f"calibration: {calib_tokens.shape[0]} x {calib_tokens.shape[1]} tokens ({cs.info.get('source', '')})",
          flush=True)

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    want = lambda key: not only or any(s in key for s in only)
    paths: dict[str, Path] = {}
    seconds: dict[str, float | None] = {}
    cands_of: dict[str, dict] = {}  # --rescore: the candidate a row of an earlier run was
    notes: dict[str, str] = {}

    cal = {"calib": str(out / "calib.txt"), "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen}

    def ours(key: str, to: str, fname: str, cached_ok: bool = True, **kw) -> None:
        gptq_row = kw.get("method") == "gptq"
        key = key + (tag if gptq_row else "")
        if not want(key):
            return
        stem, ext = (fname[:-5], ".gguf") if fname.endswith(".gguf") else (fname, "")
        slug = stem + ("-" + (args.tag or "-".join(cand)).replace("=", "").replace(" ", "")
                       if gptq_row and (cand or args.tag) else "") + ext
        path = out / slug
        if path.exists() and cached_ok and not args.fresh and (out / f"{slug}.seconds").exists():
            paths[key], seconds[key] = path, float((out / f"{slug}.seconds").read_text())
            return
        if path.is_dir():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        with gptq_defaults(overrides if gptq_row else {}):
            convert(model, path, to=to, force=True, **{**kw, **(copts if gptq_row else {})})
        seconds[key] = round(time.perf_counter() - t0, 1)
        (out / f"{slug}.seconds").write_text(str(seconds[key]))
        paths[key] = path
        print(f"{key}: {seconds[key]} s", flush=True)

    ours("ours w4a16 gptq", "safetensors", "ours-w4a16-gptq", scheme="w4a16", method="gptq", **cal)
    ours("ours w4a16 rtn", "safetensors", "ours-w4a16-rtn", scheme="w4a16", method="rtn")
    # per channel, as llm-compressor's W8A16 preset (same bits)
    ours("ours w8a16 gptq", "safetensors", "ours-w8a16-gptq", scheme="w8a16", method="gptq", group_size=-1, **cal)
    ours("ours w8a16 rtn", "safetensors", "ours-w8a16-rtn", scheme="w8a16", method="rtn", group_size=-1)
    ours("ours fp8-dynamic rtn", "safetensors", "ours-fp8-rtn", scheme="fp8-dynamic", method="rtn")
    ours("ours fp8-dynamic gptq", "safetensors", "ours-fp8-gptq", scheme="fp8-dynamic", method="gptq", **cal)
    ours("ours q4_k_m gptq", "gguf", "ours-q4_k_m-gptq.gguf", scheme="q4_k_m", method="gptq", **cal)
    ours("ours q4_k_m imatrix", "gguf", "ours-q4_k_m-imatrix.gguf", scheme="q4_k_m", method="imatrix", **cal)
    ours("ours q4_k_m rtn", "gguf", "ours-q4_k_m-rtn.gguf", scheme="q4_k_m", method="rtn")

    versions: dict[str, str] = {}
    if not args.no_peers:
        # llm-compressor, in its own venv
        py = Path(args.llmc_venv) / "bin" / "python"
        script = out / "llmc_run.py"
        script.write_text(LLMC_SCRIPT)
        for key, scheme in (("llmc w4a16 gptq", "W4A16"), ("llmc w8a16 gptq", "W8A16"),
                            ("llmc fp8-dynamic", "FP8_DYNAMIC")):
            if not want(key):
                continue
            path = out / ("llmc-" + scheme.lower())
            if not py.exists():
                notes[key] = f"no llm-compressor venv at {args.llmc_venv} (run scripts/setup_llmcompressor.sh)"
                print(f"{key}: skipped: {notes[key]}")
                continue
            if not (path / "llmc-run.json").exists() or args.fresh:
                if path.exists():
                    shutil.rmtree(path)
                env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                           OMP_NUM_THREADS=str(args.threads),
                           TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
                t0 = time.perf_counter()
                proc = subprocess.run([str(py), str(script), str(model), str(tokens_json), str(path), scheme,
                                       json.dumps(LLMC_IGNORE)], env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
                    raise SystemExit(f"{key}: llm-compressor failed:\n{tail}")
                print(f"{key}: {time.perf_counter() - t0:.1f} s", flush=True)
            run = json.loads((path / "llmc-run.json").read_text())
            paths[key], seconds[key] = path, round(run["seconds"], 1)
            versions.update({f"llmc {k}": v for k, v in run["versions"].items()})

        lc = L.find_llamacpp()
        llama_rows = [k for k in ("llama.cpp q4_k_m imatrix", "llama.cpp q4_k_m") if want(k)]
        if lc is None and llama_rows:
            for k in llama_rows:
                notes[k] = f"llama.cpp not found ({L.explain_missing()})"
        elif llama_rows:
            bf16 = out / "ours-bf16.gguf"
            if not bf16.exists():
                convert(model, bf16, to="gguf", scheme="bf16", force=True)
            versions["llama.cpp"] = lc.version()
            imat = out / "llamacpp.imatrix.gguf"
            if "llama.cpp q4_k_m imatrix" in llama_rows:
                t0 = time.perf_counter()
                if not imat.exists() or args.fresh:
                    L.run_imatrix(bf16, calib_text, imat, args.imatrix_ctx, threads=args.threads, llama=lc)
                f = out / "llamacpp-q4_k_m-imatrix.gguf"
                if not f.exists() or args.fresh:
                    L.run_quantize(bf16, f, "Q4_K_M", imatrix=imat, threads=args.threads, llama=lc)
                paths["llama.cpp q4_k_m imatrix"], seconds["llama.cpp q4_k_m imatrix"] = f, None
            if "llama.cpp q4_k_m" in llama_rows:
                f = out / "llamacpp-q4_k_m.gguf"
                if not f.exists() or args.fresh:
                    L.run_quantize(bf16, f, "Q4_K_M", threads=args.threads, llama=lc)
                paths["llama.cpp q4_k_m"], seconds["llama.cpp q4_k_m"] = f, None

    result_file = out / "quality.json"
    prev = json.loads(result_file.read_text()) if result_file.exists() else {}
    if args.rescore:
        for k, r in prev.get("rows", {}).items():
            if k not in paths and r.get("path") and Path(r["path"]).exists() and want(k):
                paths[k], seconds[k] = Path(r["path"]), r.get("seconds")
                if r.get("candidate"):
                    cands_of[k] = r["candidate"]

    # score everything on the same held-out chunks, in lockstep with the bf16 source: the demo test text first
    # (the numbers of the table), then --extra-test more test splits of the corpus generator (other seeds: text the
    # model never saw either), which only the `ext` columns use
    from llama4_quant.tiny.corpus import corpus_splits

    parts = [make_chunks(tok.encode(texts["test"]), args.ctx, None, tok.bos_id)]
    parts += [make_chunks(tok.encode(corpus_splits(s)["test"]), args.ctx, None, tok.bos_id)
              for s in range(1, args.extra_test + 1)]
    n_main = int(parts[0].shape[0])
    chunks = torch.cat(parts)
    keys = list(paths)
    print(f"scoring {len(keys)} rows on {chunks.shape[0]} chunks of {args.ctx} tokens", flush=True)
    t0 = time.perf_counter()
    ref, cands = compare_models(src, [open_any(paths[k]) for k in keys], chunks, names=keys)
    print(f"scored in {time.perf_counter() - t0:.0f} s", flush=True)
    ref_nll = torch.cat(ref.scores.nll[:n_main]).mean()
    rows = {}
    for k, c in zip(keys, cands):
        kld = torch.cat(c.kld[:n_main]).double()
        nll = torch.cat(c.scores.nll[:n_main]).mean()
        rows[k] = {"bytes": tensor_bytes(paths[k]), "kld_mean": float(kld.mean()),
                   "kld_p99": float(torch.quantile(kld, 0.99)), "ppl": float(nll.exp()),
                   "ppl_change_pct": 100 * float((nll - ref_nll).exp() - 1),
                   "top1": float(torch.cat(c.top1[:n_main]).double().mean()),
                   "kld_mean_ext": float(torch.cat(c.kld).double().mean()) if args.extra_test else None,
                   # each layer on the *reference* input (no routing flips, no accumulated error): relative error of
                   # its output, over all scored chunks; a flip-free measure of the per-layer quantization error
                   "layer_error": [round(x, 7) for x in c.layer_error],
                   "seconds": seconds.get(k),
                   "candidate": cands_of.get(k) or ({"gptq": overrides, "convert": copts}
                                                    if cand and "gptq" in k and k.startswith("ours") else None),
                   "path": str(paths[k]),
                   "chunk_kld": [round(float(x.double().mean()), 9) for x in c.kld[:n_main]]}
    all_rows = {**prev.get("rows", {}), **rows}
    result = {"model": str(model), "calib_tokens": list(calib_tokens.shape), "test_chunks": n_main,
              "extra_test_chunks": int(chunks.shape[0]) - n_main,
              "ctx": args.ctx, "source_ppl": float(ref_nll.exp()), "versions": {**prev.get("versions", {}), **versions},
              "notes": {**prev.get("notes", {}), **notes}, "rows": all_rows}
    result["ratios"] = ratios(all_rows, tag)
    result_file.write_text(json.dumps(result, indent=2))
    print_table(result, rows)
    return result


def bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5 % and 95 % quantiles of sum(a) / sum(b) over test chunks resampled with replacement (paired: both rows
    scored the same chunks), i.e. how much of a ratio the choice of held-out text could move."""
    import torch

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(0, len(a), (n, len(a)), generator=torch.Generator().manual_seed(seed))
    r = ta[idx].sum(1) / tb[idx].sum(1)
    return float(torch.quantile(r, 0.05)), float(torch.quantile(r, 0.95))


def ratios(rows: dict, tag: str = "") -> dict:
    def r(a: str, b: str):
        if a in rows and b in rows and rows[b]["kld_mean"] > 0:
            return rows[a]["kld_mean"] / rows[b]["kld_mean"]
        return None

    def ci(a: str, b: str):
        ca, cb = rows[a].get("chunk_kld"), rows[b].get("chunk_kld")
        return bootstrap(ca, cb) if ca and cb and len(ca) == len(cb) else None

    out = {}
    for ours_key, peer, goal in (("ours w4a16 gptq", "llmc w4a16 gptq", 0.75),
                                 ("ours q4_k_m gptq", "llama.cpp q4_k_m imatrix", 0.5),
                                 ("ours w8a16 gptq", "llmc w8a16 gptq", 1.0),
                                 ("ours fp8-dynamic rtn", "llmc fp8-dynamic", 1.0)):
        for k in sorted({ours_key, ours_key + tag} & set(rows)):
            v = r(k, peer)
            if v is not None:
                out[f"{k} / {peer}"] = {"ratio": v, "ci90": ci(k, peer), "goal": goal, "met": v <= goal}
    for k in [k for k in rows if k.startswith("ours") and " gptq" in k]:
        base = k.replace(" gptq", " rtn").split(" [")[0]
        if base in rows:
            v = r(k, base)
            out[f"{k} / {base}"] = {"ratio": v, "ci90": ci(k, base), "goal": 1.0, "met": v <= 1.0}
    return out


BASE_ROWS = ("ours w4a16 gptq", "ours w4a16 rtn", "ours w8a16", "ours fp8", "ours q4_k_m", "llmc", "llama.cpp")


def print_table(result: dict, fresh: dict, shown: bool = True) -> None:
    """Every row of quality.json; `shown`: leave out candidate rows (`[...]`) of earlier runs."""
    print(f"\nsource ppl {result['source_ppl']:.4f}; calib {result['calib_tokens']}; {result['test_chunks']} test chunks "
          f"of {result['ctx']}")
    print(f"{'row':44} {'bytes':>10} {'KLD':>9} {'KLD p99':>9} {'ppl':>8} {'+%':>7} {'top1':>7} {'KLD ext':>9} "
          f"{'layer err':>9} {'s':>6}")
    for k, r in result["rows"].items():
        if shown and k not in fresh and ("[" in k or not any(k.startswith(b) for b in BASE_ROWS)):
            continue
        mark = "" if k in fresh else " (earlier run)"
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        ext = "-" if r.get("kld_mean_ext") is None else f"{r['kld_mean_ext']:.6f}"
        le = r.get("layer_error")
        lerr = "-" if not le else f"{sum(le) / len(le):.5f}"
        print(f"{k:44} {r['bytes']:10d} {r['kld_mean']:9.6f} {r['kld_p99']:9.5f} {r['ppl']:8.4f} "
              f"{r['ppl_change_pct']:7.3f} {r['top1']:7.4f} {ext:>9} {lerr:>9} {sec:>6}{mark}")
    print()
    for k, v in result["ratios"].items():
        if shown and "[" in k and not any(k.startswith(f) for f in fresh):
            continue
        ci = f" [90% {v['ci90'][0]:.3f}-{v['ci90'][1]:.3f}]" if v.get("ci90") else ""
        print(f"{k:70} {v['ratio']:.3f}{ci} (goal <= {v['goal']}) {'met' if v['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
