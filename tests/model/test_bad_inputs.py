"""Bad checkpoints: one readable line on stderr, non-zero exit, nothing else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint, write_meta_checkpoint


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def hf_copy(tiny_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints[("scout", "hf")], dst)
    return dst


def shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_truncated_safetensors(hf_copy, cli):
    f = shards(hf_copy)[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("inspect", str(hf_copy)), f.name, "truncated")


def test_missing_shard(hf_copy, cli):
    f = shards(hf_copy)[-1]
    f.unlink()
    assert_one_line_error(cli("inspect", str(hf_copy)), "missing shard", f.name)


def test_wrong_model_type(hf_copy, cli):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", str(hf_copy)), "not a Llama 4", "'llama'")


def test_mismatched_shape(hf_copy, cli):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", str(hf_copy)), "shape", "config implies")


def test_missing_tensor(tmp_path, cli):
    tc = text_config("scout")
    path = write_hf_checkpoint(tmp_path / "m", tc)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 5  # config promises a layer the files lack
    cfg["text_config"]["no_rope_layers"].append(1)
    cfg["text_config"]["moe_layers"].append(4)
    (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", str(path)), "missing tensor", "layers.4")


def test_pickled_object_in_pth(tmp_path, cli):
    path = write_meta_checkpoint(tmp_path / "meta", text_config("scout"), shards=2)
    sd = torch.load(path / "consolidated.01.pth", weights_only=True)
    sd["evil"] = {"callback": print}  # an arbitrary object: must never be unpickled
    torch.save(sd, path / "consolidated.01.pth")
    assert_one_line_error(cli("inspect", str(path)), "consolidated.01.pth", "pickled")


def test_missing_meta_shard(tmp_path, cli):
    path = write_meta_checkpoint(tmp_path / "meta", text_config("scout"), shards=3)
    (path / "consolidated.01.pth").unlink()
    assert_one_line_error(cli("inspect", str(path)), "consolidated.01.pth")


def test_truncated_pth(tmp_path, cli):
    path = write_meta_checkpoint(tmp_path / "meta", text_config("scout"), shards=2)
    f = path / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:5000])
    assert_one_line_error(cli("inspect", str(path)), "consolidated.00.pth")


def test_nan_weights(tmp_path, cli):
    tc = text_config("scout")

    def fn(name, shape):
        t = torch.randn(shape) * 0.1
        if name == "layers.1.wq":
            t[0, 0] = float("nan")
        return t

    path = write_hf_checkpoint(tmp_path / "nan", tc, fn=fn)
    data = tmp_path / "data.txt"
    data.write_text("x")
    # eval reads every weight: the NaN must be named, not turned into a NaN perplexity
    from llama4_quant.model.readers import open_checkpoint
    from llama4_quant.errors import CheckpointError

    with open_checkpoint(path) as r, pytest.raises(CheckpointError, match="q_proj.*NaN|NaN.*"):
        r.read("layers.1.wq")


def test_not_a_directory(tmp_path, cli):
    assert_one_line_error(cli("inspect", str(tmp_path / "nope")), "no such")


def test_empty_directory(tmp_path, cli):
    assert_one_line_error(cli("inspect", str(tmp_path)), "neither config.json nor params.json")
