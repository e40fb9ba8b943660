"""The eval job: reference and candidates scored on the same chunks, and the CI gate over the result.

`run_eval` is what `llama4-quant eval` and `convert --verify` run; its dict is `--json`'s shape. The gate
fails a candidate whose perplexity or KLD passes a threshold, and always one whose numbers are not finite
(a NaN compares false with every threshold, so it is checked first and named)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import Llama4QuantError

GATE_FAILED_EXIT = 3


def check_vocab(tokenizer_vocab: int, model_vocab: int, where) -> None:
    if tokenizer_vocab > model_vocab:
        raise Llama4QuantError(
            f"tokenizer {where} has {tokenizer_vocab} tokens but the model's vocabulary is {model_vocab}:"
            " they do not belong together"
        )


def _not_finite(summary: dict, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if not isinstance(summary.get(k), (int, float)) or not math.isfinite(summary[k])]


def gate(summary: dict, max_ppl_increase: float | None, max_kld: float | None) -> list[str]:
    """Why a candidate fails (empty: it passes)."""
    bad = _not_finite(summary, ("perplexity", "ppl_increase_pct", "kld_mean", "kld_max", "top1_agreement"))
    if bad:
        return [f"non-finite {', '.join(bad)} (NaN/inf in the candidate's logits or weights)"]
    failures = []
    if max_ppl_increase is not None and summary["ppl_increase_pct"] > max_ppl_increase:
        failures.append(f"ppl +{summary['ppl_increase_pct']:.2f}% > {max_ppl_increase}%")
    if max_kld is not None and summary["kld_mean"] > max_kld:
        failures.append(f"KLD {summary['kld_mean']:.5f} > {max_kld}")
    return failures


def run_eval(reference: str, candidates: list[str], data: str, ctx: int, n_chunks: int | None,
             tokenizer_path: str | None, device: str, dtype: str, batch_size: int,
             max_ppl_increase: float | None, max_kld: float | None, progress=None,
             tokens: list[int] | None = None, check_hashes: bool = True) -> dict:
    """The whole check, as a dict. `tokens` (held-out calibration tokens) replaces reading `data`.
    `progress`: a rich Progress or None. Candidates with a manifest are checked against it first (sizes, and
    sha256 with `check_hashes`): a changed file is refused, not scored."""
    import torch

    from ..hub.resolve import resolve_model
    from ..model.runner import resolve_device, resolve_dtype
    from ..model.tokenizer import load_tokenizer
    from .compare import compare_models
    from .perplexity import make_chunks
    from .sources import open_any

    if ctx < 4:
        raise Llama4QuantError(f"--ctx must be at least 4 tokens, got {ctx}")
    if n_chunks is not None and n_chunks < 1:
        raise Llama4QuantError(f"--chunks must be at least 1, got {n_chunks}")
    from ..formats.manifest import check_files

    ref = open_any(Path(resolve_model(reference)))
    integrity = {}
    for c in candidates:
        if not Path(c).exists():
            raise Llama4QuantError(f"{c}: no such file or directory")
        integrity[c] = check_files(c, hashes=check_hashes)
    cands = [open_any(Path(c)) for c in candidates]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = load_tokenizer(tokenizer_path or ref.path, bos_id=None, total_vocab=ref.config.vocab_size)
    check_vocab(tok.vocab_size, ref.config.vocab_size, tok.path)
    if tokens is None:
        tokens = tok.encode(Path(data).read_text(encoding="utf-8", errors="replace"))
    chunks = make_chunks(tokens, ctx, n_chunks, tok.bos_id)
    task = progress.add_task("layers", total=ref.config.num_layers) if progress is not None else None
    ref_scores, cand_scores = compare_models(
        ref, cands, chunks, dev, dt, batch_size, names=list(candidates),
        on_layer=(lambda i: progress.advance(task)) if progress is not None else None)
    rs = ref_scores.summary()
    bad = _not_finite(rs, ("perplexity", "nll"))
    if bad:
        raise Llama4QuantError(f"reference {reference}: non-finite {', '.join(bad)} on this text (NaN/inf in its "
                               "weights or config, e.g. rms_norm_eps or rope theta): nothing to compare against")
    result = {"reference": {**rs, "path": str(reference), "ctx": ctx,
                            "per_chunk_ppl": ref_scores.scores.per_chunk_ppl(), "running_ppl": ref_scores.scores.running_ppl()},
              "candidates": [], "data": str(data),
              "thresholds": {"max_ppl_increase_pct": max_ppl_increase, "max_kld": max_kld}}
    all_ok = True
    for c in cand_scores:
        s = c.summary(ref_scores)
        s["per_chunk_ppl"] = c.scores.per_chunk_ppl()
        s["kld_values"] = torch.cat(c.kld).tolist() if c.kld else []
        s["integrity"] = integrity.get(s["path"])
        s["failures"] = gate(s, max_ppl_increase, max_kld)
        s["passed"] = not s["failures"]
        all_ok &= s["passed"]
        result["candidates"].append(s)
    result["passed"] = all_ok
    return result


def public(result: dict) -> dict:
    """--json output: drop the bulky per-position arrays (they go to report.json)."""
    return {**result, "candidates": [{k: v for k, v in c.items() if k != "kld_values"} for c in result["candidates"]]}
