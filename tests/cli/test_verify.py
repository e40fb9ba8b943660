"""Artifacts against their manifests: `verify`, and eval/inspect refusing a changed file; --force only replaces
what we wrote; reports and manifests get ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest


@pytest.fixture(scope="module")
def artifacts(cli, tiny_with_tokenizer, tmp_path_factory):
    model, _ = tiny_with_tokenizer
    root = tmp_path_factory.mktemp("verify")
    st, gg = root / "w8", root / "m.gguf"
    for args in (("--to", "safetensors", "--scheme", "w8a16", "--method", "rtn", "--group-size", "32", str(st)),
                 ("--to", "gguf", "--scheme", "q8_0", "--method", "rtn", str(gg))):
        r = cli("convert", str(model), args[-1], *args[:-1])
        assert r.returncode == 0, r.stderr
    return model, st, gg


def _copy(src, dst):
    import shutil

    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    if not src.is_dir():
        shutil.copy2(src.with_name(src.name + ".llama4-quant.json"), dst.with_name(dst.name + ".llama4-quant.json"))
    return dst


def test_verify_passes_untouched_artifacts(cli, artifacts):
    _, st, gg = artifacts
    r = cli("verify", str(st), str(gg), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["passed"] and [a["checked"] for a in out["artifacts"]] == ["sha256", "sha256"]
    assert all(a["structure"] == "ok" and a["files"] >= 1 for a in out["artifacts"])


def _flip(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_one_flipped_bit_is_refused_everywhere(cli, artifacts, tmp_path, kind):
    model, st, gg = artifacts
    if kind == "safetensors":
        bad = _copy(st, tmp_path / "w8")
        _flip(next(bad.glob("*.safetensors")))
    else:
        bad = _copy(gg, tmp_path / "m.gguf")
        _flip(bad)
    r = cli("verify", str(bad))
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "sha256" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    r = cli("eval", str(model), str(bad), "--data", str(text), "--ctx", "32", "--chunks", "2")
    assert r.returncode == 1 and "sha256" in r.stderr, r.stderr
    if kind == "gguf":
        r = cli("inspect", str(bad))
        assert r.returncode == 1 and "sha256" in r.stderr, r.stderr


def test_stray_weight_file_and_missing_manifest(cli, artifacts, tmp_path):
    _, st, _ = artifacts
    bad = _copy(st, tmp_path / "w8")
    (bad / "model-extra.safetensors").write_bytes(b"x" * 16)
    r = cli("verify", str(bad))
    assert r.returncode == 1 and "model-extra.safetensors" in r.stderr
    (bad / "model-extra.safetensors").unlink()
    (bad / "llama4-quant.json").unlink()
    r = cli("verify", str(bad))
    assert r.returncode == 1 and "nothing to verify it against" in r.stderr


def test_force_replaces_only_our_artifacts(cli, artifacts, tmp_path):
    model, st, gg = artifacts
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    r = cli("convert", str(model), str(foreign), "--scheme", "w8a16", "--method", "rtn", "--group-size", "32", "--force")
    assert r.returncode == 1 and "not an llama4-quant output" in r.stderr, r.stderr
    assert (foreign / "important.txt").read_text() == "keep me"
    # ours plus a file the user dropped in: refused too
    ours = _copy(st, tmp_path / "ours")
    (ours / "notes.txt").write_text("mine")
    r = cli("convert", str(model), str(ours), "--scheme", "w8a16", "--method", "rtn", "--group-size", "32", "--force")
    assert r.returncode == 1 and "notes.txt" in r.stderr, r.stderr
    assert (ours / "notes.txt").exists()
    (ours / "notes.txt").unlink()
    r = cli("convert", str(model), str(ours), "--scheme", "w8a16", "--method", "rtn", "--group-size", "32", "--force")
    assert r.returncode == 0, r.stderr
    # a GGUF we did not write
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 60)
    r = cli("convert", str(model), str(other), "--to", "gguf", "--scheme", "q8_0", "--method", "rtn", "--force")
    assert r.returncode == 1 and "not a GGUF written by llama4-quant" in r.stderr, r.stderr
    assert other.read_bytes().startswith(b"GGUF\0")
    mine = _copy(gg, tmp_path / "again.gguf")
    r = cli("convert", str(model), str(mine), "--to", "gguf", "--scheme", "q8_0", "--method", "rtn", "--force")
    assert r.returncode == 0, r.stderr


def test_manifests_and_reports_are_world_readable(cli, artifacts, tmp_path):
    model, st, gg = artifacts
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox " * 300)
    rep = tmp_path / "rep"
    r = cli("eval", str(model), str(st), "--data", str(text), "--ctx", "32", "--chunks", "2", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    for f in (st / "llama4-quant.json", gg.with_name(gg.name + ".llama4-quant.json"), rep / "report.json",
              rep / "report.md", rep / "report.html"):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o044 == 0o044, (f, oct(mode))
    md = (rep / "report.md").read_text()
    assert "None" not in md and "max mean KLD none" in md
