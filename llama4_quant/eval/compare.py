"""Reference vs candidates, in lockstep, one decoder layer at a time.

Every model runs on the same chunks. After each layer we record, per candidate, the relative error of
(a) its layer applied to the *reference* input (the layer's own quantization error) and (b) its own
hidden-state stream (accumulated error). At the head: perplexity (llama-perplexity protocol), KL
divergence of the candidate's next-token distribution from the reference's, and top-1 agreement.
Reference logits are computed once per run and shared by all candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Llama4QuantError
from ..model.forward import LayerWeights, decoder_layer, rms_norm
from ..model.runner import ActivationStore, LayerwiseRunner, release
from .perplexity import ChunkScores


@dataclass
class ModelScores:
    path: str
    scores: ChunkScores = field(default_factory=ChunkScores)
    kld: list[torch.Tensor] = field(default_factory=list)  # per chunk, per scored position
    top1: list[torch.Tensor] = field(default_factory=list)  # per chunk, bool per position
    layer_error: list[float] = field(default_factory=list)  # own layer on reference input
    stream_error: list[float] = field(default_factory=list)  # accumulated hidden-state error

    def summary(self, ref: "ModelScores | None" = None) -> dict:
        out = {
            "path": self.path,
            "perplexity": self.scores.perplexity,
            "nll": self.scores.mean_nll,
            "tokens": self.scores.tokens,
            "chunks": len(self.scores.nll),
        }
        if ref is not None:
            kld = torch.cat(self.kld) if self.kld else torch.zeros(1)
            out.update(
                ppl_increase_pct=100.0 * (self.scores.perplexity / ref.scores.perplexity - 1.0),
                kld_mean=float(kld.mean()),
                kld_p99=float(torch.quantile(kld.float(), 0.99)) if kld.numel() > 1 else float(kld.max()),
                kld_max=float(kld.max()),
                top1_agreement=float(torch.cat(self.top1).float().mean()) if self.top1 else 1.0,
                layer_error=self.layer_error,
                stream_error=self.stream_error,
            )
        return out


def check_compatible(ref_cfg, cand_cfg, path: str) -> None:
    """A candidate must be the reference's model: same shapes, routing and numerics constants (a GGUF whose
    expert_used_count, rope base, eps or rope scaling was changed is another model, however valid the file)."""
    import math

    from ..model.config import rope_freq_factors

    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
              "intermediate_size", "moe_layers", "top_k")
    diff = [f"{f} {getattr(cand_cfg, f)} vs {getattr(ref_cfg, f)}" for f in fields if getattr(cand_cfg, f) != getattr(ref_cfg, f)]
    for f in ("rope_theta", "rms_norm_eps"):  # float32 in a GGUF
        a, b = float(getattr(cand_cfg, f)), float(getattr(ref_cfg, f))
        if not math.isclose(a, b, rel_tol=1e-6):
            diff.append(f"{f} {a:g} vs {b:g}")
    fa, fb = rope_freq_factors(cand_cfg), rope_freq_factors(ref_cfg)
    if fa.shape != fb.shape or not bool(((fa - fb).abs() <= 1e-6 * fb.abs()).all()):
        diff.append("rope frequency factors (llama3 scaling) differ")
    if diff:
        raise Llama4QuantError(f"candidate {path} is not a quantization of the reference: " + ", ".join(diff[:3]))


def _rel(err_sq: float, ref_sq: float) -> float:
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def compare_models(
    reference,
    candidates: list,
    chunks: torch.Tensor,
    device="cpu",
    dtype=torch.float32,
    batch_size: int = 4,
    names: list[str] | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[ModelScores, list[ModelScores]]:
    cfg = reference.config
    names = names or [str(getattr(c, "path", f"candidate{i}")) for i, c in enumerate(candidates)]
    for c, n in zip(candidates, names):
        check_compatible(cfg, c.config, n)
    runners = [LayerwiseRunner(m, device, dtype, batch_size) for m in [reference, *candidates]]
    stores: list[ActivationStore] = [r.embed(chunks) for r in runners]
    ref_out = ModelScores(str(getattr(reference, "path", "reference")))
    cand_out = [ModelScores(n) for n in names]
    try:
        with torch.no_grad():
            for i in range(cfg.num_layers):
                ws = [LayerWeights(m, i, device, dtype) for m in [reference, *candidates]]
                layer_sq = [0.0] * len(candidates)
                stream_sq = [0.0] * len(candidates)
                ref_sq = 0.0
                for sl in runners[0].batches(len(chunks)):
                    h_ref_in = stores[0].get(sl, device, dtype)
                    h_ref = decoder_layer(cfg, i, ws[0], h_ref_in)
                    ref_sq += float(h_ref.float().pow(2).sum())
                    for j, c in enumerate(candidates):
                        iso = decoder_layer(c.config, i, ws[j + 1], h_ref_in)
                        layer_sq[j] += float((iso - h_ref).float().pow(2).sum())
                        own = decoder_layer(c.config, i, ws[j + 1], stores[j + 1].get(sl, device, dtype))
                        stream_sq[j] += float((own - h_ref).float().pow(2).sum())
                        stores[j + 1].put(sl, own)
                    stores[0].put(sl, h_ref)
                for j in range(len(candidates)):
                    cand_out[j].layer_error.append(_rel(layer_sq[j], ref_sq))
                    cand_out[j].stream_error.append(_rel(stream_sq[j], ref_sq))
                for w in ws:
                    w.free()
                for m in [reference, *candidates]:
                    release(m)
                if on_layer:
                    on_layer(i)
            heads = []
            for m in [reference, *candidates]:
                heads.append((m.read("norm").to(device, dtype), m.read("output").to(device, dtype), m.config.rms_norm_eps))
            for k in range(len(chunks)):
                logps = []
                for (norm, out, eps), store in zip(heads, stores):
                    h = store.get(slice(k, k + 1), device, dtype)[0]
                    logits = torch.nn.functional.linear(rms_norm(h, norm, eps), out).float()
                    logps.append(logits)
                ref_logp = ref_out.scores.add(logps[0], chunks[k])
                ref_p = ref_logp.exp()
                ref_top = ref_logp.argmax(-1)
                for j, cand in enumerate(cand_out):
                    lp = cand.scores.add(logps[j + 1], chunks[k])
                    cand.kld.append((ref_p * (ref_logp - lp)).sum(-1).clamp_min(0).cpu())
                    cand.top1.append((lp.argmax(-1) == ref_top).cpu())
    finally:
        for s in stores:
            s.close()
    return ref_out, cand_out
