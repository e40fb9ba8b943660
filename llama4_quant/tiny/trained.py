"""A tiny Llama 4 *trained* on the repo's own corpus, so quantization tests measure something real.

Trained with our own forward pass (autograd through the same functions eval uses), then written in
the HF multimodal layout with a real tokenizer. Dimensions are multiples of 256 so GGUF k-quants
apply without fallbacks. Built once and cached (see `cache_dir`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..model.checkpoint import TensorDictSource
from ..model.config import from_hf_dict
from ..model.forward import LayerWeights, decoder_layer, rms_norm
from .checkpoints import canonical_tensors, hf_config, random_tensor_fn, text_config, write_hf_checkpoint
from .corpus import corpus_splits
from .tokenizer import build_tokenizer, save_tokenizer_files

RECIPE = dict(bpe_vocab=384, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4, seq=128, batch=12,
              steps=200, lr=3e-3, seed=0, variant="scout", version=1)


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA4_QUANT_CACHE", Path.home() / ".cache" / "llama4-quant"))


def _recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def train_tiny(recipe: dict = RECIPE, log=None) -> tuple[dict, dict, object]:
    """Train and return (text_config, canonical fp32 tensors, tokenizer)."""
    splits = corpus_splits(recipe["seed"])
    tok = build_tokenizer(splits["train"], vocab_size=recipe["bpe_vocab"])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    from .tokenizer import tokenizer_info

    info = tokenizer_info(tok)
    dims = {k: recipe[k] for k in ("hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts")}
    tc = text_config(recipe["variant"], vocab_size=vocab, bos_token_id=info.bos_id, eos_token_id=info.eos_id,
                     pad_token_id=info.pad_id, **dims)
    cfg = from_hf_dict(hf_config(tc, "text"))
    torch.manual_seed(recipe["seed"])
    params = {n: t.clone().requires_grad_(True) for n, t in canonical_tensors(cfg, random_tensor_fn(recipe["seed"]))}
    with torch.no_grad():
        params["tok_embeddings"].mul_(0.5)
    data = torch.tensor(tok.encode(splits["train"], add_special_tokens=False).ids, dtype=torch.long)
    src = TensorDictSource(cfg, params)
    opt = torch.optim.AdamW(params.values(), lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe["seed"])
    T, B, steps = recipe["seq"], recipe["batch"], recipe["steps"]
    t0 = time.time()
    for step in range(steps):
        lr = recipe["lr"] * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[s : s + T] for s in starts])
        x[:, 0] = info.bos_id
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        h = params["tok_embeddings"][x]
        for i in range(cfg.num_layers):
            h = decoder_layer(cfg, i, LayerWeights(src, i), h)
        logits = torch.nn.functional.linear(rms_norm(h, params["norm"], cfg.rms_norm_eps), params["output"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return tc, {n: p.detach() for n, p in params.items()}, tok


def trained_checkpoint(recipe: dict = RECIPE, log=None) -> Path:
    """Path of the cached trained checkpoint (HF multimodal layout + tokenizer files), built if absent."""
    out = cache_dir() / "fixtures" / f"trained-{_recipe_key(recipe)}"
    if (out / "DONE").exists():
        return out
    tc, tensors, tok = train_tiny(recipe, log)
    tmp = Path(tempfile.mkdtemp(prefix="trained-", dir=out.parent if out.parent.exists() else None))
    try:
        write_hf_checkpoint(tmp, tc, fn=lambda name, shape: tensors[name])
        save_tokenizer_files(tok, tmp, instruct=True)
        splits = corpus_splits(recipe["seed"])
        (tmp / "calib.txt").write_text(splits["calib"])
        (tmp / "test.txt").write_text(splits["test"])
        (tmp / "DONE").write_text(json.dumps(recipe))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
