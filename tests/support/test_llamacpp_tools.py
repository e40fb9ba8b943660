"""llama.cpp tools from scripts/build_llamacpp.sh, driven through llama4_quant.testing.llamacpp.

The parser/locator tests always run. The rest are marked ``llamacpp`` and skip when no build is
found (run scripts/build_llamacpp.sh, or set LLAMA_CPP_DIR). Their model is a tiny random *llama*
(not llama4) GGUF written here with gguf-py's GGUFWriter: 2 layers, n_embd 64, byte-level BPE vocab
of 266 tokens (~200 KB); a perplexity run on it takes well under a second.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from support import llamacpp as lcpp
from support.llamacpp import LlamaCppError, find_llamacpp, parse_perplexity_output

REPO = Path(__file__).resolve().parents[2]
LLAMA = find_llamacpp()
needs_llamacpp = pytest.mark.skipif(LLAMA is None, reason=lcpp.explain_missing() or "llama.cpp not found")

# ---------------------------------------------------------------------------------------------
# always-on: pins and the output parser
# ---------------------------------------------------------------------------------------------

# Shape of a real llama-perplexity run (this llama.cpp), trimmed: stdout carries the [i]x, values,
# stderr the log lines and the final estimate.
CAPTURED = """\
perplexity: tokenizing the input ..
perplexity: tokenization took 1.234 ms
perplexity: calculating perplexity over 4 chunks, n_ctx=64, batch_size=64, n_seq=1
perplexity: 0.01 seconds per pass - ETA 0.00 minutes
[1]250.1000,[2]262.3000,[3]255.9000,[4]259.0000,
Final estimate: PPL = 259.0000 +/- 12.34567

llama_perf_context_print:        load time =      10.00 ms
"""


def test_pinned_version_matches_build_script():
    script = (REPO / "scripts" / "build_llamacpp.sh").read_text()
    assert f'LLAMA_CPP_PYTHON_VERSION="{lcpp.LLAMA_CPP_PYTHON_VERSION}"' in script
    assert f'LLAMA_CPP_COMMIT="{lcpp.LLAMA_CPP_COMMIT}"' in script
    assert lcpp.default_install_dir().name == f"llama.cpp-{lcpp.LLAMA_CPP_PYTHON_VERSION}"


def test_parse_perplexity_output_captured():
    r = parse_perplexity_output(CAPTURED)
    assert r["ppl"] == 259.0 and r["ppl_stderr"] == pytest.approx(12.34567)
    assert r["running_ppl"] == [250.1, 262.3, 255.9, 259.0]
    assert r["n_chunks"] == 4 and r["n_ctx"] == 64 and r["batch_size"] == 64 and r["n_seq"] == 1
    # per-chunk values are recovered from the cumulative ones: their geometric mean is the final PPL
    assert r["chunk_ppl"][0] == pytest.approx(250.1)
    assert r["chunk_ppl"][1] == pytest.approx(262.3**2 / 250.1)
    geo = math.exp(sum(math.log(p) for p in r["chunk_ppl"]) / 4)
    assert geo == pytest.approx(r["ppl"], rel=1e-9)


def test_parse_perplexity_output_errors():
    too_short = (
        "perplexity: tokenizing the input ..\n"
        "perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512\n"
        "perplexity: the data file you provided tokenizes to only 300 tokens\n"
    )
    with pytest.raises(LlamaCppError, match=r"only 300 tokens, it needs at least 1024"):
        parse_perplexity_output(too_short)
    with pytest.raises(LlamaCppError, match="Final estimate"):
        parse_perplexity_output("llama_model_load: error loading model\n")
    nan = parse_perplexity_output("[1]nan,[2]-nan,\nFinal estimate: PPL = nan +/- nan\n")
    assert math.isnan(nan["ppl"]) and nan["n_chunks"] == 2


def test_parse_perplexity_output_cut_off_at_exit():
    # unpatched llama.cpp can exit before its logger thread prints the last lines
    no_final = CAPTURED.split("Final estimate")[0]
    r = parse_perplexity_output(no_final)
    assert r["final_line_missing"] and r["ppl"] == 259.0 and math.isnan(r["ppl_stderr"])
    assert not parse_perplexity_output(CAPTURED)["final_line_missing"]
    with pytest.raises(LlamaCppError, match=r"3 of 4 chunks printed"):
        parse_perplexity_output(no_final.replace("[4]259.0000,", ""))


def test_find_llamacpp_honours_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="LLAMA_CPP_DIR"):
        assert find_llamacpp() is None
    assert "no executable llama-perplexity" in lcpp.explain_missing()
    # a flat directory with the three required (fake) binaries is accepted, converter optional
    for name in ("llama-perplexity", "llama-quantize", "llama-imatrix"):
        exe = tmp_path / "build" / "bin" / name
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    found = find_llamacpp()
    assert found is not None and found.bin_dir == tmp_path / "build" / "bin"
    assert found.convert_hf is None and found.tokenize is None


def test_cache_dir_needs_stamp(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("LLAMA4_QUANT_CACHE", str(tmp_path))
    root = lcpp.default_install_dir()
    assert root.parent == tmp_path
    for name in ("llama-perplexity", "llama-quantize", "llama-imatrix"):
        exe = root / "bin" / name
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    assert find_llamacpp() is None  # interrupted build: no stamp
    assert "no completed llama.cpp build" in lcpp.explain_missing()
    (root / lcpp.STAMP_NAME).write_text("done\n")
    assert find_llamacpp() is not None


# ---------------------------------------------------------------------------------------------
# a tiny llama GGUF
# ---------------------------------------------------------------------------------------------

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 128, 2
MERGES = ["t h", "th e", "Ġ the", "Ġ a", "i n", "e r", "Ġ s", "o n"]


def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet: one printable character standing for each byte 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", *_byte_chars(), *(m.replace(" ", "") for m in MERGES)]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    n_vocab, head_dim = len(tokens), N_EMBD // N_HEAD

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)

    def mat(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) == GGUF ne = [cols, rows]
        return (rng.standard_normal((rows, cols)) * 0.3).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(N_HEAD * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(N_EMBD, N_HEAD * head_dim))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(n_vocab, N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_text(path: Path, n_words: int, seed: int = 0) -> Path:
    words = "the a in on of and to is that it was for with as his they at be this from have or by".split()
    words += "river stone quiet lantern morning orchard signal copper winter garden letter harbor".split()
    rnd = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rnd.choice(words))
        if len(line) == 12:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    lines.append(" ".join(line))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    return {
        "gguf": write_tiny_llama_gguf(d / "tiny-llama-f32.gguf"),
        "text": write_text(d / "text.txt", 800),
        "short": write_text(d / "short.txt", 10),
        "dir": d,
    }


# ---------------------------------------------------------------------------------------------
# the real tools
# ---------------------------------------------------------------------------------------------


@pytest.mark.llamacpp
@needs_llamacpp
def test_binaries_run():
    assert LLAMA is not None
    version = LLAMA.version()  # e.g. "version: 0.5.0-dev (build 0, commit 0c1e57098)"
    assert re.match(r"version: \S+", version), version
    if LLAMA.info.get("llama_cpp_commit"):  # built by scripts/build_llamacpp.sh
        assert LLAMA.info["llama_cpp_commit"] in version
    for exe in (LLAMA.imatrix, LLAMA.tokenize):
        if exe is not None:
            proc = lcpp._run([exe, "--version"], what=exe.name, timeout=60)
            assert "version:" in proc.stdout + proc.stderr
    # llama-quantize --help prints usage and exits 1 by design
    proc = lcpp._run([LLAMA.quantize, "--help"], what="llama-quantize --help", timeout=60, ok_codes=(0, 1))
    assert "Q4_K_M" in proc.stdout and "Q8_0" in proc.stdout


@pytest.mark.llamacpp
@needs_llamacpp
def test_run_perplexity_real(tiny):
    ctx = 64
    assert lcpp.count_tokens(tiny["gguf"], tiny["text"], llama=LLAMA) >= 4 * ctx
    r = lcpp.run_perplexity(tiny["gguf"], tiny["text"], ctx=ctx, chunks=3, threads=2, llama=LLAMA)
    assert r["n_chunks"] == 3 and r["n_ctx"] == ctx and r["batch_size"] == ctx
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0 and r["ppl_stderr"] > 0
    assert r["running_ppl"][-1] == pytest.approx(r["ppl"], rel=1e-3)
    geo = math.exp(sum(math.log(p) for p in r["chunk_ppl"]) / len(r["chunk_ppl"]))
    assert geo == pytest.approx(r["ppl"], rel=1e-3)
    # deterministic: the same run gives the same number
    again = lcpp.run_perplexity(tiny["gguf"], tiny["text"], ctx=ctx, chunks=3, llama=LLAMA)
    assert again["ppl"] == pytest.approx(r["ppl"], rel=1e-4)


@pytest.mark.llamacpp
@needs_llamacpp
def test_run_perplexity_text_too_short(tiny):
    with pytest.raises(LlamaCppError, match=r"needs at least 128 \(2 x ctx\)") as info:
        lcpp.run_perplexity(tiny["gguf"], tiny["short"], ctx=64, llama=LLAMA)
    assert "command:" in str(info.value)


@pytest.mark.llamacpp
@needs_llamacpp
def test_imatrix_then_quantize(tiny):
    d = tiny["dir"]
    imat = lcpp.run_imatrix(tiny["gguf"], tiny["text"], d / "imatrix.gguf", ctx=64, chunks=2, llama=LLAMA)
    assert imat.read_bytes()[:4] == b"GGUF"
    import gguf

    reader = gguf.GGUFReader(str(imat))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert any(t.name.endswith(".in_sum2") for t in reader.tensors)

    q8 = lcpp.run_quantize(tiny["gguf"], d / "tiny-q8_0.gguf", "Q8_0", imatrix=imat, llama=LLAMA)
    assert q8.stat().st_size < tiny["gguf"].stat().st_size / 2
    base = lcpp.run_perplexity(tiny["gguf"], tiny["text"], ctx=64, chunks=2, llama=LLAMA)
    quant = lcpp.run_perplexity(q8, tiny["text"], ctx=64, chunks=2, llama=LLAMA)
    assert quant["ppl"] == pytest.approx(base["ppl"], rel=0.02)


@pytest.mark.llamacpp
@needs_llamacpp
def test_run_quantize_failure_is_clear(tiny):
    with pytest.raises(LlamaCppError, match=r"llama-quantize failed \(exit status \d+\)") as info:
        lcpp.run_quantize(tiny["gguf"], tiny["dir"] / "bad.gguf", "NOT_A_TYPE", llama=LLAMA)
    assert "output tail:" in str(info.value)


# ---------------------------------------------------------------------------------------------
# llama.cpp's own HF -> GGUF converter, run with our venv's python
# ---------------------------------------------------------------------------------------------


def write_tiny_hf_llama(d: Path, text_file: Path) -> Path:
    """A random 2-layer LlamaForCausalLM checkpoint (safetensors + config.json) with a sentencepiece
    tokenizer.model trained on *text_file*. Plain llama: the converter's llama4 path insists on the
    real Llama 4 tokenizer (it recognises BPE tokenizers by hash)."""
    import io
    import json

    import sentencepiece as spm
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    n_vocab = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()

    rng = np.random.default_rng(1)
    hd = N_EMBD // N_HEAD

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.3).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    t = {"model.embed_tokens.weight": mat(n_vocab, N_EMBD), "model.norm.weight": ones, "lm_head.weight": mat(n_vocab, N_EMBD)}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ones
        t[p + "post_attention_layernorm.weight"] = ones
        t[p + "self_attn.q_proj.weight"] = mat(N_HEAD * hd, N_EMBD)
        t[p + "self_attn.k_proj.weight"] = mat(N_HEAD_KV * hd, N_EMBD)
        t[p + "self_attn.v_proj.weight"] = mat(N_HEAD_KV * hd, N_EMBD)
        t[p + "self_attn.o_proj.weight"] = mat(N_EMBD, N_HEAD * hd)
        t[p + "mlp.gate_proj.weight"] = mat(N_FF, N_EMBD)
        t[p + "mlp.up_proj.weight"] = mat(N_FF, N_EMBD)
        t[p + "mlp.down_proj.weight"] = mat(N_EMBD, N_FF)
    save_file({k: v.copy() for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": N_EMBD,
        "intermediate_size": N_FF, "num_attention_heads": N_HEAD, "num_hidden_layers": N_LAYER,
        "num_key_value_heads": N_HEAD_KV, "rms_norm_eps": 1e-5, "vocab_size": n_vocab,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return d


@pytest.mark.llamacpp
@pytest.mark.slow
@needs_llamacpp
@pytest.mark.skipif(LLAMA is not None and LLAMA.convert_hf is None, reason="this llama.cpp build has no converter")
def test_run_convert_hf_tiny_llama(tiny):
    pytest.importorskip("sentencepiece", reason="sentencepiece (not a project dependency) trains the tiny tokenizer")
    pytest.importorskip("transformers", reason="llama.cpp's converter imports transformers")
    hf = write_tiny_hf_llama(tiny["dir"] / "hf-tiny-llama", tiny["text"])
    out = lcpp.run_convert_hf(hf, tiny["dir"] / "hf-tiny-llama-bf16.gguf", outtype="bf16", timeout=600, llama=LLAMA)
    import gguf

    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.architecture").contents() == "llama"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.1.ffn_down.weight", "output.weight"}
    r = lcpp.run_perplexity(out, tiny["text"], ctx=64, chunks=2, llama=LLAMA)
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0


@pytest.mark.llamacpp
@needs_llamacpp
def test_run_convert_hf_failure_is_clear(tmp_path):
    if LLAMA is None or LLAMA.convert_hf is None:
        pytest.skip("this llama.cpp build has no converter")
    pytest.importorskip("transformers", reason="llama.cpp's converter imports transformers")
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"]}')
    with pytest.raises(LlamaCppError, match=r"convert_hf_to_gguf.py failed") as info:
        lcpp.run_convert_hf(tmp_path, tmp_path / "x.gguf", llama=LLAMA)
    assert "NoSuchModelForCausalLM" in str(info.value)
