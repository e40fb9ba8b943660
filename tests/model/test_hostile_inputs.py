"""Hostile or malformed checkpoints: a single-file layout that must just work, an index that points outside
the model directory, absurd config values, corrupt tokenizers. Each bad case is one ConfigError/CheckpointError
(one `error:` line from the CLI), never a traceback, a hang or a silently accepted value."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama4_quant.errors import CheckpointError, ConfigError
from llama4_quant.model import hf_reader
from llama4_quant.model.readers import open_checkpoint
from llama4_quant.model.config import from_hf_dict, from_params_dict, load_config
from llama4_quant.model.presets import PRESETS
from llama4_quant.model.runner import LayerwiseRunner
from llama4_quant.model.tensors import expected_shapes
from llama4_quant.model.tokenizer import check_tokenizer, load_tokenizer
from llama4_quant.tiny.checkpoints import (
    ShardWriter,
    hf_config,
    meta_params,
    text_config,
    write_hf_checkpoint,
    write_meta_checkpoint,
)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def single_file_copy(src: Path, dst: Path) -> Path:
    """The same checkpoint as one model.safetensors without an index (small files copied)."""
    dst.mkdir(parents=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (a safetensors handle)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


def sharded_copy(src: Path, dst: Path, max_bytes: int = 64 << 10) -> Path:
    """The same checkpoint re-split into many small shards with an index."""
    w = ShardWriter(dst, max_bytes)
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                w.add(k, h.get_tensor(k))
    w.close()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    assert len(list(dst.glob("model-*.safetensors"))) > 3
    return dst


def read_index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def write_index(path: Path, index: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """The tiny Scout in several shards (the session fixtures fit in one)."""
    path = write_hf_checkpoint(tmp_path_factory.mktemp("shards") / "m", text_config("scout"), max_shard_bytes=64 << 10)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


@pytest.fixture
def hf_copy(many_shards, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(many_shards, dst)
    return dst


# ---- 1. one model.safetensors, no index ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hf", "text"])
def test_single_file_reads_like_sharded(tiny_checkpoints, tmp_path, layout):
    src = sharded_copy(tiny_checkpoints[("maverick", layout)], tmp_path / "sharded")
    one = single_file_copy(src, tmp_path / "one")
    assert not (one / "model.safetensors.index.json").exists()
    with open_checkpoint(src) as a, open_checkpoint(one) as b:
        assert b.weight_map.keys() == a.weight_map.keys()
        assert (b.model_prefix, b.head_name, b._unfused) == (a.model_prefix, a.head_name, a._unfused)
        for name in expected_shapes(a.config):
            assert torch.equal(a.read(name), b.read(name)), name
        assert torch.equal(a.read_expert(1, "gate", 3), b.read_expert(1, "gate", 3))
        assert [t.name for t in a.vision_tensors()] == [t.name for t in b.vision_tensors()]
        assert a.source_dtype() == b.source_dtype()
        tokens = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        la, lb = [], []
        LayerwiseRunner(a).logits(tokens, lambda n, x: la.append(x))
        LayerwiseRunner(b).logits(tokens, lambda n, x: lb.append(x))
        assert all(torch.equal(x, y) for x, y in zip(la, lb)) and len(la) == 2


def test_single_file_eval_equals_sharded(tiny_with_tokenizer, tmp_path, cli):
    path, data = tiny_with_tokenizer
    path = sharded_copy(path, tmp_path / "sharded")
    one = single_file_copy(path, tmp_path / "one")
    outs = []
    for p in (path, one):
        proc = cli("eval", str(p), "--data", str(data), "--ctx", "64", "--chunks", "3", "--json")
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout)["reference"])
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[0]["perplexity"] == outs[1]["perplexity"]
    assert cli("inspect", str(one)).returncode == 0


def test_single_file_nan_is_named(tmp_path):
    tc = text_config("scout")

    def fn(name, shape):
        t = torch.randn(shape) * 0.1
        if name == "layers.2.wk":
            t[1, 1] = float("inf")
        return t

    one = single_file_copy(write_hf_checkpoint(tmp_path / "sharded", tc, fn=fn), tmp_path / "one")
    with open_checkpoint(one) as r:
        with pytest.raises(CheckpointError, match="layers.2.wk holds 1 NaN/inf"):
            r.read("layers.2.wk")
        r.read("layers.1.wk")


def test_nan_in_vision_tower_is_named(tiny_checkpoints, tmp_path):
    one = single_file_copy(tiny_checkpoints[("scout", "hf")], tmp_path / "one")
    f = one / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    tensors["vision_model.class_embedding"][0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with open_checkpoint(one) as r, pytest.raises(CheckpointError, match="class_embedding holds 1 NaN"):
        r.read_raw("vision_model.class_embedding")


def test_two_files_without_index_holding_one_tensor_twice(tiny_checkpoints, tmp_path):
    one = single_file_copy(tiny_checkpoints[("scout", "text")], tmp_path / "one")
    shutil.copy(one / "model.safetensors", one / "model-copy.safetensors")
    with pytest.raises(CheckpointError, match="is in both"):
        open_checkpoint(one)


# ---- 2. index entries and links that leave the model directory -------------------------------------------------
@pytest.fixture
def opened(monkeypatch):
    """Every safetensors file a reader opens."""
    seen: list[Path] = []
    real = hf_reader.open_safetensors

    def spy(fpath):
        seen.append(Path(fpath).resolve())
        return real(fpath)

    monkeypatch.setattr(hf_reader, "open_safetensors", spy)
    return seen


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "../../../../../../../../etc/passwd",
                                   "sub/../../outside.safetensors"])
def test_index_entry_outside_the_directory_is_refused(hf_copy, tmp_path, opened, entry):
    first = min(hf_copy.glob("model-*.safetensors"))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(first, outside)  # a real shard: reading it would "work"
    if entry == "ABSOLUTE":
        entry = str(outside)
    index = read_index(hf_copy)
    for k, v in index["weight_map"].items():
        if v == first.name:
            index["weight_map"][k] = entry
    write_index(hf_copy, index)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_checkpoint(hf_copy)
    assert all(hf_copy.resolve() in p.parents for p in opened), opened


def test_index_outside_cli_one_line(hf_copy, tmp_path, cli):
    index = read_index(hf_copy)
    index["weight_map"][next(iter(index["weight_map"]))] = "../" * 8 + "etc/passwd"
    write_index(hf_copy, index)
    assert_one_line_error(cli("inspect", str(hf_copy)), "outside the model directory", "etc/passwd")


def test_symlinked_shard_outside_is_refused(hf_copy, tmp_path, opened):
    shard = max(hf_copy.glob("model-*.safetensors"))
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="link to .*outside the model directory"):
        open_checkpoint(hf_copy)
    assert outside.resolve() not in opened


def test_symlink_outside_in_single_file_layout_is_refused(tiny_checkpoints, tmp_path):
    one = single_file_copy(tiny_checkpoints[("scout", "text")], tmp_path / "one")
    real = tmp_path / "real.safetensors"
    (one / "model.safetensors").rename(real)
    (one / "model.safetensors").symlink_to(real)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_checkpoint(one)


def test_symlinks_inside_and_hf_cache_snapshot_are_fine(tiny_checkpoints, tmp_path):
    """Links within the directory, and a Hugging Face cache snapshot (links into the repo's blobs/), load."""
    src = tiny_checkpoints[("scout", "hf")]
    repo = tmp_path / "models--meta-llama--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    with open_checkpoint(snap) as r:
        r.read("layers.0.wq")
    inside = tmp_path / "inside"
    shutil.copytree(src, inside)
    shard = min(inside.glob("model-*.safetensors"))
    (inside / "store").mkdir()
    shard.rename(inside / "store" / shard.name)
    shard.symlink_to(Path("store") / shard.name)
    with open_checkpoint(inside) as r:
        r.read("tok_embeddings")


def test_meta_shard_link_outside_and_mismatched_shards(tmp_path):
    path = write_meta_checkpoint(tmp_path / "meta", text_config("scout"), shards=2)
    shard = path / "consolidated.01.pth"
    elsewhere = tmp_path / "elsewhere.pth"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="consolidated.01.pth is a link .*outside the model directory"):
        open_checkpoint(path)
    shard.unlink()
    sd = torch.load(elsewhere, weights_only=True)
    sd.pop("layers.2.attention.wo.weight")
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match="consolidated.00.pth holds tensor layers.2.attention.wo.weight but "
                                              "consolidated.01.pth does not"):
        open_checkpoint(path)


def test_meta_shards_that_cannot_split_attention(tmp_path):
    path = write_meta_checkpoint(tmp_path / "meta", text_config("scout"), shards=3)
    with pytest.raises(CheckpointError, match="3 shards cannot split the attention"):
        open_checkpoint(path)


# ---- 3. index entries a shard does not hold; a broken index -----------------------------------------------------
def test_index_names_a_shard_lacking_the_tensor(hf_copy, cli):
    index = read_index(hf_copy)
    files = sorted(set(index["weight_map"].values()))
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    write_index(hf_copy, index)
    with pytest.raises(CheckpointError, match="layers.1.self_attn.o_proj.weight in .* which does not hold it"):
        open_checkpoint(hf_copy)
    with open_checkpoint(hf_copy, validate=False) as r, pytest.raises(CheckpointError, match="does not hold it"):
        r.read("layers.1.wo")
    assert_one_line_error(cli("inspect", str(hf_copy)), "o_proj", "does not hold it")


def test_vision_entry_lacking_tensor(hf_copy):
    index = read_index(hf_copy)
    files = sorted(set(index["weight_map"].values()))
    name = "vision_model.class_embedding"
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    write_index(hf_copy, index)
    with pytest.raises(CheckpointError, match="class_embedding .*does not hold it"):
        open_checkpoint(hf_copy)


@pytest.mark.parametrize("body", [b"\x89\xff\x00garbage", b"[1, 2, 3]", b'{"weight_map": [1]}',
                                  b'{"weight_map": {"a": 5}}', b'{"weight_map": {"a": ""}}'])
def test_broken_index(hf_copy, body):
    (hf_copy / "model.safetensors.index.json").write_bytes(body)
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(hf_copy)


# ---- 4. config.json / params.json values ------------------------------------------------------------------------
def multimodal(**text_overrides) -> dict:
    return hf_config(text_config("scout", **text_overrides))


def with_text(cfg: dict, **changes) -> dict:
    cfg = copy.deepcopy(cfg)
    for k, v in changes.items():
        if v is DELETE:
            cfg["text_config"].pop(k, None)
        else:
            cfg["text_config"][k] = v
    return cfg


DELETE = object()
NAN, INF = float("nan"), float("inf")

BAD_TEXT_FIELDS = [
    ({"num_hidden_layers": 1e9}, ["num_hidden_layers", "1..1024", "1000000000.0"]),
    ({"num_hidden_layers": 0}, ["num_hidden_layers", "got 0"]),
    ({"num_hidden_layers": -4}, ["num_hidden_layers", "-4"]),
    ({"num_hidden_layers": 4.5}, ["num_hidden_layers", "integer", "4.5"]),
    ({"num_hidden_layers": "4"}, ["num_hidden_layers", "integer", "'4'"]),
    ({"num_hidden_layers": True}, ["num_hidden_layers", "True"]),
    ({"hidden_size": 1 << 20}, ["hidden_size", "1..65536"]),
    ({"hidden_size": "64"}, ["hidden_size", "'64'"]),
    ({"vocab_size": (1 << 22) + 1}, ["vocab_size", str((1 << 22) + 1)]),
    ({"vocab_size": 320.5}, ["vocab_size", "320.5"]),
    ({"num_local_experts": 5000}, ["num_local_experts", "1..4096", "5000"]),
    ({"num_local_experts": 0}, ["num_local_experts", "got 0"]),
    ({"intermediate_size": None}, ["intermediate_size", "missing"]),
    ({"intermediate_size": [96]}, ["intermediate_size", "[96]"]),
    ({"num_experts_per_tok": 5}, ["num_experts_per_tok 5 exceeds num_local_experts 4"]),
    ({"num_experts_per_tok": 0}, ["num_experts_per_tok", "got 0"]),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, ["num_attention_heads 4", "num_key_value_heads 3"]),
    ({"num_key_value_heads": 8}, ["num_attention_heads 4", "num_key_value_heads 8"]),
    ({"head_dim": 15}, ["head_dim", "even", "15"]),
    ({"head_dim": DELETE, "hidden_size": 66}, ["hidden_size 66", "num_attention_heads 4"]),
    ({"head_dim": 4096, "num_attention_heads": 32, "num_key_value_heads": 2}, ["num_attention_heads x head_dim"]),
    ({"rms_norm_eps": NAN}, ["rms_norm_eps", "nan"]),
    ({"rms_norm_eps": INF}, ["rms_norm_eps", "inf"]),
    ({"rms_norm_eps": 0}, ["rms_norm_eps", "got 0"]),
    ({"rms_norm_eps": -1e-5}, ["rms_norm_eps", "-1e-05"]),
    ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps", "'1e-5'"]),
    ({"rope_theta": NAN}, ["rope_theta", "nan"]),
    ({"rope_theta": 0.0}, ["rope_theta", "0.0"]),
    ({"rope_theta": -INF}, ["rope_theta", "-inf"]),
    ({"rope_theta": 10**400}, ["rope_theta", "finite"]),
    ({"num_hidden_layers": 10**400}, ["num_hidden_layers", "1..1024"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": NAN, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, ["rope_scaling.factor", "nan"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope_scaling.low_freq_factor", "missing"]),
    ({"rope_scaling": "llama3"}, ["rope_scaling", "JSON object"]),
    ({"moe_layers": [0, 1, 7]}, ["moe_layers", "0..3", "[0, 1, 7]"]),
    ({"moe_layers": [0, 0]}, ["moe_layers", "twice"]),
    ({"moe_layers": "all"}, ["moe_layers", "'all'"]),
    ({"moe_layers": DELETE, "interleave_moe_layer_step": 0}, ["interleave_moe_layer_step", "got 0"]),
    ({"moe_layers": DELETE, "interleave_moe_layer_step": 1e12}, ["interleave_moe_layer_step", "1..1024"]),
    ({"no_rope_layers": [1, 1]}, ["no_rope_layers", "4 layers", "[1, 1]"]),
    ({"no_rope_layers": [1, 1, 2, 0]}, ["no_rope_layers", "[1, 1, 2, 0]"]),
    ({"no_rope_layers": DELETE, "no_rope_layer_interval": 0}, ["no_rope_layer_interval", "got 0"]),
    ({"attention_chunk_size": 0}, ["attention_chunk_size", "got 0"]),
    ({"floor_scale": 0}, ["floor_scale", "got 0"]),
    ({"attn_scale": NAN}, ["attn_scale", "nan"]),
    ({"max_position_embeddings": -1}, ["max_position_embeddings", "-1"]),
    ({"use_qk_norm": "yes"}, ["use_qk_norm", "'yes'"]),
    ({"bos_token_id": "<s>"}, ["bos_token_id", "'<s>'"]),
    ({"eos_token_id": [1, -2]}, ["eos_token_id", "[1, -2]"]),
    ({"model_type": "llama"}, ["text_config.model_type", "'llama'"]),
]


@pytest.mark.parametrize("changes,needles", BAD_TEXT_FIELDS, ids=[str(c)[:60] for c, _ in BAD_TEXT_FIELDS])
@pytest.mark.parametrize("layout", ["multimodal", "text"])
def test_bad_config_values(changes, needles, layout):
    cfg = with_text(multimodal(), **changes)
    if layout == "text":
        if "model_type" in changes:
            pytest.skip("the text layout's model_type is the top-level one")
        cfg = {"architectures": ["Llama4ForCausalLM"], **cfg["text_config"]}
    with pytest.raises(ConfigError) as e:
        from_hf_dict(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


BAD_IDENTITY = [
    ([1, 2, 3], ["config.json must be a JSON object", "list"]),
    ("llama4", ["config.json must be a JSON object", "str"]),
    ({**multimodal(), "text_config": "abc"}, ["text_config must be a JSON object"]),
    ({**multimodal(), "model_type": "llama"}, ["not a Llama 4", "'llama'", "contradicts", "Llama4ForConditionalGeneration"]),
    ({**multimodal(), "architectures": ["LlamaForCausalLM"]}, ["not a Llama 4", "LlamaForCausalLM", "contradicts"]),
    ({**multimodal(), "model_type": "llama4_text"}, ["model_type 'llama4_text'", "text_config"]),
    ({**multimodal(), "architectures": "Llama4ForConditionalGeneration"}, ["architectures must be a list"]),
    ({**multimodal(), "model_type": ["llama4"]}, ["model_type must be a string"]),
    ({**multimodal(), "vision_config": [1]}, ["vision_config must be a JSON object"]),
    ({k: v for k, v in multimodal().items() if k not in ("model_type", "architectures")}, ["not a Llama 4"]),
    ({"architectures": ["Llama4ForConditionalGeneration"], **text_config("scout")}, ["needs a text_config"]),
]


@pytest.mark.parametrize("raw,needles", BAD_IDENTITY, ids=range(len(BAD_IDENTITY)))
def test_bad_config_identity(raw, needles):
    with pytest.raises(ConfigError) as e:
        from_hf_dict(raw)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_real_configs_still_parse():
    for name, want_experts, want_moe in (("scout", 16, 48), ("maverick", 128, 24)):
        cfg = from_hf_dict(PRESETS[name]["config"])
        assert (cfg.num_layers, cfg.num_experts, len(cfg.moe_layers), cfg.top_k) == (48, want_experts, want_moe, 1)
        assert cfg.q_dim == cfg.hidden_size == 5120 and cfg.vocab_size == 202048
    # the published Scout config.json spells some fields differently than our preset (explicit lists, an int flag)
    raw = copy.deepcopy(PRESETS["scout"]["config"])
    raw["text_config"].update(moe_layers=list(range(48)), no_rope_layers=[int((i + 1) % 4 != 0) for i in range(48)],
                              attn_temperature_tuning=4, floor_scale=8192, rope_theta=500000)
    assert from_hf_dict(raw).nope_layers == tuple(range(3, 48, 4))


def bad_params(changes: dict) -> dict:
    """Meta params.json of the tiny Scout with `changes` ({"n_layers": ..., "moe_args.top_k": ...}) applied."""
    p = meta_params(text_config("scout"))
    for k, v in changes.items():
        d, _, key = k.rpartition(".")
        (p[d] if d else p)[key] = v
    return p


BAD_PARAMS = [
    ({"n_layers": 1e9}, ["n_layers", "1..1024"]),
    ({"n_layers": 4.5}, ["n_layers", "4.5"]),
    ({"dim": "64"}, ["dim", "'64'"]),
    ({"dim": 0}, ["dim", "got 0"]),
    ({"vocab_size": 1 << 30}, ["vocab_size"]),
    ({"n_kv_heads": 3}, ["n_heads 4", "n_kv_heads 3"]),
    ({"norm_eps": NAN}, ["norm_eps", "nan"]),
    ({"rope_theta": 0}, ["rope_theta", "got 0"]),
    ({"rope_theta": INF}, ["rope_theta", "inf"]),
    ({"ffn_dim_multiplier": NAN}, ["ffn_dim_multiplier", "nan"]),
    ({"ffn_exp": 1e9}, ["ffn_exp"]),
    ({"nope_layer_interval": -1}, ["nope_layer_interval", "-1"]),
    ({"moe_args.num_experts": 0}, ["moe_args.num_experts", "got 0"]),
    ({"moe_args.num_experts": 10**6}, ["moe_args.num_experts", "1..4096"]),
    ({"moe_args.top_k": 5}, ["moe_args.top_k 5 exceeds moe_args.num_experts 4"]),
    ({"moe_args.top_k": 0}, ["moe_args.top_k", "got 0"]),
    ({"moe_args.interleave_moe_layer_step": 0}, ["interleave_moe_layer_step", "got 0"]),
    ({"moe_args.auto_scale_F": True, "moe_args.capacity_factor": -1.0}, ["capacity_factor", "-1.0"]),
    ({"use_scaled_rope": True, "rope_scaling_factor": NAN}, ["rope_scaling_factor", "nan"]),
    ({"moe_args": [1]}, ["moe_args must be a JSON object"]),
]


@pytest.mark.parametrize("changes,needles", BAD_PARAMS, ids=[str(c)[:60] for c, _ in BAD_PARAMS])
def test_bad_params_values(changes, needles):
    with pytest.raises(ConfigError) as e:
        from_params_dict(bad_params(changes))
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_params_not_an_object(tmp_path):
    (tmp_path / "params.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="params.json must be a JSON object"):
        load_config(tmp_path)


def test_config_with_an_endless_integer(hf_copy):
    text = (hf_copy / "config.json").read_text().replace('"num_hidden_layers": 4', '"num_hidden_layers": ' + "9" * 5000)
    (hf_copy / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(hf_copy)


def test_config_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(tmp_path)


@pytest.mark.parametrize("case", ["huge_layers", "list", "top_k", "contradiction", "nan_eps"])
def test_bad_config_cli_one_line_fast(hf_copy, cli, case):
    cfg = json.loads((hf_copy / "config.json").read_text())
    if case == "huge_layers":
        cfg["text_config"]["num_hidden_layers"] = 1e9
        needles = ["num_hidden_layers", "1000000000.0"]
    elif case == "list":
        cfg = [1, 2, 3]
        needles = ["JSON object"]
    elif case == "top_k":
        cfg["text_config"]["num_experts_per_tok"] = 9
        needles = ["num_experts_per_tok 9 exceeds num_local_experts 4"]
    elif case == "contradiction":
        cfg["model_type"] = "llama"
        needles = ["contradicts", "'llama'"]
    else:
        cfg["text_config"]["rms_norm_eps"] = NAN
        needles = ["rms_norm_eps", "nan"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", str(hf_copy), timeout=60), *needles)


# ---- 5. corrupt tokenizers ------------------------------------------------------------------------------------------
TOKENIZER_BODIES = {
    "truncated": None,  # the first half of a real tokenizer.json
    "random": os.urandom(4096),
    "not_a_tokenizer": json.dumps({"name": "not a tokenizer", "vocab": [1, 2]}).encode(),
    "a_list": b"[1, 2, 3]",
    "empty_file": b"",
    "empty_vocab": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode(),
}


@pytest.mark.parametrize("kind", list(TOKENIZER_BODIES))
def test_corrupt_tokenizer_json(tiny_with_tokenizer, tmp_path, kind):
    real = (tiny_with_tokenizer[0] / "tokenizer.json").read_bytes()
    body = TOKENIZER_BODIES[kind] if TOKENIZER_BODIES[kind] is not None else real[: len(real) // 2]
    f = tmp_path / "tokenizer.json"
    f.write_bytes(body)
    for load in (lambda: load_tokenizer(f), lambda: load_tokenizer(tmp_path), lambda: check_tokenizer(tmp_path)):
        with pytest.raises(CheckpointError) as e:
            load()
        assert str(e.value).startswith(str(f)) and "\n" not in str(e.value), str(e.value)


def test_check_tokenizer(tiny_with_tokenizer, tmp_path):
    assert check_tokenizer(tiny_with_tokenizer[0]) == tiny_with_tokenizer[0] / "tokenizer.json"
    (tmp_path / "empty").mkdir()
    assert check_tokenizer(tmp_path / "empty") is None


def test_corrupt_tiktoken_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config(tiny_with_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"bos_token": ')
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_cli_one_line(tiny_with_tokenizer, tmp_path, cli):
    path, data = tiny_with_tokenizer
    copy_dir = tmp_path / "m"
    shutil.copytree(path, copy_dir)
    real = (copy_dir / "tokenizer.json").read_bytes()
    (copy_dir / "tokenizer.json").write_bytes(real[: len(real) // 3])
    proc = cli("eval", str(copy_dir), "--data", str(data), "--ctx", "64", "--chunks", "2", timeout=120)
    assert_one_line_error(proc, "tokenizer.json", "not a valid tokenizer.json")


def test_json_nan_literals_in_config_file(hf_copy):
    """Python's json reads NaN/Infinity literals: they must still be refused."""
    text = (hf_copy / "config.json").read_text().replace('"rope_theta": 500000.0', '"rope_theta": Infinity')
    assert "Infinity" in text
    (hf_copy / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="rope_theta must be a finite number > 0, got inf"):
        load_config(hf_copy)
    assert math.isinf(json.loads(text)["text_config"]["rope_theta"])
