"""A mutated llama4 GGUF never passes with wrong numbers (issue 10).

Tiny valid GGUFs (q8_0, written by our own converter: a Scout-like model with rope_freqs, a Maverick-like one
with dense layers, a split set) are mutated in a few hundred seeded ways: byte flips in the header, metadata and
tensor infos; truncations; metadata values edited in place; tensors dropped, renamed, added, retyped; keys
dropped or retyped; split parts missing or contradicting each other. Each mutated file goes through
`llama4-quant eval` and `llama4-quant inspect` in-process, under a per-case time budget. Allowed outcomes:
a non-zero exit with exactly one `error:` line, or exit 0 with exactly the original file's eval numbers.
Never a traceback, never a hang, never exit 0 with other numbers.

One gap is tolerated and counted (`REFERENCE_ONLY`): a mutation that leaves a *valid* GGUF of a different model
(expert_used_count 1 -> 3 of 4 experts, a mantissa bit of rope.freq_base, rope_freqs dropped) cannot be told
from a real file by the GGUF alone; only the comparison with the reference checkpoint in eval can refuse it.
Named regression tests for the cases of issue 10 come first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import signal
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter

from llama4_quant.cli.main import cli as main_cli
from llama4_quant.errors import CheckpointError
from llama4_quant.formats.gguf.reader import GGUFSource, describe_gguf
from support.convert import gguf as run_gguf_convert

SEED = 20240610
CASE_BUDGET_S = 20  # seconds for one command on one mutated file (they take ~0.1 s)
EVAL_ARGS = ("--ctx", "32", "--chunks", "2", "--json")
NUMBERS = ("perplexity", "nll", "kld_mean", "kld_p99", "kld_max", "top1_agreement")
# Config fields only the reference can vouch for: eval's check_compatible compares them now, so none is tolerated.
REFERENCE_ONLY: set[str] = set()


# ---------------------------------------------------------------------------------------------------------------
# fixtures: tiny models, their GGUFs and the unmutated eval numbers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint
    from llama4_quant.tiny.corpus import corpus_splits
    from llama4_quant.tiny.tokenizer import build_tokenizer, save_tokenizer_files, tokenizer_info

    root = tmp_path_factory.mktemp("gguf-fuzz")
    splits = corpus_splits(0)
    tok = build_tokenizer(splits["train"][:60_000], vocab_size=300)
    info = tokenizer_info(tok)
    text = root / "test.txt"
    text.write_text(splits["test"][:3000])
    out = {"root": root, "text": text}
    for variant in ("scout", "maverick"):
        tc = text_config(variant, vocab_size=info.vocab_size, bos_token_id=info.bos_id, eos_token_id=info.eos_id,
                         pad_token_id=info.pad_id)
        model = write_hf_checkpoint(root / variant, tc)
        save_tokenizer_files(tok, model)
        g = root / "gguf" / variant / f"{variant}.gguf"  # no sidecar travels with the mutants
        g.parent.mkdir(parents=True)
        run_gguf_convert(model, g, scheme="q8_0", method="rtn")
        out[variant] = (model, g)
    split_dir = root / "gguf" / "split"
    split_dir.mkdir()
    run_gguf_convert(out["scout"][0], split_dir / "many.gguf", scheme="q8_0", method="rtn", split_max_size=100_000)
    parts = sorted(split_dir.glob("many-*-of-*.gguf"))
    assert len(parts) > 2
    out["split"] = (out["scout"][0], parts[0])
    out["numbers"] = {}
    with one_thread():
        for k in ("scout", "maverick", "split"):
            model, g = out[k]
            r = invoke("eval", model, g, "--data", text, *EVAL_ARGS)
            assert r.exit_code == 0, r.output
            out["numbers"][k] = numbers(r)
            out["config", k] = GGUFSource(g).config
    assert out["numbers"]["split"] == out["numbers"]["scout"]
    return out


@contextmanager
def one_thread():
    """The tiny forward is ~15x faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def invoke(*args, budget: float = CASE_BUDGET_S):
    """`llama4-quant ARGS` in-process; a run past `budget` seconds ends in a TimeoutError (a failure)."""

    def on_alarm(*_):
        raise TimeoutError(f"{args[0]} ran past {budget} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        return CliRunner().invoke(main_cli, [str(a) for a in args])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def numbers(r) -> tuple:
    c = json.loads(r.stdout)["candidates"][0]
    return tuple(c[k] for k in NUMBERS)


def problem(r) -> str | None:
    """Why a CLI result is not acceptable on any input (None: exit 0, or an exit with one error: line)."""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return "traceback: " + "".join(traceback.format_exception(r.exception))[-1500:]
    if "Traceback" in r.output:
        return "traceback in output: " + r.output[-1500:]
    if r.exit_code == 0:
        return None
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        return f"exit {r.exit_code} with {len(errors)} error: lines: {r.stderr[-800:]!r}"
    return None


def error_line(r) -> str:
    return next((line for line in r.stderr.splitlines() if line.startswith("error:")), "")


def refused(*args) -> str:
    """Run the CLI, assert it refuses with one clean error line, return that line."""
    with one_thread():
        r = invoke(*args)
    assert problem(r) is None, problem(r)
    assert r.exit_code != 0, r.output
    return error_line(r)


# ---------------------------------------------------------------------------------------------------------------
# mutations: each writes a mutated copy and returns the path to give the CLI
# ---------------------------------------------------------------------------------------------------------------


def copy_set(src: Path, dst_dir: Path) -> Path:
    """Copy a GGUF (all parts of a split set) into dst_dir; returns the copy of `src`."""
    from llama4_quant.formats.gguf.reader import split_files

    dst_dir.mkdir(parents=True)
    for f in split_files(src):
        shutil.copy(f, dst_dir / f.name)
    return dst_dir / src.name


def records(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, size) of the fixed header, of every metadata key/value and of every tensor info; data start."""
    r = GGUFReader(path)
    recs = [(0, 24)]
    recs += [(f.offset, sum(int(p.nbytes) for p in f.parts)) for k, f in r.fields.items() if not k.startswith("GGUF.")]
    recs += [(t.field.offset, sum(int(p.nbytes) for p in t.field.parts)) for t in r.tensors]
    return recs, int(r.data_offset)


def flip(path: Path, rng: random.Random, recs, header_end: int) -> str:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.25:
        pos = rng.randrange(header_end)  # anywhere before the data, padding included
    else:
        off, n = rng.choice(recs)  # one record, so that short keys get as many hits as the token list
        pos = off + rng.randrange(n)
    old = data[pos]
    data[pos] = old ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"byte {pos}: {old:#04x} -> {data[pos]:#04x}"


def truncate(path: Path, n: int) -> str:
    with open(path, "r+b") as f:
        f.truncate(n)
    return f"truncated to {n} bytes"


def edit_key(path: Path, key: str, value) -> str:
    """Overwrite a scalar metadata value in place (same type, so the layout stays intact)."""
    r = GGUFReader(path, "r+")
    f = r.fields[key]
    f.parts[f.data[0]][0] = value
    r.data.flush()
    del r
    return f"{key} = {value}"


def edit_tensor(path: Path, name: str, part: str, value) -> str:
    """Overwrite one field of a tensor info in place: dims (a list), dim0, type or offset."""
    r = GGUFReader(path, "r+")
    t = next(t for t in r.tensors if t.name == name)
    if part == "dims":
        t.field.parts[3][:] = value
    else:
        t.field.parts[{"dim0": 3, "type": 4, "offset": 5}[part]][0] = value
    r.data.flush()
    del r
    return f"{name} {part} = {value}"


def rename_in_place(path: Path, name: str, new: str) -> str:
    assert len(new) == len(name)
    r = GGUFReader(path, "r+")
    t = next(t for t in r.tensors if t.name == name)
    t.field.parts[1][:] = np.frombuffer(new.encode(), dtype=np.uint8)
    r.data.flush()
    del r
    return f"{name} renamed {new} in place"


def rewrite(src: Path, dst: Path, kv=None, tensors=None) -> None:
    """Write src again through gguf-py's GGUFWriter, after `kv(list)` / `tensors(list)` edit the lists of
    (key, value, type, sub_type) and (name, array, ggml type)."""
    r = GGUFReader(src)
    fields = [(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == V.ARRAY else None)
              for k, f in r.fields.items() if not k.startswith("GGUF.")]
    ts = [(t.name, np.asarray(t.data), T(int(t.tensor_type))) for t in r.tensors]
    fields = kv(fields) if kv else fields
    ts = tensors(ts) if tensors else ts
    arch = next((v for k, v, *_ in fields if k == "general.architecture"), None)
    w = GGUFWriter(dst, arch) if arch is not None else GGUFWriter(dst, "llama4")
    if arch is None:
        w.kv_data[0].pop("general.architecture", None)
    for k, v, typ, sub in fields:
        if k != "general.architecture":
            w.add_key_value(k, v, typ, sub)
    for name, a, qt in ts:
        w.add_tensor(name, a, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del r


def drop_tensor(name):
    return lambda ts: [t for t in ts if t[0] != name]


def rename_tensor(name, new):
    return lambda ts: [(new if n == name else n, a, q) for n, a, q in ts]


def add_tensor(like, new):
    return lambda ts: ts + [(new, a, q) for n, a, q in ts if n == like]


def retype_tensor(name, qt):
    """Store tensor `name` as F16 or F32 (its values decoded and re-encoded)."""
    from gguf.quants import dequantize

    def f(ts):
        out = []
        for n, a, q in ts:
            if n == name:
                v = np.asarray(dequantize(a, q), dtype=np.float32) if q not in (T.F32, T.F16) else a.astype(np.float32)
                a, q = v.astype(np.float16 if qt == T.F16 else np.float32), qt
            out.append((n, a, q))
        return out

    return f


def drop_key(key):
    return lambda kv: [x for x in kv if x[0] != key]


def set_key(key, value, typ, sub=None):
    return lambda kv: [x for x in kv if x[0] != key] + [(key, value, typ, sub)]


def shorten_tokens(delta):
    def f(kv):
        out = []
        for k, v, t, s in kv:
            if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                v = v[:delta] if delta < 0 else v + v[:delta]
            out.append((k, v, t, s))
        return out

    return f


# ---------------------------------------------------------------------------------------------------------------
# regression tests: the cases issue 10 names, and the checks one by one
# ---------------------------------------------------------------------------------------------------------------


def _mutant(base, tmp_path, kind="scout"):
    return copy_set(base[kind][1], tmp_path / "m")


def _eval(base, path, kind="scout"):
    return ("eval", base[kind][0], path, "--data", base["text"], *EVAL_ARGS)


@pytest.mark.parametrize("value", [0, 5, 99, 2**32 - 1])
def test_expert_used_count_out_of_range(base, tmp_path, value):
    p = _mutant(base, tmp_path)
    edit_key(p, "llama4.expert_used_count", value)
    for args in (_eval(base, p), ("inspect", p)):
        msg = refused(*args)
        assert "llama4.expert_used_count" in msg and str(value) in msg, msg


def test_block_count_beyond_the_tensors(base, tmp_path):
    p = _mutant(base, tmp_path)
    edit_key(p, "llama4.block_count", 5)
    msg = refused("inspect", p)
    assert "no tensor blk.4." in msg and "block_count 5" in msg, msg
    assert "no tensor blk.4." in refused(*_eval(base, p))
    edit_key(p, "llama4.block_count", 3)
    assert "unexpected tensor blk.3." in refused("inspect", p)


def test_dropped_output_weight(base, tmp_path, cli):
    p = tmp_path / "m.gguf"
    rewrite(base["scout"][1], p, tensors=drop_tensor("output.weight"))
    assert "no tensor output.weight" in refused("inspect", p)
    assert "no tensor output.weight" in refused(*_eval(base, p))
    proc = cli("inspect", str(p))  # a real process, once
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "no tensor output.weight" in proc.stderr


@pytest.mark.parametrize("key,value", [("llama4.rope.freq_base", 0.0), ("llama4.rope.freq_base", float("nan")),
                                       ("llama4.rope.freq_base", -1.0), ("llama4.rope.freq_base", float("inf")),
                                       ("llama4.attention.layer_norm_rms_epsilon", float("nan")),
                                       ("llama4.attention.layer_norm_rms_epsilon", 0.0),
                                       ("llama4.attention.layer_norm_rms_epsilon", 1.0)])
def test_bad_floats(base, tmp_path, key, value):
    p = _mutant(base, tmp_path)
    edit_key(p, key, value)
    for args in (_eval(base, p), ("inspect", p)):
        msg = refused(*args)
        assert key in msg and "finite" in msg, msg


def test_freq_base_zero_in_a_real_process(base, tmp_path, cli):
    p = _mutant(base, tmp_path)
    edit_key(p, "llama4.rope.freq_base", 0.0)
    proc = cli(*[str(a) for a in _eval(base, p)][:-1])
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "llama4.rope.freq_base is 0.0" in proc.stderr and "PPL" not in proc.stdout


@pytest.mark.parametrize("key,value,want", [
    ("llama4.vocab_size", 392, "tokenizer.ggml.tokens has 393 tokens"),
    ("llama4.vocab_size", 1 << 23, "llama4.vocab_size is 8388608, must be in 1..1048576"),
    ("llama4.block_count", 2**31, "llama4.block_count is 2147483648, must be in 1..1024"),
    ("llama4.block_count", 0, "llama4.block_count is 0"),
    ("llama4.embedding_length", 1 << 20, "llama4.embedding_length is 1048576"),
    ("llama4.attention.head_count_kv", 3, "not a multiple of head_count_kv 3"),
    ("llama4.attention.key_length", 32, "one even head size"),
    ("llama4.expert_count", 0, "llama4.expert_count is 0"),
    ("llama4.interleave_moe_layer_step", 0, "llama4.interleave_moe_layer_step is 0"),
    ("llama4.interleave_moe_layer_step", 5, "more than block_count 4"),
    ("llama4.expert_feed_forward_length", 64, "tensor blk.0.ffn_gate_shexp.weight has shape [96, 64], the metadata implies [64, 64]"),
    ("tokenizer.ggml.bos_token_id", 393, "tokenizer.ggml.bos_token_id is 393, outside the vocabulary"),
    ("tokenizer.ggml.eos_token_id", 2**32 - 1, "tokenizer.ggml.eos_token_id is 4294967295"),
])
def test_metadata_values(base, tmp_path, key, value, want):
    p = _mutant(base, tmp_path)
    edit_key(p, key, value)
    msg = refused("inspect", p)
    assert want in msg, msg


@pytest.mark.parametrize("kv,want", [
    (drop_key("llama4.expert_used_count"), "lacks llama4.expert_used_count"),
    (drop_key("llama4.rope.freq_base"), "lacks llama4.rope.freq_base"),
    (drop_key("tokenizer.ggml.tokens"), "GGUF has no tokenizer.ggml.tokens list of strings"),
    (drop_key("general.architecture"), "lacks general.architecture"),
    (set_key("llama4.block_count", 4, V.UINT64), "llama4.block_count has type UINT64, llama.cpp reads it as UINT32"),
    (set_key("llama4.block_count", "4", V.STRING), "llama4.block_count has type STRING"),
    (set_key("llama4.rope.freq_base", 500000.0, V.FLOAT64), "has type FLOAT64"),
    (set_key("general.architecture", "llama", V.STRING), "architecture is 'llama'"),
    (shorten_tokens(-1), "tokenizer.ggml.tokens has 392 tokens, llama4.vocab_size is 393"),
])
def test_keys(base, tmp_path, kv, want):
    p = tmp_path / "m.gguf"
    rewrite(base["scout"][1], p, kv=kv)
    assert want in refused("inspect", p)


@pytest.mark.parametrize("edit,want", [
    (drop_tensor("blk.2.attn_k.weight"), "no tensor blk.2.attn_k.weight"),
    (rename_tensor("blk.0.attn_q.weight", "blk.0.attn_qq.weight"), "no tensor blk.0.attn_q.weight"),
    (add_tensor("blk.0.attn_norm.weight", "blk.9.attn_norm.weight"), "unexpected tensor blk.9.attn_norm.weight"),
    (add_tensor("output.weight", "lm_head.weight"), "unexpected tensor lm_head.weight"),
    (retype_tensor("blk.1.ffn_norm.weight", T.F16), "blk.1.ffn_norm.weight is F16; llama.cpp keeps it F32"),
    (retype_tensor("blk.1.ffn_gate_inp.weight", T.F16), "blk.1.ffn_gate_inp.weight is F16"),
])
def test_tensor_set(base, tmp_path, edit, want):
    p = tmp_path / "m.gguf"
    rewrite(base["scout"][1], p, tensors=edit)
    assert want in refused("inspect", p)


def test_tensor_infos(base, tmp_path):
    src = base["scout"][1]
    cases = [("blk.0.attn_k.weight", "dims", [32, 64], "blk.0.attn_k.weight has shape [64, 32], the metadata implies [32, 64]"),
             ("blk.0.attn_q.weight", "dim0", 96, "tensor blk.0.attn_k.weight has data offset"),
             ("blk.0.attn_q.weight", "dim0", 50, "rows of 50 are not a whole number of Q8_0 blocks (32)"),
             ("blk.0.attn_q.weight", "type", 99, "GGML type 99"),
             ("blk.0.attn_q.weight", "type", int(T.I32), "GGML type I32, not a weight type"),
             ("blk.0.attn_q.weight", "type", int(T.Q4_0), "has data offset"),
             ("blk.0.attn_k.weight", "offset", 2**40, "has data offset 1099511627776, expected"),
             ("blk.0.attn_k.weight", "offset", 0, "has data offset 0, expected")]
    for i, (name, part, value, want) in enumerate(cases):
        p = copy_set(src, tmp_path / str(i))
        edit_tensor(p, name, part, value)
        assert want in refused("inspect", p), (name, part, value)
    p = copy_set(src, tmp_path / "dup")
    rename_in_place(p, "blk.1.attn_q.weight", "blk.0.attn_q.weight")
    assert "duplicated tensor" in refused("inspect", p)


def test_rope_freqs(base, tmp_path):
    src = base["scout"][1]
    for i, bad in enumerate((np.nan, 0.0, -1.0, np.inf)):
        p = copy_set(src, tmp_path / str(i))
        r = GGUFReader(p, "r+")
        t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
        t.data[2] = bad
        r.data.flush()
        del r
        assert "rope_freqs.weight holds non-finite or non-positive values" in refused("inspect", p)
    p = tmp_path / "short.gguf"
    rewrite(src, p, tensors=lambda ts: [(n, a[:4] if n == "rope_freqs.weight" else a, q) for n, a, q in ts])
    assert "tensor rope_freqs.weight has shape [4], the metadata implies [8]" in refused("inspect", p)
    p = tmp_path / "f16.gguf"
    rewrite(src, p, tensors=retype_tensor("rope_freqs.weight", T.F16))
    assert "tensor rope_freqs.weight is F16; llama.cpp keeps it F32" in refused("inspect", p)


def test_not_a_gguf(base, tmp_path):
    rng = random.Random(SEED)
    cases = {"random.gguf": bytes(rng.randrange(256) for _ in range(5000)), "empty.gguf": b"", "three.gguf": b"GGU",
             "text.gguf": b"hello world\n" * 100, "magic-only.gguf": b"GGUF\x03\x00\x00\x00"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        msg = refused("inspect", p)
        assert "not a readable GGUF file" in msg, msg
        assert "not a readable GGUF file" in refused(*_eval(base, p))
    src = base["scout"][1]
    size = src.stat().st_size
    for n in (100, records(src)[1] - 5, records(src)[1] + 100, size - 1):
        p = copy_set(src, tmp_path / f"cut{n}")
        truncate(p, n)
        msg = refused("inspect", p)
        assert "truncated" in msg, msg


def test_huge_array_length_does_not_hang(base, tmp_path):
    """gguf-py loops over a metadata array's claimed length, past the end of the file (forever, in effect)."""
    p = _mutant(base, tmp_path)
    r = GGUFReader(p, "r+")
    f = r.fields["tokenizer.ggml.token_type"]
    f.parts[4][0] = 2**60  # [key length, key, value type, item type, length, items...]
    r.data.flush()
    del r
    t = time.monotonic()
    assert "claims 1152921504606846976 elements" in refused("inspect", p)
    assert time.monotonic() - t < 5


def test_split_sets(base, tmp_path):
    first = base["split"][1]
    parts = sorted(first.parent.glob("many-*.gguf"))
    n = len(parts)
    p = copy_set(first, tmp_path / "missing")
    (p.parent / parts[2].name).unlink()
    assert f"split GGUF is missing {parts[2].name}" in refused("inspect", p)
    p = copy_set(first, tmp_path / "no")
    edit_key(p.parent / parts[1].name, "split.no", 2)
    assert "split keys say part 2 of" in refused("inspect", p)
    p = copy_set(first, tmp_path / "count")
    edit_key(p.parent / parts[2].name, "split.count", n + 1)
    assert f"split keys say part 2 of {n + 1}" in refused("inspect", p)
    p = copy_set(first, tmp_path / "tensors")
    edit_key(p, "split.tensors.count", 7)
    assert "split.tensors.count is 7" in refused("inspect", p)
    p = copy_set(first, tmp_path / "twice")
    t0 = GGUFReader(parts[1]).tensors[0]
    rewrite(parts[2], p.parent / parts[2].name, tensors=lambda ts: ts + [(t0.name, np.asarray(t0.data), T(int(t0.tensor_type)))])
    assert f"tensor {t0.name} is in both" in refused("inspect", p)
    p = copy_set(first, tmp_path / "cut")
    truncate(p.parent / parts[-1].name, parts[-1].stat().st_size - 10)
    assert "truncated" in refused("inspect", p)
    # a lone file that says it is one part of several
    lone = tmp_path / "lone.gguf"
    shutil.copy(first, lone)
    assert f"split keys say part 0 of {n}, but it is part 0 of 1" in refused("inspect", lone)


def test_valid_rewrites_still_open(base, tmp_path):
    """Not too strict: tensor order, an extra key, dropped optional keys, a weight stored as F32 are fine."""
    src = base["scout"][1]
    for i, (kv, ts) in enumerate([(None, lambda t: t[::-1]),
                                  (set_key("llama4.unused", 1, V.UINT32), None),
                                  (drop_key("tokenizer.ggml.bos_token_id"), None),
                                  (None, retype_tensor("blk.0.attn_q.weight", T.F32))]):
        p = tmp_path / f"ok{i}.gguf"
        rewrite(src, p, kv=kv, tensors=ts)
        assert describe_gguf(p)["llama_cpp_runs"]["layers"] == 4
        with one_thread():
            r = invoke(*_eval(base, p))
        assert r.exit_code == 0, r.output
        assert numbers(r) == base["numbers"]["scout"]


def test_in_range_change_is_refused_by_eval(base, tmp_path):
    p = _mutant(base, tmp_path)
    edit_key(p, "llama4.expert_used_count", 3)
    refused(*_eval(base, p))


def test_gguf_source_raises_checkpoint_error(base, tmp_path):
    p = _mutant(base, tmp_path)
    edit_key(p, "llama4.expert_used_count", 0)
    with pytest.raises(CheckpointError, match="expert_used_count is 0"):
        GGUFSource(p)


# ---------------------------------------------------------------------------------------------------------------
# the fuzzer
# ---------------------------------------------------------------------------------------------------------------


def mutations(base, rng: random.Random):
    """(kind, label, make(dir) -> path), seeded."""
    out = []
    for kind, n_flips in (("scout", 150), ("maverick", 40), ("split", 20)):
        src = base[kind][1]
        files = sorted(src.parent.glob("many-*.gguf")) if kind == "split" else [src]
        recs = [records(f) for f in files]
        for i in range(n_flips):
            part, s = rng.randrange(len(files)), rng.random()

            def make(d, part=part, s=s, kind=kind, files=files, recs=recs):
                p = copy_set(base[kind][1], d)
                return p, flip(p.parent / files[part].name, random.Random(s), *recs[part])

            out.append((kind, f"flip #{i}", make))
    src = base["scout"][1]
    size, end = src.stat().st_size, records(src)[1]
    cuts = [0, 3, 4, 23, 24, end - 1, end, end + 1, size - 1] + [rng.randrange(end) for _ in range(12)] + \
        [rng.randrange(end, size) for _ in range(12)]
    for n in cuts:
        out.append(("scout", f"cut {n}", lambda d, n=n: (p := copy_set(src, d), truncate(p, n))))
    edits = {
        "llama4.expert_used_count": [0, 2, 3, 4, 5, 99, 2**32 - 1],
        "llama4.expert_count": [0, 1, 3, 5, 99],
        "llama4.block_count": [0, 3, 5, 1025, 2**31],
        "llama4.embedding_length": [0, 63, 65, 2**20],
        "llama4.attention.head_count": [0, 2, 8, 2**30],
        "llama4.attention.head_count_kv": [0, 1, 3, 4, 5],
        "llama4.attention.key_length": [0, 8, 15, 32],
        "llama4.attention.value_length": [8, 32],
        "llama4.rope.dimension_count": [0, 8],
        "llama4.feed_forward_length": [0, 2**21, 100],
        "llama4.expert_feed_forward_length": [0, 64, 2**21],
        "llama4.interleave_moe_layer_step": [0, 2, 5],
        "llama4.vocab_size": [0, 392, 394, 2**23],
        "llama4.context_length": [0, 1, 2**32 - 1],
        "llama4.rope.freq_base": [0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-30],
        "llama4.attention.layer_norm_rms_epsilon": [float("nan"), 0.0, -1.0, 1.0, float("inf"), 1e-6],
        "tokenizer.ggml.bos_token_id": [393, 2**32 - 1, 0],
        "tokenizer.ggml.eos_token_id": [393],
        "GGUF.tensor_count": [0, 1, 1000],
        "GGUF.kv_count": [0, 5, 10**6],
    }
    for key, values in edits.items():
        for v in values:
            out.append(("scout", f"{key}={v}", lambda d, key=key, v=v: (p := copy_set(src, d), edit_key(p, key, v))))
    for key, values in {"llama4.interleave_moe_layer_step": [1, 3, 4], "llama4.expert_count": [4, 16]}.items():
        for v in values:
            msrc = base["maverick"][1]
            out.append(("maverick", f"{key}={v}", lambda d, key=key, v=v, msrc=msrc: (p := copy_set(msrc, d), edit_key(p, key, v))))
    names = [t.name for t in GGUFReader(src).tensors]
    f32_only = [n for n in names if n.endswith(("norm.weight", "ffn_gate_inp.weight", "rope_freqs.weight"))]
    keys = [k for k in GGUFReader(src).fields if not k.startswith("GGUF.")]
    for _ in range(30):
        op = rng.choice(["drop", "rename", "add", "f16", "f32", "dropkey", "retype"])
        name = rng.choice(f32_only if op == "f16" else names)  # F16 is lossy: only where F32 is required
        if op == "drop":
            lbl, kv, ts = f"drop {name}", None, drop_tensor(name)
        elif op == "rename":
            new = rng.choice([name.replace(".weight", ".bias"), name.replace("blk.1.", "blk.7."), "x" + name])
            lbl, kv, ts = f"rename {name} {new}", None, rename_tensor(name, new)
        elif op == "add":
            new = rng.choice(["blk.4." + name.split(".", 2)[-1], name + "2"])
            lbl, kv, ts = f"add {new}", None, add_tensor(name, new)
        elif op in ("f16", "f32"):
            lbl, kv, ts = f"{name} as {op}", None, retype_tensor(name, T.F16 if op == "f16" else T.F32)
        elif op == "dropkey":
            key = rng.choice(keys)
            lbl, kv, ts = f"drop key {key}", drop_key(key), None
        else:
            key = rng.choice([k for k in keys if k.startswith("llama4.")])
            typ = rng.choice([V.UINT64, V.INT32, V.FLOAT32, V.UINT16])
            val = 1.0 if typ == V.FLOAT32 else 4
            lbl, kv, ts = f"{key} as {typ.name}", set_key(key, val, typ), None

        def make(d, kv=kv, ts=ts, lbl=lbl):
            d.mkdir(parents=True)
            p = d / "m.gguf"
            rewrite(src, p, kv=kv, tensors=ts)
            return p, lbl

        out.append(("scout", lbl, make))
    out.append(("scout", "tokens +1", lambda d: (d.mkdir(parents=True), rewrite(src, d / "m.gguf", kv=shorten_tokens(1)), d / "m.gguf")[2]))
    return out


def test_fuzz(base, tmp_path):
    rng = random.Random(SEED)
    cases = mutations(base, rng)
    assert len(cases) >= 300
    stats, problems, gaps, examples = Counter(), [], [], {}
    t0 = time.monotonic()
    with one_thread():
        for i, (kind, label, make) in enumerate(cases):
            made = make(tmp_path / f"c{i}")
            path, what = made if isinstance(made, tuple) else (made, label)
            desc = f"[{kind} {label}: {what if isinstance(what, str) else label}]"
            try:
                ev = invoke("eval", base[kind][0], path, "--data", base["text"], *EVAL_ARGS)
                ins = invoke("inspect", path, "--json")
                outcome(base, kind, path, desc, ev, ins, stats, problems, gaps, examples)
            finally:
                shutil.rmtree(tmp_path / f"c{i}", ignore_errors=True)
    elapsed = time.monotonic() - t0
    print(f"\nGGUF fuzz: {len(cases)} mutations in {elapsed:.1f} s: {dict(stats)}; problems {len(problems)}")
    print(f"  {len(examples)} distinct errors, e.g.", *sorted(examples.values())[:: max(1, len(examples) // 8)], sep="\n    ")
    for g in gaps:
        print("  reference-only:", g)
    assert not problems, "\n".join(problems[:20])
    assert stats["rejected"] > len(cases) // 2


def outcome(base, kind, path, desc, ev, ins, stats, problems, gaps, examples) -> None:
    """Classify one mutant's eval and inspect results (see the module docstring)."""
    bad = problem(ev) or problem(ins)
    if bad:
        problems.append(f"{desc} {bad}")
        return
    if ev.exit_code != 0:
        stats["rejected"] += 1
        msg = error_line(ev).split(": ", 2)[-1]
        examples.setdefault(msg[:40], f"{desc} -> {msg}")
        if ins.exit_code == 0:
            stats["inspect accepts, eval refuses"] += 1
        return
    if ins.exit_code != 0:
        problems.append(f"{desc} eval accepts but inspect refuses: {error_line(ins)}")
    if numbers(ev) == base["numbers"][kind]:
        stats["exit 0, identical numbers"] += 1
        return
    cfg, ref = GGUFSource(path).config, base["config", kind]
    diff = {f.name for f in dataclasses.fields(ref) if getattr(cfg, f.name) != getattr(ref, f.name)}
    if diff and diff <= REFERENCE_ONLY and all(math.isfinite(x) for x in numbers(ev)):
        stats["exit 0, valid GGUF of another model (reference-only)"] += 1
        gaps.append(f"{desc} differs in {sorted(diff)}")
    else:
        problems.append(f"{desc} exit 0 with numbers {numbers(ev)} != {base['numbers'][kind]} (config diff {diff})")
