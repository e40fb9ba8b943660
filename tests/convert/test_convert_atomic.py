"""OUT appears complete or not at all: injected failures, ENOSPC, SIGTERM, SIGKILL, and existing outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest



def cli_env(**extra) -> dict:
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}  # tiny matrices on busy shared cores


def _temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".tmp-*"))


def _run(cli, src: Path, out: Path, *extra: str, inject: str | None = None):
    env = cli_env(**({"LLAMA4_QUANT_INJECT": inject} if inject else {}))
    return cli("convert", str(src), str(out), "--method", "rtn", *extra, env=env)


@pytest.mark.parametrize("inject,code,message", [
    ("error@0", 1, "error: injected failure after layer 0"),
    ("enospc@1", 1, "error: no space left on device"),
    ("term@0", 130, "error: interrupted"),
])
def test_failure_leaves_nothing(cli, tiny_mm, tmp_path, inject, code, message):
    out = tmp_path / "out"
    r = _run(cli, tiny_mm, out, inject=inject)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert not out.exists()
    assert _temps(out) == []


def test_kill_leaves_only_a_temp_dir_that_the_next_run_removes(cli, tiny_mm, tmp_path):
    out = tmp_path / "out"
    r = _run(cli, tiny_mm, out, inject="kill@0")
    assert r.returncode == -9
    assert not out.exists()
    (stale,) = _temps(out)
    assert not (stale / "config.json").exists() and not (stale / "model.safetensors.index.json").exists()
    r = _run(cli, tiny_mm, out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] == str(out)
    assert _temps(out) == []
    assert (out / "llama4-quant.json").exists()


def test_existing_output_needs_force(cli, tiny_mm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _run(cli, tiny_mm, out)
    assert r.returncode == 1 and "already exists (pass --force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = _run(cli, tiny_mm, out, "--force")  # --force never deletes what we did not write
    assert r.returncode == 1 and "not an llama4-quant output" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    r = _run(cli, tiny_mm, out, "--force")  # an empty directory may be filled
    assert r.returncode == 0, r.stderr
    r = _run(cli, tiny_mm, out, "--force")  # and our own output replaced
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and _temps(out) == []

