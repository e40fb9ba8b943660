"""`llama4-quant convert MODEL OUT --to safetensors|gguf ...`: options in, summary out (the work is convert/run.py)."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import click

from .common import emit_json, handle_errors, progress_bar
from .units import SizeType, human


def _scheme_choices() -> list[str]:
    from ..convert.gguf import SCHEMES as GGUF
    from ..quant.scheme import SCHEMES as ST

    return [*ST, *GGUF]


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the exporter removes its temporary output."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (CliRunner in tests)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class RichProgress:
    """pipeline.Progress drawn as rich bars: layers (with the calibration tokens/s of the last one and the
    pipeline's time-left estimate, convert.clock), and the experts of the current layer."""

    def __init__(self, prog):
        self.prog = prog
        self.layers = None
        self.experts = None
        self.tokens, self.t_layer = 0, time.perf_counter()

    def start(self, num_layers, tokens=0):
        if self.layers is not None:
            self.prog.remove_task(self.layers)
        self.layers = self.prog.add_task("layers", total=num_layers)
        self.tokens, self.t_layer = tokens, time.perf_counter()

    def layer_start(self, layer, num_experts):
        self.t_layer = time.perf_counter()
        if self.experts is not None:
            self.prog.remove_task(self.experts)
            self.experts = None
        if num_experts:
            self.experts = self.prog.add_task(f"  layer {layer} experts", total=num_experts)

    def expert_done(self, layer, e):
        if self.experts is not None:
            self.prog.advance(self.experts)

    def layer_done(self, layer, eta=None):
        now = time.perf_counter()
        if self.tokens:  # calibration throughput of the layer just done
            rate = self.tokens / max(now - self.t_layer, 1e-9)
            self.prog.update(self.layers, description=f"layers ({rate:,.0f} tok/s)")
        self.t_layer = now
        self.prog.advance(self.layers)
        if eta is not None:
            self.prog.update(self.layers, eta=eta)

    def status(self, text):
        pass


def verify_options(fn):
    """The --verify family of convert options."""
    opts = [
        click.option("--verify", is_flag=True, help="After converting, check the artifact against MODEL (perplexity, "
                     "KLD) on --eval-data or on calibration documents the sampler did not use; record it in the manifest."),
        click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="--verify: text file to score (default: held-out calibration documents)."),
        click.option("--verify-ctx", default=512, show_default=True, help="--verify: tokens per chunk."),
        click.option("--verify-chunks", default=16, show_default=True, help="--verify: chunks to score."),
        click.option("--max-ppl-increase", type=float, default=None, help="--verify: fail (exit 3) above this percent."),
        click.option("--max-kld", type=float, default=None, help="--verify: fail (exit 3) above this mean KLD."),
        click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
                     help="--verify: also write report.json/md/html here."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.command("convert")
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--to", "to", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True,
              help="Output format.")
@click.option("--scheme", default=None, type=click.Choice(_scheme_choices()),
              help="safetensors (default w4a16): w4a16: int4 symmetric, group 128; w8a16: int8, group 128; fp8-dynamic: "
                   "fp8 e4m3 per-channel weights + dynamic per-token activations; fp8-block: 128x128 weight blocks. "
                   "gguf (default q4_k_m): bf16, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_k_s, q4_0, iq4_xs, iq4_nl, q3_k_m, "
                   "q3_k_s, q2_k, mxfp4_moe: llama-quantize's mixes (docs/gguf.md); or --fit/--target-size for a "
                   "mix chosen per tensor.")
@click.option("--method", type=click.Choice(["auto", "gptq", "rtn", "imatrix"]), default="auto", show_default=True,
              help="gptq (calibrated) or rtn (no data); auto: gptq for int schemes, rtn for fp8. "
                   "--to gguf also: imatrix (llama-imatrix's statistic); auto: gptq when calibration data is available.")
@click.option("--calib", default=None, help="Calibration data: a .txt/.jsonl/.json file or folder, or a Hub dataset "
              "org/name[@rev][:path]. Default: the recipe in calibration/default.json (fetched from the Hub).")
@click.option("--calib-samples", default=128, show_default=True, help="Calibration sequences.")
@click.option("--calib-seqlen", default=2048, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration sampling.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(exists=True),
              help="tokenizer.json for calibration (default: the model's).")
@click.option("--group-size", default=None, type=int,
              help="--to safetensors, int schemes: input columns per scale (-1: per channel). [default: 128]")
@click.option("--targets", "targets", multiple=True, help="--to safetensors: what to quantize, comma separated: experts, "
              "shared, mlp, attn, lm_head. Default: experts,shared,mlp.")
@click.option("--ignore", "ignore", multiple=True, help="--to safetensors: keep these unquantized: glob on canonical "
              "names (layers.0.*, *.wo) or HF module names (repeatable).")
@click.option("--moe-calibration", type=click.Choice(["routed", "all"]), default="routed", show_default=True,
              help="Expert statistics from the tokens routed to each expert, or from all tokens (statistics only).")
@click.option("--min-expert-tokens", default=16, show_default=True,
              help="Experts that saw fewer calibration tokens get RTN with MSE clipping instead of GPTQ.")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ visits columns by decreasing Hessian diagonal (static groups: no g_idx, no runtime cost).")
@click.option("--damp", default=0.01, show_default=True, help="GPTQ damping, fraction of mean diag(H).")
@click.option("--shrink", default=0.25, show_default=True, help="GPTQ: pull the Hessian toward its diagonal by "
              "s*d/(s*d+n) (d input columns, n tokens), against over-fitting experts that saw few tokens; 0: off.")
@click.option("--observer", type=click.Choice(["minmax", "mse"]), default=None,
              help="--to safetensors: how int scales are fitted (mse: clipping search). [default: minmax]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Forward compute dtype (auto: fp32 on CPU, bf16 on CUDA). Hessians are always fp32.")
@click.option("--batch-size", default=4, show_default=True, help="Calibration sequences per forward batch.")
@click.option("--hessian-memory", default=None, type=SizeType(),
              help="Budget for the expert Hessians (and weights) held at once: experts are processed in chunks that "
                   "fit. [default: 8GiB on a GPU, 3GiB on a CPU]")
@click.option("--router-aware/--no-router-aware", default=None,
              help="GPTQ on grids of at most 4 bits: also steer the error of the Linears that write the residual "
                   "stream (wo, down projections) away from what the later routers read (docs/quality.md). "
                   "[default: on for int grids (w4a16), off for GGUF k-quants, where its gain was within noise]")
@click.option("--refit-router/--no-refit-router", default=True, show_default=True,
              help="GPTQ: refit each MoE layer's router (kept unquantized, same type and size) so that on the "
                   "quantized model's own activations it gives the logits the original model gives, which routes "
                   "fewer tokens to other experts than the original did (docs/quality.md).")
@click.option("--gptq-experts", default=0, show_default=True, type=click.IntRange(min=0),
              help="GPTQ: routed experts quantized in one batched column loop (0: auto, the whole chunk on a GPU, "
                   "one on a CPU; each expert in flight holds float32 copies of its weights).")
@click.option("--max-shard-size", default=None, type=SizeType(),
              help="--to safetensors: largest output shard. [default: 2GB]")
@click.option("--split-max-size", default=None, type=SizeType(), help="--to gguf: split into files of at most this "
              "many tensor bytes, llama.cpp's gguf-split format (NAME-00001-of-0000N.gguf).")
@click.option("--imatrix", "imatrix_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="--to gguf: use this llama-imatrix output (GGUF format) instead of computing one "
                   "(implies --method imatrix).")
@click.option("--mmproj", "mmproj", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="--to gguf: also write the vision tower as llama.cpp's mmproj GGUF (llama-mtmd-cli/llama-server "
                   "--mmproj), to PATH or mmproj-OUT.gguf beside OUT (docs/gguf.md).")
@click.option("--mmproj-type", type=click.Choice(["f16", "bf16", "q8_0"]), default=None,
              help="--mmproj: tensor type of the projector file (norms, biases, embeddings stay F32). [default: f16]")
@click.option("--mmproj-only", is_flag=True, help="--to gguf: write only the projector, to OUT (no text model).")
@click.option("--fit", "fit", default=None, type=SizeType(), help="Choose per-tensor GGUF types (--to safetensors: a "
              "scheme per module, one per layer's experts) so the model plus the KV cache for --context fits this much "
              "device memory (less --reserve), least measured error first (docs/fit.md).")
@click.option("--target-size", default=None, type=SizeType(), help="Like --fit, for a GGUF file (--to safetensors: "
              "weight shards) of at most this size.")
@click.option("--target-bpw", default=None, type=float, help="Like --fit, for this many bits per weight.")
@click.option("--fit-schemes", "fit_schemes", multiple=True, help="--to safetensors, --fit/--target-*: the schemes a "
              "plan chooses among, comma separated: w4a16, w8a16, fp8-dynamic, fp8-block, bf16 (kept as stored). "
              "[default: w4a16,w8a16,bf16]")
@click.option("--context", default=8192, show_default=True, help="--fit: tokens of bf16 KV cache to leave room for.")
@click.option("--reserve", default="1GB", show_default=True, type=SizeType(), help="--fit: memory kept free for "
              "the runtime's buffers.")
@click.option("--plan", "plan_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Replay the per-tensor types (schemes) of a saved plan (OUT.plan.json of a --fit run).")
@click.option("--plan-only", is_flag=True, help="With --fit/--target-size/--target-bpw: print and save the plan, "
              "convert nothing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@verify_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@handle_errors
def convert_cmd(model, out, to, scheme, method, calib, calib_samples, calib_seqlen, seed, tokenizer_path, group_size,
                targets, ignore, moe_calibration, min_expert_tokens, act_order, damp, shrink, observer, device, dtype,
                batch_size, hessian_memory, router_aware, refit_router, gptq_experts, max_shard_size, split_max_size, imatrix_file,
                mmproj, mmproj_type,
                mmproj_only, fit, target_size, target_bpw, fit_schemes, context, reserve, plan_file, plan_only, force,
                verify,
                eval_data,
                verify_ctx, verify_chunks, max_ppl_increase, max_kld, report_dir, as_json):
    """Quantize MODEL (a checkpoint directory or a Hub repo id) into OUT.

    Layers are processed one at a time: each is calibrated on the activations the already quantized layers
    produce, quantized (GPTQ or RTN), written, and freed, so memory holds one layer plus activations. OUT
    appears only when complete. Attention stays bf16 unless --targets includes attn (see docs/convert.md)."""
    from ..convert.run import ConvertOptions, run_convert
    from ..convert.verify import VerifyOptions
    from ..eval.run import GATE_FAILED_EXIT

    o = ConvertOptions(
        model=model, out=out, to=to, scheme=scheme, method=method, calib=calib, calib_samples=calib_samples,
        calib_seqlen=calib_seqlen, seed=seed, tokenizer=tokenizer_path, group_size=group_size,
        targets=tuple(targets) or None, ignore=tuple(ignore) or None, observer=observer, max_shard_size=max_shard_size,
        split_max_size=split_max_size, imatrix_file=imatrix_file, moe_calibration=moe_calibration,
        min_expert_tokens=min_expert_tokens, act_order=act_order, damp=damp, shrink=shrink, device=device, dtype=dtype,
        batch_size=batch_size, hessian_memory=hessian_memory, router_aware=router_aware, refit_router=refit_router,
        gptq_experts=gptq_experts, force=force, mmproj=mmproj, mmproj_type=mmproj_type,
        mmproj_only=mmproj_only, fit=fit, target_size=target_size, target_bpw=target_bpw, context=context,
        reserve=reserve, plan=plan_file, plan_only=plan_only, fit_schemes=tuple(fit_schemes) or None,
        verify=VerifyOptions(eval_data=eval_data, ctx=verify_ctx, chunks=verify_chunks, max_ppl_increase=max_ppl_increase,
                             max_kld=max_kld, report_dir=report_dir) if verify else None)
    import os

    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 draws and prints
    with _sigterm_as_interrupt(), progress_bar(None if rank0 else False) as prog:
        summary = run_convert(o, progress=RichProgress(prog))
    if not rank0:
        return
    if as_json:
        emit_json(summary)
    else:
        echo_summary(summary)
    for w in summary["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if verify and not summary["verification"]["passed"]:
        raise SystemExit(GATE_FAILED_EXIT)


def echo_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"plan: {plan['budget']['target']} -> {human(plan['tensor_bytes'])} of tensors "
                    f"(room {human(plan['budget']['tensor_bytes'])}), predicted error {plan['predicted_error']:.4g}")
    for col in ("group", "types", "bytes", "predicted error"):
        t.add_column(col, justify="left" if col in ("group", "types") else "right")
    for g in plan["groups"]:
        t.add_row(g["group"], ", ".join(f"{k} x{v}" for k, v in sorted(g["types"].items())), human(g["bytes"]),
                  f"{g['error']:.4g}")
    Console(stderr=True).print(t)
    click.echo(f"plan saved: {plan['file']}", err=True)


def echo_summary(summary: dict) -> None:
    if "plan" in summary and "groups" in summary["plan"]:
        echo_plan(summary["plan"])
    if summary.get("plan_only"):
        return
    mm = summary.get("mmproj")
    if summary.get("kind") == "mmproj":
        echo_mmproj(mm)
        return
    if summary["format"] == "gguf":
        types = ", ".join(f"{t} x{v['tensors']}" for t, v in summary["tensor_types"].items())
        files = [f for f in summary["files"] if not mm or f != mm["path"]]
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more split files)"
        click.echo(f"wrote {where}: {summary['scheme']} via {summary['method']}, {human(summary['total_bytes'])} "
                   f"({types}), {summary['seconds']:.1f}s")
        if mm:
            echo_mmproj(mm)
    else:
        click.echo(f"wrote {summary['output']}: {summary['scheme']} via {summary['method']}, "
                   f"{summary['quantized_tensors']} quantized tensors, {human(summary['total_bytes'])} in "
                   f"{summary['shards']} shard(s), {summary['seconds']:.1f}s")
    t = summary.get("tokens_per_expert")
    if t:
        click.echo(f"tokens per expert: min {t['min']}, max {t['max']}, {t['zero_token_experts']} expert(s) with none")
    if "verification" in summary:
        echo_verification(summary["verification"])


def echo_mmproj(mm: dict) -> None:
    types = ", ".join(f"{t} x{v['tensors']}" for t, v in mm["tensor_types"].items())
    click.echo(f"wrote {mm['path']}: mmproj ({mm['projector']} vision, {mm['vision']['layers']} layers), "
               f"{mm['type']}, {human(mm['bytes'])} ({types})")


def echo_verification(v: dict) -> None:
    c = v["candidates"][0]
    verdict = "PASS" if c["passed"] else "FAIL: " + "; ".join(c["failures"])
    click.echo(f"verify: PPL {v['reference']['perplexity']:.4f} -> {c['perplexity']:.4f} ({c['ppl_increase_pct']:+.2f}%), "
               f"KLD mean {c['kld_mean']:.5f} p99 {c['kld_p99']:.5f}, top-1 {100 * c['top1_agreement']:.2f}%  {verdict}")
