"""`llama4-quant eval`: perplexity by llama-perplexity's protocol."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, handle_errors, progress_bar


def _open_model(model: str):
    from ..model.checkpoint import open_checkpoint

    return open_checkpoint(_resolve(model))


def _resolve(model: str) -> Path:
    try:
        from ..hub.download import resolve_model
    except ImportError:  # download support not installed in this tree
        return Path(model)
    return Path(resolve_model(model))


def check_vocab(tokenizer_vocab: int, model_vocab: int, where) -> None:
    from ..errors import Llama4QuantError

    if tokenizer_vocab > model_vocab:
        raise Llama4QuantError(
            f"tokenizer {where} has {tokenizer_vocab} tokens but the model's vocabulary is {model_vocab}:"
            " they do not belong together"
        )


@click.command("eval")
@click.argument("model")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False), help="Text file to score.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk (llama-perplexity's -c).")
@click.option("--chunks", "n_chunks", default=None, type=int, help="Score at most this many chunks.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(exists=True), help="tokenizer.json (default: the model's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Compute dtype (auto: fp32 on CPU, bf16 on CUDA).")
@click.option("--batch-size", default=4, show_default=True, help="Chunks per forward batch.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handle_errors
def eval_cmd(model, data, ctx, n_chunks, tokenizer_path, device, dtype, batch_size, as_json):
    """Perplexity of MODEL (a checkpoint directory or a Hub repo id) on --data, by llama-perplexity's
    protocol: whole file tokenized with BOS, chunks of --ctx tokens each starting with BOS, the second
    half of every chunk scored. The model runs one decoder layer at a time, so it may exceed RAM."""
    from ..eval.evaluate import score_chunks
    from ..eval.perplexity import make_chunks
    from ..model.runner import resolve_device, resolve_dtype
    from ..model.tokenizer import load_tokenizer

    reader = _open_model(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = load_tokenizer(tokenizer_path or reader.path, bos_id=None)
    check_vocab(tok.vocab_size, reader.config.vocab_size, tok.path)
    text = Path(data).read_text(encoding="utf-8", errors="replace")
    chunks = make_chunks(tok.encode(text), ctx, n_chunks, tok.bos_id)
    with progress_bar() as prog:
        task = prog.add_task("layers", total=reader.config.num_layers)
        scores = score_chunks(reader, chunks, dev, dt, batch_size, on_layer=lambda i: prog.advance(task))
    result = {
        "reference": {
            "path": str(model),
            "perplexity": scores.perplexity,
            "nll": scores.mean_nll,
            "tokens": scores.tokens,
            "chunks": len(chunks),
            "ctx": ctx,
            "per_chunk_ppl": scores.running_ppl(),
        }
    }
    if as_json:
        emit_json(result)
    else:
        r = result["reference"]
        click.echo(f"{model}: PPL = {r['perplexity']:.4f}  (mean nll {r['nll']:.5f}, {r['tokens']} tokens, {r['chunks']} chunks of {ctx})")
