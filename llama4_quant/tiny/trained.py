"""A tiny Llama 4 *trained* on the repo's own corpus, so the demo and the quality tests measure something real.

Trained with our own forward pass (autograd through the same functions eval uses), then written in the HF
multimodal layout with a real tokenizer. Dimensions are multiples of 256 so GGUF k-quants apply without
fallbacks. It ships with the package (llama4_quant/data/tiny-llama4, ~10 MB of bf16, with its recipe and
sha256 in recipe.json), so every machine uses the same weights; `python scripts/build_tiny_model.py` retrains
it (about a minute on 2 cores)."""

from __future__ import annotations

import hashlib
import json
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


MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny-llama4"
RECIPE_FILE = "recipe.json"
WEIGHT_FILES = ("model-00001-of-00001.safetensors",)


def trained_checkpoint() -> Path:
    """The shipped tiny trained Llama 4 (HF multimodal layout + tokenizer), checked against its recipe's sha256."""
    rec = MODEL_DIR / RECIPE_FILE
    if not rec.is_file():
        raise FileNotFoundError(f"{MODEL_DIR}: the shipped tiny model is missing (rebuild: python scripts/build_tiny_model.py)")
    return MODEL_DIR


def demo_texts(seed: int = RECIPE["seed"]) -> dict[str, str]:
    """The calibration and held-out test text of the tiny model's corpus (deterministic, generated in ~0.1 s)."""
    splits = corpus_splits(seed)
    return {"calib": splits["calib"], "test": splits["test"]}


def build(out: Path = MODEL_DIR, recipe: dict = RECIPE, log=None) -> dict:
    """Train with `recipe` and write the checkpoint into `out` (atomically replaced); returns recipe.json's content."""
    t0 = time.time()
    tc, tensors, tok = train_tiny(recipe, log)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        write_hf_checkpoint(tmp, tc, fn=lambda name, shape: tensors[name], max_shard_bytes=1 << 40)
        save_tokenizer_files(tok, tmp, instruct=True)
        info = {"recipe": recipe, "torch": torch.__version__, "train_seconds": round(time.time() - t0, 1),
                "sha256": {f: hashlib.sha256((tmp / f).read_bytes()).hexdigest() for f in WEIGHT_FILES}}
        (tmp / RECIPE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info
