"""--target-size / --target-bpw / --fit: the optimiser honours the budget, the plan replays to the same file, and
the chosen mix beats the uniform mix of the next smaller size on the shipped trained model."""

from __future__ import annotations

import json
import random

import pytest

from llama4_quant.convert import fit
from llama4_quant.errors import Llama4QuantError
from support.convert import gguf

CALIB = dict(calib_samples=16, calib_seqlen=256)


def _synthetic(n: int, seed: int = 0) -> dict:
    """Tensors with decreasing error for more bytes (random convex-ish curves)."""
    rng = random.Random(seed)
    out = {}
    for k in range(n):
        params = rng.choice([4096, 65536, 1 << 20])
        costs, err = {}, rng.uniform(1, 100)
        for t, bpw in (("Q2_K", 2.625), ("Q3_K", 3.4375), ("Q4_K", 4.5), ("Q6_K", 6.5625), ("Q8_0", 8.5)):
            err *= rng.uniform(0.2, 0.6)
            costs[t] = [int(params * bpw / 8), err]
        out[f"t{k}"] = {"params": params, "costs": costs}
    return out


@pytest.mark.parametrize("seed", range(5))
def test_optimiser_fits_the_budget_and_beats_uniform(seed):
    m = _synthetic(40, seed)
    q4 = sum(v["costs"]["Q4_K"][0] for v in m.values())
    for budget in (int(q4 * 0.8), q4, int(q4 * 1.3)):
        types = fit.optimise(m, budget)
        used = sum(m[k]["costs"][t][0] for k, t in types.items())
        err = sum(m[k]["costs"][t][1] for k, t in types.items())
        assert used <= budget
        if budget >= q4:  # never worse than the uniform mix that fits
            assert err <= sum(v["costs"]["Q4_K"][1] for v in m.values()) + 1e-9
    with pytest.raises(Llama4QuantError, match="smallest types"):
        fit.optimise(m, 10)


def test_hull_drops_dominated_points():
    pts = [(10, 5.0, "a"), (20, 6.0, "b"), (30, 1.0, "c"), (25, 4.0, "d")]
    assert [p[2] for p in fit._hull(pts)] == ["a", "c"]


@pytest.fixture(scope="module")
def sized(trained_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    calib = str(trained_model / "calib.txt")
    q3 = gguf(trained_model, d / "q3.gguf", scheme="q3_k_m", method="imatrix", calib=calib, **CALIB)
    q4 = gguf(trained_model, d / "q4.gguf", scheme="q4_k_m", method="imatrix", calib=calib, **CALIB)
    target = (q3["total_bytes"] + q4["total_bytes"]) // 2
    f = gguf(trained_model, d / "fit.gguf", method="imatrix", calib=calib, target_size=target, **CALIB)
    return d, target, q3, q4, f


def test_target_size_is_honoured_and_the_plan_replays(sized, trained_model, tmp_path):
    d, target, q3, q4, f = sized
    assert f["total_bytes"] <= target and f["total_bytes"] > q3["total_bytes"]
    plan = json.loads((d / "fit.gguf.plan.json").read_text())
    assert plan["tensor_bytes"] <= plan["budget"]["tensor_bytes"]
    assert {g["group"] for g in plan["groups"]} >= {"attention", "experts", "output", "tok_embeddings"}
    again = gguf(trained_model, tmp_path / "again.gguf", method="imatrix", calib=str(trained_model / "calib.txt"),
                 plan=str(d / "fit.gguf.plan.json"), **CALIB)
    assert (tmp_path / "again.gguf").read_bytes() == (d / "fit.gguf").read_bytes()
    assert again["total_bytes"] == f["total_bytes"]


def test_fit_mix_beats_the_next_smaller_uniform_mix(sized, trained_model):
    from llama4_quant.eval.compare import compare_models
    from llama4_quant.eval.perplexity import make_chunks
    from llama4_quant.formats.gguf.reader import open_gguf
    from llama4_quant.model.readers import open_checkpoint
    from llama4_quant.model.tokenizer import load_tokenizer

    d = sized[0]
    tok = load_tokenizer(trained_model)
    chunks = make_chunks(tok.encode((trained_model / "test.txt").read_text()), 128, 32, tok.bos_id)
    ref, cands = compare_models(open_checkpoint(trained_model), [open_gguf(d / "q3.gguf"), open_gguf(d / "fit.gguf")],
                                chunks)
    q3, mixed = (c.summary(ref)["kld_mean"] for c in cands)
    assert mixed < 0.85 * q3, (q3, mixed)


def test_plan_errors(trained_model, tmp_path):
    with pytest.raises(Llama4QuantError, match="exactly one"):
        gguf(trained_model, tmp_path / "x.gguf", calib=str(trained_model / "calib.txt"), target_size=3 * 10**6,
             target_bpw=4.0, **CALIB)
    with pytest.raises(Llama4QuantError, match="no room"):
        gguf(trained_model, tmp_path / "x.gguf", calib=str(trained_model / "calib.txt"), target_size=10**5, **CALIB)
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"version": 1, "tensors": {"layers.99.wq": {"type": "Q4_K"}}}))
    with pytest.raises(Llama4QuantError, match="not in this model"):
        gguf(trained_model, tmp_path / "y.gguf", method="rtn", plan=str(bad))
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
