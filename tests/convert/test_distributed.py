"""Expert-parallel conversion under torchrun (gloo on CPU): the same artifact as one process, byte for byte; a
rank that dies leaves no artifact and one clear error."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAMA4_QUANT_DIST_TIMEOUT="60", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _convert(model: Path, out: Path, *args: str, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = ["convert", str(model), str(out), "--calib", str(model / "calib.txt"), "--calib-samples", "6",
           "--calib-seqlen", "64", "--device", "cpu", *args]
    if ranks == 1:
        argv = [sys.executable, "-m", "llama4_quant", *cmd]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--master-port", str(29500 + os.getpid() % 1000), "-m", "llama4_quant", *cmd]
    return subprocess.run(argv, capture_output=True, text=True, env=env or _env(), timeout=600)


def _digests(path: Path) -> dict[str, str]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("fixture,args", [
    ("tiny_mm", ("--scheme", "w4a16", "--group-size", "64")),
    ("tiny_dense", ("--scheme", "w8a16", "--group-size", "64")),
    ("tiny_mm", ("--to", "gguf", "--scheme", "q8_0", "--method", "gptq")),
])
def test_two_ranks_write_the_single_process_artifact(request, tmp_path, fixture, args):
    model = request.getfixturevalue(fixture)
    suffix = ".gguf" if "gguf" in args else ""
    one, two = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    r1 = _convert(model, one, *args)
    assert r1.returncode == 0, r1.stderr
    r2 = _convert(model, two, *args, "--json", ranks=2)
    assert r2.returncode == 0, r2.stderr
    assert list(_digests(one).values()) == list(_digests(two).values()) != []
    assert '"ranks": 2' in r2.stdout  # rank 0 alone prints the summary


def test_a_dead_rank_leaves_no_artifact(tiny_mm, tmp_path):
    out = tmp_path / "dead"
    r = _convert(tiny_mm, out, "--scheme", "w4a16", "--group-size", "64", ranks=2,
                 env=_env(LLAMA4_QUANT_INJECT="kill@0@1"))
    assert r.returncode != 0
    assert not out.exists() and not list(tmp_path.glob(".dead*")) and not list(tmp_path.glob("dead.tmp*"))
    assert "error:" in r.stderr


def test_rtn_is_refused_under_torchrun(tiny_mm, tmp_path):
    r = _convert(tiny_mm, tmp_path / "o", "--scheme", "w4a16", "--group-size", "64", "--method", "rtn", ranks=2)
    assert r.returncode != 0 and "run it in one process" in r.stderr
