"""--target-size / --target-bpw / --fit: the optimiser honours the budget, the plan replays to the same file, and
the chosen mix beats the uniform mix of the next smaller size on the shipped trained model."""

from __future__ import annotations

import json
import random
from pathlib import Path

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


# ---- --to safetensors -------------------------------------------------------------------------------------------
def _weights(out) -> int:
    return sum(p.stat().st_size for p in Path(out).glob("model-*.safetensors"))


def _data_bytes(out, prefix: str = "") -> dict[str, int]:
    """Tensor-data bytes per tensor name (safetensors headers read, no data)."""
    out_d: dict[str, int] = {}
    for p in Path(out).glob("model-*.safetensors"):
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for k, v in json.loads(raw[8:8 + n]).items():
            if k != "__metadata__" and k.startswith(prefix):
                a, b = v["data_offsets"]
                out_d[k] = b - a
    return out_d


@pytest.fixture(scope="module")
def st_sized(trained_model, tmp_path_factory):
    """Uniform w4a16 and w8a16 of the shipped model, and a --target-size plan halfway between their weight shards."""
    from support.convert import convert

    d = tmp_path_factory.mktemp("stfit")
    calib = str(trained_model / "calib.txt")
    w4 = convert(trained_model, d / "w4", calib=calib, **CALIB)
    w8 = convert(trained_model, d / "w8", scheme="w8a16", calib=calib, **CALIB)
    target = (_weights(d / "w4") + _weights(d / "w8")) // 2
    f = convert(trained_model, d / "fit", calib=calib, target_size=target, **CALIB)
    return d, target, w4, w8, f


def test_st_target_size_is_honoured_to_the_byte(st_sized):
    d, target, w4, w8, f = st_sized
    plan = json.loads((d / "fit.plan.json").read_text())
    assert plan["format"] == "safetensors" and plan["tensor_bytes"] <= plan["budget"]["tensor_bytes"]
    assert _weights(d / "fit") == f["plan"]["weights_bytes"] <= target
    assert _weights(d / "w4") < _weights(d / "fit")
    # the plan's bytes are the bytes written: per unit, the data of its modules' tensors
    stored = _data_bytes(d / "fit")
    for unit, u in plan["units"].items():
        if unit.endswith(".experts"):
            layer = unit.split(".")[1]
            got = sum(v for k, v in stored.items() if f"layers.{layer}.feed_forward.experts." in k)
        else:
            mods = [_module(t) for t in u["tensors"]]
            got = sum(v for k, v in stored.items() if k.rsplit(".", 1)[0] in mods)
        assert got == u["bytes"], unit
    schemes = {u["scheme"] for u in plan["units"].values()}
    assert {"w4a16", "w8a16"} <= schemes, schemes  # a real mix at this budget
    assert f["scheme"] == "mixed"


def _module(canonical: str) -> str:
    _, i, local = canonical.split(".", 2)
    kind = local.split(".")[1]
    return f"language_model.model.layers.{i}.feed_forward.shared_expert.{kind}_proj"


def test_st_plan_keeps_fused_units_whole_and_loads_in_compressed_tensors(st_sized):
    """Every module a layer's MoE fuses (all experts' gate/up/down) and the shared expert's gate/up fall in one
    compressed-tensors config group, in both module layouts; unquantized Linears are ignored."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    d = st_sized[0]
    qc_raw = json.loads((d / "fit" / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(qc_raw)
    plan = json.loads((d / "fit.plan.json").read_text())
    lin = torch.nn.Linear(1, 1)

    def group_of(module: str):
        hits = [k for k, g in qc.config_groups.items() if is_match(module, lin, g.targets, qc.ignore)]
        assert len(hits) <= 1, (module, hits)
        return hits[0] if hits else None

    for prefix in ("language_model.model.", "model."):
        for i in range(4):
            experts = {group_of(f"{prefix}layers.{i}.feed_forward.experts.{e}.{k}_proj")
                       for e in range(4) for k in ("gate", "up", "down")}
            assert len(experts) == 1 and None not in experts, (i, experts)
            want = plan["units"][f"layers.{i}.experts"]["scheme"]
            bits = qc.config_groups[experts.pop()].weights.num_bits
            assert bits == {"w4a16": 4, "w8a16": 8}[want]
            gate_up = {group_of(f"{prefix}layers.{i}.feed_forward.shared_expert.{k}_proj") for k in ("gate", "up")}
            assert len(gate_up) == 1
            for k in ("q", "k", "v", "o"):
                assert group_of(f"{prefix}layers.{i}.self_attn.{k}_proj") is None
                assert not is_match(f"{prefix}layers.{i}.self_attn.{k}_proj", lin, ["Linear"], qc.ignore)


def test_st_plan_replays_byte_identical(st_sized, trained_model, tmp_path):
    from support.convert import convert

    d = st_sized[0]
    again = convert(trained_model, tmp_path / "again", calib=str(trained_model / "calib.txt"),
                    plan=str(d / "fit.plan.json"), **CALIB)
    names = sorted(p.name for p in (d / "fit").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for n in names:
        if n != "llama4-quant.json":  # the manifest records times
            assert (tmp_path / "again" / n).read_bytes() == (d / "fit" / n).read_bytes(), n
    m1, m2 = (json.loads((p / "llama4-quant.json").read_text()) for p in (d / "fit", tmp_path / "again"))
    assert m1["per_module"] == m2["per_module"] and m1["output"]["files"] == m2["output"]["files"]
    assert again["plan"]["weights_bytes"] == st_sized[4]["plan"]["weights_bytes"]


def test_st_fit_mix_beats_uniform_w4a16(st_sized, trained_model):
    from llama4_quant.eval.compare import compare_models
    from llama4_quant.eval.perplexity import make_chunks
    from llama4_quant.formats.compressed_tensors.reader import QuantizedSource
    from llama4_quant.model.readers import open_checkpoint
    from llama4_quant.model.tokenizer import load_tokenizer

    d = st_sized[0]
    tok = load_tokenizer(trained_model)
    chunks = make_chunks(tok.encode((trained_model / "test.txt").read_text()), 128, 32, tok.bos_id)
    ref, cands = compare_models(open_checkpoint(trained_model), [QuantizedSource(d / n) for n in ("w4", "fit", "w8")],
                                chunks)
    w4, mixed, w8 = (c.summary(ref)["kld_mean"] for c in cands)
    assert w8 < mixed < 0.8 * w4, (w4, mixed, w8)


def _hand_plan(src: Path, dst: Path) -> Path:
    """The saved plan with layers 0 and 2 of experts w4a16, 1 w8a16, 3 kept bf16, layer 2's shared expert fp8."""
    plan = json.loads(src.read_text())
    for name, v in plan["tensors"].items():
        layer, rest = name.split(".")[1], name.split(".", 2)[2]
        if rest.startswith("experts."):
            v["type"] = {"0": "w4a16", "1": "w8a16", "2": "w4a16", "3": "bf16"}[layer]
        elif layer == "2":
            v["type"] = "fp8-dynamic"
    dst.write_text(json.dumps(plan))
    return dst


def test_st_mixed_plan_loads_in_transformers(st_sized, trained_model, tmp_path):
    """A plan mixing int4, int8, fp8 and unquantized experts/shared experts by layer loads in transformers
    (AutoModelForCausalLM) with no missing or unexpected keys, and what it decompresses equals our reader's
    weights bit for bit."""
    transformers = pytest.importorskip("transformers")
    import torch
    from support.convert import convert
    from llama4_quant.formats.compressed_tensors.reader import QuantizedSource
    from llama4_quant.model.readers import open_checkpoint

    plan = _hand_plan(st_sized[0] / "fit.plan.json", tmp_path / "hand.json")
    out = tmp_path / "hand"
    convert(trained_model, out, method="rtn", plan=str(plan))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 3
    assert any("layers\\.3\\.feed_forward\\.experts" in p for p in qc["ignore"])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    info["unexpected_keys"] = {k for k in info["unexpected_keys"]
                               if not k.startswith(("vision_model.", "multi_modal_projector."))}
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[384, 5, 17, 40, 99, 3]])).logits).all()
    ours = QuantizedSource(out)
    bits = {}
    for i in range(4):
        ff = model.model.layers[i].feed_forward
        for e in range(4):
            for kind in ("gate", "up", "down"):
                lin = getattr(ff.experts[e], f"{kind}_proj")
                assert torch.equal(lin.weight.data, ours.read_expert(i, kind, e)), (i, e, kind)
        qs = getattr(ff.experts[0].gate_proj, "quantization_scheme", None)
        bits[i] = None if qs is None else qs.weights.num_bits
        for kind in ("gate", "up", "down"):
            assert torch.equal(getattr(ff.shared_expert, f"{kind}_proj").weight.data, ours.read(f"layers.{i}.shared.{kind}"))
    assert bits == {0: 4, 1: 8, 2: 4, 3: None}
    assert torch.equal(ours.read_expert(3, "up", 1), open_checkpoint(trained_model).read_expert(3, "up", 1))


def test_st_plan_refuses_split_units_and_foreign_plans(st_sized, trained_model, tmp_path):
    from support.convert import convert

    d = st_sized[0]
    plan = json.loads((d / "fit.plan.json").read_text())
    plan["tensors"]["layers.1.experts.down"]["type"] = (
        "w8a16" if plan["tensors"]["layers.1.experts.gate"]["type"] != "w8a16" else "w4a16")
    split = tmp_path / "split.json"
    split.write_text(json.dumps(plan))
    with pytest.raises(Llama4QuantError, match="layers.1.experts mixes .*one scheme"):
        convert(trained_model, tmp_path / "a", method="rtn", plan=str(split))
    with pytest.raises(Llama4QuantError, match="not --to gguf"):
        gguf(trained_model, tmp_path / "b.gguf", method="rtn", plan=str(d / "fit.plan.json"))
    with pytest.raises(Llama4QuantError, match="--group-size"):
        convert(trained_model, tmp_path / "c", method="rtn", plan=str(d / "fit.plan.json"), group_size=64)
    with pytest.raises(Llama4QuantError, match="do not select"):
        convert(trained_model, tmp_path / "e", method="rtn", plan=str(d / "fit.plan.json"), targets=("experts",))
    with pytest.raises(Llama4QuantError, match="applies to --to safetensors only"):
        gguf(trained_model, tmp_path / "f.gguf", method="rtn", target_size=10**7, fit_schemes=("w4a16",))
    with pytest.raises(Llama4QuantError, match="w4a16-asym"):
        convert(trained_model, tmp_path / "g", calib=str(trained_model / "calib.txt"), target_size=10**7,
                fit_schemes=("w4a16,w4a16-asym",), **CALIB)
    assert not any((tmp_path / n).exists() for n in "abcefg")


def test_st_optimiser_honours_unit_budgets():
    """The one optimiser on safetensors-shaped units (three rungs, bf16 at zero error): within budget, never worse
    than the uniform rung that fits, and every byte of a budget above the largest rung unused."""
    rng = random.Random(3)
    units = {}
    for k in range(30):
        n = rng.choice([1 << 16, 1 << 20, 3 << 20])
        e4 = rng.uniform(1, 50)
        units[f"layers.{k}.experts"] = {"costs": {"w4a16": [n // 2 + n // 64, e4], "w8a16": [n + n // 64, e4 / 16],
                                                  "bf16": [2 * n, 0.0]}}
    tot = {s: sum(u["costs"][s][0] for u in units.values()) for s in ("w4a16", "w8a16", "bf16")}
    for budget in (tot["w4a16"], (tot["w4a16"] + tot["w8a16"]) // 2, tot["w8a16"], tot["bf16"] - 1, tot["bf16"] * 2):
        ch = fit.optimise(units, budget, smallest="w4a16")
        used = sum(units[k]["costs"][s][0] for k, s in ch.items())
        err = sum(units[k]["costs"][s][1] for k, s in ch.items())
        assert used <= budget
        for s in ("w4a16", "w8a16", "bf16"):
            if tot[s] <= budget:
                assert err <= sum(u["costs"][s][1] for u in units.values()) + 1e-9, (budget, s)
    assert set(fit.optimise(units, tot["bf16"] * 2, smallest="w4a16").values()) == {"bf16"}
    with pytest.raises(Llama4QuantError, match=r"smallest types \(w4a16"):
        fit.optimise(units, tot["w4a16"] - 1, smallest="w4a16")


def test_inspect_says_what_convert_fit_does(st_sized, trained_model, tmp_path):
    """inspect --gpu-mem M --context N on the checkpoint and convert --fit M --context N plan from the same budget
    (both formats), inspect's uniform sizes are the bytes convert writes, and its bits per weight bound the plan's."""
    from support.convert import convert
    from llama4_quant.cli.inspect_cmd import describe_model
    from llama4_quant.convert.sizes import header_reserve, DEFAULT_MAX_SHARD_BYTES

    d, _, _, _, _ = st_sized
    reserve, context = 10**6, 256
    probe = describe_model(str(trained_model), context, 10**12, reserve)["fit"]
    rows = {r["scheme"]: r for r in probe["safetensors"]["schemes"]}
    for scheme in ("w4a16", "w8a16"):  # exact: data + one shard header
        assert rows[scheme]["weights_bytes"] + 8 + header_reserve(DEFAULT_MAX_SHARD_BYTES) == _weights(d / scheme[:2])
    mem = (rows["w4a16"]["memory_bytes"] + rows["w8a16"]["memory_bytes"]) // 2
    f = describe_model(str(trained_model), context, mem, reserve)["fit"]
    st, gg = f["safetensors"], f["gguf"]
    assert st["uniform"]["scheme"] == "w4a16" and st["fit"]["possible"] and not st["fit"]["saturated"]
    assert 4.125 < st["fit"]["bits_per_weight"] < 8.125
    calib = dict(calib=str(trained_model / "calib.txt"), **CALIB)
    plan = convert(trained_model, tmp_path / "st", fit=mem, context=context, reserve=reserve, plan_only=True,
                   **calib)["plan"]
    assert plan["budget"]["tensor_bytes"] == st["fit"]["tensor_bytes"]
    assert plan["tensor_bytes"] <= st["fit"]["tensor_bytes"]
    assert 8 * plan["tensor_bytes"] / st["fit"]["planned_params"] <= st["fit"]["bits_per_weight"]
    assert sum(u["bytes"] for u in plan["units"].values()) > rows["w4a16"]["components"]["routed_experts"]
    assert not (tmp_path / "st").exists()
    gplan = gguf(trained_model, tmp_path / "g.gguf", method="imatrix", fit=mem, context=context, reserve=reserve,
                 plan_only=True, **calib)["plan"]
    assert gplan["budget"]["tensor_bytes"] == gg["fit"]["tensor_bytes"]
    assert gplan["tensor_bytes"] <= gg["fit"]["tensor_bytes"]
    if gg["uniform"] is not None:
        assert gg["uniform"]["memory_bytes"] <= mem
    # a budget below every plan: inspect says so, convert refuses
    small = st["fit"]["least_memory_bytes"] - 1
    f = describe_model(str(trained_model), context, small, reserve)["fit"]["safetensors"]
    assert f["uniform"] is None and not f["fit"]["possible"]
    with pytest.raises(Llama4QuantError, match="smallest types"):
        convert(trained_model, tmp_path / "st2", fit=small, context=context, reserve=reserve, plan_only=True, **calib)


def test_expert_importance_weighs_by_share_of_tokens():
    """A routed expert's error counts per token through its layer: its mean x^2 times the share of tokens it got
    (what it adds to the layer's output on average); an expert no token reached gets the others' mean at 1/E."""
    import torch

    from llama4_quant.formats.gguf.imatrix import Imatrix

    sums = torch.tensor([[6.0, 12.0], [2.0, 2.0], [0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([3, 1, 0, 4])
    im = Imatrix({"layers.0.experts.gate": sums}, {"layers.0.experts.gate": counts})
    # 8 tokens, top-1: expert 0 saw 3 with mean x^2 [2, 4] -> [2, 4] * 3/8
    assert fit.expert_importance(im, "layers.0.experts.gate", 0, 1).tolist() == [0.75, 1.5]
    assert fit.expert_importance(im, "layers.0.experts.gate", 3, 1).tolist() == [0.5, 0.0]
    mean = (torch.tensor([2.0, 4.0]) + torch.tensor([2.0, 2.0]) + torch.tensor([1.0, 0.0])) / 3
    assert fit.expert_importance(im, "layers.0.experts.gate", 2, 1).tolist() == pytest.approx((mean / 4).tolist())
    # top-2 routing: each token counted twice in the counts
    assert fit.expert_importance(im, "layers.0.experts.gate", 0, 2).tolist() == [1.5, 3.0]
    assert fit.expert_importance(im, "layers.9.experts.gate", 0, 1) is None


@pytest.mark.slow
def test_st_fit_under_torchrun_writes_the_single_process_shards(trained_model, tmp_path):
    """Two ranks measure, take rank 0's plan, and write the shards one process writes."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", LLAMA4_QUANT_DIST_TIMEOUT="120")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    args = ["convert", str(trained_model), "--calib", str(trained_model / "calib.txt"), "--calib-samples", "8",
            "--calib-seqlen", "128", "--device", "cpu", "--target-bpw", "9"]
    one = subprocess.run([sys.executable, "-m", "llama4_quant", *args[:2], str(tmp_path / "one"), *args[2:]],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free port (other test runs on this machine use torchrun too)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), "-m", "llama4_quant", *args[:2], str(tmp_path / "two"),
                          *args[2:]], capture_output=True, text=True, env=env, timeout=900)
    assert two.returncode == 0, two.stderr
    for n in ("model-00001-of-00001.safetensors", "config.json", "model.safetensors.index.json"):
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n
    a, b = (json.loads((tmp_path / f"{n}.plan.json").read_text()) for n in ("one", "two"))
    assert a["units"] == b["units"] and len({u["scheme"] for u in a["units"].values()}) > 1
