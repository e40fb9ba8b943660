"""`llama4-quant inspect`: exact parameter counts (presets and local checkpoints) and memory planning."""

from __future__ import annotations

import json

import pytest


def inspect_json(cli, *args):
    proc = cli("inspect", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_scout_preset_counts(cli):
    d = inspect_json(cli, "scout")
    p = d["params"]
    assert p["total"] == 107_769_861_120
    assert p["routed_experts"] == 96_636_764_160
    assert p["shared_experts"] == 6_039_797_760
    assert p["attention"] == 3_019_898_880
    assert p["embeddings"] == 2 * 202048 * 5120
    assert p["dense_mlp"] == 0
    a = d["architecture"]
    assert a["nope_layers"] == list(range(3, 48, 4)) and a["qk_norm"] is True
    assert a["rope_scaling"]["factor"] == 16.0
    # int4 group-128 experts + shared: fits one 80 GB H100 with an 8K context; bf16 does not
    assert d["memory"]["w4a16"]["fits"] is True
    assert d["memory"]["bf16"]["fits"] is False
    assert d["memory"]["w4a16"]["kv_cache_bytes"] == 192 * 1024 * 8192


def test_maverick_preset_counts(cli):
    p = inspect_json(cli, "maverick")["params"]
    assert p["total"] == pytest.approx(400.7e9, rel=1e-3)
    assert p["dense_mlp"] == 24 * 3 * 5120 * 16384
    assert inspect_json(cli, "maverick", "--gpu-mem", "1TB")["memory"]["bf16"]["fits"] is True


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_local_counts_match_transformers(tiny_checkpoints, cli, variant):
    transformers = pytest.importorskip("transformers")
    import torch

    path = tiny_checkpoints[(variant, "hf")]
    p = inspect_json(cli, str(path))["params"]
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    text = sum(v.numel() for k, v in model.state_dict().items() if "language_model" in k)
    vision = sum(v.numel() for k, v in model.state_dict().items() if "language_model" not in k)
    assert p["total"] == text
    assert p["vision"] == vision


def test_meta_layout_inspect(tiny_checkpoints, cli):
    hf = inspect_json(cli, str(tiny_checkpoints[("scout", "hf")]))
    meta = inspect_json(cli, str(tiny_checkpoints[("scout", "meta")]))
    assert meta["source"]["layout"] == "meta"
    assert {k: v for k, v in meta["params"].items() if "vision" not in k} == {k: v for k, v in hf["params"].items() if "vision" not in k}


def test_help_everywhere(cli):
    for cmd in ([], ["inspect"], ["eval"], ["download"]):
        proc = cli(*cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, cmd


def test_preset_needs_no_torch_and_typos_get_a_suggestion(cli):
    """inspect of a preset reads nothing and imports no heavy library (what made it take 15 s on a cold machine)."""
    import subprocess
    import sys

    code = ("import sys, io, contextlib; from llama4_quant.cli.main import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['inspect', 'scout', '--json'], standalone_mode=False)\n"
            "    cli.main(['inspect', 'maverick', '--gpu-mem', '24GB', '--context', '8192'], standalone_mode=False)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    r = cli("inspect", "scuot")
    assert r.returncode == 1 and "did you mean the preset 'scout'?" in r.stderr and r.stderr.count("error:") == 1
    r = cli("inspect", "scout", "--gpu-mem", "80")
    assert r.returncode == 2 and "has no unit" in r.stderr


def test_what_fits_a_gpu(cli):
    """inspect --gpu-mem: per format the largest uniform scheme that fits and what a --fit plan would get."""
    d = inspect_json(cli, "scout", "--gpu-mem", "24GB", "--context", "8192")["fit"]
    assert d["kv_cache_bytes"] == 192 * 1024 * 8192 and d["reserve_bytes"] == 10**9
    for fmt in ("gguf", "safetensors"):  # nothing fits one 24 GB card: Q2_K everywhere is ~35 GB of tensors
        assert d[fmt]["uniform"] is None and not d[fmt]["fit"]["possible"]
        assert d[fmt]["fit"]["least_memory_bytes"] > 24 * 10**9
    assert d["gguf"]["smallest_uniform"]["scheme"] == "q2_k"
    assert d["gguf"]["fit"]["least_memory_bytes"] < d["gguf"]["smallest_uniform"]["memory_bytes"]
    d = inspect_json(cli, "scout", "--gpu-mem", "80GB")["fit"]
    st, gg = d["safetensors"], d["gguf"]
    assert st["uniform"]["scheme"] == "w4a16" and st["uniform"]["memory_bytes"] <= 80 * 10**9
    assert [r["scheme"] for r in st["schemes"] if r["fits"]] == ["w4a16"]
    # the --fit plan spends what w4a16 leaves: between int4 and int8 on the planned Linears
    p = st["fit"]
    assert p["possible"] and 4.125 < p["bits_per_weight"] < 8.125 and p["tensor_bytes"] > st["uniform"]["weights_bytes"] - 15e9
    for row in (st["uniform"], p, gg["uniform"], gg["fit"]):
        assert sum(row["components"].values()) <= row["total_bytes"] < sum(row["components"].values()) + 10**8
        assert row["components"]["kv_cache"] == d["kv_cache_bytes"]
    assert st["uniform"]["components"]["attention"] == 2 * 3_019_898_880  # kept bf16 unless --targets attn
    assert st["uniform"]["components"]["vision"] > 0 and gg["uniform"]["components"]["vision"] == 0
    assert gg["uniform"]["memory_bytes"] <= 80 * 10**9 < min(r["memory_bytes"] for r in gg["schemes"] if not r["fits"])
    assert 4.5 < gg["fit"]["bits_per_weight"] < 8.5
    # a terabyte holds Maverick in bf16: uniform bf16, and --fit keeps every module at its largest candidate
    d = inspect_json(cli, "maverick", "--gpu-mem", "1TB")["fit"]
    assert d["safetensors"]["uniform"]["scheme"] == "bf16" and d["safetensors"]["fit"]["saturated"]
    assert d["gguf"]["fit"]["saturated"] and d["gguf"]["fit"]["bits_per_weight"] == 8.5  # Q8_0 tops the ladder
    text = cli("inspect", "scout", "--gpu-mem", "80GB", "--context", "8192")
    assert text.returncode == 0, text.stderr
    out = " ".join(text.stdout.split())
    assert "what fits 80.0 GB" in out and "largest uniform scheme that fits is w4a16" in out
    assert "convert --to safetensors --fit 80GB --context 8192 would plan" in out
