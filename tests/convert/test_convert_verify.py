"""`convert --verify`: the eval check on the artifact just written, recorded in its manifest, gating the exit code."""

from __future__ import annotations

import json


def test_verify_on_heldout_calibration_tokens(trained_model, tmp_path, cli):
    out = tmp_path / "gptq"
    proc = cli("convert", str(trained_model), str(out), "--calib", str(trained_model / "calib.txt"),
               "--calib-samples", "4", "--calib-seqlen", "128", "--verify", "--verify-ctx", "128", "--verify-chunks", "8",
               "--max-ppl-increase", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    v = summary["verification"]
    assert v["passed"] and "held-out calibration tokens" in v["data"]
    manifest = json.loads((out / "llama4-quant.json").read_text())
    assert manifest["verification"]["candidates"][0]["kld_mean"] == v["candidates"][0]["kld_mean"] > 0


def test_verify_gate_and_report(trained_model, tmp_path, cli):
    out, rep = tmp_path / "rtn", tmp_path / "rep"
    proc = cli("convert", str(trained_model), str(out), "--method", "rtn", "--verify", "--eval-data",
               str(trained_model / "test.txt"), "--verify-ctx", "128", "--verify-chunks", "4", "--max-kld", "1e-9",
               "--report", str(rep))
    assert proc.returncode == 3, proc.stderr
    assert "verify:" in proc.stdout and "FAIL" in proc.stdout
    manifest = json.loads((out / "llama4-quant.json").read_text())
    assert manifest["verification"]["passed"] is False  # the artifact stays, marked as failing
    assert (rep / "report.html").exists()


def test_verify_without_heldout_is_clear(trained_model, tmp_path, cli):
    proc = cli("convert", str(trained_model), str(tmp_path / "o"), "--method", "rtn", "--verify", "--verify-ctx", "128")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "--eval-data" in proc.stderr


def test_gguf_verify_on_heldout_recorded_in_sidecar(trained_model, tmp_path, cli):
    out = tmp_path / "m.gguf"
    proc = cli("convert", str(trained_model), str(out), "--to", "gguf", "--scheme", "q8_0", "--method", "imatrix",
               "--calib", str(trained_model / "calib.txt"), "--calib-samples", "4", "--calib-seqlen", "128",
               "--verify", "--verify-ctx", "128", "--verify-chunks", "4", "--max-kld", "0.05", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    sidecar = tmp_path / "m.gguf.llama4-quant.json"
    assert summary["manifest"] == str(sidecar)
    manifest = json.loads(sidecar.read_text())
    import hashlib

    assert manifest["sha256"]["m.gguf"] == hashlib.sha256(out.read_bytes()).hexdigest()
    v = manifest["verification"]
    assert v["passed"] and "held-out" in v["data"] and v["candidates"][0]["kld_mean"] < 0.05


def test_safetensors_only_options_rejected_for_gguf(tmp_path, cli):
    proc = cli("convert", str(tmp_path / "m"), str(tmp_path / "o.gguf"), "--to", "gguf", "--targets", "attn")
    assert proc.returncode == 1 and "--targets applies to --to safetensors only" in proc.stderr
