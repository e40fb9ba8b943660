"""`eval REFERENCE CANDIDATE...`: KLD / top-1 / ppl increase, the CI gate, reports, bad candidates."""

from __future__ import annotations

import json

import pytest
import torch

from llama4_quant.tiny.checkpoints import random_tensor_fn, write_hf_checkpoint


@pytest.fixture(scope="module")
def perturbed(tiny_with_tokenizer, tmp_path_factory):
    """The tokenizer fixture's weights with 5% multiplicative noise on every matrix."""
    import json as _json

    ref, _ = tiny_with_tokenizer
    tc = _json.loads((ref / "config.json").read_text())["text_config"]
    base = random_tensor_fn(0)

    def noisy(name, shape):
        t = base(name, shape)
        if len(shape) > 1:
            g = torch.Generator().manual_seed(abs(hash(name)) % 2**31)
            t = t * (1 + 0.05 * torch.randn(shape, generator=g))
        return t

    return write_hf_checkpoint(tmp_path_factory.mktemp("noisy") / "m", tc, fn=noisy)


def run_eval(cli, ref, *cands, data, extra=()):
    return cli("eval", str(ref), *map(str, cands), "--data", str(data), "--ctx", "64", "--chunks", "4", "--json", *extra)


def test_identical_candidate_has_zero_kld(tiny_with_tokenizer, cli):
    ref, data = tiny_with_tokenizer
    proc = run_eval(cli, ref, ref, data=data, extra=("--max-kld", "1e-9", "--max-ppl-increase", "0.001"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    c = out["candidates"][0]
    assert c["kld_mean"] < 1e-9 and c["top1_agreement"] == 1.0 and c["ppl_increase_pct"] == pytest.approx(0, abs=1e-9)
    assert out["passed"] is True and c["passed"] is True
    assert set(c) >= {"path", "perplexity", "nll", "tokens", "ppl_increase_pct", "kld_mean", "kld_p99", "top1_agreement", "passed"}
    assert all(e == 0 for e in c["layer_error"])


def test_gate_flips_exit_code(tiny_with_tokenizer, perturbed, cli):
    ref, data = tiny_with_tokenizer
    loose = run_eval(cli, ref, perturbed, data=data, extra=("--max-kld", "10", "--max-ppl-increase", "1000"))
    assert loose.returncode == 0, loose.stderr
    c = json.loads(loose.stdout)["candidates"][0]
    assert c["kld_mean"] > 1e-3 and 0 < c["top1_agreement"] < 1
    assert min(c["layer_error"]) > 0 and c["stream_error"][-1] > 0
    strict = run_eval(cli, ref, perturbed, data=data, extra=("--max-kld", str(c["kld_mean"] / 2)))
    assert strict.returncode == 3
    out = json.loads(strict.stdout)
    assert out["passed"] is False and "KLD" in out["candidates"][0]["failures"][0]
    ppl_gate = run_eval(cli, ref, perturbed, data=data, extra=("--max-ppl-increase", str(c["ppl_increase_pct"] - 0.5)))
    assert ppl_gate.returncode == 3 and "ppl" in json.loads(ppl_gate.stdout)["candidates"][0]["failures"][0]


def test_report_files(tiny_with_tokenizer, perturbed, tmp_path, cli):
    ref, data = tiny_with_tokenizer
    rep = tmp_path / "rep"
    proc = run_eval(cli, ref, ref, perturbed, data=data, extra=("--report", str(rep)))
    assert proc.returncode == 0, proc.stderr
    for f in ("report.json", "report.md", "report.html", "layer_error.png", "kld_hist.png", "ppl_chunks.png"):
        assert (rep / f).stat().st_size > 0, f
        if f.endswith(".png"):
            assert (rep / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (rep / "report.html").read_text()
    assert "kld_hist.png" in html and "<table>" in html
    md = (rep / "report.md").read_text()
    assert md.count("| `") == 2  # one row per candidate
    full = json.loads((rep / "report.json").read_text())
    assert len(full["candidates"][1]["kld_values"]) == full["candidates"][1]["tokens"]


def test_different_architecture_is_rejected(tiny_with_tokenizer, tiny_checkpoints, cli):
    ref, data = tiny_with_tokenizer
    other = tiny_checkpoints[("maverick", "hf")]
    proc = run_eval(cli, ref, other, data=data)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "not a quantization of the reference" in line


def test_truncated_gguf_is_rejected(tiny_with_tokenizer, tmp_path, cli):
    ref, data = tiny_with_tokenizer
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    proc = run_eval(cli, ref, bad, data=data)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and "broken.gguf" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_candidate_is_rejected(tiny_with_tokenizer, tmp_path, cli):
    ref, data = tiny_with_tokenizer
    proc = run_eval(cli, ref, tmp_path / "nothing.gguf", data=data)
    assert proc.returncode == 1 and "no such" in proc.stderr
