"""Probe: GPTQ of the busiest routed expert of one Scout-shaped layer, as `convert` runs it, with its RTN guard.

Usage: python scripts/expert_gptq_probe.py LAYER [CHECKPOINT]  (default /tmp/scout-bench/scout-2L from
bench/bench_scale.py). Embeds 16 x 256 random token ids, runs attention up to LAYER (earlier layers: attention
only, FFN skipped: a rough input, enough to time the expert and see how its guard decided), routes, builds the
expert's two Hessians, and prints seconds, losses and how the guard decided (rtn_rows: on a row sample)."""
import sys, time, torch
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.runner import LayerwiseRunner
from llama4_quant.model.forward import LayerWeights, attention_block, rms_norm, route
from llama4_quant.quant.hessian import HessianAccumulator
from llama4_quant.quant.gptq import GPTQConfig, GPTQJob, gptq_batch
from llama4_quant.formats.gguf.grid import BlockGrid
from llama4_quant.formats.gguf.quants import QT
torch.manual_seed(0)
layer = int(sys.argv[1])
src = open_checkpoint(sys.argv[2] if len(sys.argv) > 2 else "/tmp/scout-bench/scout-2L", validate=False); cfg = src.config
tokens = torch.randint(3, 470, (16, 256))
run = LayerwiseRunner(src, torch.device("cpu"), torch.float32, 4, keep_experts=False)
store = run.embed(tokens)
for i in range(layer + 1):
    w = LayerWeights(src, i, torch.device("cpu"), torch.float32, keep_experts=False)
    xs = []
    for s in range(0, len(store), 4):
        sl = slice(s, min(len(store), s + 4)); h = store.get(sl, "cpu", torch.float32)
        h = h + attention_block(cfg, i, w, rms_norm(h, w.get("attn_norm"), cfg.rms_norm_eps))
        if i == layer:
            xs.append(rms_norm(h, w.get("ffn_norm"), cfg.rms_norm_eps).reshape(-1, cfg.hidden_size))
        store.put(sl, h)  # (layer > 0: attention only, FFN skipped: a rough input, enough for the guard question)
x2 = torch.cat(xs); idx, scale = route(cfg, w, x2)
e = int(torch.bincount(idx.reshape(-1), minlength=cfg.num_experts).argmax())
tok, slot = torch.nonzero(idx == e, as_tuple=True); xin = x2[tok] * scale[tok, slot][:, None]
acc = HessianAccumulator(cfg.hidden_size, torch.device("cpu")); acc.add(xin)
ws = [src.read_expert(layer, k, e).float() for k in ("gate", "up")]
import torch.nn.functional as F
acc_d = HessianAccumulator(cfg.intermediate_size, torch.device("cpu")); acc_d.add(F.silu(xin @ ws[0].t()) * (xin @ ws[1].t()))
wd = src.read_expert(layer, "down", e).float()
t = time.perf_counter()
res = gptq_batch([GPTQJob(ws, acc.hessian, acc.n_tokens)], BlockGrid(QT.Q4_K), GPTQConfig(act_order=True))
print("gate+up seconds", round(time.perf_counter() - t, 1)); t = time.perf_counter()
res2 = gptq_batch([GPTQJob([wd], acc_d.hessian, acc_d.n_tokens)], BlockGrid(QT.Q4_K if layer == 0 else QT.Q6_K), GPTQConfig(act_order=True))
print("down seconds", round(time.perf_counter() - t, 1))
for r in res[0] + res2[0]:
    rec = r.record
    print(f"layer {layer} expert {e} tokens {acc.n_tokens}: method {rec.method} gptq_loss {rec.gptq_loss:.4g} rtn_loss {rec.rtn_loss:.4g} "
          f"ratio {rec.gptq_loss / rec.rtn_loss:.3f} rtn_rows {rec.rtn_rows} damp {rec.damp} reason {rec.reason[:80]}")
print("seconds", round(time.perf_counter() - t, 1))
