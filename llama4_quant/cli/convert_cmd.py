"""`llama4-quant convert MODEL OUT --to safetensors ...`: calibrate, quantize layer by layer, export atomically."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from ..formats.gguf_mix import SCHEMES as GGUF_SCHEMES
from .common import emit_json, handle_errors, progress_bar, progress_enabled
from .eval_cmd import GATE_FAILED_EXIT
from .verify import echo_verification, record_verification, verify_artifact, verify_options
from .units import SizeType, human

# --to FORMAT -> builder(options dict, scheme name) returning an Exporter (see convert/pipeline.py).
# The GGUF engineer adds "gguf" here.
FORMATS = ("safetensors", "gguf")


def _resolve(model: str) -> Path:
    try:
        from ..hub.resolve import resolve_model
    except ImportError:  # download support not installed in this tree
        return Path(model)
    return Path(resolve_model(model))


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the exporter removes its temp directory."""

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


class _RichProgress:
    """pipeline.Progress drawn as rich bars: layers, and the experts of the current layer, with ETA."""

    def __init__(self, prog):
        self.prog = prog
        self.layers = None
        self.experts = None

    def start(self, num_layers):
        self.layers = self.prog.add_task("layers", total=num_layers)

    def layer_start(self, layer, num_experts):
        if self.experts is not None:
            self.prog.remove_task(self.experts)
            self.experts = None
        if num_experts:
            self.experts = self.prog.add_task(f"  layer {layer} experts", total=num_experts)

    def expert_done(self, layer, e):
        if self.experts is not None:
            self.prog.advance(self.experts)

    def layer_done(self, layer):
        self.prog.advance(self.layers)

    def status(self, text):
        pass


@click.command("convert")
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--to", "to", type=click.Choice(FORMATS), default="safetensors", show_default=True, help="Output format.")
@click.option("--scheme", default="w4a16", show_default=True,
              type=click.Choice(["w4a16", "w4a16-asym", "w8a16", "fp8-dynamic", "fp8-block", *GGUF_SCHEMES]),
              help="w4a16: int4 symmetric, group 128; w8a16: int8, group 128; fp8-dynamic: fp8 e4m3 per-channel "
                   "weights + dynamic per-token activations; fp8-block: 128x128 weight blocks. "
                   "--to gguf: bf16, f16, q8_0, q6_k, q5_k_m, q4_k_m (default), q4_k_s, q4_0 (docs/gguf.md).")
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
@click.option("--group-size", default=128, show_default=True, help="Int schemes: input columns per scale (-1: per channel).")
@click.option("--targets", "targets", multiple=True, help="What to quantize, comma separated: experts, shared, mlp, attn, "
              "lm_head. Default: experts,shared,mlp.")
@click.option("--ignore", "ignore", multiple=True, help="Keep these unquantized: glob on canonical names "
              "(layers.0.*, *.wo) or HF module names (repeatable).")
@click.option("--moe-calibration", type=click.Choice(["routed", "all"]), default="routed", show_default=True,
              help="Expert statistics from the tokens routed to each expert, or from all tokens (statistics only).")
@click.option("--min-expert-tokens", default=16, show_default=True,
              help="Experts that saw fewer calibration tokens get RTN with MSE clipping instead of GPTQ.")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ visits columns by decreasing Hessian diagonal (static groups: no g_idx, no runtime cost).")
@click.option("--damp", default=0.01, show_default=True, help="GPTQ damping, fraction of mean diag(H).")
@click.option("--observer", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
              help="How int scales are fitted (mse: clipping search).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Forward compute dtype (auto: fp32 on CPU, bf16 on CUDA). Hessians are always fp32.")
@click.option("--batch-size", default=4, show_default=True, help="Calibration sequences per forward batch.")
@click.option("--hessian-memory", default="8GiB", show_default=True, type=SizeType(),
              help="Budget for the expert Hessians held at once (experts are processed in chunks that fit).")
@click.option("--max-shard-size", default="2GB", show_default=True, type=SizeType(), help="Largest output shard.")
@click.option("--split-max-size", default=None, type=SizeType(), help="--to gguf: split into files of at most this "
              "many tensor bytes, llama.cpp's gguf-split format (NAME-00001-of-0000N.gguf).")
@click.option("--imatrix", "imatrix_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="--to gguf: use this llama-imatrix output (GGUF format) instead of computing one "
                   "(implies --method imatrix).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@verify_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@handle_errors
def convert_cmd(model, out, to, scheme, method, calib, calib_samples, calib_seqlen, seed, tokenizer_path, group_size,
                targets, ignore,
                moe_calibration, min_expert_tokens, act_order, damp, observer, device, dtype, batch_size, hessian_memory,
                max_shard_size, split_max_size, imatrix_file, force, verify, eval_data, verify_ctx, verify_chunks,
                max_ppl_increase, max_kld, report_dir, as_json):
    """Quantize MODEL (a checkpoint directory or a Hub repo id) into OUT.

    Layers are processed one at a time: each is calibrated on the activations the already quantized layers
    produce, quantized (GPTQ or RTN), written, and freed, so memory holds one layer plus activations. OUT
    appears only when complete. Attention stays bf16 unless --targets includes attn (see docs/convert.md)."""
    from ..errors import Llama4QuantError

    if to == "gguf":  # GGUF branch: cli/convert_gguf.py
        from click.core import ParameterSource

        from .convert_gguf import convert_gguf

        ctx = click.get_current_context()
        default_scheme = ctx.get_parameter_source("scheme") == ParameterSource.DEFAULT
        st_only = [f"--{n.replace('_', '-')}" for n in ("targets", "ignore", "group_size", "observer", "max_shard_size")
                   if ctx.get_parameter_source(n) != ParameterSource.DEFAULT]
        if st_only:
            raise Llama4QuantError(f"{st_only[0]} applies to --to safetensors only (GGUF mixes choose per-tensor "
                                   "types by the scheme, see docs/gguf.md)")
        with _sigterm_as_interrupt():
            convert_gguf(model, out, scheme=None if default_scheme else scheme, method=method, as_json=as_json,
                         progress_cls=_RichProgress, calib=calib, calib_samples=calib_samples,
                         calib_seqlen=calib_seqlen, seed=seed, tokenizer=tokenizer_path,
                         split_max_size=split_max_size or 0, imatrix_file=imatrix_file, force=force,
                         act_order=act_order, damp=damp,
                         moe_calibration=moe_calibration, min_expert_tokens=min_expert_tokens, device=device,
                         dtype=dtype, batch_size=batch_size, hessian_memory=hessian_memory,
                         verify=dict(eval_data=eval_data, ctx=verify_ctx, chunks=verify_chunks,
                                     max_ppl_increase=max_ppl_increase, max_kld=max_kld,
                                     report_dir=report_dir) if verify else None)
        return
    gguf_only = [o for o, used in (("--scheme " + scheme, scheme in GGUF_SCHEMES),
                                   ("--method imatrix", method == "imatrix"), ("--split-max-size", bool(split_max_size)),
                                   ("--imatrix", bool(imatrix_file))) if used]
    if gguf_only:
        raise Llama4QuantError(f"{gguf_only[0]} needs --to gguf")
    uses_calibration = method == "gptq" or (method == "auto" and not scheme.startswith("fp8"))
    if verify and eval_data is None and not uses_calibration:
        raise Llama4QuantError("--verify without calibration data needs --eval-data FILE (RTN reads no calibration text)")
    heldout: list[int] = []
    with _sigterm_as_interrupt():
        manifest, summary = run_convert(
            model, out, scheme=scheme, method=method, calib=calib, calib_samples=calib_samples,
            calib_seqlen=calib_seqlen, seed=seed, tokenizer=tokenizer_path, group_size=group_size, targets=targets,
            ignore=ignore,
            moe_calibration=moe_calibration, min_expert_tokens=min_expert_tokens, act_order=act_order, damp=damp,
            observer=observer, device=device, dtype=dtype, batch_size=batch_size, hessian_memory=hessian_memory,
            max_shard_size=max_shard_size, force=force, heldout_out=heldout)
    if verify:
        v = verify_artifact(model, str(out), eval_data=eval_data, heldout=heldout, ctx=verify_ctx, chunks=verify_chunks,
                            max_ppl_increase=max_ppl_increase, max_kld=max_kld, device=device, dtype=dtype,
                            batch_size=batch_size, report_dir=report_dir, tokenizer=tokenizer_path)
        from ..convert.safetensors_export import MANIFEST

        record_verification(Path(out) / MANIFEST, v)
        summary["verification"] = v
    if as_json:
        emit_json(summary)
    else:
        _echo_summary(summary)
    if verify and not summary["verification"]["passed"]:
        raise SystemExit(GATE_FAILED_EXIT)


def _echo_summary(summary: dict) -> None:
    click.echo(f"wrote {summary['output']}: {summary['scheme']} via {summary['method']}, "
               f"{summary['quantized_tensors']} quantized tensors, {human(summary['total_bytes'])} in "
               f"{summary['shards']} shard(s), {summary['seconds']:.1f}s")
    if summary["tokens_per_expert"]:
        t = summary["tokens_per_expert"]
        click.echo(f"tokens per expert: min {t['min']}, max {t['max']}, {t['zero_token_experts']} expert(s) with none")
    for w in summary["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if "verification" in summary:
        echo_verification(summary["verification"])


def run_convert(model, out, *, scheme="w4a16", method="auto", calib=None, calib_samples=128, calib_seqlen=2048,
                seed=0, tokenizer=None, group_size=128, targets=(), ignore=(), moe_calibration="routed", min_expert_tokens=16,
                act_order=True, damp=0.01, observer="minmax", device="auto", dtype="auto", batch_size=4,
                hessian_memory=8 << 30, max_shard_size=2 * 10**9, force=False, progress=None, heldout_out=None):
    """The convert command without Click: returns (manifest, summary). `heldout_out`, a list, receives the
    calibration tokens that no sample holds (for --verify)."""
    from ..convert.pipeline import Pipeline, PipelineOptions, Selection
    from ..errors import Llama4QuantError
    from ..convert.safetensors_export import SafetensorsExporter, make_scheme, summary as make_summary
    from ..model.checkpoint import open_checkpoint
    from ..model.runner import resolve_device, resolve_dtype
    from ..quant.gptq import GPTQConfig
    from ..quant.scheme import FP8Scheme

    sch = make_scheme(scheme, None if group_size in (-1, None) else group_size)
    if method == "auto":
        method = "rtn" if isinstance(sch, FP8Scheme) else "gptq"
    selection = Selection.parse(targets, ignore)
    warnings = []
    if "attn" in selection.roles:
        warnings.append("attention is quantized: vLLM's Llama 4 loader permutes q/k rows without permuting grouped "
                        "scales, so this checkpoint may load but compute wrong attention there (see docs/convert.md)")
    # refuse an existing OUT before any expensive work
    exporter = SafetensorsExporter(out, sch, selection, force=force, max_shard_bytes=max_shard_size, observer=observer,
                                   actorder=act_order and method == "gptq", scheme_name=scheme, source_label=model)
    reader = open_checkpoint(_resolve(model))
    src_dir, out_dir = Path(reader.path).resolve(), exporter.out.resolve()
    if out_dir == src_dir or out_dir in src_dir.parents:
        raise Llama4QuantError(f"OUT {out} is the source checkpoint or contains it: choose another directory")
    dev = resolve_device(device)
    opts = PipelineOptions(method=method, gptq=GPTQConfig(damp=damp, act_order=act_order),
                           moe_calibration=moe_calibration, min_expert_tokens=min_expert_tokens, device=dev,
                           dtype=resolve_dtype(dtype, dev), batch_size=batch_size, hessian_budget_bytes=hessian_memory)
    tokens = info = None
    if method == "gptq":
        from ..calibration.dataset import load_calibration
        from ..model.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer or reader.path)
        cs = load_calibration(calib, tok, calib_samples, calib_seqlen, seed)
        tokens, info = cs.tokens, cs.info
        if heldout_out is not None:
            heldout_out.extend(cs.heldout)
        warnings += [f"calibration: {w}" for w in info.get("warnings", [])]
    elif calib is not None:
        warnings.append(f"--method {method} uses no calibration data: --calib ignored")
    with progress_bar(progress if progress is not None else progress_enabled()) as prog:
        pipe = Pipeline(reader, exporter, opts, _RichProgress(prog))
        pipe.warnings.extend(warnings)
        manifest = pipe.run(tokens, info)
    return manifest, make_summary(manifest, exporter.out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_cmd())
